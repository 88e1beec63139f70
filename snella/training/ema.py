"""An exponential moving average of the trainable parameters, swapped in for evaluation.

The authors' FGVC runs evaluate a model EMA (decay 0.9999, timm's ModelEma); diffusion fine-tuning
keeps one as a rule. Only the trainable parameters are averaged: the frozen backbone does not move,
so averaging it would cost its memory for nothing. SNELLA's per-matrix sparsities are not averaged:
they are the allocator's, and the averaged factors are evaluated at the sparsities training reached.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """The decay used at the ``step``-th update (1-based).

    With ``warmup``, ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's ExponentialMovingAverage
    with ``num_updates``): early updates follow the weights closely, so a short run is not averaged
    towards its initialisation. Without, ``decay`` throughout.
    """
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


class ParameterEMA:
    """shadow = d * shadow + (1 - d) * param after every optimizer step, for every trainable parameter.

    Args:
        model: the model being trained; its trainable parameters at construction are averaged.
        decay: in (0, 1); the closer to 1 the longer the memory (about 1 / (1 - decay) steps).
        warmup: use ``ema_decay_at``'s warm-up of the decay.

    Raises:
        ValueError: ``decay`` outside (0, 1), or ``model`` has no trainable parameter.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay!r} is invalid; accepted: a number in (0, 1), e.g. 0.999")
        self.decay, self.warmup, self.updates = float(decay), warmup, 0
        self.shadow = {name: p.detach().clone().float() for name, p in model.named_parameters() if p.requires_grad}
        if not self.shadow:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to average")

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current parameters into the average (call after every optimizer step)."""
        self.updates += 1
        d = ema_decay_at(self.updates, self.decay, self.warmup)
        params = dict(model.named_parameters())
        for name, avg in self.shadow.items():
            avg.mul_(d).add_(params[name].detach().float(), alpha=1.0 - d)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block ``model`` holds the averaged parameters; the trained ones come back after."""
        params = dict(model.named_parameters())
        kept = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, avg in self.shadow.items():
                params[name].copy_(avg)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in kept.items():
                    params[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged parameters into ``model`` for good (before saving the adapter of a run)."""
        params = dict(model.named_parameters())
        for name, avg in self.shadow.items():
            params[name].copy_(avg)

    def state_dict(self) -> dict:
        """Everything a checkpoint needs to resume the average exactly."""
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict, source: Optional[str] = None) -> None:
        """Restore ``state_dict`` output; refuses an average of other parameters."""
        if set(state["shadow"]) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(state["shadow"]))[:5]
            raise ValueError(f"{source or 'the checkpoint'}: its parameter average does not fit this model "
                             f"(missing {missing})")
        self.decay, self.warmup, self.updates = state["decay"], state["warmup"], state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
