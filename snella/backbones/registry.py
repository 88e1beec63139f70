"""Backbones by name: any timm architecture, the project's own Fashion-MNIST ViT, and "hf:<folder>" models."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from snella.backbones.weights import load_weights

FMNIST_ARCH = "vit_fmnist_d128"
SNELLA_DEFAULT = "snella-default"
HF_PREFIX = "hf:"
# Written by `snella pretrain`; shipped with the package once it exists.
SNELLA_DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / f"{FMNIST_ARCH}.safetensors"

# register_model reads this module-level dict to give the architecture its pretrained_cfg,
# which is what timm.data.resolve_data_config (and so data_config below) reads.
default_cfgs = {
    FMNIST_ARCH: {
        "num_classes": 10,
        "input_size": (3, 28, 28),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
    }
}


@register_model
def vit_fmnist_d128(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT for 28 px images: patch 7 (16 tokens), width 128, depth 6, 4 heads (1.2M parameters).

    Its weights come from `snella pretrain` on Fashion-MNIST, loaded with `create_backbone("snella-default", ...)`.
    """
    model_args = dict(img_size=28, patch_size=7, in_chans=3, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0)
    return build_model_with_cfg(
        VisionTransformer, FMNIST_ARCH, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        **dict(model_args, **kwargs),
    )


class HFImageClassifier(nn.Module):
    """A transformers image classifier whose forward returns the logits tensor instead of a ModelOutput.

    The transformers model is the submodule `model`, so its modules are named "model.vit.layers.0...".
    `pretrained_cfg` holds what the folder says about inputs (size, mean, std), in timm's keys.
    """

    def __init__(self, model: nn.Module, pretrained_cfg: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.pretrained_cfg = pretrained_cfg
        self.num_classes: int = model.config.num_labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits  # (B, C, H, W) -> (B, num_classes)


def create_backbone(
    name: str,
    num_classes: int,
    weights: str | Path | None = None,
    pretrained: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    """Build a classification model by name, optionally with pretrained weights from a file or the hub.

    Args:
        name: A timm architecture (`timm.list_models()`), "vit_fmnist_d128", "snella-default" (that
            architecture with the weights in snella/assets/), or "hf:<folder>" for a Hugging Face
            transformers image-classification folder (config.json + weights; a hub id also works online).
        num_classes: Number of classes of the new classification head.
        weights: A weight file (.npz, .pth/.pt/.bin, .safetensors) loaded with `load_weights`; a head
            of another class count in it is dropped and the new head kept. Overrides the weights of
            "snella-default".
        pretrained: Download timm's default weights for `name` (needs network). For
            "vit_fmnist_d128" it means the snella-default weights.
        **model_kwargs: Passed to `timm.create_model` (e.g. img_size=32, depth=2, drop_path_rate=0.1)
            or to transformers' `from_pretrained` for "hf:" names.

    Returns:
        The model, in train mode as built.

    Raises:
        ValueError: Unknown name (with close matches), num_classes < 1, or both pretrained and weights.
        FileNotFoundError: A missing weight file or missing snella-default weights.
        RuntimeError: pretrained=True and timm's weights could not be downloaded.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if pretrained and weights is not None:
        raise ValueError(f"pass either pretrained=True or weights={str(weights)!r}, not both")

    if name.startswith(HF_PREFIX):
        # The folder's own weights always load; `weights` can still override them below.
        model = _create_hf(name[len(HF_PREFIX):], num_classes, **model_kwargs)
    elif name == SNELLA_DEFAULT or (name == FMNIST_ARCH and pretrained):
        model = timm.create_model(FMNIST_ARCH, num_classes=num_classes, **model_kwargs)
        if weights is None:
            weights = _snella_default_weights()
    else:
        _check_timm_name(name)
        model = _create_timm(name, num_classes, pretrained, **model_kwargs)

    if weights is not None:
        load_weights(model, weights)
    return model


def data_config(model: nn.Module) -> dict[str, Any]:
    """Input preprocessing the model expects, resolved with `timm.data.resolve_data_config`.

    Args:
        model: A model from `create_backbone` (or any timm model).

    Returns:
        Dict with input_size (C, H, W), mean, std, interpolation, crop_pct and crop_mode.
    """
    cfg = dict(resolve_data_config(model=model))
    # A model built with another img_size / in_chans keeps the pretrained_cfg of its architecture;
    # its patch embedding knows the size it really takes.
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    proj = getattr(patch_embed, "proj", None)
    channels = getattr(proj, "in_channels", cfg["input_size"][0])
    height, width = img_size if img_size is not None else cfg["input_size"][1:]
    cfg["input_size"] = (int(channels), int(height), int(width))
    for key in ("mean", "std"):
        stats = tuple(float(s) for s in cfg[key])
        if len(stats) != channels:  # e.g. a 3-channel pretrained_cfg on a model built with in_chans=1
            stats = (sum(stats) / len(stats),) * channels
        cfg[key] = stats
    return cfg


def _check_timm_name(name: str) -> None:
    """Raise a ValueError listing up to 10 close timm names when `name` is not a timm architecture."""
    if timm.is_model(name):
        return
    known = timm.list_models()
    close = difflib.get_close_matches(name, known, n=10, cutoff=0.6)
    if len(close) < 10:  # substring hits catch short names ("deit") that difflib scores low
        close += [m for m in known if name.lower() in m and m not in close][: 10 - len(close)]
    hint = f"close matches: {', '.join(close)}" if close else "no close match"
    raise ValueError(
        f"unknown model {name!r} ({hint}). Accepted: any name in timm.list_models(), "
        f"{FMNIST_ARCH!r}, {SNELLA_DEFAULT!r}, or 'hf:<folder>' for a Hugging Face model folder."
    )


def _create_timm(name: str, num_classes: int, pretrained: bool, **model_kwargs: Any) -> nn.Module:
    """timm.create_model, turning a failed hub download into a RuntimeError that points at --weights."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
    except OSError as err:  # huggingface_hub and requests report offline failures as OSError subclasses
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not download pretrained weights for {name!r} ({type(err).__name__}: {err}). "
            "Without network, pass the weights as a file instead: --weights FILE (.npz, .pth, .safetensors)."
        ) from err


def _snella_default_weights() -> Path:
    """The path of the snella-default weights, or a FileNotFoundError saying how to make them."""
    if not SNELLA_DEFAULT_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"{SNELLA_DEFAULT!r} needs {SNELLA_DEFAULT_WEIGHTS}, which does not exist yet: it is written by "
            f"`snella pretrain` (a {FMNIST_ARCH} trained on Fashion-MNIST). Run that first, or use "
            f"--model {FMNIST_ARCH} --weights FILE."
        )
    return SNELLA_DEFAULT_WEIGHTS


