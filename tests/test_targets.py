"""Tests of target selection: the default targets of each model family, user-given forms, and the errors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from snella import SnellaConfig, get_snella_model
from snella.layer import SnellaConv2d, SnellaLayer, SnellaLinear
from snella.targets import EXTRA_TARGETS, compress_names, is_fused_qkv, resolve_targets

VIT_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def vit_names(prefix: str, blocks: int) -> list[str]:
    return [f"{prefix}blocks.{b}.{layer}" for b in range(blocks) for layer in VIT_LAYERS]


def tree(linears: list[str], convs: tuple[str, ...] = (), d: int = 4) -> nn.Module:
    """A module tree with an ``nn.Linear(d, d)`` (or ``nn.Conv2d`` for names in ``convs``) at each dotted name:
    the names of a model as some other library version writes them."""
    root = nn.Module()
    for name in [*linears, *convs]:
        *path, leaf = name.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.ModuleDict())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Conv2d(d, d, 1) if name in convs else nn.Linear(d, d))
    return root


def per_block(blocks: list[str], layers: tuple[str, ...]) -> list[str]:
    return [f"{block}.{layer}" for block in blocks for layer in layers]


def assert_defaults(model: nn.Module, expected: list[str], left: list[str]) -> None:
    """The default targets are exactly ``expected``; each of ``left`` is a Linear/Conv2d of the model left alone."""
    targets = resolve_targets(model, None)
    assert sorted(targets) == sorted(expected) and len(targets) == len(set(targets))
    for name in left:
        assert isinstance(model.get_submodule(name), (nn.Linear, nn.Conv2d)), name


def hf(model: str, config: str, **kwargs) -> nn.Module:
    """A tiny randomly initialised transformers model ``model`` built from ``config(**kwargs)``, seeded."""
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, model)(getattr(transformers, config)(**kwargs)).eval()


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
    expected = per_block([f"vit.encoder.layer.{i}" for i in range(2)], (
        "attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense",
        "intermediate.dense", "output.dense"))
    model = tree(["vit.embeddings.patch_embeddings.projection", *expected, "vit.pooler.dense", "classifier"])
    assert resolve_targets(model, None) == expected


HF5_ATTN = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
HF5_BLOCK = (*HF5_ATTN, "mlp.fc1", "mlp.fc2")  # transformers 5: ViT, DeiT, DINOv2, Swin, SegFormer
BERT_BLOCK = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")
SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 2], num_heads=[2, 4], window_size=4)


def swin_blocks(prefix: str, depths: list[int]) -> list[str]:
    return [f"{prefix}layers.{s}.blocks.{b}" for s, depth in enumerate(depths) for b in range(depth)]


def test_default_targets_timm_deit_leave_both_heads(one_thread):
    import timm

    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=3, num_classes=5)
    assert_defaults(model, vit_names("", 2), ["head", "head_dist", "patch_embed.proj"])


@pytest.mark.parametrize("model", ["SwinModel", "SwinForImageClassification"])
def test_default_targets_hf_swin(one_thread, model):
    swin = hf(model, "SwinConfig", **SWIN)
    prefix = "swin." if model != "SwinModel" else ""
    left = [f"{prefix}encoder.layers.0.downsample.reduction", f"{prefix}embeddings.patch_embeddings.projection"]
    assert_defaults(swin, per_block(swin_blocks(f"{prefix}encoder.", [1, 2]), HF5_BLOCK),
                    left + (["classifier"] if prefix else []))


def test_default_targets_hf_swin_before_transformers_5_and_swinv2(one_thread):
    # Swinv2 keeps the BERT-style names; its continuous position-bias MLP (2-D offsets -> per-head biases) is left
    swin = hf("Swinv2Model", "Swinv2Config", **SWIN)
    blocks = swin_blocks("encoder.", [1, 2])
    bias_mlp = [f"{b}.attention.self.continuous_position_bias_mlp.{i}" for b in blocks for i in (0, 2)]
    assert_defaults(swin, per_block(blocks, BERT_BLOCK), bias_mlp + ["encoder.layers.0.downsample.reduction"])
    old = per_block(blocks, BERT_BLOCK)  # SwinModel under transformers 4
    assert resolve_targets(tree([*old, "encoder.layers.0.downsample.reduction"]), None) == old


def test_default_targets_hf_convnext_mlp_only(one_thread):
    model = hf("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[8, 16], depths=[1, 2], num_stages=2,
               num_labels=3)
    blocks = ["convnext.encoder.stages.0.layers.0", "convnext.encoder.stages.1.layers.0",
              "convnext.encoder.stages.1.layers.1"]
    assert_defaults(model, per_block(blocks, ("pwconv1", "pwconv2")),
                    [f"{b}.dwconv" for b in blocks] + ["convnext.encoder.stages.1.downsampling_layer.1", "classifier"])
    extra = resolve_targets(model, EXTRA_TARGETS["convnext-convs"])
    assert extra == per_block(blocks, ("dwconv", "pwconv1", "pwconv2"))


def test_default_targets_clip_vision(one_thread):
    model = hf("CLIPVisionModel", "CLIPVisionConfig", image_size=16, patch_size=8, hidden_size=32,
               intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    layers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    assert_defaults(model, per_block(["encoder.layers.0", "encoder.layers.1"], layers), ["embeddings.patch_embedding"])


SEGFORMER = dict(num_encoder_blocks=2, depths=[1, 2], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
                 strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3)


@pytest.mark.parametrize("model", ["SegformerForSemanticSegmentation", "SegformerModel"])
def test_default_targets_segformer(one_thread, model):
    # the spatial-reduction conv (K/V downsampling, only where sr_ratio > 1) and Mix-FFN's depthwise conv stay
    # frozen like the patch embeddings; the decode head trains in full or not at all
    prefix = "segformer." if model != "SegformerModel" else ""
    blocks = [f"{prefix}stages.0.blocks.0", f"{prefix}stages.1.blocks.0", f"{prefix}stages.1.blocks.1"]
    left = [f"{prefix}stages.0.blocks.0.attention.sequence_reduction.sequence_reduction",
            *[f"{b}.mlp.dwconv.dwconv" for b in blocks], f"{prefix}stages.1.patch_embeddings.proj"]
    if prefix:
        left += ["decode_head.linear_projections.0.proj", "decode_head.linear_fuse", "decode_head.classifier"]
    assert_defaults(hf(model, "SegformerConfig", **SEGFORMER), per_block(blocks, HF5_BLOCK), left)


def test_default_targets_segformer_before_transformers_5():
    blocks = ["segformer.encoder.block.0.0", "segformer.encoder.block.1.0", "segformer.encoder.block.1.1"]
    expected = per_block(blocks, ("attention.self.query", "attention.self.key", "attention.self.value",
                                  "attention.output.dense", "mlp.dense1", "mlp.dense2"))
    convs = ("segformer.encoder.block.0.0.attention.self.sr", *[f"{b}.mlp.dwconv.dwconv" for b in blocks],
             "segformer.encoder.patch_embeddings.0.proj", "decode_head.linear_fuse", "decode_head.classifier")
    model = tree([*expected, "decode_head.linear_c.0.proj", "decode_head.linear_c.1.proj"], convs)
    assert resolve_targets(model, None) == expected


def test_default_targets_sam_vision_encoder_only(one_thread):
    model = hf("SamModel", "SamConfig", vision_config=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16, output_channels=16,
        global_attn_indexes=[1], window_size=2, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                 iou_head_hidden_dim=16))
    blocks = ["vision_encoder.layers.0", "vision_encoder.layers.1"]
    decoder = "mask_decoder.transformer.layers.0"
    assert_defaults(model, per_block(blocks, ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")), [
        "vision_encoder.patch_embed.projection", "vision_encoder.neck.conv1", "prompt_encoder.mask_embed.conv1",
        f"{decoder}.self_attn.q_proj", f"{decoder}.mlp.lin1", "mask_decoder.iou_prediction_head.proj_out"])
    wrapped = get_snella_model(model, SnellaConfig(r=4))
    names = [m.name for m in wrapped.matrices()]
    assert names[:4] == [f"vision_encoder.layers.0.attn.qkv.{p}" for p in "qkv"] + ["vision_encoder.layers.0.attn.proj"]
    assert len(names) == 2 * (3 + 1 + 2)  # the fused qkv (96 = 3 * 32 outputs) is split


@pytest.mark.parametrize("swiglu", [False, True])
def test_default_targets_dinov2(one_thread, swiglu):
    model = hf("Dinov2Model", "Dinov2Config", image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, mlp_ratio=2, use_swiglu_ffn=swiglu)
    mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if swiglu else ("mlp.fc1", "mlp.fc2")
    assert_defaults(model, per_block(["encoder.layer.0", "encoder.layer.1"], (*HF5_ATTN, *mlp)),
                    ["embeddings.patch_embeddings.projection"])


@pytest.mark.parametrize("mlp", [("mlp.fc1", "mlp.fc2"), ("mlp.weights_in", "mlp.weights_out")])
def test_default_targets_dinov2_before_transformers_5(mlp):
    expected = per_block(["encoder.layer.0", "encoder.layer.1"], (
        "attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense",
        *mlp))
    assert resolve_targets(tree(expected, ("embeddings.patch_embeddings.projection",)), None) == expected


def test_default_targets_mask2former_adapt_the_backbone_only(one_thread):
    # Users fine-tune the encoder with SNELLA and train the pixel decoder, transformer decoder and class
    # predictor in full: none of their attention/MLP linears is a default target
    backbone = dict(SWIN, model_type="swin", image_size=64, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2,
                    out_features=["stage1", "stage2", "stage3", "stage4"])
    model = hf("Mask2FormerForUniversalSegmentation", "Mask2FormerConfig", backbone_config=backbone, feature_size=32,
               mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1,
               decoder_layers=2, num_attention_heads=2, num_queries=4, num_labels=3, common_stride=4)
    pixel, decoder = "model.pixel_level_module.decoder", "model.transformer_module.decoder"
    left = [f"{pixel}.encoder.layers.0.self_attn.value_proj", f"{pixel}.encoder.layers.0.fc1",
            f"{decoder}.layers.0.self_attn.q_proj", f"{decoder}.layers.0.self_attn.out_proj",
            f"{decoder}.layers.0.cross_attn.out_proj", f"{decoder}.layers.0.fc2",
            f"{decoder}.mask_predictor.mask_embedder.0.0", "class_predictor",
            "model.pixel_level_module.encoder.swin.embeddings.patch_embeddings.projection"]
    blocks = swin_blocks("model.pixel_level_module.encoder.swin.encoder.", [1, 1, 1, 1])
    assert_defaults(model, per_block(blocks, HF5_BLOCK), left)


def test_default_targets_bert(one_thread):
    model = hf("BertModel", "BertConfig", vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=32)
    assert_defaults(model, per_block(["encoder.layer.0", "encoder.layer.1"], BERT_BLOCK), ["pooler.dense"])


def test_default_targets_skip_decoders_and_heads(tiny):
    # the same timm blocks under an encoder, a decoder and a head: only the encoder's are defaults
    holder = nn.Module()
    holder.encoder, holder.decoder, holder.seg_head = tiny.model("vit"), tiny.model("vit"), tiny.model("vit")
    assert resolve_targets(holder, None) == vit_names("encoder.", 2)
    assert resolve_targets(holder, ["decoder.blocks.0.attn.qkv"]) == ["decoder.blocks.0.attn.qkv"]  # when asked


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


def test_wrapping_records_and_logs_the_adapted_modules(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="snella.model"):
        wrapped = get_snella_model(tiny.model("vit"), SnellaConfig(r=4))
        wrapped.add_adapter("second", SnellaConfig(r=4, target_modules=["mlp.fc1", "blocks.1.attn.qkv"]))
    assert caplog.messages == [
        "snella: adapted 12 matrices in 8 modules: blocks.{0,1}.attn.{qkv,proj}, blocks.{0,1}.mlp.{fc1,fc2}",
        "snella (adapter 'second'): adapted 5 matrices in 3 modules: blocks.{0,1}.mlp.fc1, blocks.1.attn.qkv"]
    assert wrapped.targeted_module_names == vit_names("", 2)  # the active adapter's
    assert wrapped.targeted_modules("second") == ["blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]
    wrapped.set_adapter("second")
    assert wrapped.targeted_module_names == ["blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]
    wrapped.delete_adapter("default")
    assert wrapped.targeted_modules("default") == []


@pytest.mark.parametrize("names, folded", [
    (vit_names("", 12), "blocks.{0..11}.attn.{qkv,proj}, blocks.{0..11}.mlp.{fc1,fc2}"),
    # a Swin of depths (2, 2, 6, 2): stages of equal depth fold together, the deep one stays apart
    ([f"layers.{s}.blocks.{b}.attn.qkv" for s, depth in enumerate((2, 2, 6, 2)) for b in range(depth)],
     "layers.{0,1,3}.blocks.{0,1}.attn.qkv, layers.2.blocks.{0..5}.attn.qkv"),
    (["a.0.b", "a.2.b", "a.3.b", "a.4.b", "a.7.c", "x.5"], "a.{0,2..4}.b, a.7.c, x.5"),
    (["0", "2", "head"], "{0,2}, head"),
    ([], ""),
])
def test_compress_names_is_exact(names, folded):
    assert compress_names(names) == folded


# ---------------------------------------------------------------- a model already wrapped by peft


def test_peft_layer_is_refused_with_its_base_layer_named(tiny):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny.model("vit"), LoraConfig(r=2, target_modules=["qkv"]))
    x = tiny.inputs("vit")
    with torch.no_grad():
        y_peft = peft_model(x)
    qkv = "base_model.model.blocks.0.attn.qkv"
    for targets in (None, ["qkv"]):
        with pytest.raises(ValueError) as err:
            get_snella_model(peft_model, SnellaConfig(r=4, target_modules=targets))
        assert str(err.value) == (f"module '{qkv}' is a peft lora layer (lora.Linear); target its base layer "
                                  f"'{qkv}.base_layer' instead, or merge_and_unload() the peft model first")
    # the base layer can be adapted: the LoRA layer calls it, so SNELLA's update is added under LoRA's
    wrapped = get_snella_model(peft_model, SnellaConfig(r=4, target_modules=["qkv.base_layer"]))
    assert wrapped.targeted_module_names == [f"base_model.model.blocks.{i}.attn.qkv.base_layer" for i in range(2)]
    with torch.no_grad():
        with wrapped.disable_adapter():
            torch.testing.assert_close(wrapped(x), y_peft, atol=0, rtol=0)
        assert (wrapped(x) - y_peft).abs().max() > 1e-5  # K' |K'| at init: small, but not nothing


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
