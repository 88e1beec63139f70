"""Built-in segmentation from real images: Fashion-MNIST test items placed on a larger canvas, with exact masks.

Each canvas holds 1 to ``max_objects`` items, each scaled by a random factor, cropped to its box and put
where its box keeps ``GAP`` empty pixels from the others, so objects never overlap and every pixel belongs to at
most one. The mask labels an item's pixels brighter than ``threshold`` with its class index + 1; everything
else is background 0. The items come from Fashion-MNIST's *test* images (the project's ViT was pretrained on
its training images), divided into disjoint pools per split (``snella.bench.tasks.source_pools``), so no
source image appears in two splits. Everything is drawn from the seed: the same seed gives the same data.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from snella.bench.tasks import _boxes_apart, _rng, source_pools
from snella.data.builtin import FASHION_MNIST_CLASSES, fashion_mnist
from snella.data.checks import check_split
from snella.segmentation.data import ArraySegmentationDataset

COMPOSITE_CLASSES = ("background",) + FASHION_MNIST_CLASSES
CANVAS = 56  # 8 x 8 patches of the project's patch-7 ViT
SIZES = {"train": 2000, "val": 250, "test": 500}
SCALE = (0.5, 0.9)  # an item's side, 28 px, times this
THRESHOLD = 32  # item pixels (0..255) above this are the item; fainter ones are background
MAX_TRIES = 50
_SPLIT_KEYS = {"train": 1, "val": 2, "test": 3}


def render(sources: np.ndarray, labels: np.ndarray, rng: np.random.Generator, canvas: int = CANVAS,
           scale: tuple[float, float] = SCALE, threshold: int = THRESHOLD) -> tuple[np.ndarray, np.ndarray, list]:
    """One composite from the candidate items ``sources`` ``(K, 28, 28)`` uint8 with class ``labels`` ``(K,)``.

    Items are placed in order while a free place is found (at most ``MAX_TRIES`` draws each); the first always
    fits. Returns ``(image (canvas, canvas) uint8, mask (canvas, canvas) int64, boxes)``, boxes as
    ``(top, left, height, width, label)`` of the items placed.
    """
    image = np.zeros((canvas, canvas), dtype=np.uint8)
    mask = np.zeros((canvas, canvas), dtype=np.int64)
    placed: list[tuple[int, int, int, int]] = []
    boxes = []
    for source, label in zip(sources, labels):
        side = max(4, int(round(28 * rng.uniform(*scale))))
        item = np.asarray(Image.fromarray(source).resize((side, side), Image.BILINEAR))  # (side, side)
        rows, cols = np.flatnonzero((item > threshold).any(1)), np.flatnonzero((item > threshold).any(0))
        if len(rows) == 0:
            continue  # an item fainter than the threshold everywhere has no pixels to label
        item = item[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        h, w = item.shape
        for _ in range(MAX_TRIES):
            top, left = int(rng.integers(0, canvas - h + 1)), int(rng.integers(0, canvas - w + 1))
            if _boxes_apart((top, left, h, w), placed):
                break
        else:
            continue
        placed.append((top, left, h, w))
        boxes.append((top, left, h, w, int(label)))
        image[top:top + h, left:left + w] = item  # boxes are apart: no pixel is written twice
        mask[top:top + h, left:left + w][item > threshold] = int(label) + 1
    return image, mask, boxes


def make_composites(split: str, seed: int = 0, size: int | None = None, max_objects: int = 3,
                    canvas: int = CANVAS) -> tuple[np.ndarray, np.ndarray]:
    """The composites of one split: images ``(N, canvas, canvas)`` uint8 and masks ``(N, canvas, canvas)`` int64.

    Args:
        split: "train", "val" or "test" (their items come from disjoint pools of Fashion-MNIST test images).
        seed: the data seed; the same seed gives the same composites.
        size: number of composites (default ``SIZES[split]``).
        max_objects: each canvas draws 1..max_objects items.
        canvas: canvas side in pixels (>= 28).
    """
    if split not in _SPLIT_KEYS:
        raise ValueError(f"unknown split {split!r} for composites; expected one of {', '.join(_SPLIT_KEYS)}")
    if canvas < 28 or max_objects < 1:
        raise ValueError(f"canvas={canvas} must be >= 28 and max_objects={max_objects} >= 1")
    parts = fashion_mnist()
    pool = source_pools(seed)[split]
    rng = _rng(seed, 100 + _SPLIT_KEYS[split])
    n = SIZES[split] if size is None else size
    images = np.zeros((n, canvas, canvas), dtype=np.uint8)
    masks = np.zeros((n, canvas, canvas), dtype=np.int64)
    for i in range(n):
        count = int(rng.integers(1, max_objects + 1))
        chosen = rng.choice(pool, size=count, replace=False)
        images[i], masks[i], _ = render(parts.test_images[chosen], parts.test_targets[chosen], rng, canvas)
    return images, masks


def load_composites(split: str, transform: Callable | None = None, seed: int = 0, size: int | None = None,
                    max_objects: int = 3, canvas: int = CANVAS, channels: int = 3) -> ArraySegmentationDataset:
    """One split of the Fashion-MNIST composites: 11 classes (background + the 10 Fashion-MNIST classes).

    "trainval" is train + val. Needs Fashion-MNIST (Debian package dataset-fashion-mnist, see
    ``snella.data.builtin.fashion_mnist``).
    """
    check_split(split)
    names = ("train", "val") if split == "trainval" else (split,)
    made = [make_composites(name, seed, size, max_objects, canvas) for name in names]
    images = np.concatenate([m[0] for m in made])
    masks = np.concatenate([m[1] for m in made])
    return ArraySegmentationDataset(images, masks, COMPOSITE_CLASSES, "fmnist-composites", split, transform,
                                    channels=channels)
