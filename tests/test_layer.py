"""Tests of the adapted layers: Conv2d of every geometry and Linear, against plain-autograd references."""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import spec_reference as ref
from snella import SnellaConfig
from snella import functional as Fn
from snella.layer import SnellaConv2d, SnellaLayer, SnellaLinear

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # torch's own note on the 'same' conv with an even kernel, which these tests use on purpose
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")]


def timm_same_conv() -> nn.Module:
    from timm.layers import create_conv2d

    conv = create_conv2d(4, 6, 3, stride=2, padding="same")  # timm's dynamic TF-style 'same' (Conv2dSame)
    assert type(conv).__name__ == "Conv2dSame"
    return conv


CONVS: dict[str, Callable[[], nn.Module]] = {
    "1x1": lambda: nn.Conv2d(4, 6, 1),
    "3x3-stride2-pad1": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "dilation2": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2),
    "groups2": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6),
    "same-even-kernel": lambda: nn.Conv2d(4, 6, (3, 4), padding="same"),  # pads W by 1 left, 2 right
    "same-dilation2": lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "circular-stride2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, padding_mode="circular"),
    "no-bias": lambda: nn.Conv2d(4, 6, 3, padding=1, bias=False),
    "valid-stride2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding="valid"),
    "timm-same-stride2": timm_same_conv,
}


def adapted(base: nn.Module, split: bool = False, seed: int = 0, **config) -> SnellaLayer:
    """``base`` wrapped with one adapter whose factors are seeded N(0, 0.25): an update of about a
    tenth of the base weight, large enough that a wrong index or padding shows in the output."""
    torch.manual_seed(seed)
    layer = SnellaConv2d(base) if isinstance(base, nn.Conv2d) else SnellaLinear(base)
    layer.update_layer("default", SnellaConfig(**{"r": 4, "chunks": 2, "sparsity": 0.3, **config}),
                       split=split, layer_name="layer")
    with torch.no_grad():
        for p in layer.factors("default")[:2]:
            p.normal_(0.0, 0.5)
    return layer.eval()


def conv_input(conv: nn.Module, seed: int = 1) -> torch.Tensor:
    return torch.randn(3, conv.in_channels, 9, 9, generator=torch.Generator().manual_seed(seed))


def with_weight(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = "keep") -> Callable:
    """``module``'s own forward (padding modes, 'same', Conv2dSame) run with another weight (and bias)."""
    params = {"weight": weight}
    if bias != "keep":
        params["bias"] = bias
    return lambda x: functional_call(module, params, (x,))


def reference_delta(layer: SnellaLayer, factors: tuple, config: SnellaConfig) -> torch.Tensor:
    """The sparse update by plain autograd through SPEC.md transcribed, in the base weight's shape."""
    A, B, alpha, gamma, beta = factors
    coefficients = ref.coefficients(config.chunks, config.chunk_scale, dtype=A.dtype)
    delta = ref.update(config.kernel, config.competition, layer.sparsity["default"], A, B, coefficients,
                       alpha, gamma, beta)  # (out, fan_in): SPEC.md transcribed, not the library's kernels
    return delta.reshape(layer.base_layer.weight.shape)


# ---------------------------------------------------------------- Conv2d


@pytest.mark.parametrize("name", CONVS)
def test_conv_factor_shapes_cover_one_group(name):
    conv = CONVS[name]()
    layer = adapted(conv)
    kh, kw = conv.kernel_size
    fan_in = conv.in_channels // conv.groups * kh * kw
    assert tuple(layer.snella_A["default"].shape) == (1, 2, fan_in, 2)  # (S, P, in/groups*kh*kw, r/P)
    assert tuple(layer.snella_B["default"].shape) == (1, 2, conv.out_channels, 2)
    assert layer.get_delta_weight("default").shape == conv.weight.shape


