"""The library's update against an independent transcription of SPEC.md (tests/spec_reference.py):
every kernel, the competition at every sparsity (0 included), the layers' forward, merge and factor
gradients, and what the layers do with the sparsities the budget allocator hands out."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import spec_reference as ref
from snella import SnellaConfig, get_snella_model
from snella import functional as Fn
from snella.allocator import AllocatorConfig, BudgetAllocator
from snella.layer import SnellaConv2d, SnellaLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def init_factors(S, P, n_in, n_out, r, seed=0, dtype=torch.float64):
    """Factors at their init scale (Kaiming-uniform, a = sqrt(5), on (P, n, r/P): bound 1/sqrt(n r/P))
    and scalars near (1, 1, 0), perturbed so that none of them is exactly at its init value."""
    g = torch.Generator().manual_seed(seed)
    d = r // P
    A = (torch.rand(S, P, n_in, d, generator=g, dtype=dtype) * 2 - 1) / math.sqrt(n_in * d)
    B = (torch.rand(S, P, n_out, d, generator=g, dtype=dtype) * 2 - 1) / math.sqrt(n_out * d)
    alpha = 1 + 0.1 * torch.randn(S, generator=g, dtype=dtype)
    gamma = 1 + 0.1 * torch.randn(S, generator=g, dtype=dtype)
    beta = 1e-3 * torch.randn(S, generator=g, dtype=dtype)
    return A, B, alpha, gamma, beta


@pytest.mark.parametrize("kernel", Fn.KERNELS)
def test_every_kernel_equals_the_transcription(kernel):
    A, B, alpha, gamma, beta = init_factors(3, 2, 11, 7, 8)
    alpha, gamma, beta = (alpha, gamma, beta) if kernel in Fn.SCALAR_KERNELS else (None, None, None)
    c = ref.coefficients(2)
    got = Fn.kernel_delta(kernel, A, B, c, alpha, gamma, beta)  # (3, 7, 11)
    for s in range(3):
        scal = [None if v is None else v[s] for v in (alpha, gamma, beta)]
        torch.testing.assert_close(got[s], ref.kernel(kernel, A[s], B[s], c, *scal), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", ["magnitude", "soft"])
@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.5, 0.93])
def test_competition_equals_the_transcription_at_every_sparsity(mode, sparsity):
    g = torch.Generator().manual_seed(3)
    K = 1e-3 * torch.randn(40, 30, generator=g, dtype=torch.float64)
    torch.testing.assert_close(Fn.sparsify(K, sparsity, mode), ref.compete(K, sparsity, mode), rtol=1e-12, atol=0)


def test_sparsity_zero_keeps_the_competition_form():
    """SPEC 4: at s = 0 the authors' update is K' * |K'| without its smallest entry (strict > against the
    minimum); the soft one is K' * (m - min m). Plain K' would be about 1/|K'| times larger."""
    g = torch.Generator().manual_seed(4)
    K = 2e-3 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    m = K.abs()
    hand = K * m
    hand.view(-1)[m.view(-1).argmin()] = 0.0
    assert torch.equal(Fn.sparsify(K, 0.0, "magnitude"), hand)
    assert torch.equal(Fn.sparsify(K, 0.0, "soft"), K * (m - m.min()))
    assert torch.equal(Fn.sparsify(K, 0.0, "none"), K)
    with pytest.raises(ValueError, match="competition='none' keeps every entry"):
        Fn.sparsify(K, 0.3, "none")


def realistic_linear(n_in=96, n_out=64, split=False, seed=0, **config) -> SnellaLinear:
    """A Linear with W0 ~ N(0, 0.02) wrapped at the library's own init (the factors are not rescaled)."""
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out).double()
    with torch.no_grad():
        base.weight.normal_(0.0, 0.02)
    layer = SnellaLinear(base)
    layer.update_layer("default", SnellaConfig(**{"r": 8, **config}), split=split, layer_name="blocks.0.attn.qkv")
    return layer


def test_update_is_continuous_as_sparsity_goes_to_zero():
    layer = realistic_linear()
    deltas = {}
    for s in (0.01, 0.003, 0.001, 0.0):
        layer.set_sparsity("default", 0, s)
        deltas[s] = layer.get_delta_weight("default").detach()
    at_zero = deltas[0.0].norm()
    gaps = [float((deltas[s] - deltas[0.0]).norm() / at_zero) for s in (0.01, 0.003, 0.001)]
    # dropping the smallest 1% (0.3%, 0.1%) of the entries moves the update by about 1% (0.3%, 0.1%)
    assert gaps[0] < 0.03 and gaps[2] < 0.005 and gaps[0] >= gaps[1] >= gaps[2]
    dense = Fn.kernel_delta("mixed", *layer.factors("default")[:2], layer.coefficients("default", torch.device("cpu")),
                            *layer.factors("default")[2:])
    # plain K' at s = 0 would be about 1/|K'| ~ out = 64 times larger (768 on ViT-B): the check can fail
    assert float(dense.detach().norm() / at_zero) > 30


