"""Hugging Face `datasets` folders with image and mask columns."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from snella.segmentation.data import MaskError
from snella.segmentation.hf_data import load_hf_segmentation

datasets = pytest.importorskip("datasets")


def _png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _save(path, rows: dict[str, list], columns: dict[str, str], splits=("train", "test")) -> str:
    features = datasets.Features({name: datasets.Image() if kind == "image" else datasets.Value(kind)
                                  for name, kind in columns.items()})
    table = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({s: table for s in splits}).save_to_disk(str(path))
    return str(path)


def _rows(n: int, masks: list[np.ndarray], image_key="image", mask_key="mask") -> dict[str, list]:
    images = [_png(np.full((4, 5, 3), 40 * i)) for i in range(n)]
    return {image_key: images, mask_key: [_png(m) for m in masks]}


def test_auto_detected_columns_binary_masks(tmp_path):
    masks = [np.array([[0, 255, 255, 0, 0]] * 4), np.zeros((4, 5))]
    path = _save(tmp_path / "d", _rows(2, masks), {"image": "image", "mask": "image"})
    data = load_hf_segmentation(path, "test")
    assert data.binary and len(data) == 2
    image, mask = data[0]
    assert image.shape == (3, 4, 5) and mask.tolist() == [[0, 1, 1, 0, 0]] * 4
    assert round(float(data[1][0][0, 0, 0]) * 255) == 40


def test_named_columns_multiclass(tmp_path):
    labels = np.array([[0, 1, 2, 255, 0]] * 4)
    path = _save(tmp_path / "d", _rows(1, [labels], "pixels", "gt_map"), {"pixels": "image", "gt_map": "image"})
    data = load_hf_segmentation(path, "train", image_column="pixels", mask_column="gt_map", num_classes=3)
    assert data[0][1].tolist() == labels.tolist()
    with pytest.raises(MaskError, match=r"row 0 'gt_map': labels 2 are outside the 2 classes"):
        load_hf_segmentation(path, "train", image_column="pixels", mask_column="gt_map", num_classes=2)[0]


def test_two_image_columns_with_unknown_names_are_image_then_mask(tmp_path):
    path = _save(tmp_path / "d", _rows(1, [np.zeros((4, 5))], "a", "b"), {"a": "image", "b": "image"})
    data = load_hf_segmentation(path, "train")
    assert (data.image_column, data.mask_column) == ("a", "b")


def test_undetectable_columns_and_a_wrong_name(tmp_path):
    rows = _rows(1, [np.zeros((4, 5))], "photo", "m") | {"note": ["x"]}
    path = _save(tmp_path / "d", rows, {"photo": "image", "m": "image", "note": "string"})
    load_hf_segmentation(path, "train")  # two Image columns: still decidable
    rows = {"photo": rows["photo"], "note": ["x"]}
    path = _save(tmp_path / "e", rows, {"photo": "image", "note": "string"})
    with pytest.raises(ValueError, match=r"cannot tell the image and mask columns among photo, note"):
        load_hf_segmentation(path, "train")
    with pytest.raises(ValueError, match=r"mask_column='seg' is not a column; columns: photo, note"):
        load_hf_segmentation(path, "train", mask_column="seg")


def test_mask_of_another_size_is_named(tmp_path):
    path = _save(tmp_path / "d", _rows(1, [np.zeros((3, 5))]), {"image": "image", "mask": "image"})
    with pytest.raises(MaskError, match=r"\[train\] row 0 'mask' is 5x3 .* image is 5x4"):
        load_hf_segmentation(path, "train")[0]
