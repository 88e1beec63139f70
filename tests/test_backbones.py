"""Tests for snella.backbones: models by name, weights from .pth/.safetensors/.npz files, hf: folders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import snella.backbones.registry as registry
from snella.backbones import (
    HFImageClassifier,
    LoadReport,
    create_backbone,
    data_config,
    load_weights,
)

TINY = "vit_tiny_patch16_224"
TINY_KW = dict(img_size=32, depth=2, embed_dim=48, num_heads=3)  # 2x2 patch grid, 4 tokens


def tiny_vit(num_classes: int = 5, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_backbone(TINY, num_classes, **dict(TINY_KW, **overrides))
    # timm zero-initialises biases and LayerNorms: randomise everything so equality means "loaded".
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def assert_equal_except(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.startswith(skip):
            assert torch.equal(sa[k], sb[k]), k


# --- .pth / .safetensors ---------------------------------------------------------------------------


def _plain(sd):
    return sd


def _prefixed(sd):
    return {f"module.{k}": v for k, v in sd.items()}


def _in_model(sd):
    return {"model": sd}


def _training_checkpoint(sd):
    # What a DDP training script saves: wrapper prefix, optimizer-ish extras, argparse args (MAE, DINO).
    return {"state_dict": _prefixed(sd), "epoch": 3, "args": argparse.Namespace(lr=0.1), "best": 0.5}


@pytest.mark.parametrize(
    "ext, wrap",
    [(".pth", _plain), (".safetensors", _plain), (".bin", _prefixed), (".pt", _in_model),
     (".pth", _training_checkpoint), (".safetensors", _prefixed)],
)
def test_state_dict_files_load_exactly(tmp_path: Path, ext: str, wrap) -> None:
    src, dst = tiny_vit(seed=0), tiny_vit(seed=1)
    path = tmp_path / f"w{ext}"
    obj = wrap(src.state_dict())
    save_file(obj, path) if ext == ".safetensors" else torch.save(obj, path)

    report = load_weights(dst, path)

    assert_equal_except(src, dst)
    assert sorted(report.loaded) == sorted(src.state_dict())
    assert report.missing == report.unexpected == report.mismatched == report.dropped_head == []


def test_create_backbone_with_weights_loads_them(tmp_path: Path) -> None:
    src = tiny_vit(seed=0)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(1)
    dst = create_backbone(TINY, 5, weights=tmp_path / "w.pth", **TINY_KW)
    assert_equal_except(src, dst)


def test_head_of_other_class_count_is_dropped_and_new_head_kept(tmp_path: Path) -> None:
    src, dst = tiny_vit(num_classes=7, seed=0), tiny_vit(num_classes=5, seed=1)
    new_head = dst.head.weight.detach().clone()
    torch.save(src.state_dict(), tmp_path / "w.pth")

    report = load_weights(dst, tmp_path / "w.pth")

    assert_equal_except(src, dst, skip=("head.",))
    assert torch.equal(dst.head.weight, new_head)
    assert report.dropped_head == ["head.bias", "head.weight"]
    assert report.new_head == ["head.weight", "head.bias"]
    assert "head.weight" not in report.loaded


def test_moco_v3_checkpoint_keeps_base_encoder_only(tmp_path: Path) -> None:
    src, dst = tiny_vit(seed=0), tiny_vit(seed=1)
    backbone = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    sd = {f"module.base_encoder.{k}": v for k, v in backbone.items()}
    sd |= {f"module.momentum_encoder.{k}": torch.zeros_like(v) for k, v in backbone.items()}
    sd["module.base_encoder.head.0.weight"] = torch.ones(256, 48)  # MoCo's projection MLP
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd}, tmp_path / "moco.pth.tar.pth")

    report = load_weights(dst, tmp_path / "moco.pth.tar.pth")

    assert_equal_except(src, dst, skip=("head.",))
    assert "module.momentum_encoder.cls_token" in report.ignored
    assert report.dropped_head == ["head.0.weight"]


def test_dino_checkpoint_takes_teacher_backbone(tmp_path: Path) -> None:
    src, dst = tiny_vit(seed=0), tiny_vit(seed=1)
    backbone = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    teacher = {f"backbone.{k}": v for k, v in backbone.items()} | {"head.mlp.0.weight": torch.ones(8, 48)}
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in backbone.items()}
    torch.save({"student": student, "teacher": teacher, "epoch": 100}, tmp_path / "dino.pth")

    report = load_weights(dst, tmp_path / "dino.pth")

    assert_equal_except(src, dst, skip=("head.",))
    assert report.ignored == ["head.mlp.0.weight"]


def test_pos_embed_of_other_grid_is_resampled(tmp_path: Path) -> None:
    src, dst = tiny_vit(seed=0), tiny_vit(seed=1, img_size=64)  # grid 2x2 -> 4x4
    torch.save(src.state_dict(), tmp_path / "w.pth")

    report = load_weights(dst, tmp_path / "w.pth")

    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[4, 4], old_size=[2, 2], num_prefix_tokens=1)
    assert dst.pos_embed.shape == (1, 17, 48)
    assert torch.allclose(dst.pos_embed, expected)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # the class token's position is kept
    assert report.resampled == ["pos_embed: grid 2x2 -> 4x4"]
    assert_equal_except(src, dst, skip=("pos_embed",))


# --- errors ------------------------------------------------------------------------------------------

FLAG = {"ran": False}


def _set_flag() -> None:
    FLAG["ran"] = True


class Malicious:
    """Unpickling this calls _set_flag: stands in for a checkpoint that runs code."""

    def __reduce__(self):
        return (_set_flag, ())


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_vit().state_dict(), "payload": Malicious()}, path)

    with pytest.raises(ValueError, match="refused to load .*evil.pth.*execute code.*safetensors"):
        load_weights(tiny_vit(), path)
    assert FLAG["ran"] is False


def test_corrupt_file_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint at all")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    for name in ("bad.pth", "bad.safetensors"):
        with pytest.raises(ValueError, match=name):
            load_weights(tiny_vit(), tmp_path / name)


def test_shape_mismatch_names_keys_and_shapes(tmp_path: Path) -> None:
    src = tiny_vit(seed=0, mlp_ratio=2.0)  # fc1: (96, 48) in the file, (192, 48) in the model
    dst = tiny_vit(seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    torch.save(src.state_dict(), tmp_path / "w.pth")

    expected = r"w\.pth.*\n.*blocks\.0\.mlp\.fc1\.weight: file \(96, 48\) vs model \(192, 48\)"
    with pytest.raises(ValueError, match=expected):
        load_weights(dst, tmp_path / "w.pth")
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # refused: nothing loaded

    report = load_weights(dst, tmp_path / "w.pth", strict_backbone=False)
    assert len(report.mismatched) == 6  # fc1 weight+bias and fc2 weight in two blocks (fc2.bias fits)
    assert torch.equal(dst.blocks[0].mlp.fc2.bias, src.blocks[0].mlp.fc2.bias)
    assert torch.equal(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(dst.blocks[1].mlp.fc1.weight, before["blocks.1.mlp.fc1.weight"])


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    sd = tiny_vit(seed=0).state_dict()
    del sd["norm.weight"]
    sd["extra.scale"] = torch.ones(3)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"missing from the file: norm\.weight \(48,\)(.|\n)*extra\.scale \(3,\)"):
        load_weights(tiny_vit(), tmp_path / "w.pth")
    report = load_weights(tiny_vit(), tmp_path / "w.pth", strict_backbone=False)
    assert report.missing == ["norm.weight (48,)"] and report.unexpected == ["extra.scale (3,)"]


def test_file_matching_nothing_is_refused_even_when_not_strict(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.ones(2, 2)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="no key of the file matches"):
        load_weights(tiny_vit(), tmp_path / "w.pth", strict_backbone=False)


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(tiny_vit(), tmp_path / "nope.pth")
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"'\.h5'.*\.safetensors"):
        load_weights(tiny_vit(), tmp_path / "w.h5")


def test_unknown_model_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match="unknown model 'vit_tiny_patch16_22'.*vit_tiny_patch16_224"):
        create_backbone("vit_tiny_patch16_22", 10)


def test_failed_download_points_to_weights_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name, pretrained=False, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="--weights FILE"):
        create_backbone(TINY, 10, pretrained=True)


def test_pretrained_and_weights_together_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        create_backbone(TINY, 10, weights=tmp_path / "w.pth", pretrained=True)


# --- Google .npz --------------------------------------------------------------------------------------


def vit_to_npz(model: torch.nn.Module, path: Path) -> dict[str, np.ndarray]:
    """Write a timm ViT in Google's JAX naming: the inverse of timm's vision_transformer._load_weights."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],  # (1, 1, D)
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],  # (1, N, D)
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,  # (D, classes)
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = p + "MultiHeadDotProductAttention_1/"
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * dim, (j + 1) * dim)
            w[f"{mha}{name}/kernel"] = sd[b + "attn.qkv.weight"][rows].T.reshape(dim, heads, -1)  # (D, heads, hd)
            w[f"{mha}{name}/bias"] = sd[b + "attn.qkv.bias"][rows].reshape(heads, -1)
        w[f"{mha}out/kernel"] = sd[b + "attn.proj.weight"].reshape(dim, heads, -1).transpose(1, 2, 0)  # (heads, hd, D)
        w[f"{mha}out/bias"] = sd[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = sd[b + norm + ".weight"], sd[b + norm + ".bias"]
        for r in range(2):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **w)
    return w


