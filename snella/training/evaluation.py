"""Accuracy of a model on a dataset (sharded over data-parallel ranks) and batched class scores."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from snella.training.data import batches, shard
from snella.training.distributed import DistContext, all_reduce_sum


def logits_of(output) -> torch.Tensor:
    """Class scores from a model output: a tensor, or a transformers output with ``logits``."""
    return output.logits if hasattr(output, "logits") else output


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` when ``precision`` is 'bf16', else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, precision: str = "fp32",
             ctx: DistContext | None = None, num_workers: int = 0) -> tuple[float, int]:
    """Top-1 accuracy of ``model`` on every item of ``dataset``.

    Under data parallelism each rank scores its own share (no padding, so nothing counts twice)
    and the counts are summed.

    Returns:
        (accuracy in [0, 1], number of items scored).
    """
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    was_training = model.training
    model.eval()
    indices = shard(torch.arange(len(dataset)), rank, world, pad=False)
    counts = torch.zeros(2, dtype=torch.float64)  # correct, seen
    for images, labels in batches(dataset, indices, batch_size, num_workers):
        with autocast(device, precision):
            scores = logits_of(model(images.to(device)))  # (B, num_classes)
        counts += torch.tensor([(scores.argmax(1).cpu() == labels).sum().item(), len(labels)], dtype=torch.float64)
    if ctx is not None:
        counts = all_reduce_sum(ctx, counts.to(ctx.device)).cpu()
    model.train(was_training)
    correct, seen = counts.tolist()
    return (correct / seen if seen else 0.0), int(seen)


@torch.no_grad()
def probabilities(model: nn.Module, images: torch.Tensor, device: torch.device, precision: str = "fp32",
                  batch_size: int = 256) -> torch.Tensor:
    """Softmax class probabilities (N, num_classes), float32 on the CPU, for a stack of images (N, C, H, W)."""
    model.eval()
    out = []
    for chunk in torch.split(images, batch_size):
        with autocast(device, precision):
            scores = logits_of(model(chunk.to(device)))
        out.append(scores.float().softmax(dim=1).cpu())
    return torch.cat(out)
