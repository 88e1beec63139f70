"""The C++ competition passes (snella/cpu_ext.py, csrc/fused_kernel.cpp) against their torch formulas,
and the kernel's forward/backward with and without them."""

import math
import warnings

import pytest
import torch

from snella import cpu_ext
from snella import functional as Fn
from snella import kernel_vjp as kv


@pytest.fixture(scope="module")
def ext():
    module = cpu_ext.get()
    if module is None:
        pytest.skip("the C++ passes did not build on this machine (a warning says why)")
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 70_000, 300_001])
def test_kth_abs_matches_kthvalue(ext, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=dtype)
    if n > 10:
        x[: n // 5] = 0.0  # a block of ties at zero, and signed duplicates
        x[n // 5: n // 4] = -x[n // 4: n // 4 + (n // 4 - n // 5)]
    mags = x.abs()
    for k in sorted({1, max(1, n // 5), max(1, n // 5 + 1), max(1, n // 2), max(1, (4 * n) // 5), n}):
        got = ext.kth_abs(x, k)
        want = torch.kthvalue(mags, k).values.item()
        assert got == want, (k, got, want)


def test_kth_abs_refuses_bad_rank(ext):
    with pytest.raises(RuntimeError, match="outside"):
        ext.kth_abs(torch.ones(5), 6)
    with pytest.raises(RuntimeError, match="outside"):
        ext.kth_abs(torch.ones(5), 0)


def test_kth_smallest_uses_the_exact_select(ext):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50_000, generator=g)  # above _KTH_DIRECT: the C++ path
    for k in (1, 77_777, 150_000):
        assert Fn.kth_smallest(x, k, absolute=True).item() == torch.kthvalue(x.abs().flatten(), k).values.item()


def _torch_multiplier(v, t, mode):
    m = v.abs()
    return m * (m > t) if mode == "magnitude" else (m - t).clamp_min(0)


@pytest.mark.parametrize("mode", ["magnitude", "soft"])
@pytest.mark.parametrize("with_base", [True, False])
def test_apply_multiplier_matches_torch(ext, mode, with_base):
    g = torch.Generator().manual_seed(1)
    out = torch.randn(3, 40_000, generator=g)
    base = torch.randn(3, 40_000, generator=g) if with_base else None
    levels, sparse = [0.7, float("nan"), 0.2], [True, False, True]
    want = out.clone()
    for s in range(3):
        if sparse[s]:
            want[s] = want[s] * _torch_multiplier(want[s], levels[s], mode)
        if base is not None:
            want[s] = want[s] + base[s]
    got = out.clone()
    ext.apply_multiplier(got, base, levels, sparse, mode == "magnitude")
    assert torch.equal(got, want)  # same ops, same rounding (no FMA contraction)


@pytest.mark.parametrize("mode", ["magnitude", "soft"])
@pytest.mark.parametrize("update", [True, False])
def test_competition_grad_matches_torch(ext, mode, update):
    g = torch.Generator().manual_seed(2)
    kp = torch.randn(2, 30_000, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 30_000, generator=g, dtype=torch.float64)
    levels, sparse = [0.9, float("nan")], [True, False]
    mult = torch.stack([_torch_multiplier(kp[0], levels[0], mode), torch.ones_like(kp[1])])
    kp_got, grad_got = kp.clone(), grad.clone()
    ext.competition_grad(kp_got, grad_got, levels, sparse, mode == "magnitude", update)
    assert torch.equal(grad_got, grad * mult)
    assert torch.equal(kp_got, kp * mult if update else kp)


def _factors(S, P, n_in, n_out, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(S, P, n_in, d, generator=g, dtype=dtype) * 2 - 1) / math.sqrt(n_in)
    B = (torch.rand(S, P, n_out, d, generator=g, dtype=dtype) * 2 - 1) / math.sqrt(n_out)
    B[0, 0, 3] = A[0, 0, 5]  # a zero distance: clamped, passes no gradient
    scalars = [torch.rand(S, generator=g, dtype=dtype) + 0.5 for _ in range(3)]
    return A, B, scalars


@pytest.mark.parametrize("kernel", ["mixed", "piecewise"])
@pytest.mark.parametrize("mode", ["magnitude", "soft"])
def test_kernel_forward_backward_same_with_and_without_cpp(ext, monkeypatch, kernel, mode):
    """Large enough for the C++ select (> _KTH_DIRECT entries), several ragged blocks, mixed levels."""
    S, P, n_in, n_out, d = 3, 2, 150, 260, 4
    monkeypatch.setattr(kv, "BLOCK_ELEMENTS", S * P * n_out * 64)  # blocks of 64 columns: 64, 64, 22
    A, B, scalars = _factors(S, P, n_in, n_out, d, torch.float64, seed=3)
    alpha, gamma, beta = scalars if kernel == "mixed" else (None, None, None)
    c = Fn.chunk_coefficients(P, dtype=torch.float64)
    base = torch.randn(S, n_out, n_in, dtype=torch.float64)
    grad = torch.randn(S, n_out, n_in, dtype=torch.float64)
    sparsity = [0.8, 0.0, 0.35]
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("SNELLA_CPU_EXTENSION", setting)
        out, thresholds, _ = kv.kernel_forward(A, B, c, alpha, gamma, beta, kernel, mode, sparsity, base=base)
        blocks = []
        grads = kv.kernel_backward(grad, A, B, c, alpha, gamma, beta, kernel, mode, sparsity, thresholds,
                                   block_hook=lambda j, delta: blocks.append(delta.clone()))
        results[setting] = (out, thresholds, grads, torch.cat(blocks, -1))
    (out1, t1, g1, d1), (out0, t0, g0, d0) = results["1"], results["0"]
    torch.testing.assert_close(t1, t0, rtol=0, atol=0, equal_nan=True)  # the same exact selection
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(d1, d0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    kept = (d1[0] != 0).sum().item()
    assert kept == pytest.approx(0.2 * n_out * n_in, abs=2)  # the selection kept the right count


def test_setting_off_and_invalid(monkeypatch):
    monkeypatch.setenv("SNELLA_CPU_EXTENSION", "0")
    assert cpu_ext.get() is None and not cpu_ext.usable(torch.ones(2))
    monkeypatch.setenv("SNELLA_CPU_EXTENSION", "yes")
    with pytest.raises(ValueError, match="'yes'.*0 \\(off\\), 1 \\(required\\), auto"):
        cpu_ext.get()


def test_failed_build_warns_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setattr(cpu_ext, "_tried", False)
    monkeypatch.setattr(cpu_ext, "_module", None)
    monkeypatch.setenv("SNELLA_CPU_EXTENSION", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_ext.get() is None
    assert any("no compiler here" in str(w.message) for w in caught)
    assert not cpu_ext.usable(torch.ones(2))
    monkeypatch.setattr(cpu_ext, "_tried", False)
    monkeypatch.setenv("SNELLA_CPU_EXTENSION", "1")
    with pytest.raises(RuntimeError, match="no compiler here"):
        cpu_ext.get()
