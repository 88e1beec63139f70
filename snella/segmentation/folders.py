"""Image + mask folders with matching file stems (the Kvasir-SEG layout), binary or multi-class label maps.

Layouts read (the first that fits):
  - ``<root>/{train,val,test}/images/`` + ``<root>/{train,val,test}/masks/`` (``val`` may be ``valid`` or
    ``validation``; ``masks`` may be ``labels``);
  - ``<root>/images/`` + ``<root>/masks/`` with list files ``<root>/{train,val,test}.txt`` (one image stem or
    file name per line), or without list files: every pair is training data.
Masks: binary (0/1 or 0/255) unless the classes are given (``<root>/classes.txt``, one name per line, line k
naming label k, or ``num_classes``); then a PNG label map of class indices (grey or palette), where
``ignore_index`` (255) marks pixels that count for nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from snella.data.checks import check_split, open_image
from snella.data.folders import IMAGE_EXTENSIONS
from snella.data.splits import choose_split
from snella.segmentation.data import (BINARY_CLASSES, DEFAULT_IGNORE_INDEX, MaskError, SegmentationDataset,
                                      binary_mask, check_labels, check_same_size)

SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
MASK_FOLDERS = ("masks", "labels")
CLASSES_FILE = "classes.txt"
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")


def read_mask(path: str, binary: bool, num_classes: int, ignore_index: int) -> np.ndarray:
    """Read a mask file as ``(H, W)`` int64 labels, checked (see ``binary_mask`` and ``check_labels``).

    A multi-class mask is a label map: grey ("L", "I", "I;16") or palette ("P") pixels are the labels; a colour
    (RGB) file is refused, since its colours are not labels.
    """
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if binary:
                values = np.asarray(image.convert("L") if mode not in ("L", "1", "I", "I;16") else image)
            else:
                if mode not in ("L", "P", "I", "I;16", "1"):
                    raise MaskError(f"mask {path} is a {mode} image; a multi-class mask must be a label map (grey or "
                                    "palette PNG whose pixel values are the class indices), not colours")
                values = np.asarray(image)
    except (OSError, SyntaxError) as error:
        raise MaskError(f"cannot read mask {path}: {error}") from error
    if binary:
        return binary_mask(values, path, lossless=not path.lower().endswith(LOSSY_EXTENSIONS))
    return check_labels(values, num_classes, ignore_index, path)


def read_classes(path: str | Path) -> list[str]:
    """Class names from a text file, one per line (line k names label k); blank lines are skipped."""
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise ValueError(f"{path}: a class-name file needs at least 2 names (background first), got {names}")
    return names


def _by_stem(folder: str) -> dict[str, str]:
    """{file stem: path} of the image files directly in ``folder``; two files with one stem are refused."""
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path) or not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        stem = os.path.splitext(name)[0]
        if stem in found:
            raise ValueError(f"{folder}: two files share the stem {stem!r} ({os.path.basename(found[stem])}, {name}); "
                             "images and masks are matched by stem, so each stem must be unique")
        found[stem] = path
    return found


def _mask_folder(folder: str) -> str:
    for name in MASK_FOLDERS:
        if os.path.isdir(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"{folder} has images/ but no mask folder (expected one of: {', '.join(MASK_FOLDERS)})")


def _pairs(folder: str, stems: Optional[list[str]] = None, list_file: str = "") -> list[tuple[str, str]]:
    """(image, mask) paths of ``folder``/images and its mask folder, matched by stem; every file must pair."""
    images, masks = _by_stem(os.path.join(folder, "images")), _by_stem(_mask_folder(folder))
    if stems is None:
        lonely_images = sorted(set(images) - set(masks))
        lonely_masks = sorted(set(masks) - set(images))
        if lonely_images:
            raise MaskError(f"image {images[lonely_images[0]]} has no mask in {_mask_folder(folder)} (a mask is matched "
                            f"by file stem: {lonely_images[0]}.png); {len(lonely_images)} image(s) without a mask")
        if lonely_masks:
            raise MaskError(f"mask {masks[lonely_masks[0]]} has no image in {os.path.join(folder, 'images')} (matched "
                            f"by file stem); {len(lonely_masks)} mask(s) without an image")
        stems = sorted(images)
    for stem in stems:
        if stem not in images:
            raise MaskError(f"{list_file}: {stem!r} names no image in {os.path.join(folder, 'images')}")
        if stem not in masks:
            raise MaskError(f"image {images[stem]} has no mask in {_mask_folder(folder)} (a mask is matched by file "
                            f"stem: {stem}.png)")
    if not stems:
        raise ValueError(f"{folder}: no image files (accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return [(images[s], masks[s]) for s in stems]


def _read_list(path: str) -> list[str]:
    """Stems listed in a split file: one image stem or file name per line."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return [os.path.splitext(os.path.basename(line))[0] if line.lower().endswith(IMAGE_EXTENSIONS) else line
            for line in lines]


