"""The selection the CUDA torch path uses (``functional.kth_smallest_on_device``: no host sync) gives the
thresholds and masks of the CPU's sampled/C++ selection bit for bit (run here on CPU tensors)."""

import pytest
import torch

from snella import functional as Fn


@pytest.mark.parametrize("extension", ["auto", "0"])  # the C++ radix select, and the sampled bracket in torch
@pytest.mark.parametrize("absolute", [True, False])
def test_device_selection_equals_the_cpu_selection(monkeypatch, extension, absolute):
    monkeypatch.setenv("SNELLA_CPU_EXTENSION", extension)
    monkeypatch.setenv("SNELLA_TRITON", "0")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(640, 300, generator=g) * 1e-3  # 192,000 values: above the direct-kthvalue size
    x[:, ::4] = x[:, 1::4]  # ties
    x[:7] = 0.0
    values = x if absolute else x.abs()
    n = x.numel()
    for k in (1, 2, n // 5, n // 2, n - 3, n):
        want = Fn.kth_smallest(values, k, absolute=absolute)
        got = Fn.kth_smallest_on_device(values, k, absolute=absolute)
        assert torch.equal(got, want), k


@pytest.mark.parametrize("mode", ["magnitude", "soft"])
def test_masks_from_the_device_threshold_equal_the_cpu_ones(monkeypatch, mode):
    """The same threshold gives the same sparse update: ``apply_competition`` on either is identical."""
    monkeypatch.setenv("SNELLA_TRITON", "0")
    delta = torch.randn(400, 200, generator=torch.Generator().manual_seed(1))
    for level in (0.0, 0.3, 0.8, 0.97):
        k, frac = Fn.quantile_rank(delta.numel(), level)
        t_cpu = Fn.selection_threshold(delta, level, mode, absolute=True)
        v = Fn.kth_smallest_on_device(delta, k, absolute=True)
        if mode == "soft" and frac > 0:
            v = v + frac * (Fn.kth_smallest_on_device(delta, k + 1, absolute=True) - v)
        assert torch.equal(v, t_cpu)
        assert torch.equal(Fn.apply_competition(delta, v, mode), Fn.apply_competition(delta, t_cpu, mode))
