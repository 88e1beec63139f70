"""Tests of materialize: cached tensors equal the on-the-fly items; augmenting or oversized caches are refused."""

import pytest
import torch

from snella.data import build_transform, load_dataset, materialize


def test_materialized_items_equal_transformed_items(image_tree):
    transform = build_transform("vtab", 5, train=False)
    data = load_dataset(str(image_tree), "trainval", transform)
    cached = materialize(data)
    assert cached.images.shape == (5, 3, 5, 5) and cached.images.dtype == torch.float32
    assert cached.classes == ["cat", "dog"] and cached.num_classes == 2 and cached.targets == data.targets
    for i in range(len(data)):
        image, label = cached[i]
        assert torch.equal(image, data[i][0]) and label == data.targets[i]


def test_materialize_uses_the_given_transform_and_its_channels():
    data = load_dataset("faces", "test")  # no transform on the dataset
    cached = materialize(data, build_transform("none", 25, train=False, channels=1))
    assert cached.images.shape == (40, 1, 25, 25)
    expected = torch.from_numpy(data.images[3]).float() / 255 * 2 - 1  # (25, 25)
    torch.testing.assert_close(cached.images[3, 0], expected, atol=1e-6, rtol=0)


def test_materialize_refuses_augmentation_missing_transform_and_size(image_tree):
    data = load_dataset(str(image_tree), "trainval")
    with pytest.raises(ValueError, match="augments at random"):
        materialize(data, build_transform("fgvc", 8, train=True))
    with pytest.raises(ValueError, match="give a transform"):
        materialize(data)
    with pytest.raises(ValueError, match="over max_bytes"):
        materialize(data, build_transform("vtab", 64, train=False), max_bytes=1000)


def test_materialize_needs_one_image_size(image_tree, make_image):
    make_image(str(image_tree / "dog" / "big.png"), 3, size=(9, 9))
    with pytest.raises(ValueError, match=r"big.png gives shape \(3, 9, 9\), the first image \(3, 4, 6\)"):
        materialize(load_dataset(str(image_tree), "trainval"), build_transform("none", 8, train=False))