def test_npz_in_google_naming_loads_exactly(tmp_path: Path) -> None:
    src, dst = tiny_vit(seed=0), tiny_vit(seed=1)
    w = vit_to_npz(src, tmp_path / "ViT-Ti_16.npz")

    report = load_weights(dst, tmp_path / "ViT-Ti_16.npz")

    assert_equal_except(src, dst)
    # timm turns the HWIO kernel into the conv's OIHW
    assert torch.equal(dst.patch_embed.proj.weight, torch.from_numpy(w["embedding/kernel"].transpose(3, 2, 0, 1)))
    assert sorted(report.loaded) == sorted(src.state_dict())
    assert report.missing == report.new_head == []


def test_npz_with_other_head_keeps_new_head(tmp_path: Path) -> None:
    src, dst = tiny_vit(num_classes=7, seed=0), tiny_vit(num_classes=5, seed=1)
    new_head = dst.head.weight.detach().clone()
    vit_to_npz(src, tmp_path / "w.npz")

    report = load_weights(dst, tmp_path / "w.npz")

    assert_equal_except(src, dst, skip=("head.",))
    assert torch.equal(dst.head.weight, new_head)
    assert report.dropped_head == ["head/bias", "head/kernel"]
    assert sorted(report.new_head) == ["head.bias", "head.weight"]


