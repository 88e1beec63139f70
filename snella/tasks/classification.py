"""Image classification as a task: a class head on the backbone, cross-entropy, top-1 accuracy, top-k prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from snella.data import load_dataset
from snella.data.augment import random_shift
from snella.data.checks import open_image
from snella.plots import plot_curves
from snella.tasks.base import StepOutput, Task, TaskData, register_task
from snella.training.config import TrainConfig
from snella.training.data import input_spec, load_split, prepare
from snella.training.distributed import DistContext
from snella.training.evaluation import accuracy, logits_of, probabilities
from snella.training.export import json_path, write_merged
from snella.training.methods import head_modules
from snella.training.outputs import CURVES_PLOT
from snella.training.runs import Run, build_backbone, merged_model


@register_task
class ClassificationTask(Task):
    """One label per image: the backbone's classifier head is replaced by one of the data's class count."""

    name = "classification"

    # ---------------------------------------------------------------- model and data
    def load_train(self, config: TrainConfig):
        return load_dataset(config.data, config.train_split, None, skip_bad_images=config.skip_bad_images,
                            seed=config.seed)

    def model_info(self, train) -> dict[str, Any]:
        return {"classes": list(train.classes)}

    def build_model(self, config: TrainConfig, info: dict[str, Any]) -> nn.Module:
        return build_backbone(config, len(info["classes"]))

    def trained_in_full(self, config: TrainConfig, model: nn.Module) -> list[str]:
        return head_modules(model, config.head)

    def datasets(self, config: TrainConfig, train, model: nn.Module) -> TaskData:
        spec = input_spec(config, model)  # the backbone decides the input size
        train_set = prepare(train, spec, train=True, limit=config.train_limit)
        test_set = load_split(config, spec, config.test_split, train=False, limit=config.test_limit)
        val_set = load_split(config, spec, config.val_split, False, config.test_limit) if config.val_split else None
        if config.random_shift >= spec.image_size:
            raise ValueError(f"random_shift={config.random_shift} is invalid for {spec.image_size}px inputs; "
                             f"accepted: 0 to {spec.image_size - 1} pixels")
        for other in (test_set, val_set):
            if other is not None and other.classes != train_set.classes:
                raise ValueError(f"{config.data}: split {other.split!r} has classes {other.classes[:10]}, the "
                                 f"training split {train_set.classes[:10]}; every split must have the same classes")
        return TaskData(train_set, test_set, val_set, info={"input": spec.to_dict()}, skipped=len(train.bad_images))

    # ---------------------------------------------------------------- training
    def augment(self, batch: tuple, config: TrainConfig, generator: torch.Generator) -> tuple:
        images, labels = batch
        return random_shift(images, config.random_shift, generator), labels  # (B, C, H, W)

    def training_step(self, forward, batch: tuple) -> StepOutput:
        images, labels = batch
        logits = logits_of(forward(images))  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), labels)
        return StepOutput(loss, {"loss": loss.item() * len(labels), "acc": (logits.argmax(1) == labels).sum().item()},
                          len(labels))

    # ---------------------------------------------------------------- evaluation and reporting
    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                 precision: str = "fp32", ctx: Optional[DistContext] = None) -> dict[str, Any]:
        acc, images = accuracy(model, dataset, batch_size, device, precision, ctx)
        return {"accuracy": acc, "images": images}

    def val_record(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"val_acc": metrics["accuracy"]}

    def show(self, key: str, value: float) -> str:
        labels = {"train_loss": "loss", "train_acc": "acc", "val_acc": "val"}
        return f"{labels[key]} {value:.4f}" if key == "train_loss" else f"{labels.get(key, key)} {100 * value:.2f}%"

    def summary_lines(self, metrics: dict[str, Any]) -> list[str]:
        return [f"  test accuracy     {100 * metrics['test_accuracy']:.2f}%  ({metrics['test_split']} split, "
                f"{metrics['test_images']} images)"]

    def write_pictures(self, out: Path, history: list[dict[str, Any]], model: nn.Module, data: TaskData,
                       device: torch.device, precision: str) -> list[Path]:
        return [plot_curves(history, out / CURVES_PLOT)] if history else []

    # ---------------------------------------------------------------- the run tools
    def evaluate_run(self, run: Run, data: Optional[str], split: str, batch_size: int, precision: str,
                     limit: Optional[int]) -> dict[str, Any]:
        source = data or run.config.data
        dataset = load_dataset(source, split, None, skip_bad_images=run.config.skip_bad_images, seed=run.config.seed)
        if dataset.num_classes != len(run.classes):
            raise ValueError(f"{source} has {dataset.num_classes} classes, the run in {run.directory} was trained "
                             f"on {len(run.classes)} ({run.classes[:10]})")
        dataset = prepare(dataset, run.spec, train=False, limit=limit, fit_size=True)
        acc, seen = accuracy(run.model, dataset, batch_size, run.device, precision)
        return {"accuracy": acc, "images": seen, "data": source, "split": split, "run": str(run.directory)}

    def predict(self, run: Run, files: list[Path], top_k: int, batch_size: int,
                precision: str) -> list[dict[str, Any]]:
        transform = run.spec.build(train=False, fit_size=True)
        stack = torch.stack([transform(open_image(str(f), transform.image_mode)) for f in files])  # (N, C, H, W)
        probs = probabilities(run.model, stack, run.device, precision, batch_size)  # (N, num_classes)
        values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [{"file": str(f), "top": [{"label": run.classes[i], "index": int(i), "probability": float(p)}
                                         for p, i in zip(v.tolist(), ix.tolist())]}
                for f, v, ix in zip(files, values, indices)]

    def export(self, run: Run, output: Path) -> dict[str, Any]:
        channels, size = run.spec.channels, run.spec.image_size
        example = torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(0))  # (4, C, H, W)
        with torch.no_grad():
            tuned = logits_of(run.model(example))
            merged = merged_model(run)
            diff = float((logits_of(merged(example)) - tuned).abs().max())
        architecture = "vit_fmnist_d128" if run.config.model == "snella-default" else run.config.model
        info = write_merged(merged, architecture, output, example,
                            {"classes": run.classes, "input": run.spec.to_dict(), "max_abs_logit_diff": diff,
                             "run": str(run.directory)})
        return {**info, "json": str(json_path(output)), "output": str(output)}
