"""Tests of writing merged models as plain timm / transformers checkpoints: which recipes are written, that they
rebuild, and the files' permissions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import snella.backbones  # noqa: F401  (registers vit_fmnist_d128)
from snella.training.export import timm_create_args, vit_kwargs, write_merged

X28 = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def rebuild(info: dict, weights: Path) -> torch.nn.Module:
    model = timm.models.VisionTransformer(**info["vit_kwargs"]) if "vit_kwargs" in info else \
        timm.create_model(**info["create_model"])
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def test_project_vit_is_described_by_constructor_kwargs(tmp_path: Path):
    torch.manual_seed(0)
    model = timm.create_model("vit_fmnist_d128", num_classes=4, depth=2, embed_dim=32, num_heads=2).eval()
    info = write_merged(model, "vit_fmnist_d128", tmp_path / "m.safetensors", X28, {"classes": list("abcd")})
    assert "create_model" not in info  # timm alone does not know vit_fmnist_d128
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk == info and on_disk["vit_kwargs"]["depth"] == 2 and on_disk["classes"] == list("abcd")
    with torch.no_grad():
        assert torch.allclose(rebuild(on_disk, tmp_path / "m.safetensors")(X28), model(X28), atol=1e-6)


def test_timm_architectures_also_get_create_model_args(tmp_path: Path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=1).eval()
    info = write_merged(vit, "vit_tiny_patch16_224", tmp_path / "v.safetensors", X32, {})
    assert info["create_model"]["model_name"] == "vit_tiny_patch16_224" and "vit_kwargs" in info
    cnn = timm.create_model("resnet10t", num_classes=3).eval()
    assert vit_kwargs(cnn) is None and timm_create_args(cnn, "vit_fmnist_d128") is None
    info = write_merged(cnn, "resnet10t", tmp_path / "c.safetensors", X32, {})
    assert set(info) >= {"create_model"} and "vit_kwargs" not in info
    with torch.no_grad():
        assert torch.allclose(rebuild(info, tmp_path / "c.safetensors")(X32), cnn(X32), atol=1e-5)


def test_a_model_timm_cannot_build_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="merge cannot write the Sequential of architecture 'mine'.*adapter/ folder"):
        write_merged(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2)), "mine",
                     tmp_path / "x.safetensors", X32, {})
    assert not (tmp_path / "x.safetensors").exists()


def test_a_hugging_face_classifier_is_written_with_its_transformers_config(tmp_path: Path):
    from transformers import AutoConfig, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    from snella.backbones import HFImageClassifier

    torch.manual_seed(0)
    config = ViTConfig(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    model = HFImageClassifier(ViTForImageClassification(config), {}).eval()
    info = write_merged(model, "hf:/models/vit", tmp_path / "h.safetensors", X28, {"classes": ["a", "b", "c"]})
    assert "vit_kwargs" not in info and "create_model" not in info
    assert info["transformers_config"]["id2label"] == {"0": "a", "1": "b", "2": "c"}
    on_disk = json.loads((tmp_path / "h.json").read_text())
    rebuilt = AutoModelForImageClassification.from_config(AutoConfig.for_model(**on_disk["transformers_config"]))
    rebuilt.load_state_dict(load_file(str(tmp_path / "h.safetensors")))  # the transformers model's own keys
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(pixel_values=X28).logits, model(X28), atol=1e-6)
    assert rebuilt.config.id2label[2] == "c"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_merged_file_gets_the_usual_permissions(tmp_path: Path, umask: int):
    torch.manual_seed(0)
    model = timm.create_model("vit_fmnist_d128", num_classes=2, depth=1, embed_dim=32, num_heads=2).eval()
    old = os.umask(umask)
    try:
        write_merged(model, "vit_fmnist_d128", tmp_path / "m.safetensors", X28, {})
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # safetensors alone gives 0600
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.glob("*.tmp"))
