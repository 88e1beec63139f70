"""Sample grids of the diffusion task: one row per class, its first samples side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from snella.plots import _save

GRID_COLUMNS = 8  # samples shown per class


def tile(images: torch.Tensor, rows: int, columns: int, pad: int = 1) -> np.ndarray:
    """``rows * columns`` images (N, C, H, W) in [-1, 1], row-major, as one (rows*(H+pad), columns*(W+pad), C)
    uint8 array (pad pixels white)."""
    n, c, h, w = images.shape
    if n != rows * columns:
        raise ValueError(f"{n} images do not fill a {rows}x{columns} grid")
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.full((rows * (h + pad), columns * (w + pad), c), 255, dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, col = divmod(i, columns)
        grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = image
    return grid


def plot_samples(images: torch.Tensor, labels: torch.Tensor, names: Sequence[str], path: str | Path,
                 title: str = "samples", columns: int = GRID_COLUMNS) -> Path:
    """A grid PNG of ``images`` (N, C, H, W) in [-1, 1]: a row per class present in ``labels`` (N,), named from
    ``names``, with up to ``columns`` of its samples (a class with fewer is padded with blank cells)."""
    classes = sorted(set(labels.tolist()))
    blank = torch.ones(images.shape[1:])  # white
    cells = []
    for label in classes:
        own = images[labels == label][:columns]
        cells += list(own) + [blank] * (columns - len(own))
    grid = tile(torch.stack(cells), len(classes), columns)
    height = 0.45 * len(classes) + 0.6
    fig = Figure(figsize=(0.45 * columns + 1.0, height))
    ax = fig.add_axes([0.12, 0.02, 0.86, 1 - 0.5 / height])
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    step = images.shape[-2] + 1
    ax.set_yticks([step * i + step / 2 for i in range(len(classes))], [str(names[c]) for c in classes], fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    return _save(fig, path)
