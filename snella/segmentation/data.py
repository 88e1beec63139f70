"""SegmentationDataset, the torch Dataset of (image, mask) pairs every segmentation loader returns, and mask checks."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

DEFAULT_IGNORE_INDEX = 255
BINARY_CLASSES = ("background", "foreground")


class MaskError(ValueError):
    """A mask that cannot serve as the label map of its image; the message names the file and what is accepted."""


def binary_mask(values: np.ndarray, name: str, lossless: bool) -> np.ndarray:
    """A binary mask file's pixels as labels {0, 1}.

    Accepted: 0/1 or 0/255 masks. A lossless file (PNG, BMP, TIFF) must hold only those values; a JPEG mask
    (Kvasir-SEG ships JPEGs, whose compression blurs 0/255 edges) is thresholded at 128 instead.

    Args:
        values: ``(H, W)`` grey pixel values.
        name: the file, named in errors.
        lossless: whether the file format keeps values exactly.

    Returns:
        ``(H, W)`` int64 labels in {0, 1}.

    Raises:
        MaskError: a lossless mask with other values (e.g. a multi-class label map read as binary).
    """
    values = np.asarray(values)
    top = int(values.max()) if values.size else 0
    if top <= 1:
        return values.astype(np.int64)
    if lossless:
        found = np.unique(values)
        if not set(found.tolist()) <= {0, 255}:
            shown = ", ".join(str(v) for v in found[:8]) + (" ..." if len(found) > 8 else "")
            raise MaskError(f"mask {name}: values {shown} are not a binary mask (accepted: 0/1 or 0/255); for a "
                            "multi-class label map give the class names (classes.txt) or num_classes")
    return (values >= 128).astype(np.int64)


def check_labels(labels: np.ndarray, num_classes: int, ignore_index: int | None, name: str) -> np.ndarray:
    """Raise a MaskError naming ``name`` when a label is outside 0..num_classes-1 and is not ``ignore_index``.

    Returns:
        ``labels`` as int64, unchanged.
    """
    labels = np.asarray(labels).astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bad.any():
        found = np.unique(labels[bad])
        shown = ", ".join(str(v) for v in found[:8]) + (" ..." if len(found) > 8 else "")
        ignore = f" or the ignore index {ignore_index}" if ignore_index is not None else ""
        raise MaskError(f"mask {name}: labels {shown} are outside the {num_classes} classes (accepted: "
                        f"0..{num_classes - 1}{ignore}); {int(bad.sum())} pixel(s) in all")
    return labels


def check_same_size(image_size: tuple[int, int], mask_shape: tuple[int, int], image_name: str, mask_name: str) -> None:
    """Raise a MaskError when a mask ``(H, W)`` does not cover its image of PIL size ``(W, H)`` pixel for pixel."""
    width, height = image_size
    if tuple(mask_shape) != (height, width):
        raise MaskError(f"mask {mask_name} is {mask_shape[1]}x{mask_shape[0]} (width x height) but its image "
                        f"{image_name} is {width}x{height}; a mask must have its image's size")


def image_to_tensor(image: Image.Image) -> Tensor:
    """PIL image -> ``(C, H, W)`` float32 in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array  # (H, W, C)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class SegmentationDataset(Dataset):
    """Images with per-pixel labels; subclasses say where a pair comes from (``load_pair``, ``describe``).

    ``dataset[i]`` is ``(image, mask)``: image ``(C, H, W)`` float32 in [0, 1] (normalised when a transform is
    set), mask ``(H, W)`` int64 labels in 0..num_classes-1 or ``ignore_index``. The transform is a paired one
    (``snella.segmentation.transforms.PairedTransform``): it gets and returns both tensors.

    Attributes:
        classes: class names, label ``k`` is ``classes[k]``; binary datasets have ("background", "foreground").
        binary: one foreground class (a model gives one logit per pixel).
        ignore_index: label of pixels that count for neither loss nor metrics.
        source: what the dataset was loaded from; split: "train", "val", "trainval" or "test".
        channels: 3 (RGB) or 1 (grey) image channels returned.
    """

    def __init__(self, classes: Sequence[str], source: str, split: str, transform: Callable | None = None,
                 ignore_index: int = DEFAULT_IGNORE_INDEX, binary: bool = False, channels: int = 3) -> None:
        self.classes = [str(c) for c in classes]
        if len(self.classes) < 2:
            raise ValueError(f"{source}: a segmentation dataset needs at least 2 classes (background and one "
                             f"more), got {self.classes}")
        if binary and len(self.classes) != 2:
            raise ValueError(f"{source}: a binary dataset has exactly 2 classes, got {self.classes}")
        if 0 <= ignore_index < len(self.classes):
            raise ValueError(f"{source}: ignore_index={ignore_index} is one of the {len(self.classes)} class labels; "
                             "choose a value outside 0..num_classes-1 (255 by default)")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.source, self.split, self.transform = source, split, transform
        self.ignore_index, self.binary, self.channels = ignore_index, binary, channels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        raise NotImplementedError

    def load_pair(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The raw image (PIL, any mode) and its checked mask ``(H, W)`` int64 labels for item ``index``."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where item ``index`` comes from (its files, or source and row), for error messages."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.load_pair(index)
        image = image_to_tensor(image.convert("L" if self.channels == 1 else "RGB"))  # (C, H, W)
        mask = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))  # (H, W)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, split={self.split!r}, len={len(self)}, "
                f"classes={self.classes}, binary={self.binary})")


class ArraySegmentationDataset(SegmentationDataset):
    """Pairs held in memory (the built-in datasets): uint8 images ``(N, H, W)`` or ``(N, H, W, 3)`` and int masks
    ``(N, H, W)``, checked once here."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, classes: Sequence[str], source: str, split: str,
                 transform: Callable | None = None, ignore_index: int = DEFAULT_IGNORE_INDEX, binary: bool = False,
                 channels: int = 3) -> None:
        super().__init__(classes, source, split, transform, ignore_index, binary, channels)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or masks.shape != images.shape[:3]:
            raise ValueError(f"{source}: expected uint8 images (N, H, W[, 3]) and masks (N, H, W), got "
                             f"{images.dtype} {images.shape} and {masks.shape}")
        check_labels(masks, self.num_classes, ignore_index, f"{source} [{split}]")
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def load_pair(self, index: int) -> tuple[Image.Image, np.ndarray]:
        return Image.fromarray(self.images[index]), self.masks[index].astype(np.int64)

    def describe(self, index: int) -> str:
        return f"{self.source} [{self.split}] item {index}"
