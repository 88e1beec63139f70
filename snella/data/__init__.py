"""Datasets users have (built-in, ImageFolder, VTAB-1k, FGVC, Hugging Face) as torch Datasets, and their transforms."""

from snella.data.base import LabeledDataset
from snella.data.builtin import list_builtin_datasets
from snella.data.checks import SPLITS, BadImageError
from snella.data.load import load_dataset
from snella.data.materialize import TensorLabeledDataset, materialize
from snella.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, TRANSFORM_NAMES, build_transform,
                                    is_deterministic)

__all__ = [
    "load_dataset", "build_transform", "is_deterministic", "list_builtin_datasets", "materialize",
    "LabeledDataset", "TensorLabeledDataset", "BadImageError",
    "SPLITS", "TRANSFORM_NAMES", "IMAGENET_MEAN", "IMAGENET_STD",
]
