"""Hugging Face segmenters from a local folder: SegFormer, and SAM run prompt-free (one mask per image)."""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

HF_TYPES = ("segformer", "sam")


class HFSegformer(nn.Module):
    """``SegformerForSemanticSegmentation`` as ``model``: images ``(B, 3, H, W)`` -> logits ``(B, C, H, W)``.

    SegFormer predicts at 1/4 of the input; the logits are upsampled bilinearly, as its own post-processing
    does. SNELLA adapts the Mix Transformer encoder; ``model.decode_head`` trains in full.
    """

    modules_to_save = ["model.decode_head"]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes = model.config.num_labels

    def forward(self, images: Tensor) -> Tensor:
        logits = self.model(pixel_values=images).logits  # (B, C, H/4, W/4)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


class HFSam(nn.Module):
    """``SamModel`` as ``model``, prompt-free as the SAMed / GPS recipes run it: no points or boxes, one mask per
    image. Images ``(B, 3, H, W)`` are resized to the encoder's input size when they differ; the low-resolution
    mask logits are upsampled back to ``(B, 1, H, W)``. SNELLA adapts the image encoder; ``model.mask_decoder``
    trains in full (the prompt encoder, which gives the no-prompt embedding, stays frozen).
    """

    modules_to_save = ["model.mask_decoder"]
    num_classes = 1

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.image_size = int(model.config.vision_config.image_size)

    def forward(self, images: Tensor) -> Tensor:
        size = images.shape[-2:]
        if tuple(size) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)  # (B, 3, S, S)
        masks = self.model(pixel_values=images, multimask_output=False).pred_masks  # (B, 1, 1, s, s)
        return F.interpolate(masks[:, 0], size=size, mode="bilinear", align_corners=False)  # (B, 1, H, W)


def model_type(folder: str | Path) -> str:
    """The ``model_type`` of a Hugging Face folder's config.json (a FileNotFoundError/ValueError says what is wrong)."""
    config = Path(folder).expanduser() / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    kind = json.loads(config.read_text()).get("model_type")
    if kind not in HF_TYPES:
        raise ValueError(f"{folder}: model_type {kind!r} is not a segmenter snella builds; accepted: {', '.join(HF_TYPES)}")
    return kind


def load_hf_segmenter(folder: str | Path, num_classes: int) -> nn.Module:
    """A SegFormer (new head of ``num_classes`` logit channels) or a SAM (``num_classes`` must be 1) from ``folder``."""
    kind = model_type(folder)
    if kind == "sam":
        from transformers import SamModel

        if num_classes != 1:
            raise ValueError(f"prompt-free SAM gives one mask per image: use num_classes=1 (a binary task), got "
                             f"{num_classes}")
        return HFSam(SamModel.from_pretrained(str(folder)))
    from transformers import SegformerForSemanticSegmentation

    labels = {i: f"LABEL_{i}" for i in range(num_classes)}
    model = SegformerForSemanticSegmentation.from_pretrained(
        str(folder), num_labels=num_classes, id2label=labels, label2id={v: k for k, v in labels.items()},
        ignore_mismatched_sizes=True)
    return HFSegformer(model)
