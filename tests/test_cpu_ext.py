"""The C++ competition passes (snella/cpu_ext.py, csrc/fused_kernel.cpp) against their torch formulas,
and the kernel's forward/backward with and without them."""

import contextlib
import math
import sys
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


@pytest.fixture(scope="module")
def serial_ext(ext):
    """The one-thread build (no OpenMP) of the same source, as used where the compiler lacks OpenMP."""
    if cpu_ext.build_info()["variant"] == "serial":
        return ext
    try:
        return cpu_ext._build(None)
    except Exception as error:  # pragma: no cover - the OpenMP build worked, so this one should
        pytest.skip(f"the one-thread build failed: {error}")


@contextlib.contextmanager
def torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
    monkeypatch.setattr(cpu_ext, "_info", dict(cpu_ext._info))
    monkeypatch.setenv("SNELLA_CPU_EXTENSION", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_ext.get() is None
    assert any("no compiler here" in str(w.message) for w in caught)
    assert not cpu_ext.usable(torch.ones(2)) and cpu_ext.build_info()["variant"] is None
    monkeypatch.setattr(cpu_ext, "_tried", False)
    monkeypatch.setenv("SNELLA_CPU_EXTENSION", "1")
    with pytest.raises(RuntimeError, match="no compiler here"):
        cpu_ext.get()


# --- threads: the OpenMP build, and the same results for 1 and 2 threads and for the one-thread build ---

def test_build_reports_openmp_and_uses_torchs_threads(ext):
    info, par = cpu_ext.build_info(), ext.parallel_info()
    assert info["variant"] in ("openmp", "serial")
    assert par["openmp"] == (info["variant"] == "openmp")
    if not par["openmp"]:
        pytest.skip(f"the one-thread build is in use ({info['why_serial']}): no OpenMP threads to check")
    assert info["runtime"] in cpu_ext.openmp_runtimes()
    for n in (1, 2):
        with torch_threads(n):
            par = ext.parallel_info()
            # omp_max_threads follows torch.set_num_threads: the extension shares torch's OpenMP runtime
            assert (par["num_threads"], par["omp_max_threads"], par["threads_used"]) == (n, n, n)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_extension_brings_no_openmp_runtime_of_its_own(ext):
    """The extension uses torch's libgomp, never the system one that a plain ``-fopenmp`` link adds.
    (Other packages may map their own vendored copy, e.g. scikit-learn's ``scikit_learn.libs/libgomp-*``
    once it is imported: not the extension's doing, so not counted.)"""
    runtimes = cpu_ext.openmp_runtimes()
    system = [r for r in runtimes if r.startswith(("/usr/lib", "/lib"))]
    assert not system, runtimes
    if cpu_ext.build_info()["variant"] == "openmp":
        assert cpu_ext.build_info()["runtime"] in runtimes
        # the extension's own OpenMP calls resolve to torch's runtime
        import ctypes
        address = ctypes.cast(ctypes.CDLL(ext.__file__).omp_get_max_threads, ctypes.c_void_p).value
        assert cpu_ext._library_of(address) == cpu_ext._torch_openmp_runtime()[0]


def test_serial_build_has_no_openmp(serial_ext):
    par = serial_ext.parallel_info()
    assert not par["openmp"] and par["threads_used"] == 1
    with torch_threads(2):
        assert serial_ext.parallel_info()["threads_used"] == 1


# 1 slab below 2 * 131072 values (kSelectSlab), 2 above; odd sizes so the slabs differ in length.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [7, 65_537, 262_143, 262_147, 768 * 768 + 1, 2304 * 768])
def test_kth_abs_same_for_any_thread_count(ext, serial_ext, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=dtype)
    if n > 10:  # ties across the slab boundary: zeros, and signed duplicates at the far end
        x[n // 3: n // 2 + 5] = 0.0
        x[-(n // 10):] = -x[: n // 10]
    mags = x.abs()
    for k in sorted({min(n, max(1, k)) for k in (1, n // 10, n // 3 + 1, n // 2, n // 2 + 7, n - n // 10, n)}):
        want = torch.kthvalue(mags, k).values.item()
        got = []
        for threads in (1, 2):
            with torch_threads(threads):
                got += [ext.kth_abs(x, k), serial_ext.kth_abs(x, k)]
        assert got == [want] * 4, (k, got, want)


# Rows of M entries, 3 of them with one skipped (dense, no base): totals below, at and above the
# 32768-entry grain, with the threads' split falling inside a row.
@pytest.mark.parametrize("M", [1, 7, 16_384, 16_385, 32_768, 100_003])
@pytest.mark.parametrize("mode", ["magnitude", "soft"])
def test_masking_passes_same_for_any_thread_count(ext, serial_ext, M, mode):
    g = torch.Generator().manual_seed(M)
    kp = torch.randn(3, M, generator=g)
    grad = torch.randn(3, M, generator=g)
    base = torch.randn(3, M, generator=g)
    levels, sparse, magnitude = [0.6, float("nan"), 0.3], [True, False, True], mode == "magnitude"
    mult = torch.stack([_torch_multiplier(kp[0], levels[0], mode), torch.ones(M), _torch_multiplier(kp[2], levels[2], mode)])
    want_out, want_grad, want_kp = kp * mult + base, grad * mult, kp * mult
    want_nobase = kp * mult
    for module in (ext, serial_ext):
        for threads in (1, 2):
            with torch_threads(threads):
                out = kp.clone()
                module.apply_multiplier(out, base, levels, sparse, magnitude)
                assert torch.equal(out, want_out), (threads, module)
                out = kp.clone()
                module.apply_multiplier(out, None, levels, sparse, magnitude)
                assert torch.equal(out, want_nobase), (threads, module)
                k2, g2 = kp.clone(), grad.clone()
                module.competition_grad(k2, g2, levels, sparse, magnitude, True)
                assert torch.equal(g2, want_grad) and torch.equal(k2, want_kp), (threads, module)
                k2, g2 = kp.clone(), grad.clone()
                module.competition_grad(k2, g2, levels, sparse, magnitude, False)
                assert torch.equal(g2, want_grad) and torch.equal(k2, kp), (threads, module)


def test_failed_openmp_build_falls_back_to_one_thread(ext, serial_ext, monkeypatch):
    import torch.utils.cpp_extension as cpp

    real_load = cpp.load

    def no_openmp(**kwargs):
        if "-fopenmp" in kwargs.get("extra_cflags", []):
            raise RuntimeError("c++: error: unsupported option '-fopenmp'")
        return real_load(**kwargs)

    monkeypatch.setattr(cpp, "load", no_openmp)
    monkeypatch.setattr(cpu_ext, "_info", dict(cpu_ext._info))
    monkeypatch.setenv("SNELLA_CPU_EXTENSION", "auto")
    for openmp_setting, why in (("auto", "unsupported option '-fopenmp'"), ("0", "SNELLA_CPU_OPENMP=0")):
        monkeypatch.setenv("SNELLA_CPU_OPENMP", openmp_setting)
        monkeypatch.setattr(cpu_ext, "_tried", False)
        monkeypatch.setattr(cpu_ext, "_module", None)
        module = cpu_ext.get()
        info = cpu_ext.build_info()
        assert module is not None and not module.parallel_info()["openmp"]
        assert info["variant"] == "serial" and info["runtime"] is None
        if openmp_setting == "0" or cpu_ext._torch_openmp_runtime()[0] is not None:  # else torch's reason
            assert why in info["why_serial"]
        with torch_threads(2):
            assert module.parallel_info()["threads_used"] == 1
    monkeypatch.setenv("SNELLA_CPU_OPENMP", "yes")
    monkeypatch.setattr(cpu_ext, "_tried", False)
    with pytest.raises(ValueError, match="SNELLA_CPU_OPENMP='yes'"):
        cpu_ext.get()


def test_cpu_passes_bench_runs(ext, capsys):
    from snella.bench import cpu_passes

    cpu_passes.main(["--repeats", "1", "--threads", "1", "2"])
    out = capsys.readouterr().out
    assert "| kth_abs 3072x768 |" in out and "| competition_grad 3072x768 |" in out and "load average" in out