def _create_hf(folder: str, num_classes: int, **kwargs: Any) -> HFImageClassifier:
    """Load a transformers image classifier from `folder` with a new head of `num_classes`."""
    from transformers import AutoModelForImageClassification  # heavy import, only for hf: models

    path = Path(folder).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder: it has no config.json")
    labels = {i: f"LABEL_{i}" for i in range(num_classes)}  # a consistent map avoids a size warning
    try:
        model = AutoModelForImageClassification.from_pretrained(
            str(path) if path.exists() else folder,
            num_labels=num_classes,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
            ignore_mismatched_sizes=True,
            **kwargs,
        )
    except OSError as err:
        if path.exists():
            raise
        raise FileNotFoundError(
            f"no folder {folder!r}, and it could not be fetched as a Hugging Face hub id ({err}). "
            "Pass 'hf:<folder>' with a local folder holding config.json and the weights."
        ) from err
    return HFImageClassifier(model, _hf_pretrained_cfg(model, path))


def _hf_pretrained_cfg(model: nn.Module, folder: Path) -> dict[str, Any]:
    """timm-style pretrained_cfg from a transformers config and the folder's preprocessor_config.json."""
    config = model.config
    proc_file = folder / "preprocessor_config.json"
    proc = json.loads(proc_file.read_text()) if proc_file.is_file() else {}
    size = getattr(config, "image_size", None) or proc.get("size") or 224
    if isinstance(size, dict):  # processors store {"height", "width"} or {"shortest_edge"}
        size = (size.get("height", size.get("shortest_edge", 224)), size.get("width", size.get("shortest_edge", 224)))
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    # PIL resample codes as processors store them
    interpolation = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(proc.get("resample"), "bicubic")
    heads = tuple(f"model.{n}" for n, _ in model.named_children() if "classifier" in n)
    return {
        "input_size": (getattr(config, "num_channels", 3), height, width),
        "mean": tuple(proc.get("image_mean", IMAGENET_DEFAULT_MEAN)),
        "std": tuple(proc.get("image_std", IMAGENET_DEFAULT_STD)),
        "interpolation": interpolation,
        "crop_pct": proc.get("crop_pct") or 1.0,  # ViT-style processors resize to the size, no crop
        "classifier": heads if len(heads) != 1 else heads[0],
        "num_classes": config.num_labels,
    }
