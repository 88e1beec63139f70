"""load_dataset: read a ``--data`` source string and dispatch to the loader of its layout."""

from __future__ import annotations

import os
from typing import Callable

from snella.data.base import LabeledDataset
from snella.data.builtin import BUILTINS, list_builtin_datasets, load_builtin
from snella.data.checks import check_split
from snella.data.folders import load_imagefolder
from snella.data.hf import load_hf
from snella.data.lists import FGVC_FILES, VTAB_LISTS, load_fgvc, load_vtab

PREFIXES = ("imagefolder", "vtab", "fgvc", "hf")
# Files save_to_disk writes: a DatasetDict, or a single Dataset.
_HF_MARKERS = ("dataset_dict.json", "state.json")


def detect_layout(path: str) -> str:
    """The layout of a folder given without a prefix: "vtab", "fgvc", "hf" or "imagefolder"."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    if any(has(name) for name in VTAB_LISTS.values()):
        return "vtab"
    if has(FGVC_FILES["train"]):
        return "fgvc"
    if any(has(name) for name in _HF_MARKERS):
        return "hf"
    return "imagefolder"


def parse_source(source: str) -> tuple[str, str]:
    """Split a source string into (kind, location): kind is "builtin" or one of PREFIXES.

    Raises:
        FileNotFoundError: neither a built-in name nor an existing path.
    """
    kind, sep, rest = source.partition(":")
    if sep and kind in PREFIXES:
        path = os.path.expanduser(rest)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{source}: folder {path} does not exist")
        return kind, path
    if source in BUILTINS:
        return "builtin", source
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return detect_layout(path), path
    raise FileNotFoundError(
        f"data source {source!r} is neither a built-in dataset ({', '.join(list_builtin_datasets())}) nor an "
        f"existing folder; accepted forms: a built-in name, a folder, or {', '.join(p + ':<folder>' for p in PREFIXES)}")


def load_dataset(source: str, split: str, transform: Callable | None = None, *,
                 skip_bad_images: bool = False, seed: int = 0) -> LabeledDataset:
    """Load one split of a dataset as a torch Dataset of (image, int label).

    Args:
        source: a built-in name (see ``list_builtin_datasets``); "imagefolder:<folder>",
            "vtab:<root>/<task>", "fgvc:<root>/<name>", "hf:<folder saved with save_to_disk>"; or a
            folder, whose layout is detected (VTAB lists, train.json, save_to_disk files, else
            ImageFolder).
        split: "train", "val", "trainval" or "test". "train" and "val" always partition
            "trainval" (all training data); where the source has no validation part, "val" is a
            stratified 10% of its training part.
        transform: PIL image -> tensor, e.g. from ``build_transform``; None returns PIL images.
        skip_bad_images: decode every image once now (a full pass over the files, so it costs
            time) and drop unreadable ones into ``dataset.bad_images``; otherwise a corrupt image
            raises an error naming its file when it is read.
        seed: seed of the train/val hold-out for sources without a validation part (built-in
            datasets ignore it: their splits are fixed).

    Returns:
        A LabeledDataset with ``classes``, ``num_classes``, ``targets``, ``source``, ``bad_images``.
    """
    check_split(split)
    kind, location = parse_source(source)
    if kind == "builtin":
        return load_builtin(location, split, transform)
    if kind == "vtab":
        return load_vtab(location, split, transform, skip_bad_images, source)
    if kind == "fgvc":
        return load_fgvc(location, split, transform, skip_bad_images, seed, source)
    if kind == "hf":
        return load_hf(location, split, transform, skip_bad_images, seed, source)
    return load_imagefolder(location, split, transform, skip_bad_images, seed, source)
