"""Segmentation building blocks: datasets with paired transforms, built-in real data, models, losses, metrics, plots.

Importing this package is light: each submodule imports its heavy dependencies (smp, transformers, datasets,
mrcfile) itself.
"""

from snella.segmentation.data import BINARY_CLASSES, DEFAULT_IGNORE_INDEX, MaskError, SegmentationDataset
from snella.segmentation.transforms import PAIRED_TRANSFORM_NAMES, PairedTransform

__all__ = ["SegmentationDataset", "MaskError", "PairedTransform", "PAIRED_TRANSFORM_NAMES", "BINARY_CLASSES",
           "DEFAULT_IGNORE_INDEX"]
