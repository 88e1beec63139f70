"""Pure tensor functions of SNELL/SNELLA: the kernels that merge the factors into dW, and the
weight-level competition that sparsifies dW.

Shapes (SPEC.md section 2). Every function takes factors with optional leading batch dims ``...``
(the adapted layers batch the three matrices of a fused qkv projection as ``S = 3``):

- ``A``: ``(..., P, in, r/P)``  input-side factor
- ``B``: ``(..., P, out, r/P)`` output-side factor
- result: ``(..., out, in)``    the orientation of an ``nn.Linear`` weight (the authors' K transposed)

Nothing here knows about modules, data or training; the layers, the custom autograd Functions,
the tests and the benchmarks all call these.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import cpu_ext, gpu

KERNELS = ("mixed", "piecewise", "rbf", "sigmoid", "linear")
# "none": the dense kernel with no competition at all (dW = K'; the authors ran some tasks so); it
# takes sparsity 0 only. Sparsity 0 under the other two modes still competes (SPEC.md section 4).
COMPETITION_MODES = ("magnitude", "soft", "none")
# Kernels that own the three trainable scalars (alpha, gamma, beta).
SCALAR_KERNELS = ("mixed", "rbf", "sigmoid")
# Squared distances are clamped here before the square root: the GEMM identity can round a true 0 to a
# tiny negative number, and sqrt'(0) is infinite. Clamping blocks the gradient of those entries instead.
_DIST_EPS = 1e-12


def chunk_coefficients(chunks: int, scale: float = 0.1, *, dtype=None, device=None) -> Tensor:
    """The fixed chunk coefficients ``c_p = scale * (-1)^p`` (``(+0.1, -0.1)`` for two chunks).

    Returns:
        Tensor of shape ``(P,)``.
    """
    signs = [1.0 if p % 2 == 0 else -1.0 for p in range(chunks)]
    return torch.tensor(signs, dtype=dtype, device=device) * scale


def scalar_init(kernel: str) -> tuple[float, float, float]:
    """Initial ``(alpha, gamma, beta)`` for a kernel.

    The mixed kernel uses SPEC.md's (1, 1, 0). RBF and sigmoid read beta as a bandwidth/slope: at
    beta = 0 they would be constant and give the factors no gradient, so they start at beta = 1;
    the sigmoid's offset gamma starts at -0.5 so that its update is centred on zero.
    """
    if kernel == "rbf":
        return 1.0, 0.0, 1.0
    if kernel == "sigmoid":
        return 1.0, -0.5, 1.0
    return 1.0, 1.0, 0.0


def pairwise_distance(A: Tensor, B: Tensor) -> Tensor:
    """Euclidean distances between every row of ``B`` and every row of ``A``, computed as a GEMM.

    ``||b - a||^2 = ||b||^2 + ||a||^2 - 2 b.a``; on CPU this is many times faster than
    ``torch.cdist``'s backward.

    Args:
        A: ``(..., in, d)``.
        B: ``(..., out, d)``.

    Returns:
        ``(..., out, in)`` distances.
    """
    d2 = -2.0 * (B @ A.transpose(-1, -2))  # (..., out, in)
    d2 = d2 + B.pow(2).sum(-1, keepdim=True) + A.pow(2).sum(-1).unsqueeze(-2)
    return d2.clamp_min(_DIST_EPS).sqrt()


def piecewise_kernel(A: Tensor, B: Tensor, coefficients: Tensor) -> Tensor:
    """SNELL's piecewise-linear distance kernel: ``dW[i, j] = sum_p c_p ||A[p, j] - B[p, i]||``.

    Args:
        A: ``(..., P, in, r/P)``.
        B: ``(..., P, out, r/P)``.
        coefficients: ``(P,)`` chunk coefficients.

    Returns:
        ``(..., out, in)``.
    """
    dist = pairwise_distance(A, B)  # (..., P, out, in)
    return (dist * coefficients.to(dist.dtype)[:, None, None]).sum(-3)


def mixed_kernel(A: Tensor, B: Tensor, coefficients: Tensor, alpha: Tensor, gamma: Tensor,
                 beta: Tensor) -> Tensor:
    """SNELLA's mixed kernel ``K + alpha * softmax(K / gamma over out) + beta``.

    Args:
        A: ``(..., P, in, r/P)``; B: ``(..., P, out, r/P)``; coefficients: ``(P,)``.
        alpha, gamma, beta: scalars of shape ``(...)`` (one per matrix).

    Returns:
        ``(..., out, in)``.
    """
    K = piecewise_kernel(A, B, coefficients)  # (..., out, in)
    soft = torch.softmax(K / gamma[..., None, None], dim=-2)  # over the out index, per input j
    return K + alpha[..., None, None] * soft + beta[..., None, None]


def _concat_chunks(F: Tensor) -> Tensor:
    """``(..., P, n, r/P) -> (..., n, r)``: the chunks side by side, for the chunk-free kernels."""
    return torch.cat(F.unbind(-3), dim=-1)


def rbf_kernel(A: Tensor, B: Tensor, alpha: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """RBF kernel ``alpha * exp(-beta ||a - b||^2) + gamma`` on the full rank-r rows (an ablation)."""
    d = pairwise_distance(_concat_chunks(A), _concat_chunks(B))  # (..., out, in)
    return alpha[..., None, None] * torch.exp(-beta[..., None, None] * d.pow(2)) + gamma[..., None, None]


def sigmoid_kernel(A: Tensor, B: Tensor, alpha: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """Sigmoid kernel ``alpha / (1 + exp(-beta a.b)) + gamma`` on the full rank-r rows (an ablation)."""
    dot = _concat_chunks(B) @ _concat_chunks(A).transpose(-1, -2)  # (..., out, in)
    return alpha[..., None, None] * torch.sigmoid(beta[..., None, None] * dot) + gamma[..., None, None]


def linear_kernel(A: Tensor, B: Tensor) -> Tensor:
    """The linear kernel ``B A^T``: exactly LoRA's update (without LoRA's alpha/r scaling)."""
    return _concat_chunks(B) @ _concat_chunks(A).transpose(-1, -2)  # (..., out, in)


def kernel_delta(kernel: str, A: Tensor, B: Tensor, coefficients: Tensor | None = None,
                 alpha: Tensor | None = None, gamma: Tensor | None = None,
                 beta: Tensor | None = None) -> Tensor:
    """Dispatch to a kernel by name; returns the dense update ``(..., out, in)``."""
    if kernel == "mixed":
        return mixed_kernel(A, B, coefficients, alpha, gamma, beta)
    if kernel == "piecewise":
        return piecewise_kernel(A, B, coefficients)
    if kernel == "rbf":
        return rbf_kernel(A, B, alpha, gamma, beta)
    if kernel == "sigmoid":
        return sigmoid_kernel(A, B, alpha, gamma, beta)
    if kernel == "linear":
        return linear_kernel(A, B)
    raise ValueError(f"unknown kernel {kernel!r}; accepted: {', '.join(KERNELS)}")


# ----------------------------------------------------------------------------- weight-level competition


def quantile_rank(numel: int, sparsity: float) -> tuple[int, float]:
    """Where the ``sparsity``-quantile of ``numel`` values lies, as ``torch.quantile`` (linear) places it.

    Returns:
        ``(k, frac)``: the quantile is ``v_k + frac * (v_{k+1} - v_k)`` with ``v_k`` the k-th smallest
        value, 1-indexed.
    """
    pos = sparsity * (numel - 1)
    k0 = math.floor(pos)
    return k0 + 1, pos - k0


# Below this many values ``torch.kthvalue`` on everything is as fast as the sampled bracket.
_KTH_DIRECT = 32768
# Passes over a large matrix go this many elements at a time (1 MiB of float32): the temporaries of
# each piece stay in cache, and no temporary as large as the matrix is made.
PASS_CHUNK = 262144


def kth_smallest(values: Tensor, k: int, sample: int = 16384, absolute: bool = False) -> Tensor:
    """Exact k-th smallest (1-indexed) of a flat tensor (of ``|values|`` if ``absolute``), any size.

    ``torch.kthvalue`` on everything costs about 15 ns an element on CPU (it copies, then
    quickselects), 100 times an elementwise pass: at ViT sizes it was the largest part of the
    competition. Here a strided sample (1/16 of the values, at most ``sample``) brackets the answer
    with two small selections; one pass, in cache-sized pieces, counts the values below the bracket
    and gathers the band inside it (a few percent), and ``kthvalue`` runs on the band only. If the
    bracket misses (rare), it falls back to ``kthvalue`` on everything, so the result is always
    exact. No random numbers are drawn: training's random stream is not disturbed.

    On the CPU, with ``absolute``, the C++ radix select of ``cpu_ext`` (when it builds) replaces all
    of this: the same exact value in about a fifth of the time.
    """
    flat = values.reshape(-1)
    if flat.device.type != "cpu":  # the bracket below reads counts on the host: a sync per matrix there
        return kth_smallest_on_device(flat, k, absolute)
    n = flat.numel()
    ext = cpu_ext.module_for(flat) if absolute and n > _KTH_DIRECT and flat.is_contiguous() else None
    if ext is not None:  # the C++ radix select: exact, two passes, about 1 ns an element (cpu_ext.py)
        return flat.new_tensor(ext.kth_abs(flat, k))
    if n <= _KTH_DIRECT:
        return torch.kthvalue(flat.abs() if absolute else flat, k).values
    # A stride coprime with n visits every column residue: matrices have per-column structure (the
    # mixed kernel's softmax runs down each column), so a stride sharing a factor with the row length
    # would sample a few columns only and bracket the wrong values.
    stride = max(16, n // sample)
    while math.gcd(stride, n) != 1:
        stride += 1
    probe = flat[::stride]  # (ns,) a view; kthvalue copies it
    probe = probe.abs() if absolute else probe
    ns = probe.numel()
    pos = round((k - 1) / (n - 1) * (ns - 1))  # 0-indexed rank of the k-th value in the sample
    width = int(4 * math.sqrt(ns)) + 8  # ~ 8 standard deviations of the sample quantile's rank
    lo_rank, hi_rank = max(pos - width, 0), min(pos + width, ns - 1)
    lo = torch.kthvalue(probe, lo_rank + 1).values if lo_rank > 0 else None
    hi = torch.kthvalue(probe, hi_rank + 1).values if hi_rank < ns - 1 else None
    if lo is None and hi is None:
        return torch.kthvalue(flat.abs() if absolute else flat, k).values
    below = flat.new_zeros((), dtype=torch.int64)
    pieces = []
    for chunk in flat.split(PASS_CHUNK):
        v = chunk.abs() if absolute else chunk
        if lo is None:  # the answer is among the smallest values: no lower bound needed
            inside = v <= hi
        else:
            below += (v < lo).sum()
            inside = v >= lo if hi is None else (v >= lo) & (v <= hi)
        pieces.append(torch.masked_select(v, inside))  # faster than v[inside] on CPU
    band = torch.cat(pieces)
    k_band = k - int(below)
    if 1 <= k_band <= band.numel():
        return torch.kthvalue(band, k_band).values
    return torch.kthvalue(flat.abs() if absolute else flat, k).values


def kth_smallest_on_device(values: Tensor, k: int, absolute: bool = False) -> Tensor:
    """Exact k-th smallest (1-indexed) of a flat tensor (of ``|values|`` if ``absolute``) with no host sync.

    What ``kth_smallest`` does off the CPU: no count or shape depends on the data, so a training step
    queues its work without waiting for the device. With ``absolute`` on float32 where the Triton passes
    apply (``gpu.wanted``), their radix select (``gpu/select.py``: four launches, no full-size
    temporary); otherwise ``torch.kthvalue`` on the device. Both return the value ``kth_smallest`` does.
    """
    flat = values.reshape(-1)
    if absolute and gpu.wanted(flat):
        from .gpu.select import kth_abs

        return kth_abs(flat.contiguous().view(1, -1), [k])[0]
    return torch.kthvalue(flat.abs() if absolute else flat, k).values


def selection_threshold(magnitude: Tensor, sparsity: float, mode: str = "magnitude",
                        absolute: bool = False) -> Tensor:
    """The threshold of the weight-level competition for one matrix.

    Entries with ``magnitude > threshold`` are kept. For ``"magnitude"`` mode the kth value below the
    quantile is returned: ``m > t_quantile`` and ``m > v_k`` select the same entries, whatever the
    interpolation. For ``"soft"`` mode the exact interpolated ``sparsity``-quantile (as
    ``torch.quantile`` computes it) is returned, since the kept values are shifted by it.

    Args:
        magnitude: ``(out, in)`` non-negative values (detached), or signed values with ``absolute``.
        sparsity: fraction of entries to zero, in ``[0, 1)``; at 0 the threshold is the minimum.
        mode: ``"magnitude"`` or ``"soft"``.
        absolute: select on ``|magnitude|``, taken piece by piece (no full-size temporary).

    Returns:
        A 0-d tensor.
    """
    k, frac = quantile_rank(magnitude.numel(), sparsity)
    v_k = kth_smallest(magnitude, k, absolute=absolute)
    if mode == "soft" and frac > 0 and k < magnitude.numel():
        v_next = kth_smallest(magnitude, k + 1, absolute=absolute)
        return v_k + frac * (v_next - v_k)
    return v_k


def apply_competition(delta: Tensor, threshold: Tensor, mode: str = "magnitude") -> Tensor:
    """Sparsify ``delta`` against a given threshold (the part of ``sparsify`` that autograd sees).

    - ``"magnitude"`` (the authors' code): ``delta * m * 1[m > t]`` with ``m = |delta|`` detached, so a
      kept entry's effective value is ``sign * delta^2`` and its gradient is scaled by ``m``.
    - ``"soft"`` (SNELL paper eq. 5): ``delta * max(m - t, 0)``, ``m`` and ``t`` detached.
    - ``"none"``: ``delta`` itself (the dense kernel; ``threshold`` is ignored).
    """
    if mode == "none":
        return delta
    m = delta.detach().abs()
    if mode == "magnitude":
        return delta * (m * (m > threshold))
    if mode == "soft":
        return delta * (m - threshold).clamp_min(0)
    raise ValueError(f"unknown competition mode {mode!r}; accepted: {', '.join(COMPETITION_MODES)}")


def sparsify(delta: Tensor, sparsity: float | Sequence[float] | Tensor, mode: str = "magnitude") -> Tensor:
    """Weight-level competition: keep the largest-magnitude entries of each matrix (SPEC.md section 4).

    Args:
        delta: ``(out, in)`` or ``(S, out, in)`` dense update(s).
        sparsity: fraction of each matrix's entries to zero, in ``[0, 1)``; one value, or one per
            matrix for a batch. ``0`` keeps every entry but the smallest, and still applies the
            competition's multiplier (``delta * |delta|``): the authors' quantile at 0 is the minimum.
        mode: ``"magnitude"`` (default, the authors' code), ``"soft"`` (paper eq. 5) or ``"none"``
            (no competition: ``delta`` as it is; sparsity must be 0).

    Returns:
        The sparse update, same shape as ``delta``.
    """
    if mode not in COMPETITION_MODES:
        raise ValueError(f"unknown competition mode {mode!r}; accepted: {', '.join(COMPETITION_MODES)}")
    if delta.dim() == 2:
        return sparsify(delta[None], [float(sparsity)], mode)[0]
    levels = _as_levels(sparsity, delta.shape[0])
    if mode == "none":
        check_no_competition(levels)
        return delta
    out = []
    for d, s in zip(delta.unbind(0), levels):
        # s = 0 is no special case (SPEC.md section 4): the threshold is the minimum, so the authors'
        # mode gives delta * |delta| without the smallest entry, and the soft mode delta * (m - min m).
        t = selection_threshold(d.detach().abs(), s, mode)
        out.append(apply_competition(d, t, mode))
    return torch.stack(out)


def _as_levels(sparsity, count: int) -> list[float]:
    """Normalise a scalar or per-matrix sparsity to a validated list of ``count`` floats."""
    if isinstance(sparsity, Tensor):
        levels = [float(v) for v in sparsity.reshape(-1).tolist()]
    elif isinstance(sparsity, (int, float)):
        levels = [float(sparsity)]
    else:
        levels = [float(v) for v in sparsity]
    if len(levels) == 1:
        levels = levels * count
    if len(levels) != count:
        raise ValueError(f"got {len(levels)} sparsity values for {count} matrices")
    for v in levels:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"sparsity {v} is outside [0, 1); 0 is dense, 0.9 keeps 10% of the entries")
    return levels


def check_no_competition(levels: Sequence[float]) -> None:
    """Raise unless every level is 0: ``competition="none"`` has no selection that could zero entries."""
    bad = [v for v in levels if v != 0.0]
    if bad:
        raise ValueError(f"competition='none' keeps every entry, but sparsity {bad[0]} was asked for; use "
                         "competition='magnitude' or 'soft' for a sparse update, or sparsity 0")
