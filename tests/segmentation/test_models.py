"""Segmentation models: logits at the input resolution, SNELLA on the encoder only, decoders trained in full,
one step lowers the loss, and an adapter saved, loaded and merged gives the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

import snella
from snella.segmentation.losses import SegmentationLoss
from snella.segmentation.models import build_segmentation_model, is_plain_vit

TINY_VIT = dict(depth=2, embed_dim=32, num_heads=2)  # vit_fmnist_d128 shrunk: 28 px, patch 7, 2 blocks


def _tiny(kind: str, folders: dict, num_classes: int = 3):
    """(spec, input size) of a tiny seeded model of ``kind``."""
    torch.manual_seed(0)
    if kind == "vit":
        return build_segmentation_model("vit_fmnist_d128", num_classes, **TINY_VIT), 28
    if kind == "segformer":
        return build_segmentation_model(f"hf:{folders['segformer']}", num_classes), 32
    if kind == "sam":
        return build_segmentation_model(f"hf:{folders['sam']}", 1), 64
    raise ValueError(kind)


@pytest.fixture
def folders(tiny_segformer_dir, tiny_sam_dir, one_thread) -> dict:
    return {"segformer": tiny_segformer_dir, "sam": tiny_sam_dir}


EXPECTED_TARGETS = {
    "vit": [f"encoder.blocks.{b}.{m}" for b in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
    "segformer": [f"model.segformer.stages.{s}.blocks.0.{m}" for s in range(2)
                  for m in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                            "mlp.fc1", "mlp.fc2")],
    "sam": [f"model.vision_encoder.layers.{b}.{m}" for b in range(2)
            for m in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")],
}
SAVED = {"vit": ["decode_head"], "segformer": ["model.decode_head"], "sam": ["model.mask_decoder"]}


@pytest.mark.parametrize("kind", ["vit", "segformer", "sam"])
def test_adapters_land_on_the_encoder_and_the_decoder_trains_in_full(kind, folders):
    spec, side = _tiny(kind, folders)
    assert spec.modules_to_save == SAVED[kind]
    model = snella.get_snella_model(spec.model, snella.SnellaConfig(r=4, sparsity=0.5,
                                                                    modules_to_save=spec.modules_to_save))
    assert sorted(model.targeted_module_names) == sorted(EXPECTED_TARGETS[kind])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    saved_prefix = f"base_model.{spec.modules_to_save[0]}.modules_to_save.default."
    non_adapter = {n for n in trainable if ".snella_" not in n}
    assert non_adapter and all(n.startswith(saved_prefix) for n in non_adapter)
    # every parameter of the decoder / head is trained in full
    head = dict(spec.model.named_modules())[spec.modules_to_save[0]]
    assert len(non_adapter) == len(list(head.modules_to_save["default"].parameters()))
    x = torch.randn(2, 3, side, side)
    assert model(x).shape == (2, spec.num_classes, side, side)


def test_logits_are_at_the_input_resolution(folders):
    vit, _ = _tiny("vit", folders)
    assert vit.model(torch.randn(1, 3, 28, 28)).shape == (1, 3, 28, 28)
    sam, _ = _tiny("sam", folders)
    assert sam.model(torch.randn(2, 3, 48, 40)).shape == (2, 1, 48, 40)  # resized to 64 inside, and back
    seg, _ = _tiny("segformer", folders)
    assert seg.model(torch.randn(1, 3, 32, 48)).shape == (1, 3, 32, 48)


@pytest.mark.parametrize("kind", ["vit", "segformer", "sam"])
def test_one_snella_step_lowers_the_loss_on_a_fixed_batch(kind, folders):
    spec, side = _tiny(kind, folders)
    model = snella.get_snella_model(spec.model, snella.SnellaConfig(r=4, sparsity=0.5,
                                                                    modules_to_save=spec.modules_to_save))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, side, side, generator=gen)
    binary = spec.num_classes == 1
    target = (x[:, 0] > 0).long() + (0 if binary else (x[:, 1] > 0.5).long())  # (4, H, W), read off the pixels
    loss_fn = SegmentationLoss(binary=binary)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    before = loss_fn(model(x), target)
    before.backward()
    adapter_grads = [p.grad for n, p in model.named_parameters() if ".snella_" in n]
    assert adapter_grads and any(g is not None and g.abs().sum() > 0 for g in adapter_grads)
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = loss_fn(model(x), target)
    assert after.item() < before.item()


def test_save_load_and_merge_round_trip(tmp_path, folders):
    spec, side = _tiny("vit", folders)
    config = snella.SnellaConfig(r=4, sparsity=0.5, modules_to_save=spec.modules_to_save)
    model = snella.get_snella_model(spec.model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(3))
    target = torch.randint(0, 3, (2, side, side), generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        loss = SegmentationLoss(binary=False)(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "adapter")
    fresh, _ = _tiny("vit", folders)  # the same seed: the same base weights
    with torch.no_grad():
        assert not torch.allclose(fresh.model.eval()(x), expected, atol=1e-4)  # training changed something
    loaded = snella.SnellaModel.from_pretrained(fresh.model, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-6)
        merged = loaded.merge_and_unload()
        assert torch.allclose(merged(x), expected, atol=1e-5)
    assert not any(".snella_" in n for n, _ in merged.named_parameters())


def test_smp_efficientnet_lite0_gets_the_real_imagenet_weights(one_thread):
    from snella.bench.effnet import convert_state_dict, weights_path

    spec = build_segmentation_model("tf_efficientnet_lite0", 3, decoder="unet", pretrained=True)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.modules_to_save == ["model.decoder", "model.segmentation_head"]
    encoder = spec.model.model.encoder.model
    state = convert_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True), encoder)
    for key in ("conv_stem.weight", "blocks.5.3.conv_pwl.weight", "blocks.2.1.bn2.running_var"):
        assert torch.equal(encoder.state_dict()[key], state[key])
    model = snella.get_snella_model(spec.model, snella.SnellaConfig(r=4, modules_to_save=spec.modules_to_save))
    names = model.targeted_module_names
    assert len(names) == 47 and all(n.startswith("model.encoder.model.blocks.") for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"conv_dw", "conv_pw", "conv_pwl"}
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("decoder", ["fpn", "deeplabv3plus"])
def test_smp_decoders_on_a_timm_encoder(decoder, one_thread):
    spec = build_segmentation_model("resnet18", 1, decoder=decoder)
    model = snella.get_snella_model(spec.model, snella.SnellaConfig(r=4, target_modules=r"model\.encoder\.model\.layer4\..*conv\d",
                                                                    modules_to_save=spec.modules_to_save))
    assert all(n.startswith("model.encoder.model.layer4.") for n in model.targeted_module_names)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)  # eval: ASPP's pooled BN needs it at batch 1


def test_the_project_vit_on_56_px_composites():
    spec = build_segmentation_model("snella-default", 11, img_size=56)
    assert spec.model.encoder.patch_embed.patch_size == (7, 7) and spec.model.indices == [1, 2, 3, 5]
    assert spec.model(torch.randn(1, 3, 56, 56)).shape == (1, 11, 56, 56)
    assert is_plain_vit("vit_base_patch16_224") and not is_plain_vit("resnet18")


def test_bad_names_and_settings(tmp_path, folders):
    with pytest.raises(ValueError, match=r"decoder 'fpn' does not fit vit_fmnist_d128 .* accepted: vit-pup"):
        build_segmentation_model("vit_fmnist_d128", 3, decoder="fpn", **TINY_VIT)
    with pytest.raises(ValueError, match=r"decoder 'segformer' does not fit resnet18 .* accepted: fpn, unet, deeplabv3plus"):
        build_segmentation_model("resnet18", 3, decoder="segformer")
    with pytest.raises(ValueError, match="prompt-free SAM gives one mask per image: use num_classes=1"):
        build_segmentation_model(f"hf:{folders['sam']}", 3)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type 'vit' is not a segmenter snella builds; accepted: segformer, sam"):
        build_segmentation_model(f"hf:{tmp_path}", 3)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build_segmentation_model(f"hf:{tmp_path / 'nothing'}", 3)