def check_layer(layer, x, kernel, mode, levels, conv=None):
    """Forward output, merge and every factor gradient of ``layer`` against autograd through the
    transcription, in float64."""
    for s, level in enumerate(levels):
        layer.set_sparsity("default", s, level)
    factors = [f for f in layer.factors("default")]
    leaves = [None if f is None else f.detach().clone().requires_grad_() for f in factors]
    c = None if kernel not in ("mixed", "piecewise") else ref.coefficients(2)
    dW = ref.update(kernel, mode, levels, *leaves[:2], c, *leaves[2:])  # (out, fan_in)
    W0, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    if conv is None:
        y_ref = x @ (W0 + dW).T + b
    else:
        y_ref = torch.nn.functional.conv2d(x, W0 + dW.view(W0.shape), b, conv.stride, conv.padding, conv.dilation,
                                           conv.groups)
    y = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.get_delta_weight("default"), dW.detach().view(W0.shape), rtol=1e-9, atol=1e-15)
    upstream = torch.randn_like(y)
    wanted = [f for f in factors if f is not None]
    got = torch.autograd.grad(y, wanted, upstream)
    want = torch.autograd.grad(y_ref, [leaf for leaf in leaves if leaf is not None], upstream)
    for name, a, w in zip("A B alpha gamma beta".split(), got, want):
        torch.testing.assert_close(a, w, rtol=1e-8, atol=1e-10 * max(1.0, float(w.abs().max())), msg=name)


@pytest.mark.parametrize("kernel", Fn.KERNELS)
@pytest.mark.parametrize("mode", ["magnitude", "soft"])
def test_split_qkv_layer_equals_the_transcription_at_zero_and_above(kernel, mode):
    """The q, k, v matrices at s = 0, 0.4 and 0.8: output, merge and gradients (A, B, the scalars)."""
    layer = realistic_linear(96, 3 * 96, split=True, kernel=kernel, competition=mode, sparsity=0.4)
    x = torch.randn(2, 5, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    check_layer(layer, x, kernel, mode, (0.0, 0.4, 0.8))


def test_dense_kernel_without_competition_equals_the_transcription():
    layer = realistic_linear(competition="none")
    x = torch.randn(4, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    check_layer(layer, x, "mixed", "none", (0.0,))
    with pytest.raises(ValueError, match="competition='none'"):
        layer.set_sparsity("default", 0, 0.5)
    with pytest.raises(ValueError, match="competition"):
        SnellaConfig(competition="none", sparsity=0.5)


@pytest.mark.parametrize("level", [0.0, 0.6])
def test_conv_layer_equals_the_transcription(level):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2).double()
    with torch.no_grad():
        conv.weight.normal_(0.0, 0.02)
    layer = SnellaConv2d(conv)
    layer.update_layer("default", SnellaConfig(r=8, sparsity=level), split=False, layer_name="conv")
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_layer(layer, x, "mixed", "magnitude", (level,), conv=conv)


def test_layers_apply_the_allocators_sparsities_including_a_capped_matrix():
    """On a real (tiny) ViT: the allocator caps the highest-scored matrix at full density (s = 0); every
    layer then computes the transcription at the sparsity the allocator gave its matrix, and the
    frobenius score reads exactly those updates."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=3, num_classes=5).double()
    wrapped = get_snella_model(model, SnellaConfig(r=8, sparsity=0.5))
    matrices = wrapped.matrices()
    assert len(matrices) == 12  # q, k, v, proj, fc1, fc2 of two blocks
    allocator = BudgetAllocator(matrices, AllocatorConfig(target_sparsity=0.5, init_sparsity=0.01, score="frobenius"),
                                total_steps=4, steps_per_epoch=1)
    scores = torch.full((12,), 0.2 / 11, dtype=torch.float64)
    scores[3] = 0.8  # blocks.0.attn.proj: far more than its share of the budget, so capped
    budgets = allocator.reallocate(3, scores)
    assert budgets[3] == matrices[3].numel
    layers = wrapped.snella_layers()
    for m, budget in zip(matrices, budgets):
        level = m.get_sparsity()
        assert level == pytest.approx(1 - budget / m.numel)
        layer_name, _, part = m.name.rpartition(".") if m.name.endswith((".q", ".k", ".v")) else (m.name, "", "")
        layer = layers[layer_name]
        A, B, alpha, gamma, beta = (f.detach() for f in layer.factors("default"))
        s = m.segment
        want = ref.compete(ref.mixed(A[s], B[s], ref.coefficients(2), alpha[s], gamma[s], beta[s]), level, "magnitude")
        torch.testing.assert_close(m.delta(), want, rtol=1e-9, atol=1e-16)
        zeros = int((m.delta() == 0).sum())
        assert zeros == math.floor(level * (m.numel - 1)) + 1  # the minimum is dropped at s = 0 too
    assert matrices[3].get_sparsity() == 0.0
    want_scores = torch.tensor([float(m.delta().norm()) for m in matrices], dtype=torch.float64)
    torch.testing.assert_close(allocator.compute_scores(), want_scores / want_scores.sum())