def test_npz_of_other_depth_is_refused_and_model_unchanged(tmp_path: Path) -> None:
    vit_to_npz(tiny_vit(seed=0, depth=1), tmp_path / "d1.npz")
    vit_to_npz(tiny_vit(seed=0, depth=3), tmp_path / "d3.npz")
    dst = tiny_vit(seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"d1\.npz.*encoderblock_1"):
        load_weights(dst, tmp_path / "d1.npz")
    with pytest.raises(ValueError, match=r"d3\.npz(.|\n)*encoderblock_2/\* \(file has 3 blocks, model 2\)"):
        load_weights(dst, tmp_path / "d3.npz")
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def _damaged(data: bytes) -> dict[str, bytes]:
    """Broken versions of a good file's bytes: cut in half, one byte flipped in its middle, garbage, empty."""
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    return {"truncated": data[: len(data) // 2], "flipped": bytes(flipped), "garbage": b"not weights " * 40,
            "empty": b""}


@pytest.mark.parametrize("ext", [".npz", ".pth", ".safetensors"])
def test_damaged_weight_file_error_names_the_file_and_leaves_the_model(tmp_path: Path, ext: str) -> None:
    src = tiny_vit(seed=0)
    good = tmp_path / f"good{ext}"
    if ext == ".npz":
        vit_to_npz(src, good)
    elif ext == ".pth":
        torch.save(src.state_dict(), good)
    else:
        save_file(src.state_dict(), str(good))
    dst = tiny_vit(seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    failed = []
    for kind, blob in _damaged(good.read_bytes()).items():
        path = tmp_path / f"{kind}-weights{ext}"
        path.write_bytes(blob)
        try:
            load_weights(dst, path)
        except ValueError as err:
            assert str(path) in str(err), (kind, str(err))
            failed.append(kind)
    # A flipped byte inside a float of a .pth/.safetensors is a valid file with another value: it may load.
    assert set(failed) >= {"truncated", "garbage", "empty"} | ({"flipped"} if ext == ".npz" else set())
    if "flipped" in failed:
        assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_npz_into_model_without_loader_is_refused(tmp_path: Path) -> None:
    vit_to_npz(tiny_vit(), tmp_path / "w.npz")
    with pytest.raises(ValueError, match=r"w\.npz.*Linear does not"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "w.npz")


# --- the project's own ViT ---------------------------------------------------------------------------


def test_vit_fmnist_d128_is_registered_with_its_data_config() -> None:
    assert timm.is_model("vit_fmnist_d128")
    model = create_backbone("vit_fmnist_d128", num_classes=10).eval()

    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)
    assert model.patch_embed.proj.weight.shape == (128, 3, 7, 7)  # patch 7 on 28 px: 16 tokens
    assert len(model.blocks) == 6 and model.blocks[0].attn.num_heads == 4
    assert model.blocks[0].mlp.fc1.weight.shape == (512, 128)
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 28, 28)
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0


