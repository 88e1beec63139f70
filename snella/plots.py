"""PNG plots of the layer-level allocation over training and of the training curves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Figure + Agg canvas directly, not pyplot: no global backend switch, safe in notebooks and threads.

TYPE_ORDER = ("q", "k", "v", "qkv", "proj", "fc1", "fc2")
_BLOCK_NAME = re.compile(r"^(?P<prefix>.*?)blocks\.(?P<block>\d+)\.(?:.*\.)?(?P<type>[^.]+)$")


def _row_key(name: str, index: int) -> tuple:
    """Sort key grouping rows by stage prefix, block number, then matrix type."""
    match = _BLOCK_NAME.match(name)
    if match is None:
        return (1, "", 0, 0, index)  # plain names keep their order, after the block matrices
    kind = match["type"]
    rank = TYPE_ORDER.index(kind) if kind in TYPE_ORDER else len(TYPE_ORDER)
    return (0, match["prefix"], int(match["block"]), rank, index)


def _row_label(name: str) -> str:
    match = _BLOCK_NAME.match(name)
    if match is None:
        return name
    return f"{match['prefix']}b{match['block']}.{match['type']}"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120)
    return path


def plot_allocation(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Heat map of every matrix's density over the allocation events, plus the global density.

    Rows are the matrices, grouped by block and ordered q, k, v, proj, fc1, fc2 when the
    names look like 'blocks.N.<...>.<type>' (plain names otherwise); columns are the
    allocation events.

    Args:
        history: `BudgetAllocator.history`: dicts with "step", "densities" {name: density},
            and optionally "epoch", "density" (global, weighted by size).
        path: where to write the PNG; parent folders are created.

    Returns:
        The path written.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot (pass BudgetAllocator.history after construction)")
    for i, event in enumerate(history):
        if "densities" not in event or "step" not in event or not event["densities"]:
            raise ValueError(f"history[{i}] needs 'step' and a non-empty 'densities' dict, got keys {sorted(event)}")
    names = list(history[0]["densities"])
    order = sorted(range(len(names)), key=lambda i: _row_key(names[i], i))
    names = [names[i] for i in order]
    grid = np.full((len(names), len(history)), np.nan)  # (matrices, events)
    for col, event in enumerate(history):
        for row, name in enumerate(names):
            grid[row, col] = event["densities"].get(name, np.nan)
    if "density" in history[0]:
        overall, overall_label = [e["density"] for e in history], "global density"
    else:
        overall, overall_label = np.nanmean(grid, axis=0), "mean density (unweighted)"
    steps = [e["step"] for e in history]

    height = min(3.0 + 0.12 * len(names), 30.0)
    fig = Figure(figsize=(max(6.0, 1.0 + 0.35 * len(history)), height + 2.0))
    grid_spec = fig.add_gridspec(2, 2, height_ratios=[height, 2.0], width_ratios=[30, 1], hspace=0.3, wspace=0.05)
    ax = fig.add_subplot(grid_spec[0, 0])
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, cax=fig.add_subplot(grid_spec[0, 1]), label="density (1 - sparsity)")
    ax.set_yticks(range(len(names)), [_row_label(n) for n in names], fontsize=max(3, min(8, 400 // len(names))))
    ax.set_xticks(range(len(history)), [str(s) for s in steps], fontsize=7, rotation=90)
    ax.set_title("per-matrix density at each allocation")
    ax.set_xlabel("allocation at optimizer step", fontsize=8)
    # a line between blocks makes the grouping readable
    keys = [_row_key(n, i)[:3] for i, n in enumerate(names)]
    for row in range(1, len(names)):
        if keys[row] != keys[row - 1] and keys[row][0] == 0:
            ax.axhline(row - 0.5, color="white", linewidth=0.6)

    ax_global = fig.add_subplot(grid_spec[1, 0])
    ax_global.plot(steps, overall, marker="o", markersize=3)
    ax_global.set_xlabel("optimizer step")
    ax_global.set_ylabel(overall_label, fontsize=8)
    ax_global.set_ylim(0.0, 1.05)
    ax_global.grid(alpha=0.3)
    return _save(fig, path)


def plot_curves(records: Sequence[dict[str, Any]], path: str | Path, train_key: str = "train_acc",
                val_key: str = "val_acc", title: str = "accuracy",
                labels: tuple[str, str] = ("train", "val")) -> Path:
    """Training curves per epoch: loss; the train (and val) metric; density if recorded.

    Args:
        records: one dict per epoch with "epoch", "train_loss", ``train_key``, and optionally
            ``val_key`` and "density".
        path: where to write the PNG; parent folders are created.
        train_key, val_key, title, labels: the metric's keys in the records, its panel's title and the
            two lines' labels (segmentation: "train_pixel_acc", "val_miou").

    Returns:
        The path written.
    """
    if not records:
        raise ValueError("records is empty: nothing to plot (need one dict per epoch)")
    for i, record in enumerate(records):
        missing = [k for k in ("epoch", "train_loss", train_key) if k not in record]
        if missing:
            raise ValueError(f"records[{i}] lacks {missing}; each record needs 'epoch', 'train_loss', {train_key!r}")
    epochs = [r["epoch"] for r in records]
    has_density = any(r.get("density") is not None for r in records)
    fig = Figure(figsize=(12.0 if has_density else 8.5, 3.5))
    axes = fig.subplots(1, 3 if has_density else 2)

    axes[0].plot(epochs, [r["train_loss"] for r in records], marker="o", markersize=3)
    axes[0].set_title("train loss")
    axes[1].plot(epochs, [r[train_key] for r in records], marker="o", markersize=3, label=labels[0])
    val = [(r["epoch"], r[val_key]) for r in records if r.get(val_key) is not None]
    if val:
        axes[1].plot(*zip(*val), marker="s", markersize=3, label=labels[1])
    axes[1].set_title(title)
    axes[1].legend()
    if has_density:
        dens = [(r["epoch"], r["density"]) for r in records if r.get("density") is not None]
        axes[2].plot(*zip(*dens), marker="o", markersize=3, color="tab:green")
        axes[2].set_title("density of dW")
        axes[2].set_ylim(0.0, 1.05)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