@pytest.mark.parametrize("name", CONVS)
def test_conv_fused_and_parallel_paths_equal_the_merged_conv(name):
    conv = CONVS[name]()
    x = conv_input(conv)
    w0 = conv.weight.detach().clone()
    y_base = conv(x).detach()
    layer = adapted(copy.deepcopy(conv))
    with torch.no_grad():
        delta = layer.get_delta_weight("default")
        assert delta.abs().max() > 0.05 * w0.abs().max()  # the update is not negligible
        y_ref = with_weight(conv, w0 + delta)(x)  # the base conv, its own padding logic, W0 + dW
        y = layer(x)
        assert y.shape == y_base.shape
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        assert (y - y_base).abs().max() > 1e-2

        # the parallel path (chosen by dropout / drop-path) is the same map once they are off, in eval
        parallel = adapted(copy.deepcopy(conv), adapter_dropout=0.3, adapter_drop_path=0.3)
        torch.testing.assert_close(parallel(x), y_ref, atol=1e-5, rtol=1e-5)

        # merged: the base conv itself with W0 + dW, the same output
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight, w0 + delta, atol=0, rtol=0)
        torch.testing.assert_close(layer(x), y_ref, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["3x3-stride2-pad1", "depthwise", "reflect", "timm-same-stride2"])
def test_conv_parallel_path_in_training_applies_dropout_and_drop_path_to_the_adapter_only(name):
    conv = CONVS[name]()
    x = conv_input(conv)
    p_drop, p_path = 0.3, 0.5
    layer = adapted(copy.deepcopy(conv), adapter_dropout=p_drop, adapter_drop_path=p_path).train()
    with torch.no_grad():
        delta = layer.get_delta_weight("default")
        torch.manual_seed(3)
        y = layer(x)
        torch.manual_seed(3)  # the layer draws the dropout mask first, then the per-sample drop-path mask
        z = F.dropout(x, p_drop, training=True)
        keep = torch.empty(x.shape[0], 1, 1, 1).bernoulli_(1 - p_path)
        update = with_weight(conv, delta, bias=None)(z)  # conv(dropout(x), dW), same padding, no bias
        y_ref = conv(x) + update * keep / (1 - p_path)
    assert 0 < keep.sum() < x.shape[0]  # this seed drops some samples' updates and keeps others
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def check_gradients(layer: SnellaLayer, x: torch.Tensor) -> None:
    """Gradients of x and every factor through the layer == plain autograd on op(x, W0 + delta(factors))."""
    config = layer.adapter_config["default"]
    base = layer.base_layer
    x1 = x.clone().requires_grad_(True)
    y = layer(x1)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    (y * g).sum().backward()

    leaves = [None if f is None else f.detach().clone().requires_grad_(True) for f in layer.factors("default")]
    x2 = x.clone().requires_grad_(True)
    y_ref = with_weight(base, base.weight + reference_delta(layer, tuple(leaves), config))(x2)
    (y_ref * g).sum().backward()

    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    for factor, ref in zip(layer.factors("default"), leaves):
        if factor is None:
            continue
        assert ref.grad.abs().max() > 0
        torch.testing.assert_close(factor.grad, ref.grad, rtol=1e-4, atol=1e-5 * ref.grad.abs().max().item())
    assert base.weight.grad is None  # the base stays frozen: no gradient computed for it


@pytest.mark.parametrize("name", CONVS)
def test_conv_factor_gradients_match_plain_autograd(name):
    conv = CONVS[name]().requires_grad_(False)
    check_gradients(adapted(conv), conv_input(conv))


@pytest.mark.parametrize("competition", ["magnitude", "soft"])
@pytest.mark.parametrize("kernel", Fn.KERNELS)
def test_conv_gradients_for_every_kernel(kernel, competition):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).requires_grad_(False)
    check_gradients(adapted(conv, kernel=kernel, competition=competition), conv_input(conv))


# ---------------------------------------------------------------- Linear


def test_linear_split_qkv_gradients_and_per_matrix_sparsity():
    base = nn.Linear(8, 24).requires_grad_(False)  # a fused qkv: out = 3 * in
    layer = adapted(base, split=True)
    for s, level in enumerate((0.0, 0.4, 0.8)):
        layer.set_sparsity("default", s, level)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))  # (batch, tokens, in)
    check_gradients(layer, x)
    delta = layer.get_delta_weight("default").detach()  # (24, 8): q rows, then k, then v
    assert [int((part == 0).sum()) for part in delta.chunk(3)] == [1, 26, 51]  # floor(s * 63) + 1 zeros, s = 0 too


def test_linear_parallel_path_in_training():
    base = nn.Linear(8, 6)
    layer = adapted(copy.deepcopy(base), adapter_dropout=0.25, adapter_drop_path=0.5).train()
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        delta = layer.get_delta_weight("default")
        torch.manual_seed(0)
        y = layer(x)
        torch.manual_seed(0)
        z = F.dropout(x, 0.25, training=True)
        keep = torch.empty(4, 1, 1).bernoulli_(0.5)
        y_ref = base(x) + F.linear(z, delta) * keep / 0.5
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, base.weight + delta, base.bias), atol=1e-6, rtol=1e-5)


