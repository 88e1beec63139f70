"""Tests of the run's data plumbing: seeded epoch orders, sharding across ranks, batches, subsets, size checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from snella.data.base import ArrayDataset
from snella.data.materialize import TensorLabeledDataset
from snella.training.data import InputSpec, SubsetDataset, batches, epoch_order, num_batches, prepare, shard

SPEC = InputSpec("none", 8, (0.5,), (0.5,), 1)


def array_dataset(n: int = 20, side: int = 8) -> ArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
    return ArrayDataset(images, [i % 3 for i in range(n)], ["a", "b", "c"], "toy", "train")


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_order(50, seed=3, epoch=2)
    assert torch.equal(a, epoch_order(50, seed=3, epoch=2))
    assert sorted(a.tolist()) == list(range(50))
    others = [epoch_order(50, 3, 1), epoch_order(50, 4, 2), epoch_order(50, 2, 3)]
    assert all(not torch.equal(a, o) for o in others)


def test_shard_splits_evenly_and_covers_everything():
    order = torch.arange(10)
    parts = [shard(order, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]  # padded by wrapping round: 12 = 10 + 2 repeats
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.tensor([0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]))
    exact = [shard(order, r, 3, pad=False) for r in range(3)]
    assert sorted(torch.cat(exact).tolist()) == list(range(10))
    assert torch.equal(shard(order, 0, 1), order)


def test_batches_from_cache_and_from_files_agree():
    raw = array_dataset()
    raw.transform = SPEC.build(train=False)
    cached = prepare(array_dataset(), SPEC, train=False, limit=None)
    assert isinstance(cached, TensorLabeledDataset)
    order = epoch_order(len(raw), 0, 0)
    got_cached = list(batches(cached, order, 6))
    got_files = list(batches(raw, order, 6))
    assert [len(y) for _, y in got_cached] == [6, 6, 6, 2] and num_batches(20, 6) == 4
    for (xa, ya), (xb, yb) in zip(got_cached, got_files):
        assert torch.equal(ya, yb) and torch.allclose(xa, xb)
    first = order[:6].tolist()
    assert torch.equal(got_cached[0][1], torch.tensor([raw.targets[i] for i in first]))


def test_limit_takes_a_fixed_subset_whatever_the_seed():
    a = prepare(array_dataset(), SPEC, train=True, limit=7)
    b = prepare(array_dataset(), SPEC, train=True, limit=7)
    assert len(a) == 7 and torch.equal(a.images, b.images)
    full = prepare(array_dataset(), SPEC, train=True, limit=None)
    assert all(any(torch.equal(x, y) for y in full.images) for x in a.images)


def test_subset_names_the_original_item():
    sub = SubsetDataset(array_dataset(), [5, 2])
    assert sub.targets == [2, 2] and sub.describe(0) == "toy [train] item 5"


def test_images_of_the_wrong_size_are_refused_with_a_fix():
    with pytest.raises(ValueError, match=r"images are 8x8 .* model takes 28x28; use --transform vtab"):
        prepare(array_dataset(), InputSpec("none", 28, (0.5,), (0.5,), 1), train=True, limit=None)
    resized = prepare(array_dataset(), InputSpec("vtab", 28, (0.5,), (0.5,), 1), train=True, limit=None)
    assert tuple(resized[0][0].shape) == (1, 28, 28)
