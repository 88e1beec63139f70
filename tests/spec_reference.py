"""Independent transcriptions of SPEC.md's formulas, for the tests to compare the library against.

Nothing here imports ``snella``: every kernel is written out from SPEC.md sections 3 and 4 with
broadcasting (the library uses the GEMM identity, column blocks and C++ passes), and the threshold is
``torch.quantile`` (the library uses its own exact selection). Autograd through these functions, with
the competition's multiplier detached as SPEC.md says, is the reference for every gradient.

Shapes: ``A (P, in, r/P)``, ``B (P, out, r/P)``; the results are ``(out, in)`` (``dW = K^T``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def coefficients(P: int, scale: float = 0.1, dtype=torch.float64) -> Tensor:
    """SPEC 2: ``c_p = scale * (-1)^p``."""
    return torch.tensor([scale * (-1.0) ** p for p in range(P)], dtype=dtype)


def distances(a: Tensor, b: Tensor) -> Tensor:
    """``||a[j] - b[i]||`` for rows ``a (in, d)``, ``b (out, d)``: ``(in, out)``, by broadcasting."""
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1).sqrt()


def piecewise(A: Tensor, B: Tensor, c: Tensor) -> Tensor:
    """SPEC 3: ``K[j, i] = sum_p c_p ||A[p, j] - B[p, i]||``; returns ``K^T (out, in)``."""
    K = sum(c[p] * distances(A[p], B[p]) for p in range(A.shape[0]))  # (in, out)
    return K.T


def mixed(A: Tensor, B: Tensor, c: Tensor, alpha, gamma, beta) -> Tensor:
    """SPEC 3: ``K' = K + alpha * softmax(K / gamma, over out, per in j) + beta``; ``(out, in)``."""
    K = piecewise(A, B, c).T  # (in, out): the authors' orientation
    e = torch.exp(K / gamma - (K / gamma).max(dim=1, keepdim=True).values)
    soft = e / e.sum(dim=1, keepdim=True)  # each input row j sums to 1 over the out index
    return (K + alpha * soft + beta).T


def _rows(F: Tensor) -> Tensor:
    """``(P, n, r/P) -> (n, r)``: the chunks side by side."""
    return torch.cat([F[p] for p in range(F.shape[0])], dim=1)


def rbf(A: Tensor, B: Tensor, alpha, gamma, beta) -> Tensor:
    """SPEC 3 option: ``alpha * exp(-beta ||a - b||^2) + gamma`` on the rank-r rows; ``(out, in)``."""
    d2 = distances(_rows(A), _rows(B)).pow(2)  # (in, out)
    return (alpha * torch.exp(-beta * d2) + gamma).T


def sigmoid(A: Tensor, B: Tensor, alpha, gamma, beta) -> Tensor:
    """SPEC 3 option: ``alpha / (1 + exp(-beta a.b)) + gamma``; ``(out, in)``."""
    dot = (_rows(A)[:, None, :] * _rows(B)[None, :, :]).sum(-1)  # (in, out)
    return (alpha / (1 + torch.exp(-beta * dot)) + gamma).T


def linear(A: Tensor, B: Tensor) -> Tensor:
    """SPEC 3 option: ``B A^T`` (LoRA's update)."""
    return (_rows(A)[:, None, :] * _rows(B)[None, :, :]).sum(-1).T


def kernel(name: str, A: Tensor, B: Tensor, c: Tensor | None, alpha=None, gamma=None, beta=None) -> Tensor:
    """The dense update ``(out, in)`` of kernel ``name``."""
    if name == "mixed":
        return mixed(A, B, c, alpha, gamma, beta)
    if name == "piecewise":
        return piecewise(A, B, c)
    if name == "rbf":
        return rbf(A, B, alpha, gamma, beta)
    if name == "sigmoid":
        return sigmoid(A, B, alpha, gamma, beta)
    if name == "linear":
        return linear(A, B)
    raise ValueError(name)


def compete(K: Tensor, s: float, mode: str) -> Tensor:
    """SPEC 4: ``m = |K'|`` detached, ``t`` its s-quantile (at s = 0 the minimum); ``magnitude``:
    ``K' * m * 1[m > t]``; ``soft``: ``K' * max(m - t, 0)``; ``none``: ``K'``."""
    if mode == "none":
        return K
    m = K.detach().abs()
    t = torch.quantile(m.reshape(-1).double(), s).to(m.dtype)
    if mode == "magnitude":
        return K * (m * (m > t))
    return K * torch.clamp(m - t, min=0)


def update(kernel_name: str, mode: str, sparsity, A: Tensor, B: Tensor, c=None, alpha=None, gamma=None,
           beta=None) -> Tensor:
    """The sparse update of a layer holding ``S`` stacked matrices: ``A (S, P, in, d)`` ... -> ``(S*out, in)``."""
    parts = []
    for s in range(A.shape[0]):
        scal = [None if v is None else v[s] for v in (alpha, gamma, beta)]
        parts.append(compete(kernel(kernel_name, A[s], B[s], c, *scal), sparsity[s], mode))
    return torch.cat(parts, dim=0)