def test_weight_property_is_the_effective_weight():
    """Code that reads ``layer.weight`` (timm's EVA/BEiT qkv) sees W0 + dW, or W0 when disabled/merged."""
    base = nn.Linear(8, 6)
    w0 = base.weight.detach().clone()
    layer = adapted(base)
    x = torch.randn(3, 8)
    delta = layer.get_delta_weight("default").detach()
    torch.testing.assert_close(layer.weight.detach(), w0 + delta, atol=0, rtol=0)
    assert layer.bias is base.bias
    torch.testing.assert_close(F.linear(x, layer.weight, layer.bias), layer(x), atol=1e-6, rtol=1e-6)
    F.linear(x, layer.weight, layer.bias).sum().backward()  # gradients reach the factors through .weight
    assert layer.snella_B["default"].grad.abs().sum() > 0
    layer.disable_adapters = True
    assert layer.weight is base.weight
    layer.disable_adapters = False
    layer.merge()
    assert layer.weight is base.weight  # merged: the update is already inside W0
    torch.testing.assert_close(layer.weight.detach(), w0 + delta, atol=0, rtol=0)
    layer.disable_adapters = True
    torch.testing.assert_close(layer.weight.detach(), w0, atol=1e-6, rtol=0)  # disabled: unmerged
    assert not layer.merged


def test_disabled_layer_is_the_base_layer_bit_for_bit():
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    layer = adapted(copy.deepcopy(conv))
    x = conv_input(conv)
    layer.disable_adapters = True
    with torch.no_grad():
        assert torch.equal(layer(x), conv(x))


def test_merge_twice_warns_and_adds_once():
    base = nn.Linear(8, 6)
    layer = adapted(base)
    layer.merge()
    merged = base.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(base.weight, merged)
    assert layer.merged_adapters == ["default"]


def test_safe_merge_refuses_non_finite_updates():
    base = nn.Linear(8, 6)
    w0 = base.weight.detach().clone()
    layer = adapted(base, kernel="linear", sparsity=0.0)
    with torch.no_grad():
        layer.snella_A["default"][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="'default'"):
        layer.merge(safe_merge=True)
    assert torch.equal(base.weight, w0) and not layer.merged


def test_layer_rejects_bad_sparsity_and_duplicate_adapters():
    layer = adapted(nn.Linear(8, 6))
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match=repr(bad)):
            layer.set_sparsity("default", 0, bad)
    assert layer.sparsity["default"] == [0.3]
    with pytest.raises(ValueError, match="'default' already exists"):
        layer.update_layer("default", SnellaConfig(r=4), split=False)


def test_layer_with_float64_base_keeps_float64_factors():
    layer = adapted(nn.Linear(8, 6).double())
    assert layer.snella_A["default"].dtype == torch.float64
    x = torch.randn(2, 8, dtype=torch.float64)
    assert layer(x).dtype == torch.float64


# ---------------------------------------------------------------- what the wrapper exposes, adapters re-added


@pytest.mark.parametrize("name", ["linear", *CONVS])
def test_layer_exposes_the_base_layer_attributes(name):
    """Code that reads ``in_features`` / ``kernel_size`` ... of a layer reads the base layer's, as with peft."""
    base = nn.Linear(8, 6) if name == "linear" else CONVS[name]()
    layer = adapted(base)
    if name == "linear":
        assert (layer.in_features, layer.out_features) == (8, 6)
        return
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(layer, attr) == getattr(base, attr), attr
    assert (layer.in_features, layer.out_features) == (base.in_channels, base.out_channels)


