"""LabeledDataset, the torch Dataset every loader returns, with its file-backed and array-backed kinds."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from snella.data.checks import SPLITS, BadImageError, find_bad_images, log_skipped, open_image


def image_mode(transform: Callable | None) -> str:
    """The PIL mode a transform wants its input in: "L" for 1-channel transforms, else "RGB"."""
    return getattr(transform, "image_mode", "RGB")


class LabeledDataset(Dataset):
    """Images with integer labels; subclasses say where an image comes from.

    ``dataset[i]`` is ``(transform(image), label)``: with the transforms of
    ``snella.data.build_transform`` a float tensor (C, H, W); with ``transform=None`` the PIL
    image itself (RGB), as torchvision's datasets do.

    Attributes:
        classes: class names; label ``k`` is ``classes[k]``.
        targets: one int label per item.
        source: the ``source`` string the dataset was loaded from.
        split: "train", "val", "trainval" or "test".
        transform: applied in ``__getitem__``; may be replaced after loading.
        bad_images: files dropped as unreadable (only filled with ``skip_bad_images=True``).
    """

    def __init__(self, classes: Sequence[str], targets: Sequence[int], source: str, split: str,
                 transform: Callable | None = None, bad_images: Sequence[str] = ()) -> None:
        self.classes = [str(c) for c in classes]
        self.targets = [int(t) for t in targets]
        self.source = source
        self.split = split
        self.transform = transform
        self.bad_images = list(bad_images)
        if not self.classes:
            raise ValueError(f"{source}: no classes found")
        self._check_targets()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _check_targets(self) -> None:
        """Raise if a label is outside 0..num_classes-1, naming the item and the value."""
        if not self.targets:
            return
        targets = np.asarray(self.targets)
        bad = np.flatnonzero((targets < 0) | (targets >= self.num_classes))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{self.describe(i)}: label {self.targets[i]} is out of range for {self.num_classes} "
                f"classes (expected 0..{self.num_classes - 1}); {bad.size} label(s) out of range in all")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index, image_mode(self.transform))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def load_image(self, index: int, mode: str = "RGB") -> Image.Image:
        """The raw image of item ``index`` as a PIL image in ``mode`` (no transform)."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where item ``index`` comes from (a file path, or source and row), for error messages."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, split={self.split!r}, "
                f"len={len(self)}, num_classes={self.num_classes})")


class FileDataset(LabeledDataset):
    """Images read from files on disk (ImageFolder, VTAB-1k lists, FGVC json).

    Args:
        paths: one image file per item.
        targets: one label per item.
        skip_bad_images: decode every image once now (a full pass over the files) and drop the
            unreadable ones into ``bad_images`` instead of failing in ``__getitem__``.
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[int], classes: Sequence[str],
                 source: str, split: str, transform: Callable | None = None,
                 skip_bad_images: bool = False) -> None:
        paths, targets, bad = list(paths), list(targets), []
        if skip_bad_images:
            bad_idx = set(find_bad_images(paths))
            bad = [paths[i] for i in sorted(bad_idx)]
            paths = [p for i, p in enumerate(paths) if i not in bad_idx]
            targets = [t for i, t in enumerate(targets) if i not in bad_idx]
            log_skipped(source, split, bad, len(paths) + len(bad))
        self.paths = paths
        super().__init__(classes, targets, source, split, transform, bad)

    def load_image(self, index: int, mode: str = "RGB") -> Image.Image:
        return open_image(self.paths[index], mode)

    def describe(self, index: int) -> str:
        return self.paths[index]


class ArrayDataset(LabeledDataset):
    """Images held in memory as a uint8 array (the built-in datasets).

    Args:
        images: (N, H, W) grey or (N, H, W, 3) RGB, uint8.
        targets: one label per image.
    """

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str],
                 source: str, split: str, transform: Callable | None = None) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(targets):
            raise ValueError(f"{source}: expected uint8 images (N, H, W[, 3]) and N labels, got "
                             f"{images.dtype} {images.shape} and {len(targets)} labels")
        self.images = images
        super().__init__(classes, targets, source, split, transform)

    def load_image(self, index: int, mode: str = "RGB") -> Image.Image:
        return Image.fromarray(self.images[index]).convert(mode)

    def describe(self, index: int) -> str:
        return f"{self.source} [{self.split}] item {index}"


__all__ = ["SPLITS", "BadImageError", "LabeledDataset", "FileDataset", "ArrayDataset", "image_mode"]
