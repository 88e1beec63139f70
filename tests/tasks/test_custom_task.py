"""The loop is task-agnostic: a regression task defined and registered here (no images, no classes, no accuracy)
trains through `finetune` with SNELLA and its allocator, its metrics land in metrics.json, and resume is exact."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from snella.tasks import TASKS, StepOutput, Task, TaskData, get_task, register_task, task_names
from snella.train import NonFiniteLossError, finetune
from snella.training.config import TrainConfig
from snella.training.data import batches, shard
from snella.training.distributed import all_reduce_sum

FEATURES, HIDDEN = 8, 32


def _data(n: int, seed: int) -> TensorDataset:
    """x (n, 8) and y = x @ w / sqrt(8) (n,) with a fixed w: a target of variance 1 that the MLP can fit."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(FEATURES, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, FEATURES, generator=gen)
    return TensorDataset(x, x @ w / FEATURES ** 0.5)


class Regression(Task):
    """Least squares on random vectors, through an MLP whose hidden layers SNELLA adapts and whose output trains in full."""

    name = "test-regression"

    def load_train(self, config):
        return _data(256, seed=1)

    def model_info(self, train):
        return {"features": train.tensors[0].shape[1]}

    def build_model(self, config, info):
        return nn.Sequential(nn.Linear(info["features"], HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                             nn.Linear(HIDDEN, 1))

    def trained_in_full(self, config, model):
        return ["4"]  # the output layer

    def datasets(self, config, train, model):
        test = _data(64, seed=2)
        return TaskData(train, test, val=test, info={"target": "linear"})

    def training_step(self, forward, batch):
        x, y = batch
        prediction = forward(x)[:, 0]  # (B,)
        loss = F.mse_loss(prediction, y)
        return StepOutput(loss, {"loss": loss.item() * len(y), "abs_err": (prediction - y).abs().sum().item()},
                          len(y))

    @torch.no_grad()
    def evaluate(self, model, dataset, batch_size, device, precision="fp32", ctx=None):
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        sums = torch.zeros(2, dtype=torch.float64)  # squared error, items
        for x, y in batches(dataset, shard(torch.arange(len(dataset)), rank, world, pad=False), batch_size):
            sums += torch.tensor([float(((model(x)[:, 0] - y) ** 2).sum()), len(y)], dtype=torch.float64)
        if ctx is not None:
            sums = all_reduce_sum(ctx, sums)
        return {"mse": float(sums[0] / sums[1]), "items": int(sums[1])}


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_task(Regression)
    yield
    TASKS.pop(Regression.name)


def config(out: Path, **overrides) -> TrainConfig:
    return TrainConfig(task="test-regression", model="mlp", data="random", target_modules=["0", "2"], r=4,
                       sparsity=0.5, epochs=4, batch_size=32, lr=3e-2, warmup_epochs=1, output_dir=str(out),
                       progress=False, **overrides)


def run(cfg: TrainConfig) -> tuple[dict, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = finetune(cfg)
    return metrics, printed.getvalue()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("regression") / "run"
    metrics, printed = run(config(out))
    return metrics, out, printed


def test_the_task_is_registered_by_name():
    assert "test-regression" in task_names() and isinstance(get_task("test-regression"), Regression)
    with pytest.raises(ValueError, match="task='nope' is invalid; accepted: classification, segmentation, test-regression"):
        TrainConfig(task="nope")


def test_a_regression_task_trains_through_the_shared_loop(reference):
    metrics, out, printed = reference
    torch.manual_seed(0)  # the loop's seed before build_model: the run's starting weights
    untrained = Regression().build_model(None, {"features": FEATURES})
    baseline = Regression().evaluate(untrained, _data(64, seed=2), 64, torch.device("cpu"))["mse"]
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and metrics["steps"] == 4 * 8
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]  # it learns
    assert metrics["test_mse"] < 0.5 * baseline and metrics["test_items"] == 64
    # the task's own statistics and metrics, under the names the loop gives them
    assert all(0 < h["train_abs_err"] for h in history) and "train_acc" not in history[0]
    assert history[-1]["val_mse"] == metrics["test_mse"]  # the same data, after the last epoch
    assert json.loads((out / "metrics.json").read_text())["test_mse"] == metrics["test_mse"]
    # SNELLA adapted the hidden layers and its allocator ran; the output layer trained in full
    assert sorted(metrics["final_sparsities"]) == ["0", "2"] and metrics["final_density"] == pytest.approx(0.5, abs=1e-3)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.startswith("4.") for k in adapter) and any("snella_A" in k for k in adapter)
    # the task's info is in run.json; pictures are the task's (none) plus the allocator's
    assert json.loads((out / "run.json").read_text())["target"] == "linear"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "allocation.png", "checkpoint", "config.yaml",
                                                     "metrics.json", "run.json"]
    assert re.search(rf"\n  test mse +{metrics['test_mse']:.4f}\n", printed) and "val_mse " in printed


def test_a_regression_run_stopped_and_resumed_equals_the_uninterrupted_one(reference, tmp_path: Path):
    expected, reference_dir, _ = reference
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError):
        run(config(out, debug_nan_step=3 * 8 + 2))  # inside epoch 4: the checkpoint of epoch 3 is kept
    resumed, _ = run(config(out, resume=True))
    assert resumed["test_mse"] == expected["test_mse"]
    assert resumed["final_sparsities"] == expected["final_sparsities"]
    for mine, theirs in zip(resumed["history"], expected["history"]):
        assert {k: v for k, v in mine.items() if k != "seconds"} == {k: v for k, v in theirs.items() if k != "seconds"}
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(reference_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
