"""The Triton passes (snella/gpu/) against the torch passes of kernel_vjp and SPEC.md's transcription:
values, thresholds, masks, every gradient, both competition modes and sparsity 0.

Without a GPU they run on CPU tensors through triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything defines a kernel; a run where it did not take fails here, it does
not skip). On a GPU machine the same tests run the compiled kernels on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

import spec_reference as ref
from support import missing
from snella import functional as Fn
from snella import gpu, kernel_vjp

if not gpu.triton_importable():
    missing("triton is not installed (torch's Linux wheels bring it); the Triton passes cannot be tested",
            module_level=True)

from snella.gpu import kernel as tk  # noqa: E402  (after the check above)
from snella.gpu.select import kth_abs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_reachable():
    """On CPU the kernels must have been defined under the interpreter, else nothing here tests them."""
    if DEVICE == "cpu" and not (gpu.interpreting() and type(tk._kprime_kernel).__name__ == "InterpretedFunction"):
        pytest.fail("the Triton kernels were not defined under TRITON_INTERPRET=1: something imported "
                    "snella.gpu.kernel before tests/conftest.py set it", pytrace=False)


def factors(S, n_out, n_in, r, P=2, seed=0, dup_cols=False):
    """Seeded float32 factors on DEVICE; ``dup_cols`` repeats A's rows so K' has exactly tied entries."""
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(S, P, n_in, r // P, generator=g) * 2 - 1) / math.sqrt(n_in) * 8
    B = (torch.rand(S, P, n_out, r // P, generator=g) * 2 - 1) / math.sqrt(n_out) * 8
    if dup_cols:
        A[:, :, 1::2] = A[:, :, 0::2][:, :, : A[:, :, 1::2].shape[2]]
    scal = [torch.rand(S, generator=g) + 0.5, torch.rand(S, generator=g) + 0.5, torch.randn(S, generator=g) * 0.1]
    c = Fn.chunk_coefficients(P)
    return [t.to(DEVICE) for t in (A, B, c, *scal)]


def both_paths(monkeypatch, fn):
    """``fn()`` on the torch path (SNELLA_TRITON=0) and on the Triton path (=1); checks that the Triton
    passes ran in the second call only."""
    calls = []
    for name in ("kernel_forward", "kernel_backward"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    monkeypatch.setenv("SNELLA_TRITON", "0")
    torch_result = fn()
    assert not calls
    monkeypatch.setenv("SNELLA_TRITON", "1")
    triton_result = fn()
    assert calls
    return torch_result, triton_result


def dense(A, B, c, alpha, gamma, beta, kernel):
    """Triton's own K' (mode "none", no base): what its masking must act on."""
    return tk.kernel_forward(A, B, c, alpha, gamma, beta, kernel, "none", [0.0] * A.shape[0])[0]


def no_less_precise(got, torch32, want64, name=""):
    """``got`` (Triton, fp32) is within 4x the torch fp32 path's error of the float64 torch path, or
    within 1e-5 of its scale: gradient sums such as gamma's cancel, so neither fp32 path is exact."""
    err = float((got.double() - want64).abs().max())
    err32 = float((torch32.double() - want64).abs().max())
    assert err <= 4 * err32 + 1e-5 * float(want64.abs().max()), f"{name}: error {err:.3g}, torch fp32's {err32:.3g}"


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("case", ["normal", "ties", "zeros", "tiny"])
def test_radix_select_is_kthvalue_bit_for_bit(case):
    g = torch.Generator().manual_seed(1)
    n = 5003
    x = torch.randn(3, n, generator=g) * torch.tensor([[1e-4], [1.0], [30.0]])
    if case == "ties":
        x = torch.round(x * 4) / 4  # a few dozen distinct values
    elif case == "zeros":
        x[:, : n // 2] = 0.0
        x[0, :100] = -0.0
    elif case == "tiny":
        x = x * 1e-38  # subnormals
    ranks = [1, n // 2, n]
    got = kth_abs(x.to(DEVICE), ranks).cpu()
    want = torch.stack([torch.kthvalue(x[s].abs(), k).values for s, k in enumerate(ranks)])
    assert torch.equal(got, want)
    inner = [2, 1234, n - 1]  # ranks away from the ends too
    got = kth_abs(x.to(DEVICE), inner).cpu()
    assert torch.equal(got, torch.stack([torch.kthvalue(x[s].abs(), k).values for s, k in enumerate(inner)]))


@pytest.mark.parametrize("mode", ["magnitude", "soft"])
def test_thresholds_equal_the_cpu_selection(mode):
    """The device selection gives the threshold ``functional.selection_threshold`` gives, bit for bit
    (the CPU's sampled bracket / C++ radix select), on a matrix big enough for the bracket path."""
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(3, 300, 200, generator=g) * 1e-3
    delta[1, :, ::3] = delta[1, :, 1::3]  # tied entries
    levels = [0.0, 0.37, 0.99]
    got = tk.thresholds(delta.to(DEVICE), levels, mode).cpu()
    want = torch.stack([Fn.selection_threshold(delta[s], level, mode, absolute=True)
                        for s, level in enumerate(levels)])
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- forward

SHAPES = [  # (S, out_s, in, r): odd sizes that leave partial tiles, a split qkv, rank 32 (16 per chunk)
    (1, 37, 70, 8),
    (3, 40, 33, 8),
    (1, 65, 130, 32),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel,mode", [("mixed", "magnitude"), ("mixed", "soft"), ("piecewise", "magnitude"),
                                         ("mixed", "none")])
def test_forward_matches_the_torch_path(monkeypatch, shape, kernel, mode):
    S, n_out, n_in, r = shape
    A, B, c, *scal = factors(S, n_out, n_in, r)
    levels = [0.0] * S if mode == "none" else [0.8, 0.0, 0.5][:S]
    base = torch.randn(S, n_out, n_in, generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def run():
        with_base = kernel_vjp.kernel_forward(A, B, c, *scal, kernel, mode, levels, base=base)[0]
        delta, thr, _ = kernel_vjp.kernel_forward(A, B, c, *scal, kernel, mode, levels)
        # the base is added in the same pass (a float step of |base| apart at most: an FMA may round once)
        torch.testing.assert_close(with_base, delta + base, rtol=0, atol=2.5e-7 * float(base.abs().max()))
        return delta, thr

    (d_torch, t_torch), (d_triton, t_triton) = both_paths(monkeypatch, run)
    kp = dense(A, B, c, *scal, kernel)
    # K' = 0.1 (|b - a| - |b' - a'|) + ... cancels: both paths round at about a float step of max |K'|.
    scale = 2e-6 * float(kp.abs().max())
    atol = scale * float(kp.abs().max()) if mode == "magnitude" else scale  # magnitude: values ~ K'^2
    torch.testing.assert_close(d_triton, d_torch, rtol=1e-5, atol=atol)
    if mode == "none":
        assert t_triton.isnan().all()
        return
    torch.testing.assert_close(t_triton, t_torch, rtol=1e-5, atol=scale)
    # Triton's masking on Triton's own K', checked with torch ops: the threshold is the exact k-th
    # smallest |K'|, the kept set is |K'| > t, and the kept values are K' * |K'| (magnitude) or K' (|K'| - t).
    m = kp.abs()
    for s, level in enumerate(levels):
        k, _ = Fn.quantile_rank(m[s].numel(), level)
        if mode == "magnitude":
            assert torch.equal(t_triton[s], torch.kthvalue(m[s].reshape(-1).cpu(), k).values.to(DEVICE))
    mult = m * (m > t_triton[:, None, None]) if mode == "magnitude" else (m - t_triton[:, None, None]).clamp_min(0)
    got = kernel_vjp.kernel_forward(A, B, c, *scal, kernel, mode, levels)[0]
    assert torch.equal(got, kp * mult)
    # Against the torch path, a kept entry may only differ where |K'| sits at the threshold's rounding.
    flips = (d_triton != 0) != (d_torch != 0)
    near = (m - t_triton[:, None, None]).abs() <= 2 * scale
    assert not (flips & ~near).any()


@pytest.mark.parametrize("mode", ["magnitude", "soft"])
def test_forward_matches_the_spec_transcription(monkeypatch, mode):
    """Against SPEC.md transcribed in float64 (broadcast distances, torch.quantile), sparsity 0 included:
    s = 0 keeps the competition's form (K' |K'| without the smallest entry; soft: K' (m - min m))."""
    S, n_out, n_in, r = 3, 24, 40, 8
    A, B, c, *scal = factors(S, n_out, n_in, r, seed=5)
    levels = [0.0, 0.5, 0.9]
    monkeypatch.setenv("SNELLA_TRITON", "1")
    got = kernel_vjp.kernel_forward(A, B, c, *scal, "mixed", mode, levels)[0].cpu().double()
    want = ref.update("mixed", mode, levels, *[t.cpu().double() for t in (A, B, c, *scal)]).view(S, n_out, n_in)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert [int((g != 0).sum()) for g in got] == [int((w != 0).sum()) for w in want]
    if mode == "magnitude":
        assert int((got[0] == 0).sum()) == 1  # s = 0: only the minimum is dropped


# ----------------------------------------------------------------------------- backward


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel,mode", [("mixed", "magnitude"), ("mixed", "soft"), ("piecewise", "soft"),
                                         ("mixed", "none")])
