"""Memory-efficient adapted matmuls: the custom autograd Function behind every adapted layer.

An adapted layer computes ``op(x, W0 + dW)`` (the *fused* path) or ``op(x, dW)`` (the adapter branch
of the *parallel* path), where ``dW = sparsify(kernel(A, B, ...))`` and ``op`` is a linear map or a
2-D convolution. Plain autograd would keep ``dW``, the distance matrices, the softmax and the mask
alive from forward to backward: several full ``(out, in)`` matrices per layer. This Function keeps
only what LoRA keeps (the input ``x`` and the factors) and recomputes ``dW`` in backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import functional as Fn
from .kernel_vjp import FAST_KERNELS, kernel_backward, kernel_forward


def _up(t: Optional[Tensor]) -> Optional[Tensor]:
    """At least fp32: the distance identity cancels catastrophically in bf16/fp16."""
    return t if t is None or t.dtype in (torch.float32, torch.float64) else t.float()


@dataclass(frozen=True)
class DeltaSpec:
    """How the factors of one layer become its update: kernel, competition and per-matrix sparsity.

    A layer holds ``S`` matrices (``S = 3`` for a fused qkv projection split into q, k, v; else 1);
    ``sparsity`` has one value per matrix.
    """

    kernel: str
    mode: str
    sparsity: tuple[float, ...]

    def delta(self, A: Tensor, B: Tensor, coefficients: Optional[Tensor], alpha: Optional[Tensor],
              gamma: Optional[Tensor], beta: Optional[Tensor],
              thresholds: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The sparse update of every matrix, in float32 (float64 for float64 factors).

        Args:
            A: ``(S, P, in, r/P)``; B: ``(S, P, out_s, r/P)``; scalars ``(S,)`` or None.
            thresholds: ``(S,)`` thresholds from an earlier call on the same factors; given in
                backward, so the selection (the costly part of the competition) runs once a step.

        Returns:
            ``(delta, thresholds)``: ``(S, out_s, in)`` float32 and ``(S,)``.
        """
        K = Fn.kernel_delta(self.kernel, _up(A), _up(B), _up(coefficients), _up(alpha), _up(gamma), _up(beta))
        if self.mode == "none":  # the dense kernel: nothing to select
            return K, torch.full((K.shape[0],), float("nan"), device=K.device, dtype=K.dtype)
        if thresholds is None:
            # Every level, 0 included, competes (SPEC.md section 4): at 0 the threshold is the minimum.
            thresholds = torch.stack([Fn.selection_threshold(K[s].detach(), level, self.mode, absolute=True)
                                      for s, level in enumerate(self.sparsity)]).to(K.dtype)
        parts = [Fn.apply_competition(K[s], thresholds[s], self.mode) for s in range(len(self.sparsity))]
        return torch.stack(parts), thresholds  # (S, out_s, in)


