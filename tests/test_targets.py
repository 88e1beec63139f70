"""Tests of target selection: the default targets of each model family, user-given forms, and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snella import SnellaConfig, get_snella_model
from snella.layer import SnellaConv2d, SnellaLayer, SnellaLinear
from snella.targets import EXTRA_TARGETS, is_fused_qkv, resolve_targets

VIT_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def vit_names(prefix: str, blocks: int) -> list[str]:
    return [f"{prefix}blocks.{b}.{layer}" for b in range(blocks) for layer in VIT_LAYERS]


def hf_vit_v4(layers: int = 2, d: int = 8) -> nn.Module:
    """The module tree of a transformers < 5 ViTForImageClassification (encoder.layer.N.attention.attention.query)."""

    def block() -> nn.Module:
        return nn.ModuleDict({
            "attention": nn.ModuleDict({
                "attention": nn.ModuleDict({"query": nn.Linear(d, d), "key": nn.Linear(d, d), "value": nn.Linear(d, d)}),
                "output": nn.ModuleDict({"dense": nn.Linear(d, d), "dropout": nn.Dropout()}),
            }),
            "intermediate": nn.ModuleDict({"dense": nn.Linear(d, 4 * d)}),
            "output": nn.ModuleDict({"dense": nn.Linear(4 * d, d)}),
            "layernorm_before": nn.LayerNorm(d),
        })

    vit = nn.ModuleDict({
        "embeddings": nn.ModuleDict({"patch_embeddings": nn.ModuleDict({"projection": nn.Conv2d(3, d, 4, 4)})}),
        "encoder": nn.ModuleDict({"layer": nn.ModuleList([block() for _ in range(layers)])}),
        "layernorm": nn.LayerNorm(d),
    })
    return nn.ModuleDict({"vit": vit, "classifier": nn.Linear(d, 5)})


# ---------------------------------------------------------------- defaults per family


@pytest.mark.parametrize("family", ["vit", "eva"])
def test_default_targets_timm_vit_and_eva(tiny, family):
    assert resolve_targets(tiny.model(family), None) == vit_names("", 2)


def test_default_targets_swin(tiny):
    # same names under layers.N.blocks.M; the patch-merging linear and the head are left alone
    model = tiny.model("swin")
    assert resolve_targets(model, None) == [f"layers.{i}.blocks.0.{layer}" for i in range(2) for layer in VIT_LAYERS]
    assert any(n.endswith("downsample.reduction") for n, _ in model.named_modules())


def test_default_targets_convnext_mlp_only(tiny):
    model = tiny.model("convnext")  # depths (1, 1, 2, 1)
    blocks = [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    assert resolve_targets(model, None) == [f"stages.{s}.blocks.{b}.mlp.{fc}" for s, b in blocks for fc in ("fc1", "fc2")]
    # the depthwise convs are an opt-in extra
    extra = resolve_targets(model, EXTRA_TARGETS["convnext-convs"])
    assert len(extra) == 15 and "stages.2.blocks.1.conv_dw" in extra


def test_default_targets_hf_vit(tiny):
    expected = [f"vit.layers.{i}.{layer}" for i in range(2)
                for layer in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                              "mlp.fc1", "mlp.fc2")]
    assert resolve_targets(tiny.model("hf_vit"), None) == expected


def test_default_targets_hf_vit_before_transformers_5():
    expected = [f"vit.encoder.layer.{i}.{layer}" for i in range(2)
                for layer in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                              "attention.output.dense", "intermediate.dense", "output.dense")]
    assert resolve_targets(hf_vit_v4(), None) == expected


def test_default_targets_efficientnet_block_convs(one_thread):
    import timm

    model = timm.create_model("efficientnet_b0", pretrained=False)
    expected = []
    for i, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            expected += [f"blocks.{i}.{j}.{conv}" for conv, _ in block.named_children()
                         if conv in ("conv_pw", "conv_dw", "conv_pwl")]
    targets = resolve_targets(model, None)
    assert sorted(targets) == sorted(expected) and len(targets) == 2 + 15 * 3  # depthwise-separable + 15 IR blocks
    assert not any(".se." in t for t in targets) and "conv_stem" not in targets and "conv_head" not in targets
    wrapped = get_snella_model(model, SnellaConfig(r=4))
    dw = wrapped.base_model.blocks[1][0].conv_dw
    assert isinstance(dw, SnellaConv2d) and dw.base_layer.groups == dw.base_layer.in_channels
    assert tuple(dw.snella_A["default"].shape) == (1, 2, 9, 2)  # depthwise: one group's 1 * 3 * 3 inputs


def test_default_targets_under_a_prefix(tiny):
    holder = nn.Module()
    holder.backbone = tiny.model("vit")
    assert resolve_targets(holder, None) == vit_names("backbone.", 2)


def test_wrapping_applies_the_default_targets(tiny):
    wrapped = get_snella_model(tiny.model("vit"), SnellaConfig(r=4))
    layers = wrapped.snella_layers()
    assert list(layers) == vit_names("", 2)
    assert all(isinstance(m, SnellaLinear) for m in layers.values())
    # an adapted model's layers are found again (for a second adapter), their base layers are not
    assert resolve_targets(wrapped.base_model, None, adapted_types=(SnellaLayer,)) == vit_names("", 2)


# ---------------------------------------------------------------- user-given targets


@pytest.mark.parametrize("targets, expected", [
    (["qkv"], ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]),                 # a name suffix
    (["mlp.fc1", "attn.proj"], ["blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.1.attn.proj", "blocks.1.mlp.fc1"]),
    (["blocks.1.mlp.fc2"], ["blocks.1.mlp.fc2"]),                          # a full name
    (r"blocks\.1\.(attn\.proj|mlp\.fc2)", ["blocks.1.attn.proj", "blocks.1.mlp.fc2"]),  # one regex, full match
    (["head"], ["head"]),
])
def test_target_modules_forms(tiny, targets, expected):
    assert resolve_targets(tiny.model("vit"), targets) == expected


@pytest.mark.parametrize("exclude, expected", [
    (["blocks.0.attn.qkv"], vit_names("", 2)[1:]),
    (r".*fc2", [n for n in vit_names("", 2) if not n.endswith("fc2")]),
    (["attn.qkv", "mlp.fc1"], [n for n in vit_names("", 2) if n.endswith(("proj", "fc2"))]),
])
def test_exclude_modules(tiny, exclude, expected):
    assert resolve_targets(tiny.model("vit"), None, exclude) == expected


@pytest.mark.parametrize("targets", [["nonexistent"], ["fc"], "qkv", r"blocks\.9\..*"])
def test_target_matching_nothing_lists_the_module_names(tiny, targets):
    # ["fc"] is not a suffix of 'mlp.fc1' (whole name parts only); a string is a regex matched against
    # the whole name, so "qkv" alone matches nothing
    model = tiny.model("vit")
    with pytest.raises(ValueError) as err:
        get_snella_model(model, SnellaConfig(target_modules=targets))
    message = str(err.value)
    assert repr(targets) in message
    assert "blocks.0.attn.qkv" in message and "blocks.1.mlp.fc2" in message and "head" in message
    assert not any(isinstance(m, SnellaLayer) for m in model.modules())  # nothing was half-wrapped


@pytest.mark.parametrize("targets", [["norm1"], r".*\.norm\d"])
def test_target_of_an_unsupported_type_names_the_type(tiny, targets):
    with pytest.raises(ValueError, match=r"'blocks\.0\.norm1' is a LayerNorm.*nn\.Linear, nn\.Conv2d"):
        resolve_targets(tiny.model("vit"), targets)


def test_excluding_every_target_raises(tiny):
    with pytest.raises(ValueError, match="excluded by exclude_modules=\\['qkv'\\]"):
        resolve_targets(tiny.model("vit"), ["qkv"], ["qkv"])


def test_model_without_default_targets_asks_for_target_modules():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"no default targets for Sequential.*target_modules.*0, 2"):
        resolve_targets(mlp, None)
    assert resolve_targets(mlp, ["0", "2"]) == ["0", "2"]
    with pytest.raises(ValueError, match="has no nn.Linear or nn.Conv2d"):
        resolve_targets(nn.Sequential(nn.ReLU()), None)


# ---------------------------------------------------------------- fused qkv detection


def test_is_fused_qkv():
    assert is_fused_qkv("blocks.0.attn.qkv", nn.Linear(8, 24))
    assert not is_fused_qkv("blocks.0.attn.qkv", nn.Linear(8, 16))  # not 3 * in: leave it whole
    assert not is_fused_qkv("blocks.0.attn.proj", nn.Linear(8, 24))
    assert not is_fused_qkv("blocks.0.attn.to_qkv", nn.Linear(8, 24))
    assert not is_fused_qkv("qkv", nn.Conv2d(8, 24, 1))


def test_swin_and_eva_qkv_are_split(tiny):
    for family, d in (("swin", 16), ("eva", 48)):
        wrapped = get_snella_model(tiny.model(family), SnellaConfig(r=4))
        names = [m.name for m in wrapped.matrices()]
        prefix = "layers.0.blocks.0" if family == "swin" else "blocks.0"
        assert [f"{prefix}.attn.qkv.{p}" for p in "qkv"] == names[:3]
        assert tuple(wrapped.base_model.get_submodule(f"{prefix}.attn.qkv").snella_A["default"].shape) == (3, 2, d, 2)


def test_subclass_with_its_own_forward_is_refused():
    """timm's StdConv2d standardises its weight in forward: adapting it as a plain conv would be wrong."""
    from timm.layers import StdConv2d

    import snella

    model = torch.nn.Sequential(StdConv2d(3, 4, 3))
    with pytest.raises(ValueError, match="StdConv2d.*its own forward"):
        snella.get_snella_model(model, snella.SnellaConfig(r=4, target_modules=["0"]))
