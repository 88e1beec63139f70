"""The CUDA path of the adapted layers against the CPU float64 path: outputs, factor gradients, the
competition's mask, bf16 autocast. Skipped without CUDA (``-m gpu`` selects these)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import spec_reference as ref
from snella import SnellaConfig
from snella.layer import SnellaConv2d, SnellaLinear

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU machine)")]


def layer_pair(base: nn.Module, **config):
    """The same adapted layer twice: float64 on the CPU (the reference) and float32 on CUDA."""
    torch.manual_seed(0)
    with torch.no_grad():
        base.weight.normal_(0.0, 0.02)
    wrap = SnellaConv2d if isinstance(base, nn.Conv2d) else SnellaLinear
    split = isinstance(base, nn.Linear) and base.out_features == 3 * base.in_features
    cpu = wrap(copy.deepcopy(base).double())
    cpu.update_layer("default", SnellaConfig(**{"r": 8, "sparsity": 0.6, **config}), split=split, layer_name="blocks.0.attn.qkv")
    gpu = wrap(copy.deepcopy(base).cuda())
    gpu.update_layer("default", SnellaConfig(**{"r": 8, "sparsity": 0.6, **config}), split=split, layer_name="blocks.0.attn.qkv")
    with torch.no_grad():
        for a, b in zip(cpu.factors("default"), gpu.factors("default")):
            if a is not None:
                b.copy_(a.float())
    for s, level in enumerate((0.0, 0.5, 0.8)[:len(cpu.sparsity["default"])]):
        cpu.set_sparsity("default", s, level)
        gpu.set_sparsity("default", s, level)
    return cpu, gpu


@pytest.mark.parametrize("kind", ["qkv", "conv"])
@pytest.mark.parametrize("mode", ["magnitude", "soft"])
def test_cuda_matches_the_cpu_float64_layer(kind, mode):
    base = nn.Linear(64, 192) if kind == "qkv" else nn.Conv2d(8, 16, 3, padding=1, groups=2)
    cpu, gpu = layer_pair(base, competition=mode)
    x = torch.randn(4, 10, 64) if kind == "qkv" else torch.randn(2, 8, 9, 9)
    y_cpu = cpu(x.double())
    y_gpu = gpu(x.cuda())
    torch.testing.assert_close(y_gpu.double().cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    up = torch.randn_like(y_cpu)
    g_cpu = torch.autograd.grad(y_cpu, [f for f in cpu.factors("default") if f is not None], up)
    g_gpu = torch.autograd.grad(y_gpu, [f for f in gpu.factors("default") if f is not None], up.float().cuda())
    for a, b in zip(g_gpu, g_cpu):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-3, atol=1e-6 * float(b.abs().max()))
    # the mask: the same count of zeros per matrix as the transcription's
    dW = gpu.get_delta_weight("default").detach().cpu()
    want = ref.update("mixed", mode, cpu.sparsity["default"], *[None if f is None else f.detach()
                      for f in cpu.factors("default")[:2]], ref.coefficients(2),
                      *[f.detach() for f in cpu.factors("default")[2:]])
    assert int((dW == 0).sum()) == int((want == 0).sum())


def test_cuda_bf16_autocast_keeps_the_effect():
    cpu, gpu = layer_pair(nn.Linear(384, 1152), r=32)
    x = torch.randn(4, 50, 384, device="cuda")
    with torch.no_grad():
        y32 = gpu(x)
        gpu.disable_adapters = True
        y0 = gpu(x)
        gpu.disable_adapters = False
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y16 = gpu(x)
            gpu.disable_adapters = True
            y016 = gpu(x)
            gpu.disable_adapters = False
    a, b = (y16.double() - y016.double()).flatten(), (y32.double() - y0.double()).flatten()
    assert float(a @ b / (a.norm() * b.norm())) >= 0.99
