"""Tests of the stratified hold-out and of how split names map onto a source's parts."""

import numpy as np
import pytest

from snella.data.splits import choose_split, stratified_split


def test_stratified_split_holds_out_each_class_in_proportion():
    targets = np.repeat([0, 1, 2], [50, 20, 3])
    kept, held = stratified_split(targets, 0.1, seed=0)
    assert np.bincount(targets[held]).tolist() == [5, 2, 1]  # a 3-item class still gives one
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(73))
    assert np.all(np.diff(held) > 0)


def test_stratified_split_depends_on_seed_only():
    targets = np.arange(100) % 4
    a, b, c = (stratified_split(targets, 0.25, seed=s)[1] for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_single_item_class_stays_in_training():
    kept, held = stratified_split([0, 1, 1, 1], 0.5, seed=0)
    assert 0 in kept and len(held) == 2


def test_bad_fraction():
    with pytest.raises(ValueError, match="fraction must be in"):
        stratified_split([0, 1], 1.0, seed=0)


def test_choose_split_with_and_without_val_part():
    parts = {"train": [0, 1] * 10, "val": [0, 1], "test": [1]}
    assert [(p, i.tolist()) for p, i in choose_split("trainval", parts, 0, "s")] == \
        [("train", list(range(20))), ("val", [0, 1])]
    assert [(p, i.tolist()) for p, i in choose_split("val", parts, 0, "s")] == [("val", [0, 1])]
    no_val = {"train": [0, 1] * 10}
    (part, train), = choose_split("train", no_val, 0, "s")
    (_, val), = choose_split("val", no_val, 0, "s")
    assert part == "train" and len(val) == 2 and sorted(train.tolist() + val.tolist()) == list(range(20))
    with pytest.raises(ValueError, match="s has no test split"):
        choose_split("test", no_val, 0, "s")