def test_data_config_follows_model_kwargs() -> None:
    cfg = data_config(tiny_vit())
    assert cfg["input_size"] == (3, 32, 32)  # built at img_size=32, not the architecture's 224
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["crop_pct"] == 0.9


def test_snella_default_needs_its_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "SNELLA_DEFAULT_WEIGHTS", tmp_path / "vit_fmnist_d128.safetensors")
    with pytest.raises(FileNotFoundError, match="vit_fmnist_d128.safetensors.*snella pretrain"):
        create_backbone("snella-default", num_classes=10)

    torch.manual_seed(0)
    src = create_backbone("vit_fmnist_d128", num_classes=10)
    save_file(src.state_dict(), tmp_path / "vit_fmnist_d128.safetensors")
    torch.manual_seed(1)
    dst = create_backbone("snella-default", num_classes=4)
    assert_equal_except(src, dst, skip=("head.",))
    assert dst.head.weight.shape == (4, 128)
    same = create_backbone("vit_fmnist_d128", num_classes=4, pretrained=True)  # pretrained means these weights
    assert_equal_except(src, same, skip=("head.",))


# --- hf: folders ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory):
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path_factory.mktemp("hf_vit")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=5)
    model = ViTForImageClassification(config)
    model.save_pretrained(folder)
    processor = {"image_mean": [0.25, 0.25, 0.25], "image_std": [0.2, 0.2, 0.2], "resample": 2,
                 "size": {"height": 32, "width": 32}, "image_processor_type": "ViTImageProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder, model


def test_hf_folder_loads_and_returns_logits(hf_folder) -> None:
    folder, original = hf_folder
    model = create_backbone(f"hf:{folder}", num_classes=3).eval()

    assert isinstance(model, HFImageClassifier)
    logits = model(torch.randn(2, 3, 32, 32))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3)
    names = dict(model.named_modules())
    assert "model.vit.layers.0.attention.q_proj" in names  # transformers 5 module names, under "model."
    for k, v in original.state_dict().items():
        if not k.startswith("classifier"):
            assert torch.equal(model.model.state_dict()[k], v), k
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.25,) * 3 and cfg["std"] == (0.2,) * 3
    assert cfg["interpolation"] == "bilinear"


def test_weights_saved_from_hf_model_load_back(hf_folder, tmp_path: Path) -> None:
    folder, _ = hf_folder
    trained = create_backbone(f"hf:{folder}", num_classes=3)
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()
    save_file(trained.state_dict(), tmp_path / "wrapper.safetensors")  # keys "model.vit..."
    save_file(trained.model.state_dict(), tmp_path / "inner.safetensors")  # keys "vit..."

    for name in ("wrapper.safetensors", "inner.safetensors"):
        fresh = create_backbone(f"hf:{folder}", num_classes=3)
        report = load_weights(fresh, tmp_path / name)
        assert_equal_except(trained, fresh)
        assert report.dropped_head == [] and "model.classifier.weight" in report.loaded

    other = create_backbone(f"hf:{folder}", num_classes=4)
    report = load_weights(other, tmp_path / "wrapper.safetensors")
    assert report.dropped_head == ["model.classifier.bias", "model.classifier.weight"]
    assert_equal_except(trained, other, skip=("model.classifier",))


def test_load_report_summary() -> None:
    report = LoadReport(loaded=["a", "b"], dropped_head=["head.weight"])
    assert report.summary() == "2 loaded, 1 dropped head"