def scan_layout(root: str) -> dict[str, list[tuple[str, str]]]:
    """The (image, mask) pairs of each split part ("train", optional "val" and "test") found under ``root``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no folder {root}")
    parts: dict[str, list[tuple[str, str]]] = {}
    for part, names in SPLIT_NAMES.items():  # <root>/<split>/images
        name = next((n for n in names if os.path.isdir(os.path.join(root, n, "images"))), None)
        if name is not None:
            parts[part] = _pairs(os.path.join(root, name))
    if parts:
        if "train" not in parts:
            raise ValueError(f"{root}: split folders {', '.join(parts)} but no train/ (with images/ and masks/)")
        return parts
    if not os.path.isdir(os.path.join(root, "images")):
        raise FileNotFoundError(f"{root} holds neither images/ + masks/ nor train/images/ + train/masks/")
    for part, names in SPLIT_NAMES.items():  # list files <root>/<split>.txt
        name = next((n for n in names if os.path.isfile(os.path.join(root, f"{n}.txt"))), None)
        if name is not None:
            list_file = os.path.join(root, f"{name}.txt")
            parts[part] = _pairs(root, _read_list(list_file), list_file)
    if parts and "train" not in parts:
        raise ValueError(f"{root}: list files {', '.join(parts)} but no train.txt")
    return parts or {"train": _pairs(root)}


class MaskFolderDataset(SegmentationDataset):
    """Pairs of files on disk; each pair is read and checked when it is loaded (size, labels)."""

    def __init__(self, pairs: list[tuple[str, str]], classes: list[str], source: str, split: str,
                 transform: Callable | None = None, ignore_index: int = DEFAULT_IGNORE_INDEX, binary: bool = False,
                 channels: int = 3) -> None:
        super().__init__(classes, source, split, transform, ignore_index, binary, channels)
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def load_pair(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        image = open_image(image_path, "RGB" if self.channels == 3 else "L")
        mask = read_mask(mask_path, self.binary, self.num_classes, self.ignore_index)
        check_same_size(image.size, mask.shape, image_path, mask_path)
        return image, mask

    def describe(self, index: int) -> str:
        return f"{self.pairs[index][0]} + {self.pairs[index][1]}"

    def check(self) -> None:
        """Read every pair once (a full pass over the files): raises on the first bad one, naming its files."""
        for i in range(len(self)):
            self.load_pair(i)


def load_mask_folder(root: str, split: str, transform: Callable | None = None, num_classes: Optional[int] = None,
                     classes_file: Optional[str] = None, ignore_index: int = DEFAULT_IGNORE_INDEX, seed: int = 0,
                     channels: int = 3, check: bool = False) -> MaskFolderDataset:
    """Load one split of an image + mask folder (layouts in the module docstring).

    Args:
        root: the dataset folder.
        split: "train", "val", "trainval" or "test"; without a val part, "train"/"val" are a 90/10 hold-out of
            the training pairs chosen with ``seed``.
        transform: a paired transform (``PairedTransform``), or None for the raw tensors.
        num_classes: classes of a multi-class label map (background included), when there is no class-name file.
        classes_file: the class-name file; default ``<root>/classes.txt`` when it exists. With neither this nor
            ``num_classes`` the masks are binary.
        ignore_index: label of ignored pixels in multi-class masks.
        seed: seed of the train/val hold-out.
        channels: 3 (RGB) or 1 (grey) images.
        check: read every pair of the split now, so a bad file fails at load time rather than mid-training.

    Raises:
        MaskError: an image without a mask or a mask without an image (named), and with ``check`` (or when the
            pair is loaded) a mask whose size differs from its image or with labels outside the classes.
    """
    check_split(split)
    default_classes = os.path.join(root, CLASSES_FILE)
    if classes_file is None and os.path.isfile(default_classes):
        classes_file = default_classes
    if classes_file is not None:
        classes = read_classes(classes_file)
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"num_classes={num_classes} but {classes_file} names {len(classes)} classes")
    elif num_classes is not None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
        classes = [str(k) for k in range(num_classes)]
    else:
        classes = list(BINARY_CLASSES)
    binary = classes_file is None and num_classes is None
    parts = scan_layout(root)
    labels = {part: [0] * len(pairs) for part, pairs in parts.items()}  # one "class": the hold-out is plain random
    chosen = choose_split(split, labels, seed, root)
    pairs = [parts[part][i] for part, indices in chosen for i in indices]
    dataset = MaskFolderDataset(pairs, classes, root, split, transform, ignore_index, binary, channels)
    if check:
        dataset.check()
    return dataset