def test_backward_matches_the_torch_path(monkeypatch, shape, kernel, mode):
    S, n_out, n_in, r = shape
    A, B, c, *scal = factors(S, n_out, n_in, r, seed=7)
    levels = [0.0] * S if mode == "none" else [0.7, 0.0, 0.4][:S]
    grad = torch.randn(S, n_out, n_in, generator=torch.Generator().manual_seed(8)).to(DEVICE)

    def run():
        delta, thr, _ = kernel_vjp.kernel_forward(A, B, c, *scal, kernel, mode, levels)
        hooked = {}
        grads = kernel_vjp.kernel_backward(grad, A, B, c, *scal, kernel, mode, levels, thr,
                                           block_hook=lambda j, d: hooked.__setitem__(j, d.clone()))
        rebuilt = torch.cat([hooked[j] for j in sorted(hooked)], dim=-1)
        return delta, rebuilt, grads

    (d0, _, g_torch), (d1, rebuilt, g_triton) = both_paths(monkeypatch, run)
    assert torch.equal(rebuilt, d1)  # backward's recomputed update is forward's, bit for bit
    monkeypatch.setenv("SNELLA_TRITON", "0")
    f64 = [t.double() for t in (A, B, c, *scal)]
    thr64 = kernel_vjp.kernel_forward(*f64, kernel, mode, levels)[1]
    g_f64 = kernel_vjp.kernel_backward(grad.double(), *f64, kernel, mode, levels, thr64)
    names = ("A", "B", "alpha", "gamma", "beta")
    for name, a, b, want in zip(names, g_triton, g_torch, g_f64):
        if kernel == "piecewise" and name in names[2:]:
            assert a is None and b is None
            continue
        no_less_precise(a, b, want, name)


