"""The two comparison methods that exist only in the benchmarks: GPS-style sparse tuning and the
authors' way of running SNELL/SNELLA, both written from SPEC.md (not from their code)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from snella import functional as Fn
from snella.targets import is_fused_qkv, resolve_targets


def apply_gps_style(model: nn.Module, density: float = 0.1, seed: int = 0) -> list[str]:
    """Sparse tuning as GPS/SPT run it: whole target matrices trainable, a fixed sparse mask on their
    gradients, so AdamW keeps full-size state for every tuned matrix (their memory bill).

    Returns:
        The names of the tuned matrices. The mask is random here: which entries are chosen does not
        change the memory or the time, only the accuracy.
    """
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    names = resolve_targets(model, None)
    for name in names:
        weight = model.get_submodule(name).weight
        mask = torch.rand(weight.shape, generator=g) < density  # bool, 1 byte per entry, as a stored mask
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, mask=mask: grad * mask)
    return names


class ReferenceSnellaLinear(nn.Module):
    """SNELLA as the authors' code runs it (SPEC.md sections 3, 4, 6), the baseline to beat.

    A parallel branch ``base(x) + drop_path(dropout(x) @ dW^T)`` under activation checkpointing; the
    kernel from ``torch.cdist``; the threshold from ``torch.quantile`` (a sort) on every forward; a
    fused qkv split into three matrices with their own factors.
    """

    def __init__(self, base: nn.Linear, r: int = 32, chunks: int = 2, sparsity: float = 0.8, split: bool = False,
                 dropout: float = 0.1, drop_path: float = 0.1):
        super().__init__()
        self.base = base
        S = 3 if split else 1
        self.S, self.sparsity, self.drop_path = S, sparsity, drop_path
        A = torch.empty(S, chunks, base.in_features, r // chunks)
        B = torch.empty(S, chunks, base.out_features // S, r // chunks)
        for s in range(S):
            nn.init.kaiming_uniform_(A[s], a=math.sqrt(5))
            nn.init.kaiming_uniform_(B[s], a=math.sqrt(5))
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
        self.alpha, self.gamma = nn.Parameter(torch.ones(S)), nn.Parameter(torch.ones(S))
        self.beta = nn.Parameter(torch.zeros(S))
        self.register_buffer("c", Fn.chunk_coefficients(chunks), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def _delta(self, A: Tensor, B: Tensor, alpha: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        parts = []
        for s in range(self.S):
            K = sum(self.c[p] * torch.cdist(A[s, p], B[s, p]) for p in range(A.shape[1]))  # (in, out)
            K = K + alpha[s] * torch.softmax(K / gamma[s], dim=1) + beta[s]
            m = K.detach().abs()
            flat = m.flatten()
            if flat.numel() <= 2 ** 24:
                t = torch.quantile(flat, self.sparsity)
            else:  # torch.quantile's limit in older torch
                t = flat.kthvalue(math.floor(self.sparsity * (flat.numel() - 1)) + 1).values
            parts.append((K * m * (m > t)).T)  # (out_s, in)
        return torch.cat(parts, 0)

    def _branch(self, x: Tensor, A: Tensor, B: Tensor, alpha: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        return F.linear(x, self._delta(A, B, alpha, gamma, beta))

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        z = self.dropout(x)
        update = checkpoint(self._branch, z, self.A, self.B, self.alpha, self.gamma, self.beta, use_reentrant=False)
        if self.training and self.drop_path > 0:
            keep = 1 - self.drop_path
            update = update * update.new_empty((update.shape[0],) + (1,) * (update.dim() - 1)).bernoulli_(keep) / keep
        return out + update


def apply_snell_reference(model: nn.Module, r: int = 32, sparsity: float = 0.8) -> list[str]:
    """Wire ``ReferenceSnellaLinear`` into every default target, as the authors' ViT wires its adapters."""
    model.requires_grad_(False)
    names = resolve_targets(model, None)
    for name in names:
        base = model.get_submodule(name)
        model.set_submodule(name, ReferenceSnellaLinear(base, r=r, sparsity=sparsity, split=is_fused_qkv(name, base)))
    return names
