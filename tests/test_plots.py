"""Tests of the allocation heat map and the training-curve plots."""

from __future__ import annotations

import struct

import pytest

from snella.plots import _row_key, plot_allocation, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def make_history(events: int = 5) -> list[dict]:
    names = [f"blocks.{b}.{part}" for b in range(3)
             for part in ("mlp.fc2", "attn.qkv.q", "attn.qkv.k", "attn.qkv.v", "attn.proj", "mlp.fc1")]
    history = []
    for e in range(events):
        density = 0.99 - 0.15 * e
        densities = {n: min(1.0, density * (1 + 0.1 * (i % 4))) for i, n in enumerate(names)}
        history.append({"step": 10 * e, "epoch": e, "budget": 1000 - 100 * e,
                        "density": density, "densities": densities})
    return history


def test_plot_allocation_writes_png(tmp_path):
    path = plot_allocation(make_history(), tmp_path / "out" / "allocation.png")
    width, height = png_size(path)
    assert width >= 600 and height >= 400
    assert path.stat().st_size > 10_000


def test_plot_allocation_plain_names_and_missing_global(tmp_path):
    history = [{"step": s, "densities": {"enc.a": 0.9 - s / 10, "enc.b": 0.5}} for s in range(3)]
    path = plot_allocation(history, tmp_path / "plain.png")
    assert png_size(path)[0] > 0 and path.stat().st_size > 5_000


def test_rows_grouped_by_block_then_type():
    names = ["blocks.1.mlp.fc1", "blocks.0.mlp.fc2", "blocks.0.attn.qkv.q", "head", "blocks.10.attn.proj",
             "blocks.2.attn.qkv.v"]
    ordered = [names[i] for i in sorted(range(len(names)), key=lambda i: _row_key(names[i], i))]
    assert ordered == ["blocks.0.attn.qkv.q", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.2.attn.qkv.v",
                       "blocks.10.attn.proj", "head"]


def test_plot_allocation_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="history is empty"):
        plot_allocation([], tmp_path / "a.png")
    with pytest.raises(ValueError, match="densities"):
        plot_allocation([{"step": 0}], tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_plot_curves_writes_png(tmp_path):
    records = [{"epoch": e, "train_loss": 2.0 / (e + 1), "train_acc": 0.1 * e, "val_acc": 0.09 * e,
                "density": 1 - 0.1 * e} for e in range(6)]
    path = plot_curves(records, tmp_path / "curves.png")
    width, height = png_size(path)
    assert width > height > 200 and path.stat().st_size > 10_000
    # without val accuracy and density: two panels, so a narrower figure
    narrow = plot_curves([{k: r[k] for k in ("epoch", "train_loss", "train_acc")} for r in records],
                         tmp_path / "narrow.png")
    assert png_size(narrow)[0] < width


def test_plot_curves_rejects_bad_records(tmp_path):
    with pytest.raises(ValueError, match="records is empty"):
        plot_curves([], tmp_path / "c.png")
    with pytest.raises(ValueError, match="train_acc"):
        plot_curves([{"epoch": 0, "train_loss": 1.0}], tmp_path / "c.png")


def test_plot_curves_reads_the_metric_keys_it_is_given(tmp_path):
    records = [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_pixel_acc": 0.8 + 0.01 * e, "val_miou": 0.1 * e}
               for e in range(1, 4)]
    path = plot_curves(records, tmp_path / "seg.png", "train_pixel_acc", "val_miou", "pixel accuracy / mIoU")
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="train_pixel_acc"):
        plot_curves([{"epoch": 0, "train_loss": 1.0, "train_acc": 0.5}], tmp_path / "c.png", "train_pixel_acc")
