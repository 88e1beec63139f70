"""The `--data` sources of the segmentation task, cached as tensors at the model's input, and its paired augmentation.

Sources: ``fmnist-composites`` (built-in, the embedded default), ``liver`` (built-in LiTS CT slices),
``seg:<folder>`` (images/ + masks/, ``snella.segmentation.folders``) and ``hf:<folder>`` (a ``datasets`` folder
with image and mask columns, ``snella.segmentation.hf_data``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from snella.data.materialize import TensorLabeledDataset
from snella.segmentation.data import SegmentationDataset
from snella.segmentation.transforms import (PairedTransform, crop_pair, hflip_pair, random_resized_crop_box,
                                            resize_pair)

BUILTIN_SOURCES = ("fmnist-composites", "liver")
SOURCES = "fmnist-composites, liver, seg:<folder>, hf:<folder>"
DATA_SEED = 0  # the composites drawn: fixed, so every seed of a sweep sees the same images
FILE_IMAGE_SIZE = 224  # model input for seg:/hf: data without --image-size (their images differ in size)
CROP_SCALE = (0.5, 1.0)


def native_size(source: str) -> int:
    """The side of the built-in sources' images (their default model input), FILE_IMAGE_SIZE for files."""
    if source == "fmnist-composites":
        from snella.segmentation.composites import CANVAS

        return CANVAS
    return 128 if source == "liver" else FILE_IMAGE_SIZE


def load_source(config: Any, split: str, transform: Optional[PairedTransform] = None) -> SegmentationDataset:
    """One split of ``config.data`` (a TrainConfig) with ``transform``.

    Raises:
        ValueError: an unknown source (lists those accepted), or a setting the source does not read (num_classes,
            classes_file, image_column, mask_column, ignore_index with a built-in source).
        MaskError / FileNotFoundError: from the loaders, naming the file.
    """
    data = config.data
    given = {name: getattr(config, name) for name in ("num_classes", "classes_file", "image_column", "mask_column")
             if getattr(config, name) is not None}
    if data in BUILTIN_SOURCES or data.startswith("seg:"):
        refused = {k: v for k, v in given.items() if k in ("image_column", "mask_column") or data in BUILTIN_SOURCES}
        if data in BUILTIN_SOURCES and config.ignore_index != 255:
            refused["ignore_index"] = config.ignore_index
        if refused:
            name, value = next(iter(refused.items()))
            raise ValueError(f"{name}={value!r} is not read for data={data!r}: built-in sources have their own "
                             "classes and no ignored pixels; num_classes/classes_file are for seg:/hf: label maps, "
                             "image_column/mask_column for hf: data")
    if data == "fmnist-composites":
        from snella.segmentation.composites import load_composites

        return load_composites(split, transform, seed=DATA_SEED)
    if data == "liver":
        from snella.segmentation.liver import load_liver

        return load_liver(split, transform)
    if data.startswith("seg:"):
        from snella.segmentation.folders import load_mask_folder

        return load_mask_folder(data[4:], split, transform, config.num_classes, config.classes_file,
                                config.ignore_index, seed=config.seed)
    if data.startswith("hf:"):
        from snella.segmentation.folders import read_classes
        from snella.segmentation.hf_data import load_hf_segmentation

        classes = read_classes(config.classes_file) if config.classes_file else None
        return load_hf_segmentation(data[3:], split, transform, config.image_column, config.mask_column, classes,
                                    config.num_classes, config.ignore_index, seed=config.seed)
    raise ValueError(f"data={data!r} is not a segmentation source; accepted: {SOURCES}")


class CachedPairs(TensorLabeledDataset):
    """A segmentation split held as tensors: ``images`` (N, C, H, W) normalised, ``labels`` the masks (N, H, W).

    It keeps what evaluation and pictures need of its source: classes, binary, ignore_index, mean, std.
    """

    def __init__(self, images: Tensor, masks: Tensor, dataset: SegmentationDataset, mean, std) -> None:
        self.images, self.labels = images, masks
        self.classes, self.binary, self.ignore_index = list(dataset.classes), dataset.binary, dataset.ignore_index
        self.source, self.split, self.bad_images, self.targets = dataset.source, dataset.split, [], []
        self.mean, self.std = tuple(mean), tuple(std)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def unnormalised(self, count: int) -> Tensor:
        """The first ``count`` images back in [0, 1], ``(count, H, W, C)`` for plotting."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (self.images[:count] * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def cached_split(config: Any, split: str, size: int, mean, std, limit: Optional[int]) -> CachedPairs:
    """One split read once, brought to ``size`` (resize; --transform none: kept, and must already be ``size``),
    normalised and held as tensors; ``limit``: a fixed random subset. Every pair is read here, so a bad file
    stops the run before training, named."""
    geometry = "none" if config.transform == "none" else "resize"
    dataset = load_source(config, split, PairedTransform(geometry, size, False, mean, std))
    if len(dataset) == 0:
        raise ValueError(f"{config.data}: split {split!r} has no images")
    indices = list(range(len(dataset)))
    if limit is not None and limit < len(dataset):
        from snella.training.data import SUBSET_SEED

        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))[:limit].tolist()
    images, masks = [], []
    for i in indices:
        image, mask = dataset[i]
        if tuple(mask.shape) != (size, size):
            raise ValueError(f"{dataset.describe(i)} is {mask.shape[1]}x{mask.shape[0]} but the model takes "
                             f"{size}x{size}; use --transform resize or flip-crop (they resize), or --image-size")
        images.append(image)
        masks.append(mask)
    return CachedPairs(torch.stack(images), torch.stack(masks), dataset, mean, std)  # (N, C, H, W), (N, H, W)


def flip_crop(images: Tensor, masks: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each pair of a batch ``(B, C, H, W)`` / ``(B, H, W)``: a random resized crop (scale 0.5-1, ratio 3/4-4/3)
    back to H x W, then a horizontal flip with probability 1/2; every draw from ``generator``."""
    out_images, out_masks = [], []
    for image, mask in zip(images, masks):
        top, left, h, w = random_resized_crop_box(*mask.shape, CROP_SCALE, (3 / 4, 4 / 3), generator)
        image, mask = resize_pair(*crop_pair(image, mask, top, left, h, w), tuple(mask.shape))
        if float(torch.rand(1, generator=generator)) < 0.5:
            image, mask = hflip_pair(image, mask)
        out_images.append(image)
        out_masks.append(mask)
    return torch.stack(out_images), torch.stack(out_masks)
