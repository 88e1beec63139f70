"""Checkpoints of a run: written atomically every epoch, read without unpickling code, RNG state included."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional

import torch

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "last.pt"
VERSION = 1


def checkpoint_path(output_dir: Path) -> Path:
    """<output_dir>/checkpoint/last.pt: the one checkpoint of a run, replaced every epoch."""
    return Path(output_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def rng_state() -> dict[str, Any]:
    """The random generators a training step may draw from (dropout, augmentations), as plain data."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by ``rng_state``."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng_state(saved: Any, rank: int, world_size: int, source: Path) -> dict[str, Any]:
    """This rank's generators from a checkpoint's ``rng`` entry: one state per rank (a list), or one
    dict from a checkpoint written before ranks had streams of their own (single-process runs).

    Raises:
        ValueError: the checkpoint was written by another number of processes; the run cannot resume
            exactly (its data shards and random streams depend on that number).
    """
    if isinstance(saved, dict):
        saved = [saved]
    if len(saved) != world_size:
        raise ValueError(f"{checkpoint_path(source)} was written by {len(saved)} process(es), this run has "
                         f"{world_size}; resume with the same number of processes (torchrun --nproc_per_node "
                         f"{len(saved)}) to continue exactly")
    return saved[rank]


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(output_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to <output_dir>/checkpoint/last.pt atomically: a crash leaves the old file or the new one.

    Args:
        output_dir: the run's folder.
        state: tensors, dicts, lists, numbers and strings only (so ``torch.load(weights_only=True)`` reads it).

    Returns:
        The checkpoint's path.
    """
    path = checkpoint_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"version": VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
    os.replace(tmp, path)
    return path


def load_checkpoint(output_dir: Path, map_location: Optional[torch.device] = None) -> dict[str, Any]:
    """Read the run's checkpoint with ``weights_only=True``: a file that needs arbitrary code is refused.

    Raises:
        FileNotFoundError: the run has no checkpoint.
        ValueError: the file is corrupt, needs code to load, or is of another version.
    """
    path = checkpoint_path(output_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from; the run did not finish an epoch "
                                "(start it again with --overwrite)")
    try:
        state = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError for bad files
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or state.get("version") != VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a snella checkpoint of version {VERSION} (found {found!r})")
    return state
