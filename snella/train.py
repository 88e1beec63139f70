"""The fine-tuning loop behind `snella finetune`: every task and method, one machine or many, resumable; read top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import snella
from snella.allocator import BudgetAllocator
from snella.plots import plot_allocation
from snella.tasks import Task, TaskData, get_task
from snella.training import distributed as distrib
from snella.training.checkpoint import (checkpoint_path, load_checkpoint, rank_rng_state, rng_state, save_checkpoint,
                                       set_rng_state)
from snella.training.config import TrainConfig
from snella.training.data import augment_generator, batches, epoch_order, num_batches, shard
from snella.training.evaluation import autocast
from snella.training.methods import Method, get_method, load_trainable_state, trainable_state
from snella.training.ema import ParameterEMA
from snella.training.norm import (mark_trained_in_full, save_batchnorm_stats, set_train_mode,
                                  trained_in_full_batchnorms)
from snella.training.optim import build_optimizer, build_scheduler, update_step
from snella.training.outputs import (ADAPTER_DIR, ALLOCATION_PLOT, METRICS_FILE, RUN_FILE, CONFIG_FILE,
                                     check_output_dir, clear_run, default_output_dir, folder_bytes, write_json)
from snella.training.report import MemoryMeter, print_summary


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became NaN or infinite; the last good checkpoint is kept."""


def finetune(config: TrainConfig) -> dict[str, Any]:
    """Fine-tune ``config.model`` on ``config.data`` for ``config.task`` with ``config.method``; write the outputs.

    Under torchrun every process calls this; they train data-parallel and rank 0 writes the files.

    Args:
        config: the run's settings (``TrainConfig()`` is the default recipe).

    Returns:
        The metrics written to metrics.json (the same dict on every rank).

    Raises:
        ValueError / FileNotFoundError: bad settings or data (the message names the value or file).
        NonFiniteLossError: the loss became NaN or infinite.
    """
    wall_start = time.perf_counter()
    ctx = distrib.setup(config.device)
    try:
        return _finetune(config, ctx, wall_start)
    finally:
        distrib.teardown(ctx)


