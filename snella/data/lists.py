"""Datasets described by label lists: VTAB-1k text lists and FGVC (VPT) json files, validated before use."""

from __future__ import annotations

import json
import os
from typing import Callable

from snella.data.base import FileDataset
from snella.data.checks import check_split
from snella.data.splits import choose_split

VTAB_LISTS = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt", "test": "test.txt"}
FGVC_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}
# Where VPT's FGVC json paths are relative to, by dataset: the json's folder (flowers, cars),
# images/ (CUB, NABirds) or Images/ (Stanford Dogs). The loader checks which holds the files.
FGVC_IMAGE_DIRS = ("", "images", "Images")
_SHOW_MISSING = 5


def _check_exist(entries: list[tuple[str, str]], listed_in: str) -> None:
    """Raise FileNotFoundError naming the first missing files of ``entries`` ((where, path) pairs)."""
    missing = [(where, path) for where, path in entries if not os.path.isfile(path)]
    if missing:
        shown = "; ".join(f"{where}: {path}" for where, path in missing[:_SHOW_MISSING])
        raise FileNotFoundError(f"{len(missing)} of {len(entries)} image(s) listed in {listed_in} do not "
                                f"exist, first: {shown}")


def read_vtab_list(list_file: str) -> list[tuple[int, str, int]]:
    """Parse a VTAB-1k list, one ``<relative image path> <integer label>`` per line.

    Returns:
        (line number, relative path, label) per non-empty line.

    Raises:
        ValueError: a malformed line or a negative label, naming the file and line.
    """
    entries = []
    with open(list_file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            fields = line.rsplit(None, 1)  # the path itself may contain spaces
            where = f"{list_file}, line {number}"
            if len(fields) != 2:
                raise ValueError(f"{where}: malformed line {line!r}; expected '<relative image path> <integer label>'")
            try:
                label = int(fields[1])
            except ValueError:
                raise ValueError(f"{where}: label {fields[1]!r} is not an integer (line {line!r})") from None
            if label < 0:
                raise ValueError(f"{where}: label {label} is negative; labels are 0, 1, 2, ...")
            entries.append((number, fields[0], label))
    return entries


def load_vtab(root: str, split: str, transform: Callable | None, skip_bad_images: bool,
              source: str) -> FileDataset:
    """Load one split of a VTAB-1k task folder.

    Splits read train800.txt, val200.txt, train800val200.txt (or, if it is absent, the first
    two together) and test.txt. Paths are relative to ``root``. Classes are "0".."K-1" with K
    one more than the largest label in any of the task's lists, so every split agrees.
    Every list is parsed and every file of the split checked before the dataset is returned.
    """
    check_split(split)
    lists = {name: os.path.join(root, file) for name, file in VTAB_LISTS.items()
             if os.path.isfile(os.path.join(root, file))}
    wanted = [split]
    if split == "trainval" and "trainval" not in lists and {"train", "val"} <= set(lists):
        wanted = ["train", "val"]
    for name in wanted:
        if name not in lists:
            raise FileNotFoundError(f"VTAB-1k list {os.path.join(root, VTAB_LISTS[name])} for split "
                                    f"{split!r} does not exist (lists found: "
                                    f"{', '.join(os.path.basename(p) for p in lists.values()) or 'none'})")
    parsed = {name: read_vtab_list(path) for name, path in lists.items()}
    num_classes = 1 + max((label for entries in parsed.values() for _, _, label in entries), default=-1)
    paths, targets = [], []
    for name in wanted:
        files = [(f"line {number}", os.path.join(root, rel)) for number, rel, _ in parsed[name]]
        if not files:
            raise ValueError(f"VTAB-1k list {lists[name]} lists no images")
        _check_exist(files, lists[name])
        paths += [path for _, path in files]
        targets += [label for _, _, label in parsed[name]]
    classes = [str(i) for i in range(num_classes)]
    return FileDataset(paths, targets, classes, source, split, transform, skip_bad_images)


def read_fgvc_json(json_file: str) -> dict[str, int]:
    """Parse an FGVC (VPT) split file: a json object mapping image path -> non-negative int label.

    Raises:
        ValueError: invalid json, not an object, or a label that is not a non-negative integer,
            naming the file and the entry.
    """
    try:
        with open(json_file, encoding="utf-8") as f:
            mapping = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_file} is not valid json: {error}") from error
    if not isinstance(mapping, dict):
        raise ValueError(f"{json_file}: expected a json object mapping image path -> integer label, "
                         f"got a {type(mapping).__name__}")
    for path, label in mapping.items():
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ValueError(f"{json_file}: entry {path!r} has label {label!r}; expected a non-negative integer")
    return mapping


def _fgvc_image_dir(folder: str, json_file: str, rel_paths: list[str]) -> str:
    """The folder that ``rel_paths`` are relative to; raise naming the missing files if none holds them all."""
    best = None
    for sub in FGVC_IMAGE_DIRS:
        base = os.path.join(folder, sub) if sub else folder
        if not os.path.isdir(base):
            continue
        missing = sum(not os.path.isfile(os.path.join(base, p)) for p in rel_paths)
        if missing == 0:
            return base
        if best is None or missing < best[1]:
            best = (base, missing)
    _check_exist([(f"entry {p!r}", os.path.join(best[0], p)) for p in rel_paths],
                 f"{json_file} (resolved against {best[0]}, the best of {', '.join(FGVC_IMAGE_DIRS[1:])}/ or the json's folder)")
    return best[0]  # unreachable: _check_exist raised


def load_fgvc(root: str, split: str, transform: Callable | None, skip_bad_images: bool, seed: int,
              source: str) -> FileDataset:
    """Load one split of an FGVC task folder in VPT's layout (train.json, val.json, test.json).

    Image paths are relative to the json's folder, or to its ``images/`` or ``Images/`` folder,
    whichever holds them. "trainval" is train + val; without val.json, "train"/"val" are a seeded
    90/10 stratified split of train.json. Labels are mapped to 0..K-1 in sorted order of the
    label values found in all the json files (VPT's json labels may start at 1); ``classes``
    holds the original values as strings.
    """
    check_split(split)
    files = {name: os.path.join(root, file) for name, file in FGVC_FILES.items()
             if os.path.isfile(os.path.join(root, file))}
    if "train" not in files:
        raise FileNotFoundError(f"FGVC split file {os.path.join(root, FGVC_FILES['train'])} does not exist")
    mappings = {name: read_fgvc_json(path) for name, path in files.items()}
    for name, mapping in mappings.items():
        if not mapping:
            raise ValueError(f"FGVC split file {files[name]} lists no images")
    label_values = sorted({label for mapping in mappings.values() for label in mapping.values()})
    index_of = {value: i for i, value in enumerate(label_values)}
    parts = {name: [index_of[label] for label in mapping.values()] for name, mapping in mappings.items()}
    paths, targets = [], []
    for name, indices in choose_split(split, parts, seed, source):
        rel_paths = list(mappings[name])
        chosen = [rel_paths[i] for i in indices]
        base = _fgvc_image_dir(root, files[name], chosen)
        paths += [os.path.join(base, p) for p in chosen]
        targets += [parts[name][i] for i in indices]
    return FileDataset(paths, targets, [str(v) for v in label_values], source, split, transform, skip_bad_images)
