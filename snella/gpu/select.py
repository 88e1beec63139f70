"""Exact k-th smallest ``|x|`` of each matrix on the device, in Triton: the competition's threshold
with no host sync (a radix select over the float bits).

A non-negative float32 orders as its bit pattern read as an int32, so the k-th smallest ``|x|`` is
found digit by digit: a histogram of the top 16 bits of every key (atomics into 32768 bins) locates
the bin holding rank k; a histogram of the low 16 bits of the keys in that bin locates the value.
Four launches per call for all ``S`` matrices at once; the ranks arrive as kernel arguments and the
intermediate state (bin, rank left) stays in a device buffer, so nothing is copied to or from the
host. The result is the exact value ``torch.kthvalue(|x|, k)`` returns, bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

HIGH_BINS = 32768  # the top 16 bits of a key; its sign bit is 0 (|x|), so 2^15 values
LOW_BINS = 65536  # the low 16 bits
BLOCK = 1024  # elements per program of a histogram pass
SCAN = 4096  # bins per step of a resolve scan (one program per matrix walks its histogram)
GROUP = 3  # matrices per resolve launch (their ranks are scalar arguments); a layer has 1 or 3


@triton.jit
def _hist_kernel(x_ptr, hist_ptr, state_ptr, n, LOW: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of one 16-bit digit of ``|x|``'s keys for matrix ``program_id(1)``; with ``LOW``, the
    low digit of the keys whose high digit is the bin found before (``state[s, 0]``)."""
    s = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    v = tl.load(x_ptr + s * n + offs, mask=valid, other=0.0)
    key = tl.abs(v).to(tl.int32, bitcast=True)
    if LOW:
        prefix = tl.load(state_ptr + s * 2)
        valid = valid & ((key >> 16) == prefix)
        tl.atomic_add(hist_ptr + s * LOW_BINS + (key & 0xFFFF), 1, mask=valid)
    else:
        tl.atomic_add(hist_ptr + s * HIGH_BINS + (key >> 16), 1, mask=valid)


@triton.jit
def _resolve_kernel(hist_ptr, state_ptr, out_ptr, k0, k1, k2, LOW: tl.constexpr, BINS: tl.constexpr,
                    SCAN: tl.constexpr):
    """The bin of a histogram that holds rank k (1-indexed) and the rank left inside it.

    High digit: ``k`` is ``k0/k1/k2`` by matrix; writes ``state[s] = (bin, k - count below bin)``.
    Low digit: ``k`` is ``state[s, 1]``; writes the value ``(state[s, 0] << 16 | bin)`` to ``out[s]``.
    """
    s = tl.program_id(0)
    if LOW:
        k = tl.load(state_ptr + s * 2 + 1)
    else:
        k = tl.where(s == 0, k0, tl.where(s == 1, k1, k2))
    run = 0
    best = BINS
    for start in range(0, BINS, SCAN):  # first bin whose cumulative count reaches k
        idx = start + tl.arange(0, SCAN)
        h = tl.load(hist_ptr + s * BINS + idx)
        cum = tl.cumsum(h, 0) + run
        best = tl.minimum(best, tl.min(tl.where(cum >= k, idx, BINS), 0))
        run += tl.sum(h, 0)
    below = 0
    for start in range(0, BINS, SCAN):  # entries in the bins before it
        idx = start + tl.arange(0, SCAN)
        h = tl.load(hist_ptr + s * BINS + idx)
        below += tl.sum(tl.where(idx < best, h, 0), 0)
    if LOW:
        key = (tl.load(state_ptr + s * 2) << 16) | best
        tl.store(out_ptr + s, key.to(tl.float32, bitcast=True))
    else:
        tl.store(state_ptr + s * 2, best)
        tl.store(state_ptr + s * 2 + 1, k - below)


def kth_abs(x: Tensor, ks: Sequence[int]) -> Tensor:
    """The ``ks[s]``-th smallest (1-indexed) of ``|x[s]|`` for each matrix: exact, no host sync.

    Args:
        x: ``(S, n)`` float32, contiguous (a batch of flattened matrices).
        ks: one rank per matrix, each in ``[1, n]``.

    Returns:
        ``(S,)`` float32 on ``x``'s device.
    """
    S, n = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"kth_abs takes a contiguous float32 (S, n) tensor, got {x.dtype} {tuple(x.shape)}")
    if len(ks) != S or any(not 1 <= k <= n for k in ks):
        raise ValueError(f"ranks {list(ks)} for {S} matrices of {n} entries: each must be in [1, {n}]")
    high = torch.zeros((S, HIGH_BINS), dtype=torch.int32, device=x.device)
    low = torch.zeros((S, LOW_BINS), dtype=torch.int32, device=x.device)
    state = torch.empty((S, 2), dtype=torch.int32, device=x.device)  # (bin, rank left) per matrix
    out = torch.empty(S, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, BLOCK), S)
    _hist_kernel[grid](x, high, state, n, LOW=False, BLOCK=BLOCK)
    for g in range(0, S, GROUP):  # the ranks travel as arguments, three matrices a launch
        k = list(ks[g:g + GROUP]) + [1] * (GROUP - len(ks[g:g + GROUP]))
        _resolve_kernel[(min(GROUP, S - g),)](high[g:], state[g:], out, *k, LOW=False, BINS=HIGH_BINS, SCAN=SCAN)
    _hist_kernel[grid](x, low, state, n, LOW=True, BLOCK=BLOCK)
    _resolve_kernel[(S,)](low, state, out, 0, 0, 0, LOW=True, BINS=LOW_BINS, SCAN=SCAN)
    return out
