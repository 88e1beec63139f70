"""Hand-derived forward and backward of the distance kernels (SNELL piecewise, SNELLA mixed) with the
weight-level competition: the hot path of every adapted layer.

Autograd through ``functional.mixed_kernel`` + ``sparsify`` works, but it allocates a fresh (out, in)
tensor for every elementwise op and keeps them all until backward ends. These functions compute the
same values and gradients with in-place ops, GEMM-shaped reductions and a handful of live (out, in)
buffers, which roughly halves the kernel's share of a training step on CPU. ``tests/test_ops.py``
checks them against plain autograd on the formulas of ``functional.py``.

Shapes: ``A (S, P, in, d)``, ``B (S, P, out, d)``, scalars ``(S,)``, ``c (P,)``; updates ``(S, out, in)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .functional import _DIST_EPS, selection_threshold

FAST_KERNELS = ("mixed", "piecewise")


def _softmax_(z: Tensor, dim: int) -> Tensor:
    """Softmax computed in the storage of ``z`` (one (out, in) buffer fewer than ``torch.softmax``)."""
    z.sub_(z.amax(dim, keepdim=True)).exp_()
    return z.div_(z.sum(dim, keepdim=True))


def _distances(A: Tensor, B: Tensor) -> Tensor:
    """``||B[i] - A[j]||`` per chunk as ``(S, P, out, in)``: one batched GEMM plus three in-place passes."""
    S, P, n_in, d = A.shape
    n_out = B.shape[2]
    D = B.pow(2).sum(-1, keepdim=True) + A.pow(2).sum(-1).unsqueeze(-2)  # (S, P, out, in)
    D = D.view(S * P, n_out, n_in)
    torch.baddbmm(D, B.reshape(S * P, n_out, d), A.reshape(S * P, n_in, d).transpose(1, 2), alpha=-2.0, out=D)
    return D.view(S, P, n_out, n_in).clamp_(min=_DIST_EPS).sqrt_()


def _batched_dot(x: Tensor, y: Tensor) -> Tensor:
    """``sum(x * y)`` per leading index without an elementwise temporary: ``(S, ...) -> (S,)``."""
    S = x.shape[0]
    return torch.bmm(x.reshape(S, 1, -1), y.reshape(S, -1, 1)).view(S)


def kernel_forward(A: Tensor, B: Tensor, c: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor],
                   beta: Optional[Tensor], kernel: str, mode: str, sparsity: Sequence[float],
                   thresholds: Optional[Tensor] = None, keep: bool = False
                   ) -> tuple[Tensor, Tensor, Optional[dict]]:
    """The sparse update, without autograd.

    Args:
        kernel: "mixed" or "piecewise". mode: "magnitude" or "soft". sparsity: one level per matrix.
        thresholds: ``(S,)`` from an earlier call (backward reuses forward's selection); computed if None.
        keep: also return the intermediates that ``kernel_backward`` needs, as a dict it consumes:
            distances ``D (S, P, out, in)``, kernel ``K``, softmax ``soft`` (mixed) and the competition's
            multiplier ``scale`` (None if dense), each ``(S, out, in)``.

    Returns:
        ``(delta (S, out, in), thresholds (S,), state or None)``.
    """
    S, P = A.shape[:2]
    D = _distances(A, B)
    K = torch.matmul(c.to(D.dtype).view(1, 1, P), D.view(S, P, -1)).view(S, *D.shape[2:])  # sum_p c_p D_p
    if not keep:
        del D  # forward keeps at most three (out, in) buffers alive: K/K', the softmax, the multiplier
    soft = None
    if kernel == "mixed":
        soft = _softmax_(K / gamma.view(S, 1, 1), dim=-2)  # over the out index, per input j
        # K' = K + alpha * soft + beta; in K's own storage unless backward needs K itself.
        Kp = (K.addcmul_ if not keep else K.addcmul)(soft, alpha.view(S, 1, 1)).add_(beta.view(S, 1, 1))
        if not keep:
            del soft
    elif kernel == "piecewise":
        Kp = K  # not modified in place when kept: the competition below then makes a new tensor
    else:
        raise ValueError(f"kernel_forward handles {FAST_KERNELS}, not {kernel!r}")
    scale = None
    if any(level > 0 for level in sparsity):
        scale = Kp.abs()  # (S, out, in): m, turned in place into the competition's multiplier
    if thresholds is None:
        thresholds = torch.full((S,), float("nan"), device=A.device, dtype=Kp.dtype)
        for s, level in enumerate(sparsity):
            if level > 0:
                thresholds[s] = selection_threshold(scale[s], level, mode)
    if scale is not None:
        for s, level in enumerate(sparsity):
            if level == 0:
                scale[s].fill_(1.0)
            elif mode == "magnitude":  # m * 1[m > t]
                if scale.device.type == "cpu":
                    torch.nn.functional.threshold_(scale[s], float(thresholds[s]), 0.0)  # one pass
                else:  # no host sync on accelerators
                    scale[s].masked_fill_(scale[s] <= thresholds[s], 0.0)
            else:
                scale[s].sub_(thresholds[s]).clamp_(min=0.0)  # max(m - t, 0)
        delta = Kp * scale if keep else Kp.mul_(scale)
    else:
        delta = Kp
    state = {"D": D, "K": K, "soft": soft, "scale": scale} if keep else None
    return delta, thresholds, state


def kernel_backward(state: dict, A: Tensor, B: Tensor, c: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor]
                    ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``(A, B, alpha, gamma, beta)`` from ``state["grad"] = dL/d(delta)`` ``(S, out, in)``.

    ``state`` (from ``kernel_forward(keep=True)`` plus the gradient) is consumed: its tensors are
    emptied out and overwritten in place, so each buffer is freed as soon as it is last used and the
    backward holds at most about five (out, in) buffers. The competition's multiplier is treated as
    a constant (it is detached in the authors' code), exactly as ``functional.apply_competition``.
    """
    D, K, soft, scale, g = (state.pop(k) for k in ("D", "K", "soft", "scale", "grad"))
    S, P = A.shape[:2]
    if scale is not None:
        g.mul_(scale)  # dL/dK' (S, out, in)
        del scale
    g_alpha = g_gamma = g_beta = None
    if soft is not None:
        # K' = K + alpha * softmax(K / gamma) + beta
        g_beta = g.sum((-2, -1))
        t = g * soft  # (S, out, in)
        col = t.sum(-2, keepdim=True)  # (S, 1, in): softmax's per-column inner product
        g_alpha = col.sum((-2, -1))
        t.addcmul_(soft, col, value=-1.0)  # soft * (g - col): dL/dZ divided by alpha
        del soft
        a = alpha.view(S, 1, 1)
        gm = gamma.view(S, 1, 1)
        g_gamma = -alpha * _batched_dot(t, K) / gamma.pow(2)  # Z = K / gamma
        g.addcmul_(t, a / gm)  # dL/dK = dL/dK' + dL/dZ / gamma
        del t
    del K
    # K = sum_p c_p ||B_p[i] - A_p[j]||: dL/dD_p = c_p g; d||b - a|| = (b - a) / ||b - a||. With
    # E_p = g / D_p: dL/dB_p = c_p (B_p * rowsum(E_p) - E_p A_p), dL/dA_p = c_p (A_p * colsum(E_p) - E_p^T B_p).
    # E is built in D's storage; a column of ones appended to A and B makes each GEMM return the
    # row/column sums as well, and c_p scales the small results instead of the large E.
    d_min = D.new_tensor(_DIST_EPS).sqrt()
    clamped = D <= d_min if D.amin() <= d_min else None
    E = D.reciprocal_().mul_(g.unsqueeze(1))  # (S, P, out, in)
    del D, g
    if clamped is not None:
        E.masked_fill_(clamped, 0.0)  # clamped distances pass no gradient
    Ef = E.view(S * P, *E.shape[2:])
    Bf = B.reshape(S * P, B.shape[2], B.shape[3])
    Af = A.reshape(S * P, A.shape[2], A.shape[3])
    EA = torch.bmm(Ef, torch.cat([Af, Af.new_ones(Af.shape[:2] + (1,))], -1))  # (S*P, out, d+1)
    EB = torch.bmm(Ef.transpose(1, 2), torch.cat([Bf, Bf.new_ones(Bf.shape[:2] + (1,))], -1))  # (S*P, in, d+1)
    del E, Ef
    cp = c.to(A.dtype).repeat(S).view(S * P, 1, 1)
    g_B = (Bf * EA[..., -1:] - EA[..., :-1]) * cp  # (S*P, out, d)
    g_A = (Af * EB[..., -1:] - EB[..., :-1]) * cp  # (S*P, in, d)
    return g_A.view(A.shape), g_B.view(B.shape), g_alpha, g_gamma, g_beta
