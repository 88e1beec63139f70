"""overlays.png: image / ground truth / prediction for a few test images."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from snella.plots import _save

IGNORE_COLOUR = (1.0, 1.0, 1.0)  # ignored pixels are drawn white


def label_colours(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` RGB in [0, 1]: black background, then tab10 / tab20 colours."""
    table = colormaps["tab10" if num_classes <= 11 else "tab20"]
    colours = [(0.0, 0.0, 0.0)] + [tuple(table(i % table.N)[:3]) for i in range(num_classes - 1)]
    return np.asarray(colours, dtype=np.float64)


def colourise(mask: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """Label map ``(H, W)`` -> RGB ``(H, W, 3)`` in [0, 1] with ``label_colours``; ``ignore_index`` white."""
    colours = label_colours(num_classes)
    mask = np.asarray(mask)
    out = np.zeros(mask.shape + (3,), dtype=np.float64)
    valid = (mask >= 0) & (mask < num_classes)
    out[valid] = colours[mask[valid]]
    if ignore_index is not None:
        out[mask == ignore_index] = IGNORE_COLOUR
    return out


def plot_overlays(images: np.ndarray, targets: np.ndarray, predictions: np.ndarray, path: str | Path,
                  classes: Sequence[str], ignore_index: int | None = None, alpha: float = 0.5) -> Path:
    """One row per image: the image, the ground truth over it, the prediction over it.

    Args:
        images: ``(N, H, W, 3)`` or ``(N, H, W)`` in [0, 1] (un-normalised).
        targets: ``(N, H, W)`` int labels (``ignore_index`` drawn white).
        predictions: ``(N, H, W)`` int labels.
        path: the PNG to write; parent folders are created.
        classes: class names (label k is classes[k]); the legend lists those that occur.
        alpha: opacity of the label colours over the image.

    Returns:
        The path written.
    """
    images, targets, predictions = np.asarray(images), np.asarray(targets), np.asarray(predictions)
    if len(images) == 0 or not (len(images) == len(targets) == len(predictions)):
        raise ValueError(f"need one target and one prediction per image, at least one image; got {len(images)} "
                         f"images, {len(targets)} targets, {len(predictions)} predictions")
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)  # (N, H, W, 3)
    images = np.clip(images, 0.0, 1.0)
    n, C = len(images), len(classes)
    fig = Figure(figsize=(7.5, 2.5 * n))
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        for j, (title, mask) in enumerate((("image", None), ("ground truth", targets[i]), ("prediction", predictions[i]))):
            ax = axes[i, j]
            shown = images[i] if mask is None else (1 - alpha) * images[i] + alpha * colourise(mask, C, ignore_index)
            ax.imshow(shown, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title)
    present = sorted({int(v) for v in np.unique(np.concatenate([targets.ravel(), predictions.ravel()])) if 0 <= v < C})
    colours = label_colours(C)
    from matplotlib.patches import Patch

    fig.legend([Patch(color=colours[k]) for k in present], [classes[k] for k in present], loc="lower center",
               ncol=min(6, len(present)), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)
