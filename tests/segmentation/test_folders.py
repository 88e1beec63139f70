"""Image + mask folders: the layouts are read as written, masks decode to the right labels, bad input is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from snella.segmentation.data import MaskError
from snella.segmentation.folders import load_mask_folder


def _write(folder: Path, stem: str, mask: np.ndarray, image_size: tuple[int, int] | None = None,
           mask_ext: str = ".png", mask_mode: str = "L") -> None:
    """An RGB image (its red channel = 10 x the stem's number) and its mask, in folder/images and folder/masks."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    h, w = image_size or mask.shape
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[..., 0] = 10 * int(stem.strip("abcdefghijklmnopqrstuvwxyz_") or 0)
    Image.fromarray(pixels).save(folder / "images" / f"{stem}.jpg", quality=100)
    if mask_mode == "P":  # a palette PNG whose indices are the labels (its colours are not)
        image = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
        image.putpalette([v for k in range(256) for v in (k * 7 % 256, k * 13 % 256, k * 29 % 256)])
    else:
        image = Image.fromarray(mask.astype(np.uint8))
    image.save(folder / "masks" / f"{stem}{mask_ext}")


BOX = np.zeros((6, 8), dtype=np.uint8)
BOX[1:4, 2:6] = 255  # a 3x4 foreground box


def test_split_folders_with_binary_0_255_masks(tmp_path):
    for split, stems in (("train", ["img1", "img2"]), ("val", ["img3"]), ("test", ["img4", "img5"])):
        for stem in stems:
            _write(tmp_path / split, stem, BOX)
    train = load_mask_folder(str(tmp_path), "train")
    assert len(train) == 2 and train.binary and train.classes == ["background", "foreground"]
    image, mask = train[1]
    assert image.shape == (3, 6, 8) and mask.dtype.is_floating_point is False
    assert round(float(image[0, 0, 0]) * 255) == 20  # img2's red value: images and masks pair by stem, in order
    assert mask.sum().item() == 12 and mask[1:4, 2:6].eq(1).all()
    assert [len(load_mask_folder(str(tmp_path), s)) for s in ("val", "test", "trainval")] == [1, 2, 3]


def test_list_files_and_0_1_masks(tmp_path):
    for i in range(1, 6):
        _write(tmp_path, f"case{i}", BOX // 255)
    (tmp_path / "train.txt").write_text("case1\ncase2.jpg\ncase3\n")
    (tmp_path / "test.txt").write_text("case5\n\n")
    train = load_mask_folder(str(tmp_path), "trainval")
    assert [Path(p[0]).stem for p in train.pairs] == ["case1", "case2", "case3"]
    assert train[0][1].sum().item() == 12
    assert [Path(p[0]).stem for p in load_mask_folder(str(tmp_path), "test").pairs] == ["case5"]
    # without a val list, "train" and "val" partition the listed training pairs
    held = load_mask_folder(str(tmp_path), "val", seed=1).pairs
    kept = load_mask_folder(str(tmp_path), "train", seed=1).pairs
    assert len(held) == 1 and sorted(held + kept) == sorted(train.pairs)


def test_jpeg_masks_are_thresholded_at_128(tmp_path):
    noisy = BOX.copy()
    noisy[0, 0], noisy[1, 2] = 3, 250  # what JPEG compression does to a 0/255 mask's values
    _write(tmp_path, "a1", noisy, mask_ext=".jpg")
    mask = load_mask_folder(str(tmp_path), "trainval")[0][1]
    assert mask[1:4, 2:6].eq(1).all() and mask.sum().item() == 12


def test_multiclass_label_maps_with_ignore_index_and_class_names(tmp_path):
    labels = np.array([[0, 1, 2, 255], [2, 2, 1, 0]], dtype=np.uint8)
    _write(tmp_path, "x1", labels)
    _write(tmp_path, "x2", labels, mask_mode="P")
    (tmp_path / "classes.txt").write_text("background\nliver\ntumour\n")
    assert Image.open(tmp_path / "masks" / "x2.png").mode == "P"
    data = load_mask_folder(str(tmp_path), "trainval")
    assert not data.binary and data.classes == ["background", "liver", "tumour"] and data.ignore_index == 255
    for i in range(2):  # grey and palette PNGs give the same labels (palette indices, not colours)
        assert data[i][1].tolist() == labels.astype(np.int64).tolist()


def test_num_classes_without_a_class_file(tmp_path):
    _write(tmp_path, "x1", np.array([[0, 3], [1, 2]], dtype=np.uint8))
    data = load_mask_folder(str(tmp_path), "trainval", num_classes=4)
    assert data.classes == ["0", "1", "2", "3"] and data[0][1].tolist() == [[0, 3], [1, 2]]


def test_label_outside_the_classes_is_refused_naming_the_file(tmp_path):
    _write(tmp_path, "x1", np.array([[0, 1], [1, 0]], dtype=np.uint8))
    _write(tmp_path, "x2", np.array([[0, 5], [1, 0]], dtype=np.uint8))
    with pytest.raises(MaskError, match=r"mask .*x2\.png: labels 5 are outside the 3 classes \(accepted: 0\.\.2 or the "
                                        r"ignore index 255\)"):
        load_mask_folder(str(tmp_path), "trainval", num_classes=3, check=True)


def test_a_multiclass_map_read_as_binary_is_refused(tmp_path):
    _write(tmp_path, "x1", np.array([[0, 1], [2, 0]], dtype=np.uint8))
    data = load_mask_folder(str(tmp_path), "trainval")
    with pytest.raises(MaskError, match=r"x1\.png: values 0, 1, 2 are not a binary mask"):
        data[0]


def test_mask_size_differs_from_its_image(tmp_path):
    _write(tmp_path, "x1", BOX, image_size=(6, 9))
    with pytest.raises(MaskError, match=r"mask .*x1\.png is 8x6 .* its image .*x1\.jpg is 9x6"):
        load_mask_folder(str(tmp_path), "trainval")[0]


def test_image_without_mask_and_mask_without_image(tmp_path):
    _write(tmp_path, "x1", BOX)
    _write(tmp_path, "x2", BOX)
    (tmp_path / "masks" / "x2.png").unlink()
    with pytest.raises(MaskError, match=r"image .*images/x2\.jpg has no mask"):
        load_mask_folder(str(tmp_path), "train")
    (tmp_path / "images" / "x2.jpg").unlink()
    Image.fromarray(BOX).save(tmp_path / "masks" / "x3.png")
    with pytest.raises(MaskError, match=r"mask .*masks/x3\.png has no image"):
        load_mask_folder(str(tmp_path), "train")


def test_list_file_naming_a_missing_image(tmp_path):
    _write(tmp_path, "x1", BOX)
    (tmp_path / "train.txt").write_text("x1\nx9\n")
    with pytest.raises(MaskError, match=r"train\.txt: 'x9' names no image"):
        load_mask_folder(str(tmp_path), "train")


def test_colour_mask_is_refused_for_multiclass(tmp_path):
    _write(tmp_path, "x1", BOX)
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp_path / "masks" / "x1.png")
    with pytest.raises(MaskError, match=r"x1\.png is a RGB image; a multi-class mask must be a label map"):
        load_mask_folder(str(tmp_path), "trainval", num_classes=3)[0]


def test_missing_test_split_and_missing_folders(tmp_path):
    _write(tmp_path, "x1", BOX)
    with pytest.raises(ValueError, match="has no test split"):
        load_mask_folder(str(tmp_path), "test")
    with pytest.raises(FileNotFoundError, match="neither images/"):
        load_mask_folder(str(tmp_path / "masks"), "train")
