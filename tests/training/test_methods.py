"""Tests of the five methods: what trains, and that save -> load and merge reproduce the tuned model."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import snella.backbones  # noqa: F401  (registers vit_fmnist_d128)
from snella.training.config import TrainConfig
from snella.training.methods import (METHODS, cls_token_names, get_method, head_modules, load_trainable_state,
                                     trainable_state)

D, DEPTH, R, CLASSES = 32, 2, 8, 10
# Trainable parameters, counted by hand. Per block SNELLA adapts q, k, v, proj (d -> d) and fc1, fc2 (d <-> 4d):
# r * (in + out) each, plus 3 kernel scalars per matrix for the mixed kernel; head d*10+10; class token d.
HEAD, CLS = D * CLASSES + CLASSES, D
SNELL_BLOCK = 4 * R * (D + D) + 2 * R * (D + 4 * D)
LORA_BLOCK = R * (D + 3 * D) + R * (D + D) + 2 * R * (D + 4 * D)  # qkv is one fused matrix for LoRA
EXPECTED = {
    "snella": DEPTH * (SNELL_BLOCK + 6 * 3) + HEAD + CLS,
    "snell": DEPTH * SNELL_BLOCK + HEAD + CLS,
    "lora": DEPTH * LORA_BLOCK + HEAD + CLS,
    "linear": HEAD,
}


def backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_fmnist_d128", num_classes=CLASSES, depth=DEPTH, embed_dim=D, num_heads=2).eval()


def config(method: str) -> TrainConfig:
    return TrainConfig(method=method, r=R, sparsity=0.3, model="vit_fmnist_d128")


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable parameter, so that a save/load that dropped one would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


X = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))


def test_heads_and_tokens_are_found_or_named():
    model = backbone()
    assert head_modules(model) == ["head"] and cls_token_names(model) == ["cls_token"]
    assert head_modules(model, ["blocks.0.mlp.fc2"]) == ["blocks.0.mlp.fc2"]
    with pytest.raises(ValueError, match=r"head='classifier' is not a module .* top-level modules"):
        head_modules(model, ["classifier"])
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        get_method("dora")


@pytest.mark.parametrize("name", list(METHODS))
def test_what_trains(name: str):
    model = get_method(name).apply(config(name), backbone())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name == "full":
        assert count == sum(p.numel() for p in backbone().parameters())
        return
    assert count == EXPECTED[name]
    if name == "linear":
        assert sorted(trainable) == ["head.bias", "head.weight"]
        return
    prefix = "lora_" if name == "lora" else "snella_"
    others = [n for n in trainable if prefix not in n]
    assert sorted(o.split("model.")[-1] for o in others) == [
        "cls_token", "head.modules_to_save.default.bias", "head.modules_to_save.default.weight"]


@pytest.mark.parametrize("name", list(METHODS))
def test_save_load_and_merge_reproduce_the_tuned_model(name: str, tmp_path: Path):
    method = get_method(name)
    model = method.apply(config(name), backbone())
    perturb(model)
    model.eval()
    with torch.no_grad():
        expected = model(X)  # (3, 10)
    method.save(model, tmp_path / "adapter")
    loaded = method.load(config(name), backbone(), tmp_path / "adapter").eval()
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(X), expected, atol=1e-5)
        merged = method.merge(loaded).eval()
        assert type(merged).__name__ == "VisionTransformer"
        assert torch.allclose(merged(X), expected, atol=1e-4)
    with pytest.raises((FileNotFoundError, ValueError)):
        method.load(config(name), backbone(), tmp_path / "nothing")


def test_trainable_state_leaves_out_frozen_weights_and_keeps_sparsities():
    method = get_method("snella")
    model = method.apply(config("snella"), backbone())
    refs = method.matrices(model)
    for i, ref in enumerate(refs):
        ref.set_sparsity(0.1 + 0.05 * i)
    perturb(model)
    state = trainable_state(model)
    assert not any(k.endswith("blocks.0.attn.qkv.base_layer.weight") for k in state)
    assert any(k.endswith("_extra_state") for k in state)
    fresh = method.apply(config("snella"), backbone())
    load_trainable_state(fresh, state, "test")
    expected = [0.1 + 0.05 * i for i in range(len(refs))]
    assert [r.get_sparsity() for r in method.matrices(fresh)] == pytest.approx(expected)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(X), model.eval()(X))
    with pytest.raises(ValueError, match="does not fit this model: missing"):
        load_trainable_state(method.apply(config("snella"), backbone()), {}, "empty.pt")


BLOCKS = "blocks.{0,1}.attn.{qkv,proj}, blocks.{0,1}.mlp.{fc1,fc2}"


@pytest.mark.parametrize("name, line", [
    ("snella", f"snella: adapted 12 matrices in 8 modules: {BLOCKS}"),  # q, k, v split out of qkv
    ("snell", f"snella: adapted 12 matrices in 8 modules: {BLOCKS}"),
    ("lora", f"lora: adapted 8 modules: {BLOCKS}"),
    ("full", ""), ("linear", ""),
])
def test_targets_summary_names_the_adapted_modules(name: str, line: str):
    method = get_method(name)
    assert method.targets_summary(method.apply(config(name), backbone())) == line


def test_lora_leaves_out_the_depthwise_convs_peft_cannot_adapt_and_says_so(capsys):
    from torch import nn

    from snella.training.methods import lora_targets

    model = nn.ModuleDict({"dw": nn.Conv2d(32, 32, 3, groups=32), "pw": nn.Conv2d(32, 16, 1),
                           "g4": nn.Conv2d(16, 16, 3, groups=4), "fc": nn.Linear(4, 4)})
    assert lora_targets(model, ["dw", "pw", "g4", "fc"], 8, chosen_by_user=False) == ["pw", "g4", "fc"]
    assert "not adapting 1 grouped (depthwise) convs" in capsys.readouterr().out  # groups=4 divides r=8: kept
    with pytest.raises(ValueError, match=r"match 1 grouped convs peft's LoRA cannot adapt at r=8 .*dw"):
        lora_targets(model, ["dw", "pw"], 8, chosen_by_user=True)
    with pytest.raises(ValueError, match="every default target is a grouped conv"):
        lora_targets(model, ["dw"], 8, chosen_by_user=False)
