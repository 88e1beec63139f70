"""Hugging Face `datasets` saved with save_to_disk (a DatasetDict of splits, or one Dataset)."""

from __future__ import annotations

import io
import logging
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from snella.data.base import LabeledDataset
from snella.data.checks import BadImageError, is_readable, log_skipped, open_image
from snella.data.splits import choose_split

logger = logging.getLogger(__name__)

# Split names of a DatasetDict read as each of our parts; the first one present wins.
HF_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}
IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels")


def _columns(features: Any, where: str) -> tuple[str, str]:
    """(image column, label column): by feature type (Image, ClassLabel), else by name."""
    import datasets

    def pick(feature_type: type, names: Sequence[str], what: str) -> str:
        typed = [name for name, f in features.items() if isinstance(f, feature_type)]
        named = [name for name in names if name in features]
        if len(typed) == 1:
            return typed[0]
        if named:
            return named[0]
        raise ValueError(f"{where}: cannot tell which column holds the {what} among "
                         f"{', '.join(features)}; expected one {feature_type.__name__} column or a "
                         f"column named {' or '.join(names)}")

    return (pick(datasets.Image, IMAGE_COLUMN_NAMES, "images"),
            pick(datasets.ClassLabel, LABEL_COLUMN_NAMES, "labels"))


def _decode(value: Any, mode: str, name: str) -> Image.Image:
    """A PIL image from a cell of the image column: encoded bytes/path, a PIL image, or a uint8 array."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        data = value.get("bytes")
        return open_image(io.BytesIO(data) if data else value["path"], mode, name)
    if isinstance(value, Image.Image):
        return value.convert(mode)
    array = np.asarray(value)
    if array.dtype.kind not in "iu" or array.size == 0 or array.min() < 0 or array.max() > 255:
        raise BadImageError(f"{name}: expected an encoded image or a uint8 pixel array, got "
                            f"{type(value).__name__} of dtype {array.dtype}")
    return Image.fromarray(array.astype(np.uint8)).convert(mode)


class HFImageDataset(LabeledDataset):
    """Rows of a Hugging Face Dataset with an image column and a label column."""

    def __init__(self, table: Any, image_column: str, targets: Sequence[int], classes: Sequence[str],
                 source: str, split: str, transform: Callable | None = None, skip_bad_images: bool = False) -> None:
        import datasets

        table = table.select_columns([image_column])
        if isinstance(table.features[image_column], datasets.Image):
            # Read the encoded bytes and decode them here, so a corrupt image gets our error.
            table = table.cast_column(image_column, datasets.Image(decode=False))
        self.table, self.image_column = table, image_column
        self.source, self.split = source, split  # describe() needs them before the base class sets them
        targets, bad = list(targets), []
        if skip_bad_images:
            keep = [i for i in range(len(table)) if self._readable(i)]
            bad = [self.describe(i) for i in sorted(set(range(len(table))) - set(keep))]
            self.table = table.select(keep)
            targets = [targets[i] for i in keep]
            log_skipped(source, split, bad, len(keep) + len(bad))
        super().__init__(classes, targets, source, split, transform, bad)

    def _readable(self, index: int) -> bool:
        value = self.table[index][self.image_column]
        if isinstance(value, dict) and value.get("bytes"):
            return is_readable(value["bytes"])
        try:
            self.load_image(index)
            return True
        except (BadImageError, OSError):
            return False

    def load_image(self, index: int, mode: str = "RGB") -> Image.Image:
        return _decode(self.table[index][self.image_column], mode, self.describe(index))

    def describe(self, index: int) -> str:
        value = self.table[index][self.image_column]
        path = value.get("path") if isinstance(value, dict) else None
        return f"{self.source} [{self.split}] row {index}" + (f" ({path})" if path else "")


def load_saved(path: str, what: str = "hf: sources"):
    """``datasets.load_from_disk(path)``: a DatasetDict or a Dataset, with errors that say what is missing.

    Raises:
        ImportError: ``datasets`` is not installed (``what`` names the caller in the message).
        FileNotFoundError: ``path`` holds no dataset saved with save_to_disk.
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"{what} need the `datasets` package: pip install 'snella[data]'") from error
    try:
        return datasets.load_from_disk(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path} is not a dataset saved with save_to_disk: {error}") from error


def dict_parts(loaded: Any, path: str) -> dict[str, Any]:
    """The parts ("train", optional "val", "test") of a DatasetDict, by ``HF_SPLIT_NAMES``; it must have "train"."""
    parts = {}
    for part, names in HF_SPLIT_NAMES.items():
        name = next((n for n in names if n in loaded), None)
        if name is not None:
            parts[part] = loaded[name]
    if "train" not in parts:
        raise ValueError(f"{path}: a DatasetDict needs a 'train' split, it has {', '.join(loaded)}")
    return parts


def load_hf(path: str, split: str, transform: Callable | None, skip_bad_images: bool, seed: int,
            source: str) -> HFImageDataset:
    """Load one split of a dataset saved with ``datasets``' save_to_disk.

    A DatasetDict's "train", "validation" (or "val", "valid") and "test" splits map as in
    ``snella.data.splits.choose_split``; a single Dataset is all training data ("test" is then
    the same rows, with a warning). The image column is the one Image feature (else the column
    named "image" or "img"); the label column the one ClassLabel (else "label" or "labels").
    Class names come from the ClassLabel, else are "0".."K-1".
    """
    loaded = load_saved(path)
    import datasets  # imported by load_saved

    if isinstance(loaded, datasets.DatasetDict):
        parts = dict_parts(loaded, path)
    else:
        parts = {"train": loaded, "test": loaded}
        if split == "test":
            logger.warning("%s is a single Dataset: split 'test' is every row, overlapping training", path)
    image_column, label_column = _columns(parts["train"].features, path)
    for part, table in parts.items():
        if {image_column, label_column} - set(table.column_names):
            raise ValueError(f"{path}: split {part!r} lacks column {image_column!r} or {label_column!r}")
    labels = {part: [int(v) for v in table[label_column]] for part, table in parts.items()}
    feature = parts["train"].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
    else:
        classes = [str(i) for i in range(1 + max(max(v, default=-1) for v in labels.values()))]
    chosen = choose_split(split, labels, seed, source)
    tables = [parts[part].select(indices) for part, indices in chosen]
    table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    targets = [labels[part][i] for part, indices in chosen for i in indices]
    return HFImageDataset(table, image_column, targets, classes, source, split, transform, skip_bad_images)
