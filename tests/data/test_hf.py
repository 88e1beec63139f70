"""Tests of Hugging Face `datasets` folders written with save_to_disk in tmp_path."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from snella.data import BadImageError, build_transform, load_dataset

datasets = pytest.importorskip("datasets")
RAW = build_transform("none", 8, train=False, mean=(0.0,), std=(1.0,))


def solid(value, size=(5, 3)):
    return Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8))


def image_features(names=("cat", "dog", "emu")):
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})


@pytest.fixture
def hf_dict(tmp_path):
    """A DatasetDict with train (6), validation (3) and test (2); pixel value = 10 * row + 50 * split."""
    def part(n, offset, labels):
        return datasets.Dataset.from_dict(
            {"image": [solid(offset + 10 * i) for i in range(n)], "label": labels}, features=image_features())
    dd = datasets.DatasetDict(train=part(6, 0, [0, 1, 2, 0, 1, 2]), validation=part(3, 50, [2, 1, 0]),
                              test=part(2, 100, [1, 1]))
    dd.save_to_disk(str(tmp_path / "hfdict"))
    return tmp_path / "hfdict"


def test_dataset_dict_splits_classes_and_pixels(hf_dict):
    sizes = {s: len(load_dataset(f"hf:{hf_dict}", s)) for s in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 6, "val": 3, "trainval": 9, "test": 2}
    trainval = load_dataset(str(hf_dict), "trainval", RAW)  # detected without the prefix
    assert trainval.classes == ["cat", "dog", "emu"]
    assert trainval.targets == [0, 1, 2, 0, 1, 2, 2, 1, 0]
    image, label = trainval[7]  # validation row 1: value 60, label dog
    assert label == 1 and image.shape == (3, 3, 5)
    torch.testing.assert_close(image, torch.full((3, 3, 5), 60 / 255), atol=1e-6, rtol=0)


def test_single_dataset_named_columns_and_held_out_val(tmp_path, caplog):
    # No Image / ClassLabel features: columns found by name, pixels stored as uint8 arrays.
    pixels = [np.full((4, 4), v, dtype=np.uint8) for v in range(0, 200, 20)]
    ds = datasets.Dataset.from_dict({"img": pixels, "labels": [0, 1] * 5, "note": ["x"] * 10})
    ds.save_to_disk(str(tmp_path / "single"))
    train = load_dataset(f"hf:{tmp_path / 'single'}", "train", RAW, seed=1)
    val = load_dataset(f"hf:{tmp_path / 'single'}", "val", RAW, seed=1)
    assert train.classes == ["0", "1"]
    assert len(train) + len(val) == 10 and sorted(val.targets) == [0, 1]
    image, label = val[0]
    value = round(float(image[0, 0, 0]) * 255)
    assert image.shape == (3, 4, 4) and label == (value // 20) % 2
    with caplog.at_level(logging.WARNING):
        assert len(load_dataset(f"hf:{tmp_path / 'single'}", "test")) == 10
    assert "overlapping training" in caplog.text


def test_unlabelled_rows_are_out_of_range(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [solid(1), solid(2)], "label": [0, -1]}, features=image_features())
    ds.save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(ValueError, match=r"row 1: label -1 is out of range for 3 classes"):
        load_dataset(f"hf:{tmp_path / 'unlabelled'}", "trainval")


def test_columns_that_cannot_be_told_apart_are_an_error(tmp_path):
    ds = datasets.Dataset.from_dict({"picture": [[1]], "y": [0]})
    ds.save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(ValueError, match="cannot tell which column holds the images among picture, y"):
        load_dataset(f"hf:{tmp_path / 'odd'}", "train")


def test_not_a_saved_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a dataset saved with save_to_disk"):
        load_dataset(f"hf:{tmp_path / 'empty'}", "train")


def test_corrupt_encoded_image(tmp_path, caplog):
    buffer = io.BytesIO()
    solid(9, size=(32, 32)).save(buffer, format="PNG")
    broken = buffer.getvalue()[:60]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": buffer.getvalue(), "path": None}, {"bytes": broken, "path": "broken.png"}],
         "label": [0, 1]}, features=image_features())
    ds.save_to_disk(str(tmp_path / "corrupt"))
    source = f"hf:{tmp_path / 'corrupt'}"
    data = load_dataset(source, "trainval", RAW)
    with pytest.raises(BadImageError, match=r"row 1 \(broken.png\)"):
        data[1]
    with caplog.at_level(logging.WARNING):
        kept = load_dataset(source, "trainval", RAW, skip_bad_images=True)
    assert len(kept) == 1 and kept.targets == [0] and len(kept.bad_images) == 1
    assert "broken.png" in kept.bad_images[0] and "skipped 1 unreadable image(s) of 2" in caplog.text
    torch.testing.assert_close(kept[0][0], torch.full((3, 32, 32), 9 / 255), atol=1e-6, rtol=0)
