"""Hugging Face `datasets` folders (save_to_disk) with an image column and a mask column."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from snella.data.checks import check_split
from snella.data.hf import _decode, dict_parts, load_saved
from snella.data.splits import choose_split
from snella.segmentation.data import (BINARY_CLASSES, DEFAULT_IGNORE_INDEX, MaskError, SegmentationDataset,
                                      binary_mask, check_labels, check_same_size)

IMAGE_COLUMNS = ("image", "img", "pixel_values")
MASK_COLUMNS = ("mask", "label", "labels", "annotation", "segmentation", "semantic_segmentation", "seg", "gt",
                "label_map")


def find_columns(features: Any, where: str, image_column: Optional[str] = None,
                 mask_column: Optional[str] = None) -> tuple[str, str]:
    """(image column, mask column) of a dataset: the ones given, else by name among the known names.

    With no name known, two image-typed columns are read as (image, mask) when exactly two exist.

    Raises:
        ValueError: a given column does not exist, or the columns cannot be told apart (lists the columns and
            the names tried).
    """
    import datasets

    columns = list(features)
    for given, what in ((image_column, "image_column"), (mask_column, "mask_column")):
        if given is not None and given not in columns:
            raise ValueError(f"{where}: {what}={given!r} is not a column; columns: {', '.join(columns)}")
    image = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    mask = mask_column or next((c for c in MASK_COLUMNS if c in columns and c != image), None)
    typed = [c for c in columns if isinstance(features[c], datasets.Image)]
    if (image is None or mask is None) and len(typed) == 2:
        image = image or next(c for c in typed if c != mask)
        mask = mask or next(c for c in typed if c != image)
    if image is None or mask is None or image == mask:
        raise ValueError(f"{where}: cannot tell the image and mask columns among {', '.join(columns)}; name them "
                         f"(image_column=..., mask_column=...). Names tried: images {', '.join(IMAGE_COLUMNS)}; masks "
                         f"{', '.join(MASK_COLUMNS)}")
    return image, mask


class HFSegmentationDataset(SegmentationDataset):
    """Rows of a Hugging Face Dataset; each row's image and mask are decoded and checked when it is loaded."""

    def __init__(self, table: Any, image_column: str, mask_column: str, classes: Sequence[str], source: str,
                 split: str, transform: Callable | None = None, ignore_index: int = DEFAULT_IGNORE_INDEX,
                 binary: bool = False, channels: int = 3) -> None:
        import datasets

        super().__init__(classes, source, split, transform, ignore_index, binary, channels)
        table = table.select_columns([image_column, mask_column])
        for column in (image_column, mask_column):
            if isinstance(table.features[column], datasets.Image):  # decode here: a bad file gets our error
                table = table.cast_column(column, datasets.Image(decode=False))
        self.table, self.image_column, self.mask_column = table, image_column, mask_column

    def __len__(self) -> int:
        return len(self.table)

    def _mask(self, value: Any, name: str) -> np.ndarray:
        """A mask cell (encoded file, PIL image or integer array) as checked ``(H, W)`` int64 labels."""
        lossless = True
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            lossless = not str(value.get("path") or "").lower().endswith((".jpg", ".jpeg", ".webp"))
            image = _decode(value, "L", name) if self.binary else _open_label_map(value, name)
            values = np.asarray(image)
        elif isinstance(value, Image.Image):
            values = np.asarray(value.convert("L") if self.binary and value.mode not in ("L", "1") else value)
        else:
            values = np.asarray(value)
            if values.dtype.kind not in "iub":
                raise MaskError(f"mask {name}: expected an encoded image or an integer array, got dtype {values.dtype}")
        if values.ndim != 2:
            raise MaskError(f"mask {name}: expected a 2-D label map, got shape {values.shape}")
        if self.binary:
            return binary_mask(values, name, lossless)
        return check_labels(values, self.num_classes, self.ignore_index, name)

    def load_pair(self, index: int) -> tuple[Image.Image, np.ndarray]:
        row = self.table[index]
        name = self.describe(index)
        image = _decode(row[self.image_column], "RGB" if self.channels == 3 else "L", f"{name} image")
        mask = self._mask(row[self.mask_column], f"{name} {self.mask_column!r}")
        check_same_size(image.size, mask.shape, f"{name} image", f"{name} {self.mask_column!r}")
        return image, mask

    def describe(self, index: int) -> str:
        return f"{self.source} [{self.split}] row {index}"


def _open_label_map(value: dict, name: str) -> Image.Image:
    """An encoded label map opened without converting its mode (palette indices stay indices)."""
    import io

    try:
        image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        image.load()
    except (OSError, SyntaxError) as error:
        raise MaskError(f"cannot read mask {name}: {error}") from error
    if image.mode not in ("L", "P", "I", "I;16", "1"):
        raise MaskError(f"mask {name} is a {image.mode} image; a multi-class mask must be a label map (grey or palette "
                        "pixels that are the class indices), not colours")
    return image


def load_hf_segmentation(path: str, split: str, transform: Callable | None = None,
                         image_column: Optional[str] = None, mask_column: Optional[str] = None,
                         classes: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                         ignore_index: int = DEFAULT_IGNORE_INDEX, seed: int = 0,
                         channels: int = 3) -> HFSegmentationDataset:
    """Load one split of a dataset saved with ``datasets``' save_to_disk (a DatasetDict of splits, or one Dataset).

    Splits map as for classification (``snella.data.hf``): "train", "validation"/"val"/"valid", "test"; without
    a validation split "train"/"val" are a 90/10 hold-out chosen with ``seed``. Masks are binary (0/1 or 0/255)
    unless ``classes`` or ``num_classes`` are given; then they are label maps with ``ignore_index``.
    """
    check_split(split)
    loaded = load_saved(path, "hf: segmentation sources")
    import datasets  # imported by load_saved

    if isinstance(loaded, datasets.DatasetDict):
        parts = dict_parts(loaded, path)
    else:
        parts = {"train": loaded}
    image_column, mask_column = find_columns(parts["train"].features, path, image_column, mask_column)
    if classes is None and num_classes is not None:
        classes = [str(k) for k in range(num_classes)]
    binary = classes is None
    chosen = choose_split(split, {part: [0] * len(table) for part, table in parts.items()}, seed, path)
    tables = [parts[part].select(indices) for part, indices in chosen]
    table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    return HFSegmentationDataset(table, image_column, mask_column, list(classes or BINARY_CLASSES), path, split,
                                 transform, ignore_index, binary, channels)
