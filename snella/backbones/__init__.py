"""Backbones by name and pretrained weights from files; importing this registers vit_fmnist_d128 in timm."""

from snella.backbones.registry import (
    SNELLA_DEFAULT_WEIGHTS,
    HFImageClassifier,
    create_backbone,
    data_config,
)
from snella.backbones.weights import LoadReport, apply_state_dict, load_weights

__all__ = [
    "SNELLA_DEFAULT_WEIGHTS",
    "HFImageClassifier",
    "LoadReport",
    "apply_state_dict",
    "create_backbone",
    "data_config",
    "load_weights",
]
