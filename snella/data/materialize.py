"""materialize: apply a deterministic transform to a whole dataset once and keep the tensors in memory."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset

from snella.data.base import LabeledDataset, image_mode

# Refuse to build caches larger than this by default: past it, transform on the fly instead.
DEFAULT_MAX_BYTES = 4 * 2**30


class TensorLabeledDataset(Dataset):
    """A dataset held as one float tensor of images and one tensor of labels.

    Attributes:
        images: (N, C, H, W) float32, already transformed.
        labels: (N,) int64.
        classes, num_classes, targets, source, split, bad_images: as on the dataset it came from.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, dataset: LabeledDataset) -> None:
        self.images, self.labels = images, labels
        self.classes = list(dataset.classes)
        self.targets = labels.tolist()
        self.source, self.split = dataset.source, dataset.split
        self.bad_images = list(dataset.bad_images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def materialize(dataset: LabeledDataset, transform: Callable | None = None,
                max_bytes: int = DEFAULT_MAX_BYTES) -> TensorLabeledDataset:
    """Transform every image once and cache the results, for epochs without augmentation.

    Args:
        dataset: any LabeledDataset.
        transform: a deterministic PIL image -> tensor (C, H, W) transform; defaults to
            ``dataset.transform``. One with ``deterministic = False`` (an augmenting transform) is
            refused, since caching would freeze one random draw.
        max_bytes: the largest cache allowed; estimated from the first image.

    Returns:
        A TensorLabeledDataset whose items equal ``(transform(image), label)``.
    """
    transform = transform if transform is not None else dataset.transform
    if transform is None:
        raise ValueError(f"materialize({dataset.source}): give a transform (dataset.transform is None)")
    if getattr(transform, "deterministic", True) is False:
        raise ValueError(f"materialize({dataset.source}): transform {transform!r} augments at random; "
                         "caching it would freeze one draw. Use a deterministic transform "
                         "(see snella.data.is_deterministic) or transform on the fly")
    if len(dataset) == 0:
        raise ValueError(f"materialize({dataset.source}): the dataset is empty")
    mode = image_mode(transform)
    first = transform(dataset.load_image(0, mode))
    if not isinstance(first, torch.Tensor):
        raise ValueError(f"materialize: transform {transform!r} must return a tensor, got {type(first).__name__}")
    size = len(dataset) * first.numel() * 4
    if size > max_bytes:
        raise ValueError(f"materialize({dataset.source}): {len(dataset)} images of shape {tuple(first.shape)} "
                         f"take {size / 2**30:.1f} GiB, over max_bytes={max_bytes / 2**30:.1f} GiB; "
                         "transform on the fly or raise max_bytes")
    images = torch.empty((len(dataset), *first.shape), dtype=torch.float32)  # (N, C, H, W)
    images[0] = first
    for i in range(1, len(dataset)):
        image = transform(dataset.load_image(i, mode))
        if image.shape != first.shape:
            raise ValueError(f"materialize: {dataset.describe(i)} gives shape {tuple(image.shape)}, the first "
                             f"image {tuple(first.shape)}; use a transform that resizes to one size")
        images[i] = image
    labels = torch.tensor(dataset.targets, dtype=torch.int64)  # (N,)
    return TensorLabeledDataset(images, labels, dataset)