def _finetune(config: TrainConfig, ctx: distrib.DistContext, wall_start: float) -> dict[str, Any]:
    device, show = ctx.device, config.progress and ctx.is_main

    # ---- the output folder: named by rank 0, checked by every rank before anything is written
    out = Path(distrib.broadcast_object(ctx, str(config.output_dir or default_output_dir(config))))
    config = dataclasses.replace(config, output_dir=str(out))
    check_output_dir(out, config.overwrite, config.resume)
    distrib.barrier(ctx)

    # ---- data and model, from the task: the data may size the model (a class count), the model
    # decides the input (its size, mean and std)
    task = get_task(config.task)
    train_raw = task.load_train(config)
    info = task.model_info(train_raw)
    torch.manual_seed(config.seed)  # the new head's init, the same on every rank
    backbone = task.build_model(config, info)
    data = task.datasets(config, train_raw, backbone)
    train_set, test_set, val_set = data.train, data.test, data.val

    # ---- the method: which parameters train
    method = get_method(config.method)
    torch.manual_seed(config.seed)  # the adapter's init
    in_full = task.trained_in_full(config, backbone)
    mark_trained_in_full(backbone, in_full)  # a new decoder's BatchNorms estimate their statistics
    model = method.apply(config, backbone, in_full).to(device)
    adapted = method.targets_summary(model)  # which modules were adapted, one line
    if ctx.is_main and adapted:
        print(adapted, flush=True)
    if config.batch_size % ctx.world_size:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the {ctx.world_size} processes")
    rank_batch = config.batch_size // ctx.world_size
    steps_per_epoch = num_batches(len(shard(torch.arange(len(train_set)), 0, ctx.world_size)), rank_batch)
    total_steps = config.epochs * steps_per_epoch
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, config.warmup_epochs * steps_per_epoch, config.lr,
                                config.warmup_lr, config.min_lr)
    allocator = _allocator(config, method, model, total_steps, steps_per_epoch)
    ema = ParameterEMA(model, config.ema_decay) if config.ema_decay is not None else None

    # ---- a fresh run writes its config; a resumed one restores every piece of state
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    if config.resume:
        state = load_checkpoint(out)
        _check_same_run(config, state, out)
        load_trainable_state(model, state["model"], str(checkpoint_path(out)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if allocator is not None:
            allocator.load_state_dict(state["allocator"])
        if ema is not None:
            ema.load_state_dict(state["ema"], str(checkpoint_path(out)))
        set_rng_state(rank_rng_state(state["rng"], ctx.rank, ctx.world_size, out))
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
    elif ctx.is_main:
        if config.overwrite:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        config.save_yaml(out / CONFIG_FILE)
        write_json(out / RUN_FILE, {**info, **data.info, "method": config.method, "model": config.model,
                                    "snella_version": snella.__version__})
    distrib.barrier(ctx)
    if not config.resume:  # dropout and drop-path: each rank its own stream (seed + rank, as timm)
        torch.manual_seed(config.seed + ctx.rank)

    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if ctx.distributed else model

    def forward(*inputs):  # the task's forward pass, under the run's autocast
        with autocast(device, config.precision):
            return net(*inputs)

    meter = MemoryMeter(device)
    meter.start()
    epoch_bar = tqdm(total=config.epochs, initial=start_epoch, desc="epochs", disable=not show, position=0)
    for epoch in range(start_epoch, config.epochs):
        # ---- one epoch over this rank's share of the seeded order
        epoch_start, density = time.perf_counter(), _density(allocator, method, model)
        set_train_mode(model, config.bn_stats)  # BatchNorm statistics as the config says
        order = shard(epoch_order(len(train_set), config.seed, epoch), ctx.rank, ctx.world_size)
        names, totals = [], None  # the task's statistics: sums over all ranks, then the item count
        step_bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                        disable=not show, position=1)
        shifts = augment_generator(config.seed, epoch, ctx.rank)
        for batch in batches(train_set, order, rank_batch, config.num_workers, seed=config.seed + epoch):
            batch = task.augment(batch, config, shifts)
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            # forward
            result = task.training_step(forward, batch)
            if config.debug_nan_step == step + 1:
                result.loss, result.stats["loss"] = result.loss * float("nan"), float("nan")
            # every rank sees the global loss, so all stop together on a bad one
            names = list(result.stats)
            stats = torch.tensor([*result.stats.values(), result.count], dtype=torch.float64, device=device)
            stats = distrib.all_reduce_sum(ctx, stats).cpu()
            if not math.isfinite(stats[0]):
                step_bar.close()
                epoch_bar.close()
                mean_loss = float(stats[0] / stats[-1])
                raise NonFiniteLossError(_non_finite_message(mean_loss, epoch, step, config, out, history))
            # backward, update; the allocator reads |theta * grad| after the step, before the grads go
            step = update_step(result.loss, optimizer, scheduler, allocator, step)
            if ema is not None:
                ema.update(model)
            totals = stats if totals is None else totals + stats
            step_bar.update()
            step_bar.set_postfix(**{n: f"{totals[i] / totals[-1]:.3f}" for i, n in enumerate(names)},
                                 **({"density": f"{density:.3f}"} if density is not None else {}))
            if config.debug_step_delay:
                time.sleep(config.debug_step_delay)
        step_bar.close()

        # ---- record the epoch, validate, checkpoint
        record = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                  **{f"train_{n}": float(totals[i] / totals[-1]) for i, n in enumerate(names)},
                  "density": density, "seconds": time.perf_counter() - epoch_start}
        if val_set is not None:
            with ema.swapped_in(model) if ema is not None else contextlib.nullcontext():  # what test will score
                record.update(task.val_record(task.evaluate(model, val_set, rank_batch, device, config.precision,
                                                            ctx)))
        history.append(record)
        rngs = distrib.gather_objects(ctx, rng_state())  # every rank's generators: resume stays exact
        if ctx.is_main:
            save_checkpoint(out, {
                "config": config.to_dict(), "epoch": epoch + 1, "step": step, "history": history,
                "model": trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "allocator": allocator.state_dict() if allocator is not None else None, "rng": rngs,
                "ema": ema.state_dict() if ema is not None else None})
        distrib.barrier(ctx)
        epoch_bar.update()
        if ctx.is_main:
            tqdm.write(_epoch_line(task, record, config.epochs))
    epoch_bar.close()
    peak_mb = meter.peak_mb()

    # ---- test, check that the ranks agree, write the outputs
    if ema is not None:  # the average is the result: tested, saved and merged
        ema.copy_to(model)
    test = task.evaluate(model, test_set, rank_batch, device, config.precision, ctx)
    sparsities = {m.name: float(m.get_sparsity()) for m in method.matrices(model)}
    ranks = distrib.gather_objects(ctx, {"sparsities": sparsities, "checksum": _checksum(model)})
    metrics: Optional[dict[str, Any]] = None
    if ctx.is_main:
        method.save(model, out / ADAPTER_DIR)
        # the adapter alone would bring back the pretrained statistics (and a new decoder's init ones)
        if config.bn_stats == "update" or trained_in_full_batchnorms(model):
            save_batchnorm_stats(model, out / ADAPTER_DIR)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        metrics = {
            **{f"test_{k}": v for k, v in test.items()}, "test_split": config.test_split,
            "trainable_params": trainable, "total_params": sum(p.numel() for p in model.parameters()),
            "adapter_bytes": folder_bytes(out / ADAPTER_DIR), "peak_memory_mb": peak_mb,
            "peak_memory_kind": meter.kind, "train_seconds": sum(r["seconds"] for r in history),
            "wall_seconds": time.perf_counter() - wall_start, "epochs": config.epochs, "steps": step,
            "task": config.task, "method": config.method, "model": config.model, "data": config.data,
            "output_dir": str(out), "world_size": ctx.world_size, "skipped_images": data.skipped,
            "final_density": _density(allocator, method, model), "final_sparsities": sparsities,
            "ranks_agree": all(r == ranks[0] for r in ranks), "rank_results": ranks,
            "history": history, "allocation_history": allocator.history if allocator is not None else None,
        }
        write_json(out / METRICS_FILE, metrics)
        _write_pictures(task, out, metrics, model, data, device, config.precision)
        print_summary(metrics, task.summary_lines(metrics))
    return distrib.broadcast_object(ctx, metrics)


