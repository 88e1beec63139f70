"""overlays.png and the label colours."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from snella.segmentation.plots import colourise, plot_overlays


def test_colourise_background_classes_and_ignore():
    rgb = colourise(np.array([[0, 1, 2, 255]]), 3, ignore_index=255)
    tab10 = colormaps["tab10"]
    assert rgb[0, 0].tolist() == [0.0, 0.0, 0.0]
    assert np.allclose(rgb[0, 1], tab10(0)[:3]) and np.allclose(rgb[0, 2], tab10(1)[:3])
    assert rgb[0, 3].tolist() == [1.0, 1.0, 1.0]


def test_overlays_png_has_one_row_per_image(tmp_path):
    images = np.random.default_rng(0).uniform(0, 1, (2, 16, 16))
    targets = np.zeros((2, 16, 16), dtype=np.int64)
    targets[:, 4:10, 4:10] = 1
    predictions = np.roll(targets, 2, axis=2)
    path = plot_overlays(images, targets, predictions, tmp_path / "out" / "overlays.png", ["background", "polyp"])
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (900, 600)  # 7.5 x 2.5 * 2 inches at 120 dpi
    with pytest.raises(ValueError, match="one target and one prediction per image"):
        plot_overlays(images, targets[:1], predictions, tmp_path / "x.png", ["a", "b"])
