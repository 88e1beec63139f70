"""The diffusion task's images: any labelled dataset snella reads, held as tensors in [-1, 1] at the network's size."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image

from snella.data.base import LabeledDataset
from snella.data.materialize import TensorLabeledDataset


def to_model_range(dataset: LabeledDataset, channels: int, size: int, indices: Optional[list[int]] = None,
                   labels: Optional[list[int]] = None) -> TensorLabeledDataset:
    """``dataset``'s images (all, or ``indices``) as float32 (N, C, size, size) in [-1, 1] with their labels.

    Grey (C=1) or RGB (C=3) as the network reads; resized with PIL's bicubic filter when not ``size`` already.
    ``labels`` replaces the dataset's labels (the few-image mode's new class token).

    Raises:
        ValueError: a network with another channel count (the message names it).
    """
    if channels not in (1, 3):
        raise ValueError(f"the network reads {channels}-channel images; accepted: 1 (grey) or 3 (RGB) pixel "
                         "networks (latent networks need a VAE, which this task does not run)")
    indices = list(range(len(dataset))) if indices is None else list(indices)
    images = torch.empty(len(indices), channels, size, size)  # (N, C, H, W)
    for row, index in enumerate(indices):
        image = dataset.load_image(index, "L" if channels == 1 else "RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32).reshape(size, size, channels)
        images[row] = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)
    targets = [dataset.targets[i] for i in indices] if labels is None else list(labels)
    return TensorLabeledDataset(images, torch.tensor(targets, dtype=torch.long), dataset)


def subject_indices(dataset: LabeledDataset, subject: str, count: int, seed: int) -> list[int]:
    """``count`` indices of ``dataset``'s images of class ``subject``, drawn from ``seed`` (the few-image mode).

    Raises:
        ValueError: ``subject`` is not a class of the data, or it has fewer than ``count`` images.
    """
    if subject not in dataset.classes:
        shown = ", ".join(map(str, dataset.classes[:20]))
        raise ValueError(f"subject={subject!r} is not a class of {dataset.source} ({dataset.split} split); "
                         f"accepted: one of {shown}")
    label = dataset.classes.index(subject)
    pool = [i for i, t in enumerate(dataset.targets) if t == label]
    if len(pool) < count:
        raise ValueError(f"subject={subject!r} has {len(pool)} images in {dataset.source} ({dataset.split} split); "
                         f"subject_images={count} needs at least that many")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:count]
    return sorted(pool[i] for i in order.tolist())