# ---------------------------------------------------------------- helpers of the loop


def _allocator(config: TrainConfig, method: Method, model: nn.Module, total_steps: int,
               steps_per_epoch: int) -> Optional[BudgetAllocator]:
    """SNELLA's budget allocator (sets every matrix to the initial sparsity); None for the other methods."""
    if not config.uses_allocator:
        return None  # a dense SNELLA has no budget to share
    return BudgetAllocator(method.matrices(model), config.allocator_config(), total_steps, steps_per_epoch)


def _write_pictures(task: Task, out: Path, metrics: dict[str, Any], model: nn.Module, data: TaskData,
                    device: torch.device, precision: str) -> list[Path]:
    """The task's pictures, and allocation.png when the budget allocator ran."""
    written = task.write_pictures(out, metrics["history"], model, data, device, precision)
    if metrics["allocation_history"]:
        written.append(plot_allocation(metrics["allocation_history"], out / ALLOCATION_PLOT))
    return written


def _density(allocator: Optional[BudgetAllocator], method: Method, model: nn.Module) -> Optional[float]:
    """Fraction of update entries kept over all adapted matrices; None for methods without sparsity."""
    if allocator is not None:
        return allocator.current_budget() / sum(allocator.numels)
    matrices = method.matrices(model)
    if not matrices:
        return None
    kept = sum((1.0 - m.get_sparsity()) * m.numel for m in matrices)
    return kept / sum(m.numel for m in matrices)


def _checksum(model: nn.Module) -> list[float]:
    """Sum and sum of squares of the trainable parameters: equal on every rank of a correct DDP run."""
    params = [p.detach().double() for p in model.parameters() if p.requires_grad]
    return [float(sum(p.sum() for p in params)), float(sum(p.square().sum() for p in params))]


def _check_same_run(config: TrainConfig, state: dict[str, Any], out: Path) -> None:
    saved = TrainConfig.from_dict(state["config"], source=str(checkpoint_path(out)))
    diff = config.differences(saved)
    if diff:
        shown = ", ".join(f"{k}: now {a!r}, checkpoint {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"--resume: the settings differ from the run in {out} ({shown}); resume with the same "
                         "settings (omit them to reuse the saved config.yaml) or start a new run")


def _non_finite_message(loss: float, epoch: int, step: int, config: TrainConfig, out: Path,
                        history: list[dict[str, Any]]) -> str:
    kept = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept in {checkpoint_path(out)}"
            if history else "no checkpoint was written (the first epoch did not finish)")
    return (f"loss became {loss} at epoch {epoch + 1}, step {step + 1}: training stopped; {kept}. "
            f"Lower --lr (now {config.lr}) or use --precision fp32, and start again with --overwrite.")


def _epoch_line(task: Task, record: dict[str, Any], epochs: int) -> str:
    """One line per epoch: the task's train statistics, the lr, its validation metrics, density, time."""
    train = [k for k in record if k.startswith("train_")]
    val = [k for k in record if k.startswith("val_") and record[k] is not None]
    parts = [f"epoch {record['epoch']}/{epochs}", *(task.show(k, record[k]) for k in train), f"lr {record['lr']:.2e}",
             *(task.show(k, record[k]) for k in val)]
    if record.get("density") is not None:
        parts.append(f"density {100 * record['density']:.1f}%")
    return "  ".join(parts) + f"  {record['seconds']:.1f}s"
