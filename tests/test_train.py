"""Tests of the fine-tuning loop: its outputs and their values, the non-finite stop, refusing to overwrite,
and a run killed with SIGKILL mid-epoch that resumes to exactly the result of an uninterrupted run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snella.train import NonFiniteLossError, finetune
from snella.training.checkpoint import checkpoint_path
from snella.training.config import TrainConfig
from snella.training.outputs import folder_bytes
from snella.training.tools import evaluate

REPO = Path(__file__).resolve().parents[1]
# A 2-block, width-32 ViT on 192 real MNIST digits: 6 steps per epoch, a few seconds per run.
TINY = dict(model="vit_fmnist_d128", model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, data="mnist5k",
            train_limit=192, test_limit=100, epochs=3, batch_size=32, warmup_epochs=1, sparsity=0.5, lr=1e-2,
            progress=False)
D, R = 32, 8
# SNELLA's trainable parameters: per block q, k, v, proj (d x d) and fc1, fc2 (d x 4d) at r*(in+out) each,
# 3 kernel scalars per matrix; the 10-class head; the class token.
TINY_TRAINABLE = 2 * (4 * R * 2 * D + 2 * R * 5 * D + 6 * 3) + (D * 10 + 10) + D


def tiny(out: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "output_dir": str(out), **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished tiny SNELLA run: (metrics returned, output folder, printed text)."""
    out = tmp_path_factory.mktemp("run") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = finetune(tiny(out))
    return metrics, out, printed.getvalue()


def test_outputs_hold_the_run(run):
    metrics, out, _ = run
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "allocation.png", "checkpoint", "config.yaml",
                                                     "curves.png", "metrics.json", "run.json"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert TrainConfig.from_yaml(out / "config.yaml") == tiny(out)
    assert json.loads((out / "run.json").read_text())["classes"] == [str(d) for d in range(10)]
    for png in ("allocation.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_metrics_values(run):
    metrics, out, printed = run
    assert metrics["trainable_params"] == TINY_TRAINABLE
    assert metrics["adapter_bytes"] == folder_bytes(out / "adapter") > 4 * TINY_TRAINABLE  # float32 weights
    assert metrics["steps"] == 18 and metrics["test_images"] == 100 and metrics["world_size"] == 1
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["train_seconds"] == pytest.approx(sum(h["seconds"] for h in metrics["history"]))
    assert 0 <= metrics["peak_memory_mb"] < 4096  # growth over the RSS at the start: 0 if memory was reused
    assert all(0 <= h["train_acc"] <= 1 and h["train_loss"] > 0 for h in metrics["history"])
    # the summary a person reads carries the same numbers
    assert f"test accuracy     {100 * metrics['test_accuracy']:.2f}%" in printed
    assert f"trainable params  {TINY_TRAINABLE:,}" in printed and printed.count("epoch ") >= 3
    assert "snella: adapted 12 matrices in 8 modules: blocks.{0,1}.attn.{qkv,proj}, blocks.{0,1}.mlp.{fc1,fc2}\n" \
        in printed


def test_allocation_goes_from_dense_to_the_target_by_score(run):
    metrics, _, _ = run
    densities = [h["density"] for h in metrics["history"]]
    assert densities[0] == pytest.approx(0.99, abs=1e-4) and densities[-1] == pytest.approx(0.5, abs=1e-4)
    assert densities[0] > densities[1] > densities[2]  # the cubic schedule, once per epoch
    events = metrics["allocation_history"]
    assert [e["t"] for e in events] == [0, 1, 2] and [e["step"] for e in events] == [0, 6, 12]
    final = metrics["final_sparsities"]
    assert final == {k: pytest.approx(1 - v) for k, v in events[-1]["densities"].items()}
    assert len(final) == 12 and len({round(s, 6) for s in final.values()}) > 1  # shared out unequally, by score
    assert metrics["final_density"] == pytest.approx(0.5, abs=1e-4)


def test_saved_adapter_and_checkpoint_reproduce_the_run(run):
    metrics, out, _ = run
    assert evaluate(str(out), limit=100)["accuracy"] == metrics["test_accuracy"]
    state = torch.load(checkpoint_path(out), weights_only=True)  # plain data only
    assert (state["epoch"], state["step"]) == (3, 18)
    assert state["history"] == json.loads(json.dumps(metrics["history"]))
    assert state["allocator"]["sparsities"] == pytest.approx(list(metrics["final_sparsities"].values()))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for key, value in adapter.items():
        if key.endswith("snella_A"):
            assert torch.equal(value, state["model"]["base_model." + key.replace("snella_A", "snella_A.default")])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, step 8: .* last good checkpoint "
                                                 r"\(epoch 1\) is kept"):
        finetune(tiny(out, epochs=2, debug_nan_step=8))
    state = torch.load(checkpoint_path(out), weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if isinstance(v, torch.Tensor))
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()

    # the folder now holds a run: refused without --overwrite, before any work
    with pytest.raises(ValueError, match="already holds a run .* pass --overwrite"):
        finetune(tiny(out))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        finetune(tiny(out, overwrite=True, debug_nan_step=1))
    assert not checkpoint_path(out).exists() and (out / "notes.txt").read_text() == "mine"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before writing {path}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.01)


@pytest.mark.slow  # over 10 s: `-m "not slow"` skips it in a quick loop; CI runs it
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(run, tmp_path: Path):
    reference, reference_dir, _ = run  # the same settings, never interrupted

    out = tmp_path / "killed"
    config_file = tiny(out).save_yaml(tmp_path / "tiny.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # 0.15 s after each step makes an epoch last about a second, so the kill lands inside epoch 2
    proc = subprocess.Popen([sys.executable, "-m", "snella", "finetune", "--config", str(config_file),
                             "--debug-step-delay", "0.15"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    _wait_for(checkpoint_path(out), proc, timeout=240)
    time.sleep(0.4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(checkpoint_path(out), weights_only=True)["epoch"] < 3 and not (out / "metrics.json").exists()

    # resume with nothing but the folder: the saved config.yaml supplies the settings
    done = subprocess.run([sys.executable, "-m", "snella", "finetune", "--output-dir", str(out), "--resume"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["peak_memory_mb"] > 0  # a fresh process: training's activations show as RSS growth
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert resumed["final_sparsities"] == reference["final_sparsities"]
    assert resumed["allocation_history"] == json.loads(json.dumps(reference["allocation_history"]))
    for mine, theirs in zip(resumed["history"], reference["history"]):
        assert {k: v for k, v in mine.items() if k != "seconds"} == {k: v for k, v in theirs.items() if k != "seconds"}
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(reference_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # resuming with other settings would mix two runs: refused, naming the difference
    with pytest.raises(ValueError, match=r"settings differ .*\(lr: now 0.5, checkpoint 0.01\)"):
        finetune(tiny(out, lr=0.5, resume=True))