@dataclass(frozen=True)
class LinearOp:
    """``y = x W^T + b`` and its two gradients."""

    def weight_shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (out_features, in_features)

    def forward(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return F.linear(x, w, b)

    def backward(self, gy: Tensor, x: Tensor, w: Tensor, need_x: bool) -> tuple[Optional[Tensor], Tensor]:
        """``(dL/dx, dL/dW)``; ``w`` is scratch: dL/dW is written into its storage (one buffer fewer)."""
        gx = gy @ w if need_x else None  # (..., in)
        gw = torch.mm(gy.reshape(-1, gy.shape[-1]).t(), x.reshape(-1, x.shape[-1]), out=w)  # (out, in)
        return gx, gw

    def bias_grad(self, gy: Tensor) -> Tensor:
        return gy.reshape(-1, gy.shape[-1]).sum(0)


@dataclass(frozen=True)
class Conv2dOp:
    """``y = conv2d(x, W, b)`` with integer padding (the layer pre-pads other padding modes)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    kernel_size: tuple[int, int]

    def weight_shape(self, out_channels: int, fan_in: int) -> tuple[int, ...]:
        return (out_channels, fan_in // (self.kernel_size[0] * self.kernel_size[1]), *self.kernel_size)

    def forward(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, gy: Tensor, x: Tensor, w: Tensor, need_x: bool) -> tuple[Optional[Tensor], Tensor]:
        """``(dL/dx, dL/dW)``."""
        gx, gw, _ = torch.ops.aten.convolution_backward(
            gy, x, w, None, self.stride, self.padding, self.dilation, False, (0, 0), self.groups,
            (need_x, True, False))
        return gx, gw

    def bias_grad(self, gy: Tensor) -> Tensor:
        return gy.sum((0, 2, 3))


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _low_precision_delta(op, x: Tensor, delta: Tensor, dtype: torch.dtype) -> Tensor:
    """``op(x, dW)`` in fp32 for a bf16/fp16 ``x``, with ``dW`` (fp32) at full relative precision.

    bf16 has fp32's exponent range, so ``dW`` casts with a relative error of 2^-8. fp16's smallest
    normal (6e-5) is above most of ``dW``'s entries, so ``dW`` is first scaled by a power of two (exact)
    and the result scaled back in fp32.
    """
    if dtype == torch.float16:
        scale = torch.exp2(-torch.floor(torch.log2(delta.abs().amax().clamp_min(1e-30))))  # no host sync
        return op.forward(x, (delta * scale).to(dtype), None).float().div_(scale)
    return op.forward(x, delta.to(dtype), None).float()


def _autocast_dtype(x: Tensor, default: torch.dtype) -> torch.dtype:
    """The dtype the matmul should run in: autocast's when it is on for x's device, else ``default``."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return default


def _direct(dtype: torch.dtype, A: Tensor, weight: Optional[Tensor]) -> bool:
    """Whether the op runs in the kernel's own dtype, so the update can be built in the weight buffer."""
    return dtype == _up(A).dtype and (weight is None or weight.dtype == dtype)


def _linear_backward_blocked(ctx, saved: Sequence[Optional[Tensor]], gy: Tensor, need: Sequence[bool]) -> tuple:
    """Backward of a linear layer with a fast kernel, without any full-size weight of its own.

    ``dL/dW = gy^T x`` is the one (out, in) buffer (full fine-tuning forms it too). The kernel's
    backward reads it a block of columns at a time, recomputes the update of that block and hands it
    here, where ``W0 + dW`` of those columns overwrites the columns just read. When the kernel is done
    the buffer holds ``W0 + dW`` and ``dL/dx = gy (W0 + dW)`` is one GEMM, as full fine-tuning's; the
    kernel runs twice per step in all. ``saved`` is ``ctx.saved_tensors``, unpacked once by the caller:
    under non-reentrant activation checkpointing a second unpack raises.
    """
    x, weight, bias, coefficients, A, B, alpha, gamma, beta, thresholds = saved
    spec = ctx.spec
    factors = (A, B, alpha, gamma, beta)
    S, n_in = A.shape[0], A.shape[2]
    gy2 = gy.reshape(-1, gy.shape[-1]).to(ctx.dtype)  # (N, out)
    x2 = x.reshape(-1, n_in)  # (N, in)
    gw = torch.mm(gy2.t(), x2)  # (out, in): dL/d(W0 + dW), then W0 + dW
    g_weight = gw.to(weight.dtype, copy=True) if weight is not None and need[1] else None

    def rebuild(j: int, delta: Tensor) -> None:  # delta: (S, out_s, nb) columns j:j+nb of dW
        cols = gw[:, j:j + delta.shape[-1]]  # (out, nb), already read by the kernel's backward
        w = delta.reshape(-1, delta.shape[-1])
        if weight is not None:
            torch.add(w, weight[:, j:j + w.shape[1]], out=cols)
        else:
            cols.copy_(w)

    up = [_up(f) for f in factors]
    grads = kernel_backward(gw.view(S, -1, n_in), up[0], up[1], coefficients, *up[2:], spec.kernel, spec.mode,
                            spec.sparsity, thresholds, block_hook=rebuild if need[0] else None)
    gx = gy2 @ gw if need[0] else None  # (N, in)
    del gw
    factor_grads = [g.to(f.dtype) if (f is not None and need[4 + i] and g is not None) else None
                    for i, (f, g) in enumerate(zip(factors, grads))]
    g_bias = gy2.sum(0).to(bias.dtype) if bias is not None and need[2] else None
    g_x = gx.view(x.shape).to(x.dtype) if gx is not None else None
    return (g_x, g_weight, g_bias, None, *factor_grads, None, None, None, None)


def _weight(op, spec: DeltaSpec, weight: Optional[Tensor], coefficients: Optional[Tensor], A: Tensor, B: Tensor,
            alpha: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor], dtype: torch.dtype,
            thresholds: Optional[Tensor] = None, keep: bool = False) -> tuple[Tensor, Tensor, Optional[tuple]]:
    """The weight the op runs with, ``W0 + dW`` (``dW`` alone if ``weight`` is None), in ``dtype``.

    With the fast kernels and float32 everywhere, ``dW`` is built in the weight buffer itself and
    ``W0`` added in the same pass: the one full-size tensor of the layer. Returns ``(w, thresholds,
    state)``; ``state`` (fast kernels, ``keep``, single-block matrices) goes to ``kernel_backward``.
    """
    S, P, n_in = A.shape[:3]
    n_out = S * B.shape[2]
    shape = op.weight_shape(n_out, n_in)
    if spec.kernel in FAST_KERNELS:
        up = [_up(f) for f in (A, B, alpha, gamma, beta)]
        direct = _direct(dtype, A, weight)
        out = torch.empty(shape, dtype=up[0].dtype, device=A.device).view(S, -1, n_in) if direct else None
        base = weight.reshape(S, -1, n_in) if (direct and weight is not None) else None
        delta, thresholds, state = kernel_forward(up[0], up[1], coefficients, *up[2:], spec.kernel, spec.mode,
                                                  spec.sparsity, thresholds=thresholds, out=out, base=base,
                                                  keep=keep)
        if direct:
            return delta.view(shape), thresholds, state
    else:
        delta, thresholds = spec.delta(A, B, coefficients, alpha, gamma, beta, thresholds)  # (S, out_s, in)
        state = None
    w = delta.reshape(shape).to(dtype)
    del delta
    if weight is not None:
        w.add_(weight.to(dtype))
    return w, thresholds, state


