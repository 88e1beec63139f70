"""What training does with BatchNorm's running statistics: keep the pretrained ones, or re-estimate them.

A frozen BatchNorm in ``train()`` mode still normalises with each batch's statistics and overwrites
its running mean and variance with the task's. On small transfer tasks that re-estimation, not the
adapter, moved EfficientNet-Lite0's features by 50-170% and cost every method 10-40 points of val
accuracy (docs/convnet-diagnosis.md); detection and segmentation toolkits keep backbone BN in eval
mode for the same reason (mmcv's ``norm_eval``). Models without BatchNorm (ViTs) are not affected.

The rule covers the pretrained part only. A BatchNorm inside a module that trains in full and was newly
initialised (a segmentation decoder: smp's UNet and DeepLabV3+ heads have BatchNorms) has nothing to keep:
its running statistics are the init's mean 0 / variance 1, and normalising the decoder's activations with them
in eval mode would be wrong from the first step to the last. ``mark_trained_in_full`` tags those BatchNorms
(before a method wraps or copies the model: the tag is an attribute, so peft's copies keep it) and
``set_train_mode`` always leaves them in train mode, so they estimate their statistics from the task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BN_STATS = ("frozen", "update")
TRAINED_IN_FULL_TAG = "snella_trained_in_full"  # attribute set on the BatchNorms of modules trained in full


def batchnorm_modules(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm of ``model`` (1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d: all subclass _BatchNorm)
    that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def mark_trained_in_full(model: nn.Module, names: list[str]) -> int:
    """Tag every BatchNorm inside the modules ``names`` of ``model`` (the task's ``trained_in_full``: new heads,
    decoders) so that ``set_train_mode`` lets them update their statistics; returns how many were tagged."""
    tagged = 0
    for name in names:
        for module in batchnorm_modules(model.get_submodule(name)):
            setattr(module, TRAINED_IN_FULL_TAG, True)
            tagged += 1
    return tagged


def trained_in_full_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorms ``mark_trained_in_full`` tagged (their statistics change in every run)."""
    return [m for m in batchnorm_modules(model) if getattr(m, TRAINED_IN_FULL_TAG, False)]


def set_train_mode(model: nn.Module, bn_stats: str) -> nn.Module:
    """``model.train()``, then with ``bn_stats='frozen'`` every pretrained BatchNorm back in eval mode.

    BatchNorms tagged by ``mark_trained_in_full`` (a newly initialised decoder's) stay in train mode.

    In eval mode a BatchNorm normalises with its running statistics and leaves them as they are; its
    affine weight and bias still train when they require grad (full fine-tuning).

    Args:
        model: the model about to run a training step (call again after every evaluation).
        bn_stats: one of BN_STATS: 'frozen' keeps the pretrained statistics, 'update' is torch's train mode.

    Returns:
        ``model``.

    Raises:
        ValueError: ``bn_stats`` is not one of BN_STATS.
    """
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats={bn_stats!r} is invalid; accepted: {', '.join(BN_STATS)}")
    model.train()
    if bn_stats == "frozen":
        for module in batchnorm_modules(model):
            if not getattr(module, TRAINED_IN_FULL_TAG, False):
                module.eval()
    return model


# ---------------------------------------------------------------- re-estimated statistics in the adapter folder

BN_STATS_FILE = "batchnorm_stats.safetensors"


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every BatchNorm of ``model`` under their state-dict names."""
    names = {id(m) for m in batchnorm_modules(model)}
    state = {}
    for module_name, module in model.named_modules():
        if id(module) in names:
            for buffer_name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    state[f"{module_name}.{buffer_name}" if module_name else buffer_name] = buffer.detach()
    return state


def save_batchnorm_stats(model: nn.Module, directory: Path) -> Optional[Path]:
    """Write the BatchNorm statistics training re-estimated (``bn_stats='update'``, or a decoder's own) beside
    the adapter.

    An adapter holds the trainable weights only; without this file a model rebuilt from the backbone
    and the adapter would normalise with the pretrained statistics, not the ones it was trained with.

    Returns:
        The file written, or None when ``model`` has no BatchNorm.
    """
    state = batchnorm_state(model)
    if not state:
        return None
    path = Path(directory) / BN_STATS_FILE
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(path))
    return path


def load_batchnorm_stats(model: nn.Module, directory: Path) -> bool:
    """Load ``save_batchnorm_stats``'s file from ``directory`` into ``model`` if there is one.

    Returns:
        Whether a file was loaded.

    Raises:
        ValueError: the file names statistics ``model`` does not have, or misses some it has.
    """
    path = Path(directory) / BN_STATS_FILE
    if not path.is_file():
        return False
    state = load_file(str(path))
    expected = batchnorm_state(model)
    if set(state) != set(expected):
        extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise ValueError(f"{path} does not fit the model: unexpected {extra[:5]}, missing {missing[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            expected[name].copy_(value)
    return True
