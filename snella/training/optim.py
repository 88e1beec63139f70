"""The optimiser of every method: AdamW without decay on 1-D parameters, cosine schedule with linear warm-up."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

# timm's no-decay names (position embedding, class / distillation / register tokens) are not 1-D but
# are not weights either.
NO_DECAY_NAMES = ("cls_token", "pos_embed", "dist_token", "reg_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: decayed matrices, and undecayed 1-D parameters and tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters: nothing to fine-tune")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999) over the trainable parameters (SPEC.md section 6)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999))


def cosine_lr(step: int, total_steps: int, warmup_steps: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    Linear from ``warmup_lr`` at step 0 towards ``lr`` over ``warmup_steps``, then a half cosine from
    ``lr`` down to ``min_lr`` at ``total_steps``.
    """
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _factor(step: int, total_steps: int, warmup_steps: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    return cosine_lr(step, total_steps, warmup_steps, lr, warmup_lr, min_lr) / lr


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, lr: float,
                    warmup_lr: float, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following ``cosine_lr``; its state_dict is plain numbers (checkpoint-safe)."""
    factor = functools.partial(_factor, total_steps=total_steps, warmup_steps=warmup_steps, lr=lr,
                               warmup_lr=warmup_lr, min_lr=min_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def update_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, allocator, step: int) -> int:
    """Backward and one optimizer step; SNELLA's allocator (or None) reads |theta * grad| after the
    update, before the gradients go, and reallocates at its schedule's points. Returns the new step count."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if allocator is not None:
        allocator.update_scores()
    scheduler.step()
    step += 1
    if allocator is not None:
        allocator.step(step)  # at the last step of an epoch: the allocation of the next one
    return step
