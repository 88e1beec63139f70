"""Hand-derived forward and backward of the distance kernels (SNELL piecewise, SNELLA mixed) with the
weight-level competition: the hot path of every adapted layer.

Autograd through ``functional.mixed_kernel`` + ``sparsify`` works, but it allocates a fresh (out, in)
tensor for every elementwise op and keeps them all until backward ends. These functions compute the
same values and gradients a block of input columns at a time:

- every entry of the kernel depends on one column's factors, and the mixed kernel's softmax runs down
  each column, so a block of columns is computed (and differentiated) on its own;
- a block holds about ``BLOCK_ELEMENTS`` entries, so the temporaries are that small, whatever the
  size of the matrix;
- the only full-size buffer is the update itself (the caller's weight buffer, written in place), and
  in backward the caller's ``dL/d(dW)``: nothing else as large as the matrix is ever allocated.

The competition's threshold is global to a matrix: the forward selects it on the finished update
(``functional.selection_threshold``, itself a sampled pass in pieces), and the backward reuses it.
``tests/test_ops.py`` checks all of this against plain autograd on the formulas of ``functional.py``.

On the CPU, the competition's passes (the threshold's selection, the forward's masking pass and the
backward's) run in the C++ loops of ``csrc/fused_kernel.cpp`` (``cpu_ext``) when it builds; the kernel
values stay in torch, so forward and backward compute the same K' bit for bit and mask the same entries.
``tests/test_cpu_ext.py`` checks the C++ passes against the torch ones.

On CUDA (float32, triton importable, ``SNELLA_TRITON`` not 0: ``gpu/__init__.py``), both functions
hand the whole matrix to the Triton passes of ``gpu/kernel.py``, which keep the same contract and
select the threshold on the device. The torch passes here run on CUDA without a host sync as well
(the selection is ``torch.kthvalue`` on the device, the clamped-distance mask is always applied);
``tests/test_triton.py`` checks the Triton passes against these.

Shapes: ``A (S, P, in, d)``, ``B (S, P, out, d)``, scalars ``(S,)``, ``c (P,)``; updates ``(S, out, in)``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import cpu_ext, gpu
from .functional import _DIST_EPS, PASS_CHUNK, selection_threshold

FAST_KERNELS = ("mixed", "piecewise")
# Entries of the (S, P, out, block) distance tensor of one block (4 MiB of float32): large enough that
# the per-op overhead of a block is negligible, small enough that the block's temporaries are a
# fraction of a ViT-B MLP matrix's.
BLOCK_ELEMENTS = 1 << 20


def block_width(S: int, P: int, n_out: int, n_in: int) -> int:
    """Columns per block: as many as keep the block's distance tensor near ``BLOCK_ELEMENTS``."""
    return max(1, min(n_in, BLOCK_ELEMENTS // max(1, S * P * n_out)))


def _softmax_(z: Tensor, dim: int) -> Tensor:
    """Softmax computed in the storage of ``z``."""
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


def _block_kernel(A: Tensor, B: Tensor, c: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor],
                  beta: Optional[Tensor], kernel: str, keep: bool
                  ) -> tuple[Tensor, Optional[tuple[Tensor, Tensor, Optional[Tensor]]]]:
    """The dense kernel ``K'`` of a block of columns (``A`` holds the block's rows), ``(S, out, nb)``.

    With ``keep``, also ``(D (S, P, out, nb), K (S, out, nb), soft (S, out, nb) or None)``: what the
    backward of the block needs.
    """
    S, P = A.shape[:2]
    D = _distances(A, B)  # (S, P, out, nb)
    K = torch.matmul(c.to(D.dtype).view(1, 1, P), D.view(S, P, -1)).view(S, *D.shape[2:])  # sum_p c_p D_p
    soft = None
    if kernel == "mixed":
        soft = _softmax_(K / gamma.view(S, 1, 1), dim=-2)  # over the out index, per input column
        # K' = K + alpha * soft + beta; in K's own storage unless backward needs K itself.
        Kp = (K.addcmul if keep else K.addcmul_)(soft, alpha.view(S, 1, 1)).add_(beta.view(S, 1, 1))
    elif kernel == "piecewise":
        Kp = K
    else:
        raise ValueError(f"kernel_vjp handles {FAST_KERNELS}, not {kernel!r}")
    return Kp, ((D, K, soft) if keep else None)


def _multiplier_(m: Tensor, threshold, mode: str) -> Tensor:
    """Turn ``m = |K'|`` of one matrix, in place, into the competition's multiplier (detached;
    ``mode`` "magnitude" or "soft").

    ``threshold`` is a float (CPU: one fused pass) or a 0-d tensor (accelerators: no host sync).
    """
    if mode == "magnitude":  # m * 1[m > t]
        if isinstance(threshold, float):
            return torch.nn.functional.threshold_(m, threshold, 0.0)
        return m.masked_fill_(m <= threshold, 0.0)
    return m.sub_(threshold).clamp_(min=0.0)  # soft: max(m - t, 0)


def _per_matrix(thresholds: Tensor) -> list:
    """The thresholds as the passes take them: Python floats on CPU (one host copy), 0-d tensors elsewhere."""
    if thresholds.device.type == "cpu":
        return [float(t) for t in thresholds.tolist()]
    return list(thresholds.unbind(0))


def kernel_forward(A: Tensor, B: Tensor, c: Tensor, alpha: Optional[Tensor], gamma: Optional[Tensor],
                   beta: Optional[Tensor], kernel: str, mode: str, sparsity: Sequence[float],
                   thresholds: Optional[Tensor] = None, out: Optional[Tensor] = None,
                   base: Optional[Tensor] = None, keep: bool = False
                   ) -> tuple[Tensor, Tensor, Optional[tuple]]:
    """The sparse update (plus ``base`` if given), without autograd.

    Args:
        kernel: "mixed" or "piecewise". mode: "magnitude" or "soft". sparsity: one level per matrix.
        thresholds: ``(S,)`` from an earlier call (backward reuses forward's selection); computed if None.
        out: ``(S, out, in)`` contiguous buffer of the factors' dtype to write into (e.g. the layer's
            scratch weight); allocated if None.
        base: ``(S, out, in)`` added to the result (the frozen weight, for the fused path).
        keep: when the matrix is a single block, also return that block's intermediates, which
            ``kernel_backward`` then uses instead of computing them a second time (small matrices).

    Returns:
        ``(out (S, out, in), thresholds (S,), state or None)``: ``sparsify(K') + base``.
    """
    if gpu.wanted(A):
        from .gpu import kernel as triton_kernel

        out, thresholds = triton_kernel.kernel_forward(A, B, c, alpha, gamma, beta, kernel, mode, sparsity,
                                                       thresholds, out=out, base=base)
        return out, thresholds, None
    S, P, n_in, _ = A.shape
    n_out = B.shape[2]
    if out is None:
        out = torch.empty((S, n_out, n_in), dtype=A.dtype, device=A.device)
    nb = block_width(S, P, n_out, n_in)
    keep = keep and nb >= n_in
    state = None
    for j in range(0, n_in, nb):
        Kp, parts = _block_kernel(A[:, :, j:j + nb], B, c, alpha, gamma, beta, kernel, keep=keep)
        out[:, :, j:j + nb] = Kp  # (S, out, nb)
        if keep:
            state = (Kp, *parts)
    compete = mode != "none"  # "none": the dense kernel, multiplier 1
    if thresholds is None and compete:
        # Every level, 0 included, competes (SPEC.md section 4): at 0 the threshold is the minimum.
        thresholds = torch.stack([selection_threshold(out[s], level, mode, absolute=True)
                                  for s, level in enumerate(sparsity)]).to(out.dtype)
    elif thresholds is None:
        thresholds = torch.full((S,), float("nan"), device=A.device, dtype=out.dtype)
    levels = _per_matrix(thresholds)
    ext = cpu_ext.module_for(out)
    if ext is not None and (compete or base is not None):
        ext.apply_multiplier(out.view(S, -1), None if base is None else base.reshape(S, -1).contiguous(),
                             levels, [compete] * S, mode == "magnitude")
        return out, thresholds, state
    for s in range(S):
        flat = out[s].view(-1)
        base_flat = None if base is None else base[s].reshape(-1)
        for i in range(0, flat.numel(), PASS_CHUNK):  # one pass in cache-sized pieces
            piece = flat[i:i + PASS_CHUNK]
            if compete:
                piece.mul_(_multiplier_(piece.abs(), levels[s], mode))
            if base_flat is not None:
                piece.add_(base_flat[i:i + PASS_CHUNK])
    return out, thresholds, state


def kernel_backward(grad: Tensor, A: Tensor, B: Tensor, c: Tensor, alpha: Optional[Tensor],
                    gamma: Optional[Tensor], beta: Optional[Tensor], kernel: str, mode: str,
                    sparsity: Sequence[float], thresholds: Tensor, state: Optional[tuple] = None,
                    block_hook: Optional[Callable[[int, Tensor], None]] = None) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``(A, B, alpha, gamma, beta)`` from ``grad = dL/d(delta)`` ``(S, out, in)``.

    Each block of columns recomputes its kernel (the forward's selection ``thresholds`` is reused) and
    is differentiated on its own; ``grad`` is only read. ``state``: the single block's intermediates
    from ``kernel_forward(keep=True)``, used instead of recomputing them. ``block_hook(j, delta)``, if
    given, receives each block's sparse update (columns ``j:j + nb``, ``(S, out, nb)``) while it is at
    hand: the caller's input gradient then needs no full-size update of its own. The hook may overwrite
    ``grad``'s columns ``j:j + nb``: they have been read (copied) before it is called. The
    competition's multiplier is treated as a constant (it is detached in the authors' code), exactly as
    ``functional.apply_competition``.
    """
    if gpu.wanted(A):
        from .gpu import kernel as triton_kernel

        return triton_kernel.kernel_backward(grad, A, B, c, alpha, gamma, beta, kernel, mode, thresholds,
                                             block_hook=block_hook)
    S, P, n_in, d = A.shape
    n_out = B.shape[2]
    nb = block_width(S, P, n_out, n_in)
    levels = _per_matrix(thresholds)
    ext = cpu_ext.module_for(A)
    on_cpu = A.device.type == "cpu"
    cp = c.to(A.dtype).repeat(S).view(S * P, 1, 1)
    Bf = B.reshape(S * P, n_out, d)
    B1 = torch.cat([Bf, Bf.new_ones(S * P, n_out, 1)], -1)  # (S*P, out, d+1): the ones give column sums
    EA = A.new_zeros(S * P, n_out, d + 1)  # sum over columns j of E[i, j] [A[j], 1]
    g_A = torch.empty_like(A)
    mixed = kernel == "mixed"
    g_alpha = A.new_zeros(S) if mixed else None
    g_gamma = A.new_zeros(S) if mixed else None
    g_beta = A.new_zeros(S) if mixed else None
    d_min = A.new_tensor(_DIST_EPS).sqrt()
    for j in range(0, n_in, nb):
        A_blk = A[:, :, j:j + nb]  # (S, P, nb, d)
        if state is not None:
            Kp, D, K, soft = state
            state = None
        else:
            Kp, (D, K, soft) = _block_kernel(A_blk, B, c, alpha, gamma, beta, kernel, keep=True)
        g = grad[:, :, j:j + nb].clone(memory_format=torch.contiguous_format)  # (S, out, nb): dL/d(delta)
        if mode == "none":  # the dense kernel: multiplier 1
            if block_hook is not None:
                block_hook(j, Kp)
        elif ext is not None:  # one C++ pass: g *= multiplier(K'), K' *= multiplier(K')
            ext.competition_grad(Kp.view(S, -1), g.view(S, -1), levels, [True] * S, mode == "magnitude",
                                 block_hook is not None)
            if block_hook is not None:
                block_hook(j, Kp)
        else:
            m = Kp.abs()
            for s in range(S):
                g[s].mul_(_multiplier_(m[s], levels[s], mode))  # dL/dK'
            if block_hook is not None:
                block_hook(j, Kp.mul_(m))  # the block's sparse update
            del m
        del Kp
        if mixed:
            # K' = K + alpha * softmax(K / gamma) + beta
            g_beta += g.sum((-2, -1))
            t = g * soft  # (S, out, nb)
            col = t.sum(-2, keepdim=True)  # (S, 1, nb): softmax's per-column inner product
            g_alpha += col.sum((-2, -1))
            t.addcmul_(soft, col, value=-1.0)  # soft * (g - col): dL/dZ divided by alpha
            del soft
            g_gamma -= alpha * _batched_dot(t, K) / gamma.pow(2)  # Z = K / gamma
            g.addcmul_(t, (alpha / gamma).view(S, 1, 1))  # dL/dK = dL/dK' + dL/dZ / gamma
            del t
        del K
        # K = sum_p c_p ||B_p[i] - A_p[j]||: dL/dD_p = c_p g; d||b - a|| = (b - a) / ||b - a||. With
        # E_p = g / D_p: dL/dB_p = c_p (B_p * rowsum(E_p) - E_p A_p), dL/dA_p = c_p (A_p * colsum(E_p) - E_p^T B_p).
        # A column of ones appended to A and B makes each GEMM return the row/column sums as well, and
        # c_p scales the small results instead of the large E.
        # On the CPU the mask is skipped when no distance was clamped (the common case); elsewhere that
        # test would be a host sync per block, so the mask is always made.
        clamped = D <= d_min if not on_cpu or D.amin() <= d_min else None
        E = D.reciprocal_().mul_(g.unsqueeze(1))  # (S, P, out, nb), in D's storage
        del D, g
        if clamped is not None:
            E.masked_fill_(clamped, 0.0)  # clamped distances pass no gradient
        Ef = E.view(S * P, n_out, -1)
        Af = A_blk.reshape(S * P, -1, d)
        EA.baddbmm_(Ef, torch.cat([Af, Af.new_ones(Af.shape[:2] + (1,))], -1))  # (S*P, out, d+1)
        EB = torch.bmm(Ef.transpose(1, 2), B1)  # (S*P, nb, d+1)
        del E, Ef
        g_A[:, :, j:j + nb] = ((Af * EB[..., -1:] - EB[..., :-1]) * cp).view(A_blk.shape)
    g_B = (Bf * EA[..., -1:] - EA[..., :-1]) * cp  # (S*P, out, d)
    return g_A, g_B.view(B.shape), g_alpha, g_gamma, g_beta