def test_a_tie_at_the_threshold_never_flips_between_forward_and_backward(monkeypatch):
    """Duplicated input rows make K' hold exact pairs; at sparsity 0.5 the threshold falls on a pair.
    Strict ``>`` drops both, in forward and in backward's recompute alike."""
    A, B, c, *scal = factors(1, 30, 40, 8, dup_cols=True, seed=9)
    monkeypatch.setenv("SNELLA_TRITON", "1")
    delta, thr, _ = kernel_vjp.kernel_forward(A, B, c, *scal, "mixed", "magnitude", [0.5])
    kp = dense(A, B, c, *scal, "mixed")
    tied = int((kp.abs() == thr).sum())
    assert tied >= 2  # the threshold is a tied value
    assert int((delta != 0).sum()) == int((kp.abs() > thr).sum())
    hooked = []
    kernel_vjp.kernel_backward(torch.ones_like(delta), A, B, c, *scal, "mixed", "magnitude", [0.5], thr,
                               block_hook=lambda j, d: hooked.append(d.clone()))
    assert torch.equal(hooked[0], delta)


# ----------------------------------------------------------------------------- the layer, end to end


def qkv_layer(dtype=torch.float32, **config):
    from snella import SnellaConfig
    from snella.layer import SnellaLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(48, 144).to(DEVICE)
    layer = SnellaLinear(base)
    layer.update_layer("default", SnellaConfig(**{"r": 8, "sparsity": 0.6, **config}), split=True,
                       layer_name="blocks.0.attn.qkv")
    for s, level in enumerate((0.0, 0.5, 0.8)):
        layer.set_sparsity("default", s, level)
    return layer.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["magnitude", "soft"])
