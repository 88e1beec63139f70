"""The distance kernels (SNELL piecewise, SNELLA mixed) with the weight-level competition, in Triton:
forward, the backward's recompute and the backward, over tiles of ``(out, in)``.

The same contract as ``kernel_vjp.kernel_forward`` / ``kernel_backward`` (which dispatch here for
float32 CUDA tensors, ``gpu/__init__.py``), computed tile by tile in registers:

- ``_kprime_kernel``: one program per (block of input columns, matrix). Distances by direct differences
  (exact, no GEMM cancellation), the column softmax of the mixed kernel online over the out tiles (a
  first sweep for each column's max and sum, a second for the values); writes ``K'`` and the
  softmax's ``(max, sum)`` per column.
- ``gpu/select.py`` selects each matrix's threshold on the device (no host sync).
- ``_apply_kernel``: ``dst = K' * multiplier(|K'|, t) (+ base)`` elementwise.
- Backward: ``_kprime_kernel`` runs again into a scratch ``K'`` (the same compiled kernel on the same
  factors: the same bits, so the mask cannot flip between forward and backward); ``_grad_cols_kernel``
  (per column block) gives dL/dA, the softmax's per-column inner product and the scalars' partial
  sums; ``_grad_rows_kernel`` (per row block) gives dL/dB. Each program owns the rows of the factor
  gradient it writes: no atomics, the same gradient on every run.

What this trades: one scratch ``(S, out, in)`` ``K'`` in backward (the torch path recomputes it a
block at a time), against no host sync and a handful of launches per layer. Shapes: ``A (S, P, in, d)``,
``B (S, P, out, d)``, scalars ``(S,)``, ``c (P,)``; updates ``(S, out, in)``; all float32, contiguous.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..functional import _DIST_EPS, quantile_rank
from .select import kth_abs

BLOCK_I = 32  # out rows per tile
BLOCK_J = 64  # input columns per tile: the contiguous index of an (out, in) matrix
APPLY_BLOCK = 1024
MODES = {"magnitude": 0, "soft": 1, "none": 2}


@triton.jit
def _distance(A_ptr, B_ptr, sp, rows, cols, rmask, cmask, n_in, n_out, D: tl.constexpr,
              BI: tl.constexpr, BJ: tl.constexpr):
    """Squared distances ``||B[sp, i] - A[sp, j]||^2`` of a tile, ``(BI, BJ)``; ``sp = s * P + p``."""
    a_row = A_ptr + (sp * n_in + cols) * D  # (BJ,)
    b_row = B_ptr + (sp * n_out + rows) * D  # (BI,)
    d2 = tl.zeros((BI, BJ), dtype=tl.float32)
    for k in tl.static_range(D):
        a = tl.load(a_row + k, mask=cmask, other=0.0)
        b = tl.load(b_row + k, mask=rmask, other=0.0)
        diff = b[:, None] - a[None, :]
        d2 += diff * diff
    return d2


@triton.jit
def _piecewise(A_ptr, B_ptr, c_ptr, s, rows, cols, rmask, cmask, n_in, n_out, P: tl.constexpr,
               D: tl.constexpr, EPS: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """``K = sum_p c_p ||B_p[i] - A_p[j]||`` of a tile, ``(BI, BJ)``; squared distances clamped at EPS."""
    K = tl.zeros((BI, BJ), dtype=tl.float32)
    for p in tl.static_range(P):
        d2 = _distance(A_ptr, B_ptr, s * P + p, rows, cols, rmask, cmask, n_in, n_out, D, BI, BJ)
        K += tl.load(c_ptr + p) * tl.sqrt(tl.maximum(d2, EPS))
    return K


@triton.jit
def _multiplier(kp, t, MODE: tl.constexpr):
    """The competition's (detached) multiplier of ``K'``: magnitude ``m 1[m > t]``, soft ``max(m - t, 0)``, none 1."""
    m = tl.abs(kp)
    if MODE == 0:
        return tl.where(m > t, m, 0.0)
    elif MODE == 1:
        return tl.maximum(m - t, 0.0)
    else:
        return tl.full(kp.shape, 1.0, tl.float32)


@triton.jit
def _kprime_kernel(A_ptr, B_ptr, c_ptr, alpha_ptr, gamma_ptr, beta_ptr, out_ptr, stats_ptr, n_in, n_out,
                   P: tl.constexpr, D: tl.constexpr, MIXED: tl.constexpr, EPS: tl.constexpr,
                   BI: tl.constexpr, BJ: tl.constexpr):
    """``K'`` of columns ``program_id(0)`` of matrix ``program_id(1)``; stats ``(S, 2, in)``: the column
    max and sum of ``exp(K / gamma - max)`` (mixed only)."""
    s = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BJ + tl.arange(0, BJ)
    cmask = cols < n_in
    col_max = tl.full((BJ,), float("-inf"), tl.float32)
    col_sum = tl.zeros((BJ,), dtype=tl.float32)
    if MIXED:
        gamma = tl.load(gamma_ptr + s)
        for i0 in range(0, n_out, BI):  # sweep 1: the softmax's column max and sum, online
            rows = i0 + tl.arange(0, BI)
            rmask = rows < n_out
            K = _piecewise(A_ptr, B_ptr, c_ptr, s, rows, cols, rmask, cmask, n_in, n_out, P, D, EPS, BI, BJ)
            z = tl.where(rmask[:, None], K / gamma, float("-inf"))
            new_max = tl.maximum(col_max, tl.max(z, 0))
            col_sum = col_sum * tl.exp(col_max - new_max) + tl.sum(tl.exp(z - new_max[None, :]), 0)
            col_max = new_max
        tl.store(stats_ptr + s * 2 * n_in + cols, col_max, mask=cmask)
        tl.store(stats_ptr + (s * 2 + 1) * n_in + cols, col_sum, mask=cmask)
    for i0 in range(0, n_out, BI):  # sweep 2: the values
        rows = i0 + tl.arange(0, BI)
        rmask = rows < n_out
        K = _piecewise(A_ptr, B_ptr, c_ptr, s, rows, cols, rmask, cmask, n_in, n_out, P, D, EPS, BI, BJ)
        if MIXED:
            soft = tl.exp(K / gamma - col_max[None, :]) / col_sum[None, :]
            K = K + tl.load(alpha_ptr + s) * soft + tl.load(beta_ptr + s)
        offs = (s * n_out + rows[:, None]) * n_in + cols[None, :]
        tl.store(out_ptr + offs, K, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _apply_kernel(src_ptr, base_ptr, dst_ptr, thr_ptr, n, MODE: tl.constexpr, HAS_BASE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """``dst = src * multiplier(src, t_s) (+ base)`` for matrix ``program_id(1)`` (``dst`` may be ``src``)."""
    s = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    kp = tl.load(src_ptr + s * n + offs, mask=valid, other=0.0)
    out = kp
    if MODE != 2:
        out = kp * _multiplier(kp, tl.load(thr_ptr + s), MODE)
    if HAS_BASE:
        out += tl.load(base_ptr + s * n + offs, mask=valid, other=0.0)
    tl.store(dst_ptr + s * n + offs, out, mask=valid)


@triton.jit
def _dkernel(g_ptr, kp_ptr, thr, K, soft, col, alpha, gamma, offs, tmask, MODE: tl.constexpr,
             MIXED: tl.constexpr):
    """dL/dK of a tile from dL/d(delta): through the competition (multiplier of the saved ``K'``) and,
    for the mixed kernel, ``K' = K + alpha softmax(K / gamma) + beta``. Also returns dL/dK' and
    ``t = soft * (dL/dK' - col)`` (dL/dZ over alpha, ``Z = K / gamma``)."""
    g = tl.load(g_ptr + offs, mask=tmask, other=0.0)
    gp = g * _multiplier(tl.load(kp_ptr + offs, mask=tmask, other=0.0), thr, MODE)
    gp = tl.where(tmask, gp, 0.0)
    if MIXED:
        t = soft * (gp - col)
        return gp + (alpha / gamma) * t, gp, t
    return gp, gp, gp


@triton.jit
def _soft(K, gamma, stats_ptr, s, cols, cmask, n_in):
    """The column softmax of a tile from the saved column (max, sum)."""
    col_max = tl.load(stats_ptr + s * 2 * n_in + cols, mask=cmask, other=0.0)
    col_sum = tl.load(stats_ptr + (s * 2 + 1) * n_in + cols, mask=cmask, other=1.0)
    return tl.exp(K / gamma - col_max[None, :]) / col_sum[None, :]


@triton.jit
def _grad_cols_kernel(g_ptr, kp_ptr, stats_ptr, thr_ptr, A_ptr, B_ptr, c_ptr, alpha_ptr, gamma_ptr, gA_ptr,
                      col_ptr, part_ptr, n_in, n_out, n_cb, P: tl.constexpr, D: tl.constexpr,
                      MIXED: tl.constexpr, MODE: tl.constexpr, EPS: tl.constexpr, BI: tl.constexpr,
                      BJ: tl.constexpr):
    """dL/dA of columns ``program_id(0)`` of matrix ``program_id(1)``; the softmax's per-column inner
    product ``col`` (for ``_grad_rows_kernel``); partial sums of dL/d(alpha, gamma, beta) ``(S, 3, n_cb)``."""
    s = tl.program_id(1).to(tl.int64)
    cb = tl.program_id(0)
    cols = cb * BJ + tl.arange(0, BJ)
    cmask = cols < n_in
    thr = tl.load(thr_ptr + s)
    alpha = 1.0
    gamma = 1.0
    col = tl.zeros((BJ,), dtype=tl.float32)
    g_beta = 0.0
    g_gamma = 0.0
    if MIXED:
        alpha = tl.load(alpha_ptr + s)
        gamma = tl.load(gamma_ptr + s)
        for i0 in range(0, n_out, BI):  # sweep 1: col_j = sum_i dL/dK'[i, j] soft[i, j]
            rows = i0 + tl.arange(0, BI)
            rmask = rows < n_out
            tmask = rmask[:, None] & cmask[None, :]
            offs = (s * n_out + rows[:, None]) * n_in + cols[None, :]
            K = _piecewise(A_ptr, B_ptr, c_ptr, s, rows, cols, rmask, cmask, n_in, n_out, P, D, EPS, BI, BJ)
            soft = _soft(K, gamma, stats_ptr, s, cols, cmask, n_in)
            _, gp, _ = _dkernel(g_ptr, kp_ptr, thr, K, soft, col, alpha, gamma, offs, tmask, MODE, False)
            col += tl.sum(gp * soft, 0)
            g_beta += tl.sum(tl.sum(gp, 0), 0)
        tl.store(col_ptr + s * n_in + cols, col, mask=cmask)
    for i0 in range(0, n_out, BI):  # sweep 2: dL/dA
        rows = i0 + tl.arange(0, BI)
        rmask = rows < n_out
        tmask = rmask[:, None] & cmask[None, :]
        offs = (s * n_out + rows[:, None]) * n_in + cols[None, :]
        K = _piecewise(A_ptr, B_ptr, c_ptr, s, rows, cols, rmask, cmask, n_in, n_out, P, D, EPS, BI, BJ)
        soft = K
        if MIXED:
            soft = _soft(K, gamma, stats_ptr, s, cols, cmask, n_in)
        dK, gp, t = _dkernel(g_ptr, kp_ptr, thr, K, soft, col[None, :], alpha, gamma, offs, tmask, MODE, MIXED)
        if MIXED:
            g_gamma += tl.sum(tl.sum(tl.where(tmask, t * K, 0.0), 0), 0)
        for p in tl.static_range(P):
            # d||b - a|| / da = (a - b) / ||b - a||; E = c_p dL/dK / D_p, 0 where the distance was clamped.
            d2 = _distance(A_ptr, B_ptr, s * P + p, rows, cols, rmask, cmask, n_in, n_out, D, BI, BJ)
            E = tl.where((d2 > EPS) & tmask, tl.load(c_ptr + p) * dK / tl.sqrt(tl.maximum(d2, EPS)), 0.0)
            e_col = tl.sum(E, 0)  # (BJ,)
            a_row = A_ptr + ((s * P + p) * n_in + cols) * D
            b_row = B_ptr + ((s * P + p) * n_out + rows) * D
            g_row = gA_ptr + ((s * P + p) * n_in + cols) * D
            for k in tl.static_range(D):
                a = tl.load(a_row + k, mask=cmask, other=0.0)
                b = tl.load(b_row + k, mask=rmask, other=0.0)
                g = tl.load(g_row + k, mask=cmask, other=0.0)
                tl.store(g_row + k, g + a * e_col - tl.sum(E * b[:, None], 0), mask=cmask)
    if MIXED:
        tl.store(part_ptr + (s * 3 + 0) * n_cb + cb, tl.sum(col, 0))  # dL/d(alpha)
        tl.store(part_ptr + (s * 3 + 1) * n_cb + cb, -alpha * g_gamma / (gamma * gamma))  # dL/d(gamma)
        tl.store(part_ptr + (s * 3 + 2) * n_cb + cb, g_beta)  # dL/d(beta)


@triton.jit
def _grad_rows_kernel(g_ptr, kp_ptr, stats_ptr, thr_ptr, A_ptr, B_ptr, c_ptr, alpha_ptr, gamma_ptr, gB_ptr,
                      col_ptr, n_in, n_out, P: tl.constexpr, D: tl.constexpr, MIXED: tl.constexpr,
                      MODE: tl.constexpr, EPS: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """dL/dB of rows ``program_id(0)`` of matrix ``program_id(1)``, sweeping over the column tiles."""
    s = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BI + tl.arange(0, BI)
    rmask = rows < n_out
    thr = tl.load(thr_ptr + s)
    alpha = 1.0
    gamma = 1.0
    if MIXED:
        alpha = tl.load(alpha_ptr + s)
        gamma = tl.load(gamma_ptr + s)
    for j0 in range(0, n_in, BJ):
        cols = j0 + tl.arange(0, BJ)
        cmask = cols < n_in
        tmask = rmask[:, None] & cmask[None, :]
        offs = (s * n_out + rows[:, None]) * n_in + cols[None, :]
        K = _piecewise(A_ptr, B_ptr, c_ptr, s, rows, cols, rmask, cmask, n_in, n_out, P, D, EPS, BI, BJ)
        soft = K
        col = tl.zeros((1, BJ), dtype=tl.float32)
        if MIXED:
            soft = _soft(K, gamma, stats_ptr, s, cols, cmask, n_in)
            col = tl.load(col_ptr + s * n_in + cols, mask=cmask, other=0.0)[None, :]
        dK, _, _ = _dkernel(g_ptr, kp_ptr, thr, K, soft, col, alpha, gamma, offs, tmask, MODE, MIXED)
        for p in tl.static_range(P):
            d2 = _distance(A_ptr, B_ptr, s * P + p, rows, cols, rmask, cmask, n_in, n_out, D, BI, BJ)
            E = tl.where((d2 > EPS) & tmask, tl.load(c_ptr + p) * dK / tl.sqrt(tl.maximum(d2, EPS)), 0.0)
            e_row = tl.sum(E, 1)  # (BI,)
            a_row = A_ptr + ((s * P + p) * n_in + cols) * D
            b_row = B_ptr + ((s * P + p) * n_out + rows) * D
            g_row = gB_ptr + ((s * P + p) * n_out + rows) * D
            for k in tl.static_range(D):
                a = tl.load(a_row + k, mask=cmask, other=0.0)
                b = tl.load(b_row + k, mask=rmask, other=0.0)
                g = tl.load(g_row + k, mask=rmask, other=0.0)
                tl.store(g_row + k, g + b * e_row - tl.sum(E * a[None, :], 1), mask=rmask)


def _args(A: Tensor, B: Tensor, c: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor],
          beta: Optional[Tensor], kernel: str):
    """Contiguous float32 operands; the scalars of the piecewise kernel are never read (A stands in)."""
    if kernel not in ("mixed", "piecewise"):
        raise ValueError(f"the Triton kernel handles mixed and piecewise, not {kernel!r}")
    A, B = A.contiguous(), B.contiguous()
    scal = [A if v is None or kernel != "mixed" else v.contiguous() for v in (alpha, gamma, beta)]
    return A, B, c.to(device=A.device, dtype=torch.float32).contiguous(), scal


def _kprime(A: Tensor, B: Tensor, c: Tensor, scal: Sequence[Tensor], kernel: str, out: Tensor) -> Tensor:
    """Write ``K'`` into ``out`` ``(S, out, in)``; returns the column stats ``(S, 2, in)``."""
    S, P, n_in, d = A.shape
    n_out = B.shape[2]
    stats = torch.empty((S, 2, n_in), dtype=torch.float32, device=A.device)
    _kprime_kernel[(triton.cdiv(n_in, BLOCK_J), S)](A, B, c, *scal, out, stats, n_in, n_out, P=P, D=d,
                                                    MIXED=kernel == "mixed", EPS=_DIST_EPS, BI=BLOCK_I, BJ=BLOCK_J)
    return stats


def _apply(src: Tensor, thresholds: Tensor, mode: str, base: Optional[Tensor] = None,
           dst: Optional[Tensor] = None) -> Tensor:
    """``dst = src * multiplier(src) (+ base)`` per matrix; in place when ``dst`` is None."""
    S = src.shape[0]
    n = src[0].numel()
    dst = src if dst is None else dst
    _apply_kernel[(triton.cdiv(n, APPLY_BLOCK), S)](src, src if base is None else base.contiguous(), dst, thresholds,
                                                    n, MODE=MODES[mode], HAS_BASE=base is not None, BLOCK=APPLY_BLOCK)
    return dst


def thresholds(delta: Tensor, sparsity: Sequence[float], mode: str) -> Tensor:
    """Each matrix's threshold (``functional.selection_threshold`` semantics), selected on the device.

    Magnitude mode: the k-th smallest ``|K'|``. Soft mode: the interpolated quantile
    ``v_k + frac (v_{k+1} - v_k)``, as ``torch.quantile``. ``delta``: ``(S, out, in)``; returns ``(S,)``.
    """
    flat = delta.view(delta.shape[0], -1)
    n = flat.shape[1]
    ranks = [quantile_rank(n, level) for level in sparsity]
    t = kth_abs(flat, [k for k, _ in ranks])
    if mode != "soft" or not any(frac > 0 and k < n for k, frac in ranks):
        return t
    t_next = kth_abs(flat, [min(k + 1, n) for k, _ in ranks])
    parts = [t[s] + frac * (t_next[s] - t[s]) if frac > 0 and k < n else t[s] for s, (k, frac) in enumerate(ranks)]
    return torch.stack(parts)


def kernel_forward(A: Tensor, B: Tensor, c: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor],
                   beta: Optional[Tensor], kernel: str, mode: str, sparsity: Sequence[float],
                   thresholds_: Optional[Tensor] = None, out: Optional[Tensor] = None,
                   base: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``sparsify(K') + base`` into ``out`` ``(S, out, in)``, and the thresholds ``(S,)`` (NaN for "none").

    ``kernel_vjp.kernel_forward``'s contract (see there), without its ``keep`` state."""
    A, B, c, scal = _args(A, B, c, alpha, gamma, beta, kernel)
    S, _, n_in, _ = A.shape
    n_out = B.shape[2]
    if out is None:
        out = torch.empty((S, n_out, n_in), dtype=torch.float32, device=A.device)
    _kprime(A, B, c, scal, kernel, out)
    if mode == "none":
        thresholds_ = torch.full((S,), float("nan"), device=A.device, dtype=torch.float32)
    elif thresholds_ is None:
        thresholds_ = thresholds(out, sparsity, mode)
    if mode != "none" or base is not None:
        _apply(out, thresholds_, mode, base)
    return out, thresholds_


def kernel_backward(grad: Tensor, A: Tensor, B: Tensor, c: Tensor, alpha: Optional[Tensor],
                    gamma: Optional[Tensor], beta: Optional[Tensor], kernel: str, mode: str,
                    thresholds_: Tensor, block_hook: Optional[Callable[[int, Tensor], None]] = None
                    ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``(A, B, alpha, gamma, beta)`` from ``grad = dL/d(delta)`` ``(S, out, in)``.

    ``kernel_vjp.kernel_backward``'s contract: ``grad`` is only read; ``block_hook(0, delta)`` receives
    the whole sparse update ``(S, out, in)`` once ``grad`` has been read (one block of all columns)."""
    A, B, c, scal = _args(A, B, c, alpha, gamma, beta, kernel)
    grad = grad.contiguous()
    S, P, n_in, d = A.shape
    n_out = B.shape[2]
    mixed = kernel == "mixed"
    kp = torch.empty((S, n_out, n_in), dtype=torch.float32, device=A.device)  # the scratch K'
    stats = _kprime(A, B, c, scal, kernel, kp)
    n_cb = triton.cdiv(n_in, BLOCK_J)
    g_A = torch.zeros_like(A)
    g_B = torch.zeros_like(B)
    col = torch.empty((S, n_in), dtype=torch.float32, device=A.device)
    part = torch.zeros((S, 3, n_cb), dtype=torch.float32, device=A.device)
    common = dict(P=P, D=d, MIXED=mixed, MODE=MODES[mode], EPS=_DIST_EPS, BI=BLOCK_I, BJ=BLOCK_J)
    thr = thresholds_.to(torch.float32).contiguous()
    _grad_cols_kernel[(n_cb, S)](grad, kp, stats, thr, A, B, c, scal[0], scal[1], g_A, col, part, n_in, n_out,
                                 n_cb, **common)
    _grad_rows_kernel[(triton.cdiv(n_out, BLOCK_I), S)](grad, kp, stats, thr, A, B, c, scal[0], scal[1], g_B, col,
                                                        n_in, n_out, **common)
    if block_hook is not None:
        block_hook(0, _apply(kp, thr, mode))
    del kp
    if not mixed:
        return g_A, g_B, None, None, None
    g_alpha, g_gamma, g_beta = part.sum(-1).unbind(1)  # (S,) each
    return g_A, g_B, g_alpha, g_gamma, g_beta
