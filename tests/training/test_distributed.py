"""Tests of data-parallel fine-tuning: two CPU processes under torchrun reach the same allocation, rank 0 writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from support import torchrun_finetune
from snella.training.config import TrainConfig
from snella.training.distributed import gather_objects, pick_device, setup

def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert gather_objects(ctx, {"a": 1}) == [{"a": 1}]
    if not torch.cuda.is_available():
        assert pick_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


@pytest.mark.slow  # over 10 s: `-m "not slow"` skips it in a quick loop; CI runs it
def test_two_cpu_processes_agree_and_write_once(tmp_path: Path):
    out = tmp_path / "ddp"
    config = TrainConfig(model="vit_fmnist_d128", model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2},
                         train_limit=192, test_limit=100, epochs=2, batch_size=32, warmup_epochs=1, sparsity=0.5,
                         progress=False,
                         output_dir=str(out), device="cpu")
    config_file = config.save_yaml(tmp_path / "ddp.yaml")
    done = torchrun_finetune(config_file, tmp_path, timeout=400)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # each rank trains 96 of the 192 images at 16 per step: 6 steps per epoch, as one process at 32
    assert metrics["steps"] == 12 and metrics["test_images"] == 100
    first, second = metrics["rank_results"]
    assert first["sparsities"] == second["sparsities"] and first["checksum"] == second["checksum"]
    assert metrics["ranks_agree"] is True
    assert len(set(first["sparsities"].values())) > 1 and metrics["final_density"] == pytest.approx(0.5, abs=1e-4)
    # rank 0 alone prints and writes
    assert done.stdout.count("snella finetune: snella on mnist5k") == 1
    assert sum(line.startswith("epoch ") for line in done.stdout.splitlines()) == 2
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "allocation.png", "checkpoint", "config.yaml",
                                                     "curves.png", "metrics.json", "run.json"]
    assert os.listdir(out / "checkpoint") == ["last.pt"]
    checkpoint = torch.load(out / "checkpoint" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    # each rank draws its dropout/drop-path from its own stream (seed + rank), saved for resume
    rngs = checkpoint["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