class _AdaptedWeightFn(torch.autograd.Function):
    """``y = op(x, W0 + dW(factors)) + b`` (fused path) or ``op(x, dW(factors))`` (``W0 = None``).

    Saves: ``x``, the factors, ``W0`` (a parameter, no copy) and one threshold per matrix.
    Recomputes in backward: ``dW`` (the kernel, O(in*out*r), r/T of one matmul of the layer) and its
    mask against the saved threshold, so the selection runs once per step, not twice.
    Trades: the kernel runs twice per step, in exchange for no ``(out, in)`` tensor living between
    forward and backward: the memory of LoRA at the same rank, with a high-rank update.
    Gradients: ``x`` and the base weight/bias as the base op's own backward would give them; the
    factors' by autograd through the recomputed kernel with the full-size ``dL/d(dW)`` as seed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, coefficients, A, B, alpha, gamma, beta, op, spec, dtype, out_dtype):
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            b = None if bias is None else bias.to(dtype)
            xd = x.to(dtype)
            if dtype in LOW_PRECISION:
                # Below fp32 the update runs as its own branch: |dW| (1e-7 to 1e-5 under the magnitude
                # competition) is far below one bf16 step of W0, so bf16(W0 + dW) would round it away.
                delta, thresholds, _ = _weight(op, spec, None, coefficients, A, B, alpha, gamma, beta, torch.float32)
                y = _low_precision_delta(op, xd, delta, dtype)  # fp32
                del delta
                if weight is not None:
                    y = y.add_(op.forward(xd, weight.to(dtype), b))
                y = y.to(out_dtype)
            else:
                w, thresholds, _ = _weight(op, spec, weight, coefficients, A, B, alpha, gamma, beta, dtype)
                y = op.forward(xd, w, b)
        ctx.save_for_backward(x, weight, bias, coefficients, A, B, alpha, gamma, beta, thresholds)
        ctx.op, ctx.spec, ctx.dtype = op, spec, dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        saved = ctx.saved_tensors  # unpacked once: checkpointing's saved-tensor hooks allow one unpack
        x, weight, bias, coefficients, A, B, alpha, gamma, beta, thresholds = saved
        op, spec, dtype = ctx.op, ctx.spec, ctx.dtype
        need = ctx.needs_input_grad  # x, weight, bias, coefficients, A, B, alpha, gamma, beta, ...
        factors = (A, B, alpha, gamma, beta)
        fast = spec.kernel in FAST_KERNELS
        with torch.autocast(x.device.type, enabled=False):
            if fast and isinstance(op, LinearOp) and _direct(dtype, A, weight):
                return _linear_backward_blocked(ctx, saved, gy, need)
            if fast:  # hand-derived backward (kernel_vjp.py): no autograd graph over (out, in) tensors
                w, _, state = _weight(op, spec, weight, coefficients, A, B, alpha, gamma, beta, dtype, thresholds,
                                      keep=True)
            else:
                with torch.enable_grad():
                    leaves = [None if f is None else f.detach().requires_grad_(need[4 + i])
                              for i, f in enumerate(factors)]
                    delta, _ = spec.delta(*leaves[:2], coefficients, *leaves[2:], thresholds=thresholds)
                w = delta.detach().reshape(op.weight_shape(delta.shape[0] * delta.shape[1], delta.shape[2])).to(dtype)
                if weight is not None:
                    w.add_(weight.to(dtype))
            gy = gy.to(dtype)
            gx, gw = op.backward(gy, x.to(dtype), w, need[0])  # gw is written into w's storage
            del w
            g_weight = gw.reshape(weight.shape).to(weight.dtype, copy=True) if weight is not None and need[1] else None
            S = A.shape[0]
            if fast:
                up = [_up(f) for f in factors]
                g_delta = gw.reshape(S, -1, A.shape[2]).to(up[0].dtype)  # (S, out_s, in)
                del gw
                grads = kernel_backward(g_delta, up[0], up[1], coefficients, *up[2:], spec.kernel, spec.mode,
                                        spec.sparsity, thresholds, state)
                del state
                factor_grads = [g.to(f.dtype) if (f is not None and need[4 + i] and g is not None) else None
                                for i, (f, g) in enumerate(zip(factors, grads))]
            else:
                g_delta = gw.reshape(delta.shape).to(delta.dtype)
                wanted = [leaf for i, leaf in enumerate(leaves) if leaf is not None and need[4 + i]]
                it = iter(torch.autograd.grad(delta, wanted, g_delta) if wanted else ())
                factor_grads = [next(it).to(f.dtype) if (f is not None and need[4 + i]) else None
                                for i, f in enumerate(factors)]
        g_bias = op.bias_grad(gy).to(bias.dtype) if bias is not None and need[2] else None
        g_x = gx.to(x.dtype) if gx is not None else None
        return (g_x, g_weight, g_bias, None, *factor_grads, None, None, None, None)


@torch.compiler.disable
def adapted_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], op, spec: DeltaSpec,
               factors: Sequence[Optional[Tensor]], coefficients: Optional[Tensor]) -> Tensor:
    """Run ``op(x, W0 + dW)`` (or ``op(x, dW)`` when ``weight`` is None) without storing ``dW``.

    ``torch.compile`` does not trace into it (a graph break around each adapted layer, the rest of the
    model compiles): a traced forward rounds ``dW`` differently from the eager backward that recomputes
    it, so the saved threshold would sit a float step off and entries of the mask would flip.

    Args:
        x: the layer input. weight, bias: the frozen base weight/bias (either may be None).
        op: a ``LinearOp`` or ``Conv2dOp``. spec: the layer's ``DeltaSpec``.
        factors: ``(A, B, alpha, gamma, beta)``; the scalars are None for kernels without them.
        coefficients: ``(P,)`` chunk coefficients (None for chunk-free kernels).
    """
    dtype = _autocast_dtype(x, x.dtype)
    A, B, alpha, gamma, beta = factors
    # Below fp32 the sum W0 x + dW x is formed in fp32. Under autocast it is returned in fp32, so that
    # the update's effect (often below one bf16 step of the output) reaches the fp32 residual stream;
    # the next autocast op casts as usual. In a model cast to bf16 it is rounded once, to x's dtype.
    # The adapter branch alone (``weight`` None, the parallel path) stays fp32 for its caller to add.
    low = dtype in LOW_PRECISION
    out_dtype = torch.float32 if low and (weight is None or torch.is_autocast_enabled(x.device.type)) else dtype
    return _AdaptedWeightFn.apply(x, weight, bias, coefficients, A, B, alpha, gamma, beta, op, spec, dtype,
                                  out_dtype)
