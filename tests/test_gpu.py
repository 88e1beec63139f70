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


@pytest.mark.parametrize("path", ["0", "1"])  # the torch passes, the Triton passes
@pytest.mark.parametrize("mode", ["magnitude", "soft"])
def test_a_training_step_issues_no_host_sync(monkeypatch, path, mode):
    """Forward, backward and the optimizer step of adapted layers (a split qkv and a single matrix) run
    with CUDA's sync debug mode set to raise: no .item(), no data-dependent shape, no blocking copy."""
    monkeypatch.setenv("SNELLA_TRITON", path)
    _, qkv = layer_pair(nn.Linear(192, 576), r=32, competition=mode)
    _, fc = layer_pair(nn.Linear(192, 768), r=32, competition=mode)
    params = [p for layer in (qkv, fc) for p in layer.factors("default") if p is not None]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randn(4, 50, 192, device="cuda")

    def step():
        loss = fc(qkv(x)[..., :192]).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # compiles the kernels, warms the allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


VIT_B = {"qkv": (3, 768, 768), "proj": (1, 768, 768), "fc1": (1, 3072, 768), "fc2": (1, 768, 3072)}


@pytest.mark.parametrize("name", list(VIT_B))
@pytest.mark.parametrize("mode", ["magnitude", "soft"])
def test_triton_matches_torch_at_vit_b_sizes(monkeypatch, name, mode):
    """The Triton passes against the torch passes on ViT-B's matrices (rank 32, sparsity 0.8; the
    split qkv at 0, 0.5, 0.8): update, thresholds, the mask up to entries at the threshold's
    rounding, every gradient; and the radix select against torch.kthvalue, bit for bit."""
    from snella import functional as Fn
    from snella import kernel_vjp
    from snella.gpu.select import kth_abs

    S, n_out, n_in = VIT_B[name]
    g = torch.Generator().manual_seed(0)
    A = ((torch.rand(S, 2, n_in, 16, generator=g) * 2 - 1) * 0.2).cuda()
    B = ((torch.rand(S, 2, n_out, 16, generator=g) * 2 - 1) * 0.2).cuda()
    scal = [t.cuda() for t in (torch.ones(S) * 1.1, torch.ones(S) * 0.9, torch.full((S,), 0.01))]
    c = Fn.chunk_coefficients(2, device="cuda")
    levels = [0.0, 0.5, 0.8][:S] if S == 3 else [0.8]
    grad = torch.randn(S, n_out, n_in, generator=g).cuda()
    results = {}
    for path in ("0", "1"):
        monkeypatch.setenv("SNELLA_TRITON", path)
        delta, thr, _ = kernel_vjp.kernel_forward(A, B, c, *scal, "mixed", mode, levels)
        grads = kernel_vjp.kernel_backward(grad, A, B, c, *scal, "mixed", mode, levels, thr)
        results[path] = (delta, thr, grads)
    (d0, t0, g0), (d1, t1, g1) = results["0"], results["1"]
    scale = float(d0.abs().max())
    torch.testing.assert_close(d1, d0, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-7)
    flips = ((d0 != 0) != (d1 != 0)).sum().item()
    assert flips <= 1e-5 * d0.numel()
    for label, a, b in zip(("A", "B", "alpha", "gamma", "beta"), g1, g0):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4 * float(b.abs().max()), msg=label)
    flat = d0.reshape(S, -1).abs().contiguous()
    ks = [max(1, int(level * flat.shape[1])) for level in levels]
    want = torch.stack([torch.kthvalue(flat[s], k).values for s, k in enumerate(ks)])
    assert torch.equal(kth_abs(flat, ks), want)
