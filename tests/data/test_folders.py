"""Tests of ImageFolder loading: both layouts, split mapping, pixel round trip, errors, corrupt images."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from snella.data import BadImageError, build_transform, load_dataset

# mean 0, std 1: the tensor holds the pixel value / 255.
RAW = build_transform("none", 8, train=False, mean=(0.0,), std=(1.0,))


def rgb(value):
    return torch.tensor([value, value // 2, 255 - value], dtype=torch.float32) / 255


def test_flat_tree_classes_labels_and_pixels(image_tree):
    data = load_dataset(str(image_tree), "trainval", RAW)
    assert data.classes == ["cat", "dog"] and data.num_classes == 2
    assert data.targets == [0, 0, 0, 1, 1]
    assert len(data) == 5 and data.source == str(image_tree)
    image, label = data[2]  # cat/c2.png, value 20, lossless
    assert image.shape == (3, 4, 6) and label == 0
    torch.testing.assert_close(image[:, 0, 0], rgb(20), atol=1e-6, rtol=0)
    image, label = data[4]  # dog/d1.jpg, value 110, lossy but a flat colour survives JPEG closely
    assert label == 1
    torch.testing.assert_close(image[:, 2, 3], rgb(110), atol=4 / 255, rtol=0)


def test_without_transform_items_are_rgb_pil_images(tmp_path, make_image):
    path = tmp_path / "root" / "only" / "g.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.full((3, 5), 77, dtype=np.uint8)).save(path)  # a grey "L" file
    image, label = load_dataset(f"imagefolder:{tmp_path / 'root'}", "trainval")[0]
    assert image.mode == "RGB" and image.size == (5, 3) and label == 0
    assert image.getpixel((0, 0)) == (77, 77, 77)


def test_flat_tree_train_val_partition_trainval_and_test_is_everything(image_tree, caplog):
    everything = set(load_dataset(str(image_tree), "trainval").paths)
    train = load_dataset(str(image_tree), "train", seed=3)
    val = load_dataset(str(image_tree), "val", seed=3)
    assert set(train.paths) | set(val.paths) == everything
    assert not set(train.paths) & set(val.paths)
    assert sorted(val.targets) == [0, 1]  # stratified: one of each class held out
    assert load_dataset(str(image_tree), "val", seed=3).paths == val.paths  # same seed, same split
    with caplog.at_level(logging.WARNING):
        test = load_dataset(str(image_tree), "test")
    assert set(test.paths) == everything
    assert "overlapping training" in caplog.text


@pytest.fixture
def split_tree(tmp_path, make_image):
    root = tmp_path / "split"
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for cls in ("ant", "bee"):
            for i in range(n):
                make_image(str(root / split / cls / f"{split}{i}.png"), 7 * i)
    make_image(str(root / "test" / "cicada" / "nested" / "x.png"), 1)  # a class only in test, nested
    (root / "test" / "cicada" / "notes.txt").write_text("not an image")
    return root


def test_split_folders_map_to_splits_with_shared_classes(split_tree):
    sizes = {s: len(load_dataset(str(split_tree), s)) for s in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 6, "val": 2, "trainval": 8, "test": 5}
    test = load_dataset(str(split_tree), "test")
    assert test.classes == ["ant", "bee", "cicada"]
    assert test.targets == [0, 0, 1, 1, 2]
    assert test.paths[-1].endswith(os.path.join("cicada", "nested", "x.png"))
    train = load_dataset(str(split_tree), "train")
    assert train.classes == test.classes  # labels agree across splits
    assert all(os.sep + "train" + os.sep in p for p in train.paths)


def test_split_folders_without_val_hold_out_from_train(split_tree):
    import shutil
    shutil.rmtree(split_tree / "val")
    train, val = load_dataset(str(split_tree), "train"), load_dataset(str(split_tree), "val")
    assert len(train) + len(val) == 6 and sorted(val.targets) == [0, 1]
    assert len(load_dataset(str(split_tree), "trainval")) == 6


def test_missing_test_folder_is_an_error(split_tree):
    import shutil
    shutil.rmtree(split_tree / "test")
    with pytest.raises(ValueError, match="has no test split"):
        load_dataset(str(split_tree), "test")


def test_empty_class_folder_is_named(image_tree):
    (image_tree / "emu").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*emu holds no images"):
        load_dataset(str(image_tree), "train")


def test_folder_without_classes_or_missing_is_an_error(tmp_path, make_image):
    make_image(str(tmp_path / "loose" / "a.png"), 0)
    with pytest.raises(ValueError, match="holds no class folders"):
        load_dataset(str(tmp_path / "loose"), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}", "train")


def test_corrupt_image_is_named_when_read(image_tree, make_corrupt):
    bad = make_corrupt(str(image_tree / "dog" / "d9.png"))
    data = load_dataset(str(image_tree), "trainval", RAW)
    assert len(data) == 6
    with pytest.raises(BadImageError, match=f"cannot read image {bad}"):
        data[data.paths.index(bad)]
    assert isinstance(BadImageError("x"), ValueError)


def test_skip_bad_images_drops_and_counts_them(image_tree, make_corrupt, caplog):
    bad = [make_corrupt(str(image_tree / "dog" / "d9.png"))]
    (image_tree / "cat" / "c9.jpg").write_bytes(b"not a jpeg at all")
    bad.insert(0, str(image_tree / "cat" / "c9.jpg"))
    with caplog.at_level(logging.WARNING):
        data = load_dataset(str(image_tree), "trainval", RAW, skip_bad_images=True)
    assert data.bad_images == bad
    assert len(data) == 5 and data.targets == [0, 0, 0, 1, 1]
    assert "skipped 2 unreadable image(s) of 7" in caplog.text
    assert all(data[i][0].shape == (3, 4, 6) for i in range(len(data)))


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep" / "c" / "a.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(path)
    image, _ = load_dataset(str(tmp_path / "deep"), "trainval")[0]
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100,) * 3, (255,) * 3]
