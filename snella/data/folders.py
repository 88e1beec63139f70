"""ImageFolder trees: <root>/<class>/<image>, or <root>/{train,val,test}/<class>/<image>."""

from __future__ import annotations

import logging
import os
from typing import Callable

from snella.data.base import FileDataset
from snella.data.splits import choose_split

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Folder names read as a split in a split layout; the first name found wins.
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def _subfolders(folder: str) -> list[str]:
    """Sorted names of the visible subfolders of ``folder``."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_under(folder: str) -> list[str]:
    """Sorted paths of the image files anywhere under ``folder``."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(parent, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def _split_folders(root: str) -> dict[str, str]:
    """The split folders of a split layout ({} when ``root`` holds class folders directly).

    A root is a split layout when it has a ``train/`` folder that itself holds folders.
    """
    present = set(_subfolders(root))
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        name = next((n for n in names if n in present), None)
        if name is not None:
            found[split] = os.path.join(root, name)
    if "train" not in found or not _subfolders(found["train"]):
        return {}
    return found


def _scan(folder: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """(paths, labels) of the images in ``folder``/<class>/; raise on an empty class folder."""
    paths, targets = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(folder, name)
        if not os.path.isdir(class_dir):
            continue  # a split may lack a class the others have
        images = _images_under(class_dir)
        if not images:
            raise ValueError(f"class folder {class_dir} holds no images (accepted extensions: "
                             f"{' '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        paths += images
        targets += [label] * len(images)
    return paths, targets


def load_imagefolder(root: str, split: str, transform: Callable | None, skip_bad_images: bool,
                     seed: int, source: str) -> FileDataset:
    """Load one split of an ImageFolder tree.

    Two layouts are detected. With split folders (``train/`` and optionally ``val/`` (or
    ``valid/``, ``validation/``) and ``test/``, each holding class folders) the splits map as in
    ``snella.data.splits.choose_split``. A root holding class folders directly is all training
    data: "trainval" is every image, "train"/"val" a seeded 90/10 stratified split of them, and
    "test" again every image (logged as a warning, as it overlaps training).

    Class names are the sorted class folder names (over all split folders, so labels agree
    across splits); images may sit in nested folders below their class folder.

    Args:
        root: the tree's root folder.
        split: "train", "val", "trainval" or "test".
        transform: applied to each PIL image.
        skip_bad_images: decode every image now and drop unreadable ones (a full pass).
        seed: seed of the train/val hold-out when there is no val folder.
        source: the user's source string, kept on the dataset and named in errors.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    folders = _split_folders(root) or {"train": root, "test": root}
    classes = sorted({name for folder in folders.values() for name in _subfolders(folder)})
    if not classes:
        raise ValueError(f"{root} holds no class folders; expected {root}/<class>/<image> or "
                         f"{root}/train/<class>/<image> (with optional val/ and test/)")
    parts = {name: _scan(folder, classes) for name, folder in folders.items()}
    for name, (paths, _) in parts.items():
        if not paths:
            raise ValueError(f"no images in {folders[name]} (accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")
    if split == "test" and folders.get("test") == folders["train"]:
        logger.warning("%s has no split folders: split 'test' is every image, overlapping training", root)
    paths, targets = [], []
    for part, indices in choose_split(split, {k: v[1] for k, v in parts.items()}, seed, source):
        paths += [parts[part][0][i] for i in indices]
        targets += [parts[part][1][i] for i in indices]
    return FileDataset(paths, targets, classes, source, split, transform, skip_bad_images)
