"""The custom autograd Function against its plain-autograd twin: outputs, every gradient, dtypes, memory."""

import math

import pytest
import torch
import torch.nn.functional as F

import spec_reference as ref
from snella import functional as Fn
from snella.ops import Conv2dOp, DeltaSpec, LinearOp, adapted_op


def make_factors(S, P, n_in, n_out_s, r, kernel, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(S, P, n_in, r // P, generator=g, dtype=dtype) * 2 - 1) / math.sqrt(n_in)
    B = (torch.rand(S, P, n_out_s, r // P, generator=g, dtype=dtype) * 2 - 1) / math.sqrt(n_out_s)
    scalars = [None, None, None]
    if kernel in Fn.SCALAR_KERNELS:
        scalars = [torch.rand(S, generator=g, dtype=dtype) + 0.5 for _ in range(3)]
    leaves = [t.requires_grad_() if t is not None else None for t in (A, B, *scalars)]
    c = Fn.chunk_coefficients(P, dtype=dtype) if kernel in ("mixed", "piecewise") else None
    return leaves, c


def twin(x, weight, bias, spec, leaves, c, op):
    """Plain autograd on SPEC.md's formulas, transcribed independently: keeps every intermediate alive."""
    up = lambda t: t if t is None or t.dtype in (torch.float32, torch.float64) else t.float()  # noqa: E731
    A, B, alpha, gamma, beta = leaves
    # SPEC.md transcribed (tests/spec_reference.py), not the library's own kernels or selection
    delta = ref.update(spec.kernel, spec.mode, list(spec.sparsity), up(A), up(B), up(c),
                       *(up(t) for t in (alpha, gamma, beta)))
    delta = delta.view(A.shape[0], -1, A.shape[2])  # (S, out_s, in)
    w = delta.reshape(op.weight_shape(delta.shape[0] * delta.shape[1], delta.shape[2])).to(x.dtype)
    if x.dtype in (torch.bfloat16, torch.float16):  # below fp32: two branches, summed in fp32
        y = op.forward(x, w, None).float()
        return y if weight is None else (y + op.forward(x, weight, bias).float()).to(x.dtype)
    if weight is not None:
        w = weight + w
    return op.forward(x, w, bias)


def compare(x, weight, bias, spec, leaves, c, op, rtol, atol):
    y = adapted_op(x, weight, bias, op, spec, leaves, c)
    y_ref = twin(x, weight, bias, spec, leaves, c, op)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    upstream = torch.randn_like(y)
    inputs = [t for t in (x, *leaves) if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, inputs, upstream)
    want = torch.autograd.grad(y_ref, inputs, upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


SHAPES = [  # (S, P, in, out_s, r, lead shape of x)
    (1, 2, 16, 24, 8, (5,)),
    (1, 2, 7, 5, 4, (2, 3)),  # odd sizes, 3-D input
    (3, 2, 12, 12, 8, (2, 4)),  # a split qkv: three matrices
    (1, 4, 9, 13, 8, (3,)),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", ["mixed", "piecewise", "rbf", "sigmoid", "linear"])
@pytest.mark.parametrize("mode", ["magnitude", "soft"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_matches_plain_autograd(shape, kernel, mode, fused, dtype):
    S, P, n_in, n_out_s, r, lead = shape
    torch.manual_seed(0)
    leaves, c = make_factors(S, P, n_in, n_out_s, r, kernel, dtype=dtype)
    x = torch.randn(*lead, n_in, requires_grad=True, dtype=dtype)
    weight = torch.randn(S * n_out_s, n_in, dtype=dtype) if fused else None
    bias = torch.randn(S * n_out_s, dtype=dtype) if fused else None
    sparsity = tuple([0.5, 0.0, 0.8][:S]) if S == 3 else (0.6,)
    # float64: the same values to rounding. float32: the hand-derived backward (kernel_vjp.py) sums in
    # another order than autograd, and the distance gradient A*colsum(E) - E^T B cancels, so 5e-5 of the
    # largest gradient.
    rtol, atol = (1e-9, 1e-11) if dtype == torch.float64 else (1e-4, 5e-5)
    compare(x, weight, bias, DeltaSpec(kernel, mode, sparsity), leaves, c, LinearOp(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("kernel", ["mixed", "piecewise"])
@pytest.mark.parametrize("mode", ["magnitude", "soft"])
@pytest.mark.parametrize("fused", [True, False])
def test_blocked_kernel_matches_plain_autograd(monkeypatch, kernel, mode, fused):
    """Matrices larger than a block: the kernel and its backward go a few columns at a time (ragged last
    block), the competition's passes go in pieces, and the selection takes its sampled path; all of it
    must give exactly what one pass over the whole matrix gives (float64, to rounding)."""
    from snella import functional, kernel_vjp

    monkeypatch.setattr(kernel_vjp, "BLOCK_ELEMENTS", 3 * 2 * 40 * 7)  # 7 columns of 40 rows, S=3, P=2
    monkeypatch.setattr(kernel_vjp, "PASS_CHUNK", 1000)
    monkeypatch.setattr(functional, "PASS_CHUNK", 1000)
    monkeypatch.setattr(functional, "_KTH_DIRECT", 500)
    assert kernel_vjp.block_width(3, 2, 40, 150) == 7
    torch.manual_seed(0)
    leaves, c = make_factors(3, 2, 150, 40, 8, kernel, dtype=torch.float64)
    x = torch.randn(6, 150, requires_grad=True, dtype=torch.float64)
    weight = torch.randn(120, 150, dtype=torch.float64) if fused else None
    bias = torch.randn(120, dtype=torch.float64) if fused else None
    spec = DeltaSpec(kernel, mode, (0.5, 0.0, 0.9))
    compare(x, weight, bias, spec, leaves, c, LinearOp(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("fused", [True, False])
def test_linear_matches_plain_autograd_bf16(fused):
    """bf16 activations and base weight, fp32 factors (the kernel always runs in fp32)."""
    torch.manual_seed(0)
    leaves, c = make_factors(3, 2, 32, 32, 8, "mixed")
    x = torch.randn(4, 10, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(96, 32, dtype=torch.bfloat16) if fused else None
    bias = torch.randn(96, dtype=torch.bfloat16) if fused else None
    compare(x, weight, bias, DeltaSpec("mixed", "magnitude", (0.5, 0.7, 0.0)), leaves, c, LinearOp(),
            rtol=2e-2, atol=2e-2)
    y = adapted_op(x, weight, bias, LinearOp(), DeltaSpec("mixed", "magnitude", (0.5, 0.7, 0.0)), leaves, c)
    # the whole layer comes back in the model's dtype; the adapter branch alone stays fp32 for the sum
    assert y.dtype == (torch.bfloat16 if fused else torch.float32)


@pytest.mark.parametrize("conv", [
    dict(kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1),
    dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=1),
    dict(kernel_size=(3, 3), stride=(1, 1), padding=(2, 2), dilation=(2, 2), groups=2),
    dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=4),  # depthwise
])
@pytest.mark.parametrize("fused", [True, False])
def test_conv2d_matches_plain_autograd(conv, fused):
    torch.manual_seed(0)
    c_in, c_out = 4, 8
    kh, kw = conv["kernel_size"]
    op = Conv2dOp(conv["stride"], conv["padding"], conv["dilation"], conv["groups"], conv["kernel_size"])
    fan_in = c_in // conv["groups"] * kh * kw
    leaves, c = make_factors(1, 2, fan_in, c_out, 4, "mixed")
    x = torch.randn(2, c_in, 9, 9, requires_grad=True)
    weight = torch.randn(c_out, c_in // conv["groups"], kh, kw) if fused else None
    bias = torch.randn(c_out) if fused else None
    compare(x, weight, bias, DeltaSpec("mixed", "magnitude", (0.5,)), leaves, c, op, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op_name", ["linear", "conv"])
def test_gradcheck_float64(op_name):
    """Finite differences agree with the Function's analytical gradients, on the dense kernel
    (``competition="none"``): the competition's detached magnitude is by design not the derivative of
    the function, so the competing modes are checked against the twin above instead."""
    torch.manual_seed(0)
    if op_name == "linear":
        op, lead, n_in, n_out = LinearOp(), (3,), 5, 4
        x = torch.randn(*lead, n_in, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(n_out, n_in, dtype=torch.float64)
    else:
        op, n_in, n_out = Conv2dOp((1, 1), (1, 1), (1, 1), 1, (3, 3)), 2 * 9, 3
        x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    leaves, c = make_factors(1, 2, n_in, n_out, 4, "mixed", dtype=torch.float64)
    spec = DeltaSpec("mixed", "none", (0.0,))

    def fn(x, A, B, alpha, gamma, beta):
        # float64 end to end: the Function computes the kernel in float32 only when factors are lower.
        return adapted_op(x, weight, None, op, spec, (A, B, alpha, gamma, beta), c)

    assert torch.autograd.gradcheck(fn, (x, *leaves), eps=1e-6, atol=1e-5)


def test_no_full_size_tensor_is_saved_for_backward():
    """Only the input, the factors, the base weight (a parameter, not a copy) and thresholds are saved;
    plain autograd on the same math saves several (out, in) matrices, which this check must catch."""
    torch.manual_seed(0)
    n_in, n_out = 64, 96
    leaves, c = make_factors(1, 2, n_in, n_out, 8, "mixed")
    x = torch.randn(4, n_in, requires_grad=True)
    weight = torch.randn(n_out, n_in)
    spec = DeltaSpec("mixed", "magnitude", (0.5,))

    def saved_sizes(run):
        sizes = []

        def pack(t):
            if t.data_ptr() != weight.data_ptr():
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return sizes

    ours = saved_sizes(lambda: adapted_op(x, weight, None, LinearOp(), spec, leaves, c))
    plain = saved_sizes(lambda: twin(x, weight, None, spec, leaves, c, LinearOp()))
    assert max(ours) < n_out * n_in  # nothing the size of dW
    assert sum(ours) == x.numel() + sum(t.numel() for t in leaves) + c.numel() + 1  # + coefficients, threshold
    assert sum(s >= n_out * n_in for s in plain) >= 3  # the check can fail: plain autograd keeps dW-sized tensors


def test_autocast_bf16_runs_matmul_in_bf16_and_returns_the_fp32_sum():
    torch.manual_seed(0)
    leaves, c = make_factors(1, 2, 16, 16, 8, "mixed")
    x = torch.randn(3, 16)
    weight = torch.randn(16, 16)
    spec = DeltaSpec("mixed", "magnitude", (0.5,))
    y32 = adapted_op(x, weight, None, LinearOp(), spec, leaves, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = adapted_op(x, weight, None, LinearOp(), spec, leaves, c)
    assert y16.dtype == torch.float32  # W0 x and dW x from bf16 GEMMs, summed in fp32 (ops.adapted_op)
    torch.testing.assert_close(y16, y32, rtol=3e-2, atol=5e-2)
    assert not torch.equal(y16, y32)  # the GEMMs did run in bf16
    (g,) = torch.autograd.grad(y16.float().sum(), leaves[0])
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