def test_layer_output_and_every_gradient_match_the_torch_path(monkeypatch, dtype, mode):
    """The whole adapted layer (forward, recompute, backward; the fused path's blocked backward): its
    output, input gradient and every factor's and scalar's gradient, per input dtype."""
    layer = qkv_layer(dtype, competition=mode)
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    params = [p for p in layer.factors("default") if p is not None]

    def run():
        xx = x.clone().requires_grad_()
        y = layer(xx)
        grads = torch.autograd.grad(y.float().square().sum(), [xx, *params])
        return y.float(), grads

    (y0, g0), (y1, g1) = both_paths(monkeypatch, run)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y1, y0, **tol)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol["rtol"] * 10,
                                   atol=tol["atol"] * float(b.float().abs().max()) + 1e-12)


def test_bf16_autocast_keeps_the_updates_effect(monkeypatch):
    """Under bf16 autocast the Triton path's update still reaches the output (fp32 sum of the branches)."""
    layer = qkv_layer()
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    monkeypatch.setenv("SNELLA_TRITON", "1")
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x)
        layer.disable_adapters = True
        y_base = layer(x)
        layer.disable_adapters = False
    monkeypatch.setenv("SNELLA_TRITON", "0")
    with torch.no_grad():
        y32 = layer(x)
        layer.disable_adapters = True
        y32_base = layer(x)
        layer.disable_adapters = False
    a, b = (y.double() - y_base.double()).flatten(), (y32.double() - y32_base.double()).flatten()
    assert float(a @ b / (a.norm() * b.norm())) >= 0.99


def test_switch_values(monkeypatch):
    t = torch.empty(2, device=DEVICE)
    monkeypatch.setenv("SNELLA_TRITON", "0")
    assert not gpu.wanted(t)
    monkeypatch.setenv("SNELLA_TRITON", "1")
    assert gpu.wanted(t) and not gpu.wanted(t.double())
    monkeypatch.setenv("SNELLA_TRITON", "auto")
    assert gpu.wanted(t) == (DEVICE == "cuda")  # auto: CPU tensors stay on the torch/C++ passes
    monkeypatch.setenv("SNELLA_TRITON", "yes")
    with pytest.raises(ValueError, match="SNELLA_TRITON='yes'"):
        gpu.wanted(t)


@pytest.mark.slow  # a ViT-S-wide matrix in the interpreter (ViT-S's full 384 x 384 takes minutes there)
@pytest.mark.parametrize("shape", [(1, 96, 384, 32)])
def test_vit_s_sizes_match_the_torch_path(monkeypatch, shape):
    S, n_out, n_in, r = shape
    A, B, c, *scal = factors(S, n_out, n_in, r, seed=11)
    levels = [0.8] * S
    grad = torch.randn(S, n_out, n_in, generator=torch.Generator().manual_seed(12)).to(DEVICE)

    def run():
        delta, thr, _ = kernel_vjp.kernel_forward(A, B, c, *scal, "mixed", "magnitude", levels)
        return delta, thr, kernel_vjp.kernel_backward(grad, A, B, c, *scal, "mixed", "magnitude", levels, thr)

    (d0, t0, g0), (d1, t1, g1) = both_paths(monkeypatch, run)
    torch.testing.assert_close(d1, d0, rtol=1e-5, atol=2e-6 * float(d0.abs().max()))
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=0)
    for name, a, b in zip(("A", "B", "alpha", "gamma", "beta"), g1, g0):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4 * float(b.abs().max()), msg=name)