@pytest.mark.parametrize("second", [dict(chunks=4), dict(chunk_scale=0.5), dict(chunks=1, kernel="piecewise")])
def test_adapter_readded_under_its_name_gets_its_own_chunk_coefficients(second):
    """The coefficient cache must not hand a re-added adapter the coefficients of the one deleted."""
    layer = adapted(nn.Linear(8, 6))
    layer.get_delta_weight("default")  # fills the cache with chunks=2, chunk_scale=0.1
    layer.delete_adapter("default")
    config = SnellaConfig(**{"r": 4, "sparsity": 0.3, **second})
    layer.update_layer("default", config, split=False, layer_name="layer")
    with torch.no_grad():
        torch.testing.assert_close(layer.get_delta_weight("default"),
                                   reference_delta(layer, layer.factors("default"), config), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- hooks on the base layer


def run_paths(layer: SnellaLayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layer's output on each path: fused, parallel (dropout in training, seeded), disabled, merged."""
    out = {}
    with torch.no_grad():
        out["fused"] = layer.eval()(x)
        torch.manual_seed(7)
        out["parallel"] = layer.train()(x)
        layer.eval()
        layer.disable_adapters = True
        out["disabled"] = layer(x)
        layer.disable_adapters = False
        w0 = layer.base_layer.weight.clone()
        layer.merge()
        out["merged"] = layer(x)
        layer.unmerge()
        layer.base_layer.weight.copy_(w0)  # W0 exactly, not W0 + dW - dW: every run sees the same layer
    return out


@pytest.mark.parametrize("base", [lambda: nn.Linear(8, 6), CONVS["3x3-stride2-pad1"]], ids=["linear", "conv"])
def test_hooks_on_the_base_layer_run_around_the_adapted_computation(base):
    """Forward pre-hooks on ``base_layer`` change the layer's input, forward hooks its output, on every path,
    each once per call, as if ``base_layer`` computed the adapted map."""
    layer = adapted(base(), adapter_dropout=0.25)
    x = torch.randn(3, 8) if isinstance(layer, SnellaLinear) else conv_input(layer.base_layer)
    plain, doubled = run_paths(layer, x), run_paths(layer, 2 * x)
    calls = []
    seen = {}

    def pre_hook(module, args):
        calls.append("pre")
        assert module is layer.base_layer
        return (args[0] * 2,)

    def hook(module, args, output):
        calls.append("hook")
        seen["input"], seen["output"] = args[0], output
        return output + 1

    handles = [layer.base_layer.register_forward_pre_hook(pre_hook), layer.base_layer.register_forward_hook(hook)]
    hooked = run_paths(layer, x)
    assert calls == ["pre", "hook"] * 4
    for path in plain:
        assert torch.equal(hooked[path], doubled[path] + 1), path
        assert not torch.equal(hooked[path], plain[path] + 1), path
    assert torch.equal(seen["input"], 2 * x) and torch.equal(seen["output"] + 1, hooked["merged"])

    for handle in handles:  # removed, they no longer run
        handle.remove()
    again = run_paths(layer, x)
    assert all(torch.equal(again[p], plain[p]) for p in plain) and len(calls) == 8


def test_base_layer_hooks_with_kwargs_always_call_and_the_wrapper_s_own_hooks():
    layer = adapted(nn.Linear(8, 6))
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = layer(x)
        y_half = layer(x / 2)
    order = []
    layer.register_forward_pre_hook(lambda m, args: order.append("layer pre"))
    layer.register_forward_hook(lambda m, args, out: order.append("layer hook") or out * 3)
    base = layer.base_layer
    base.register_forward_pre_hook(lambda m, args, kwargs: order.append("base pre") or ((args[0] / 2,), kwargs),
                                   with_kwargs=True)
    base.register_forward_hook(lambda m, args, kwargs, out: order.append("base hook") or out - 1, with_kwargs=True)
    with torch.no_grad():
        out = layer(x)
    assert order == ["layer pre", "base pre", "base hook", "layer hook"]  # nested as torch nests modules
    assert torch.equal(out, (y_half - 1) * 3)
    assert not torch.equal(out, (y - 1) * 3)

    failed = []
    base.register_forward_hook(lambda m, args, out: failed.append(out), always_call=True)
    with pytest.raises(RuntimeError):
        layer(torch.randn(3, 5))  # wrong width: the adapted op raises, the always_call hook still runs
    assert failed == [None]
    with torch.no_grad():
        assert torch.equal(layer(x), (y_half - 1) * 3)  # the hooks are all still in place after the error


def test_backward_hooks_on_the_base_layer_warn():
    layer = adapted(nn.Linear(8, 6))
    layer.base_layer.register_full_backward_hook(lambda m, grad_in, grad_out: None)
    layer.base_layer.register_forward_hook(lambda m, args, out: None)
    with pytest.warns(UserWarning, match="backward hooks"):
        layer(torch.randn(3, 8))
