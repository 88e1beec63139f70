"""Tests of checkpoint files: atomic replacement, safe loading, and RNG state."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from snella.training.checkpoint import checkpoint_path, load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_round_trip_keeps_values(tmp_path: Path):
    state = {"epoch": 2, "step": 7, "history": [{"epoch": 1, "train_loss": 0.5, "density": None}],
             "model": {"w": torch.arange(6.0).reshape(2, 3), "layer._extra_state": {"sparsity": {"default": [0.5]}}}}
    path = save_checkpoint(tmp_path, state)
    assert path == checkpoint_path(tmp_path) and path.parent.name == "checkpoint"
    loaded = load_checkpoint(tmp_path)
    assert loaded["epoch"] == 2 and loaded["history"] == state["history"]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["model"]["layer._extra_state"] == {"sparsity": {"default": [0.5]}}
    assert os.listdir(path.parent) == ["last.pt"]  # no temp file left behind


def test_a_new_checkpoint_replaces_the_old(tmp_path: Path):
    save_checkpoint(tmp_path, {"epoch": 1})
    save_checkpoint(tmp_path, {"epoch": 2})
    assert load_checkpoint(tmp_path)["epoch"] == 2


def test_missing_corrupt_and_code_needing_files_are_refused(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*last.pt"):
        load_checkpoint(tmp_path)
    path = checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*last.pt"):
        load_checkpoint(tmp_path)
    marker = tmp_path / "code-ran"
    with open(path, "wb") as f:  # a pickle that creates a file when loaded without weights_only
        pickle.dump({"version": 1, "x": Exploit(marker)}, f, protocol=2)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path)
    assert not marker.exists()
    torch.save({"epoch": 1}, path)  # no version: not one of ours
    with pytest.raises(ValueError, match="not a snella checkpoint"):
        load_checkpoint(tmp_path)


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_rng_state_restores_the_same_draws(tmp_path: Path):
    torch.manual_seed(5)
    random.seed(5)
    save_checkpoint(tmp_path, {"rng": rng_state()})
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(tmp_path)["rng"])
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_each_rank_resumes_its_own_random_stream(tmp_path: Path):
    from snella.training.checkpoint import rank_rng_state

    states = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        states.append(rng_state())
    save_checkpoint(tmp_path, {"rng": states})
    saved = load_checkpoint(tmp_path)["rng"]
    for rank in range(2):
        set_rng_state(rank_rng_state(saved, rank, 2, tmp_path))
        got = torch.rand(3)
        torch.manual_seed(100 + rank)
        assert torch.equal(got, torch.rand(3))
    single = rank_rng_state(states[0], 0, 1, tmp_path)  # a checkpoint of a single-process run (one dict)
    assert torch.equal(single["torch"], states[0]["torch"])
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 4"):
        rank_rng_state(saved, 0, 4, tmp_path)
