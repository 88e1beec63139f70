"""How the four split names map onto the parts a dataset has on disk, and the stratified hold-out behind "val"."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from snella.data.checks import check_split

# Share of the training data held out as "val" when a source has no validation part of its own.
VAL_FRACTION = 0.1


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of every class, chosen at random with ``seed``.

    Each class of two or more items gives at least one item to each side, so every class
    appears in both parts where it can.

    Args:
        targets: one label per item.
        fraction: share of each class held out, in (0, 1).
        seed: seed of the random choice; the same seed gives the same split.

    Returns:
        (kept, held_out): sorted item indices.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        n_held = int(round(fraction * len(members)))
        if len(members) >= 2:
            n_held = min(max(n_held, 1), len(members) - 1)
        held.append(members[:n_held])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(targets)), held_out)
    return kept, held_out


def choose_split(split: str, parts: Mapping[str, Sequence[int]], seed: int, source: str) -> list[tuple[str, np.ndarray]]:
    """Which items of which on-disk part make up ``split``.

    "trainval" is all training data (the "train" part plus the "val" part if there is one);
    "train" and "val" always partition it: the source's own parts if it has a "val" part, else a
    stratified ``VAL_FRACTION`` hold-out of "train" chosen with ``seed``. "test" is the "test" part.

    Args:
        split: "train", "val", "trainval" or "test".
        parts: labels of each part the source has, keyed "train" (required), "val", "test".
        seed: seed of the hold-out when there is no "val" part.
        source: named in errors.

    Returns:
        (part name, sorted indices into that part) pairs whose items, concatenated, form the split.
    """
    check_split(split)
    every = lambda name: (name, np.arange(len(parts[name])))  # noqa: E731
    if split == "test":
        if "test" not in parts:
            raise ValueError(f"{source} has no test split (it has: {', '.join(sorted(parts))}); "
                             "add one, or evaluate on split 'val'")
        return [every("test")]
    if split == "trainval":
        return [every(name) for name in ("train", "val") if name in parts]
    if "val" in parts:
        return [every(split)]
    kept, held_out = stratified_split(parts["train"], VAL_FRACTION, seed)
    return [("train", kept if split == "train" else held_out)]
