"""Checks on user data: reading an image with a clear error, finding unreadable images, valid split names."""

from __future__ import annotations

import io
import logging
from typing import BinaryIO, Sequence

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "trainval", "test")

# What PIL raises on a truncated, corrupt or non-image file (SyntaxError: some broken PNG headers).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class BadImageError(ValueError):
    """An image that PIL cannot decode; the message names the file."""


def check_split(split: str) -> str:
    """Return ``split`` if it is one of SPLITS, else raise a ValueError listing them."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def open_image(file: str | BinaryIO, mode: str = "RGB", name: str | None = None) -> Image.Image:
    """Decode an image file fully and convert it to ``mode``.

    Args:
        file: a path or a binary file object.
        mode: PIL mode of the result ("RGB" or "L").
        name: what to call the file in an error (defaults to the path).

    Returns:
        The decoded image, detached from the file.

    Raises:
        BadImageError: the file cannot be read or decoded; the message names it.
    """
    try:
        with Image.open(file) as image:
            # Decode here so that a corrupt file fails with its name, not later inside a transform.
            image.load()
            if image.mode.startswith("I;16"):
                # PIL's convert clips 16-bit grey at 255; scale 0..65535 to 0..255 instead.
                pixels = np.asarray(image, dtype=np.float64) / 257.0
                return Image.fromarray(np.round(pixels).astype(np.uint8)).convert(mode)
            return image.convert(mode)
    except _DECODE_ERRORS as error:
        raise BadImageError(f"cannot read image {name or file}: {error}") from error


def is_readable(file: str | bytes) -> bool:
    """Whether PIL can verify and fully decode ``file`` (a path, or the bytes of an image file)."""
    try:
        # verify() checks structure (PNG checksums) but decodes nothing, and is a no-op for much
        # of JPEG; a full load() catches truncated pixel data. Each needs a fresh open.
        for check in ("verify", "load"):
            handle = io.BytesIO(file) if isinstance(file, bytes) else file
            with Image.open(handle) as image:
                getattr(image, check)()
        return True
    except _DECODE_ERRORS:
        return False


def find_bad_images(files: Sequence[str | bytes]) -> list[int]:
    """Indices of the files PIL cannot read. Decodes every image once: a full pass over the data."""
    return [i for i, file in enumerate(files) if not is_readable(file)]


def log_skipped(source: str, split: str, bad: Sequence[str], total: int) -> None:
    """Log how many unreadable images were dropped from a split, naming the first few."""
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        logger.warning("%s [%s]: skipped %d unreadable image(s) of %d: %s",
                       source, split, len(bad), total, shown)
