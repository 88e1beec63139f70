"""Fixtures for the snella.data tests: tiny real image files written with PIL into tmp_path."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image


def write_image(path: str, value: int, size: tuple[int, int] = (6, 4), fmt: str | None = None) -> str:
    """Write a solid RGB image whose every pixel is (value, value // 2, 255 - value); return its path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)  # (H, W, 3)
    pixels[...] = (value, value // 2, 255 - value)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_corrupt(path: str) -> str:
    """Write a file named like a PNG that is the first half of one (truncated pixel data)."""
    good = write_image(path + ".tmp.png", 100, size=(32, 32))
    with open(good, "rb") as f:
        data = f.read()
    os.remove(good)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


@pytest.fixture
def image_tree(tmp_path):
    """An ImageFolder root with classes cat (3 PNG) and dog (2 JPEG), pixel value = 10 * index."""
    root = tmp_path / "flat"
    for i in range(3):
        write_image(str(root / "cat" / f"c{i}.png"), 10 * i)
    for i in range(2):
        write_image(str(root / "dog" / f"d{i}.jpg"), 100 + 10 * i)
    return root


@pytest.fixture
def make_image():
    """write_image, for tests that build their own trees."""
    return write_image


@pytest.fixture
def make_corrupt():
    """write_corrupt, for tests that need an unreadable image."""
    return write_corrupt
