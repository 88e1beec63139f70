"""The data side of a run: datasets with the model's transform, fixed subsets, seeded epoch orders and batches."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from snella.backbones import data_config
from snella.data import (LabeledDataset, TensorLabeledDataset, build_transform, is_deterministic, load_dataset,
                         materialize)
from snella.training.config import TrainConfig

# Seed of the --train-limit / --test-limit subsets: fixed, so every seed of a sweep sees the same images.
SUBSET_SEED = 0


@dataclass
class InputSpec:
    """How images become model inputs; saved in run.json so that evaluate and predict do the same."""

    transform: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int

    def build(self, train: bool, fit_size: bool = False):
        """The transform (PIL image -> tensor (C, H, W)) for training or for evaluation.

        ``fit_size``: also bring images of another size to ``image_size`` (see ``build_transform``).
        """
        return build_transform(self.transform, self.image_size, train, self.mean, self.std, self.channels, fit_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        return cls(data["transform"], int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]),
                   int(data["channels"]))


def input_spec(config: TrainConfig, model: torch.nn.Module) -> InputSpec:
    """The transform of a run: the configured name, at the model's input size, mean and std."""
    cfg = data_config(model)
    channels, height, _ = cfg["input_size"]
    return InputSpec(config.transform, config.image_size or int(height), tuple(cfg["mean"]), tuple(cfg["std"]),
                     int(channels))


class SubsetDataset(LabeledDataset):
    """Some items of a LabeledDataset, in a given order, still a LabeledDataset (so it can be cached)."""

    def __init__(self, base: LabeledDataset, indices: Sequence[int]) -> None:
        self.base, self.indices = base, [int(i) for i in indices]
        super().__init__(base.classes, [base.targets[i] for i in self.indices], base.source, base.split,
                         base.transform, base.bad_images)

    def load_image(self, index: int, mode: str = "RGB"):
        return self.base.load_image(self.indices[index], mode)

    def describe(self, index: int) -> str:
        return self.base.describe(self.indices[index])


def load_split(config: TrainConfig, spec: InputSpec, split: str, train: bool, limit: Optional[int]) -> Dataset:
    """One split of ``config.data`` with the run's transform (see ``prepare``)."""
    dataset = load_dataset(config.data, split, None, skip_bad_images=config.skip_bad_images, seed=config.seed)
    return prepare(dataset, spec, train, limit)


def prepare(dataset: LabeledDataset, spec: InputSpec, train: bool, limit: Optional[int],
            fit_size: bool = False) -> Dataset:
    """Give ``dataset`` the run's transform, cut it to ``limit`` items, and cache it as tensors when the
    transform allows (then an epoch costs only the model). ``fit_size``: resize images of another size
    to the model's (evaluating a finished run on other data) instead of refusing them.

    Raises:
        ValueError: an empty split, or images of another size than the model takes.
    """
    if len(dataset) == 0:
        raise ValueError(f"{dataset.source}: split {dataset.split!r} has no images")
    dataset.transform = spec.build(train, fit_size)
    if limit is not None and limit < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))
        dataset = SubsetDataset(dataset, order[:limit].tolist())
    if is_deterministic(spec.transform, train):
        dataset = materialize(dataset)
    _check_size(dataset, spec, dataset.source)
    return dataset


def _check_size(dataset: Dataset, spec: InputSpec, source: str) -> None:
    image = dataset[0][0]  # (C, H, W)
    if tuple(image.shape[-2:]) != (spec.image_size, spec.image_size):
        raise ValueError(
            f"{source}: images are {image.shape[-2]}x{image.shape[-1]} after transform {spec.transform!r}, "
            f"but the model takes {spec.image_size}x{spec.image_size}; use --transform vtab (resizes to "
            f"--image-size) or a model built for this size (e.g. --model-kwargs img_size=...)")


# ---------------------------------------------------------------- orders and batches


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation drawn from a generator seeded with (seed, epoch).

    It depends on nothing else, so a resumed run sees the same batches as an uninterrupted one.
    """
    key = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(key))


def augment_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator of one epoch's augmentation on one process, seeded from (seed, epoch, rank) only,
    so a resumed run draws the same offsets as an uninterrupted one and ranks draw different ones."""
    key = int(np.random.SeedSequence([seed, epoch, rank, 1]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(key)


def shard(order: torch.Tensor, rank: int, world_size: int, pad: bool = True) -> torch.Tensor:
    """This process's part of ``order``: every ``world_size``-th item from ``rank``, as DistributedSampler.

    With ``pad``, the order is first extended by wrapping around, so every rank gets the same count
    (and so the same number of steps: DDP needs every rank in every all-reduce).
    """
    if world_size == 1:
        return order
    if pad:
        size = -(-len(order) // world_size) * world_size
        order = torch.cat([order, order[: size - len(order)]]) if size > len(order) else order
    return order[rank::world_size]


def batches(dataset: Dataset, indices: torch.Tensor, batch_size: int, num_workers: int = 0,
            seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images (B, C, H, W), labels (B,)) over ``indices`` in order, the last batch possibly short."""
    chunks = [c for c in torch.split(indices, batch_size)]
    if isinstance(dataset, TensorLabeledDataset):
        for idx in chunks:  # cached tensors: index directly, no per-item Python
            yield dataset.images[idx], dataset.labels[idx]
        return
    loader = DataLoader(dataset, batch_sampler=[c.tolist() for c in chunks], num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed))
    for images, labels in loader:
        yield images, torch.as_tensor(labels)


def num_batches(num_items: int, batch_size: int) -> int:
    """Batches of at most ``batch_size`` that ``num_items`` make (the last may be short)."""
    return -(-num_items // batch_size)
