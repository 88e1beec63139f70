"""Every SnellaConfig and AllocatorConfig setting reaches `snella finetune`: flags and YAML -> TrainConfig -> the
SnellaModel and allocator actually built; bad values are refused once, by the config that owns them, in flag names."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import timm
import torch

import snella.backbones  # noqa: F401  (registers vit_fmnist_d128)
from snella import cli
from snella.allocator import AllocatorConfig
from snella.config import SnellaConfig
from snella.train import _allocator
from snella.training.config import ALLOCATOR_FIELDS, TrainConfig
from snella.training.methods import get_method


def parse(*flags: str) -> TrainConfig:
    return cli.config_from_args(cli.build_parser("finetune").parse_args(["finetune", *flags]))


def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_fmnist_d128", num_classes=10, depth=2, embed_dim=32, num_heads=2)


def test_every_adapter_and_allocator_field_is_a_setting():
    names = {f.name for f in fields(TrainConfig)}
    # the modules trained in full are the task's (classification: --head)
    assert {f.name for f in fields(SnellaConfig)} - names == {"modules_to_save"}
    assert set(ALLOCATOR_FIELDS) == {f.name for f in fields(AllocatorConfig)} and set(ALLOCATOR_FIELDS.values()) <= names


def test_adapter_flags_reach_the_built_model():
    config = parse("--kernel", "rbf", "--chunks", "4", "--chunk-scale", "0.5", "--init-scale", "0.25",
                   "--no-split-qkv", "--exclude-modules", "blocks.1.mlp.fc2", "--adapter-dropout", "0.1",
                   "--adapter-dropout-exclude", "fc1", "--sparsity-pattern", "{'blocks\\.0\\..*': 0.9}",
                   "--parameters-to-save", "pos_embed", "--sparsity", "0.4")
    model = get_method("snella").apply(config, backbone())
    built = model.peft_config["default"]
    assert (built.kernel, built.chunks, built.chunk_scale, built.init_scale) == ("rbf", 4, 0.5, 0.25)
    assert built.split_qkv is False and built.exclude_modules == ["blocks.1.mlp.fc2"]
    assert built.parameters_to_save == ["cls_token", "pos_embed"] and built.modules_to_save == ["head"]
    names = [m.name for m in model.matrices()]
    assert "blocks.0.attn.qkv" in names and "blocks.0.attn.qkv.q" not in names  # one fused matrix
    assert "blocks.1.mlp.fc2" not in names and "blocks.0.mlp.fc2" in names
    sparsity = {m.name: m.get_sparsity() for m in model.matrices()}
    assert sparsity["blocks.0.mlp.fc1"] == pytest.approx(0.9) and sparsity["blocks.1.mlp.fc1"] == pytest.approx(0.4)
    assert built.dropout_for("blocks.0.mlp.fc1") == 0.0 and built.dropout_for("blocks.0.attn.proj") == 0.1
    assert model.base_model.get_parameter("pos_embed").requires_grad


def test_the_method_kernel_is_the_default_and_yaml_regexes_stay_regexes(tmp_path: Path):
    assert get_method("snell").adapter_config(TrainConfig(method="snell"), backbone()).kernel == "piecewise"
    assert get_method("snella").adapter_config(TrainConfig(), backbone()).kernel == "mixed"
    (tmp_path / "c.yaml").write_text("exclude_modules: 'blocks\\.1\\..*'\nadapter_dropout_exclude: null\n")
    config = parse("--config", str(tmp_path / "c.yaml"))
    assert config.exclude_modules == r"blocks\.1\..*" and config.adapter_dropout_exclude is None
    assert parse("--adapter-dropout-exclude", "none").adapter_dropout_exclude is None
    names = [m.name for m in get_method("snella").apply(config, backbone()).matrices()]
    assert names and all(n.startswith("blocks.0.") for n in names)


def test_allocator_flags_reach_the_built_allocator():
    config = parse("--allocation", "steps", "--allocation-interval", "3", "--allocation-beta1", "0.5",
                   "--allocation-beta2", "0.6", "--allocation-warmup", "1", "--allocation-final", "2",
                   "--score", "frobenius", "--adaptive-threshold", "0.1", "--init-sparsity", "0.05")
    method = get_method("snella")
    model = method.apply(config, backbone())
    allocator = _allocator(config, method, model, total_steps=30, steps_per_epoch=10)
    assert allocator.config == AllocatorConfig(target_sparsity=0.3, init_sparsity=0.05, score="frobenius",
                                               schedule="steps", interval_steps=3, adaptive_threshold=0.1, beta1=0.5,
                                               beta2=0.6, warmup=1, final=2)
    assert all(m.get_sparsity() == pytest.approx(0.05) for m in model.matrices())  # allocation step 0
    assert _allocator(parse("--sparsity", "0"), method, model, 30, 10) is None  # nothing to share


@pytest.mark.parametrize("flags, message", [
    (["--kernel", "cubic"], "kernel='cubic' is invalid; accepted: mixed, piecewise, rbf, sigmoid, linear"),
    (["--chunk-scale", "0"], "chunk_scale=0.0 is invalid; accepted: a positive number"),
    (["--init-scale", "-1"], "init_scale=-1.0 is invalid; accepted: a positive number"),
    (["--sparsity-pattern", "fc1=1.5"], r"sparsity_pattern\['fc1'\]=1.5 is invalid; accepted: a fraction in \[0, 1\)"),
    (["--sparsity-pattern", "{'(': 0.5}"], r"sparsity_pattern='\(' is invalid; accepted: valid regular expressions"),
    (["--allocation-beta2", "1"], r"allocation_beta2=1.0 is invalid; accepted: a number in \[0, 1\)"),
    (["--allocation-final", "-1"], r"allocation_final=-1 is invalid; accepted: an integer >= 0"),
    (["--score", "norm"], "score='norm' is invalid; accepted: sensitivity, frobenius"),
    (["--allocation", "adaptive"], "allocation_interval=None is invalid; accepted: a positive integer, which "
                                   "allocation='adaptive' needs"),
    (["--method", "lora", "--sparsity", "0", "--init-sparsity", "1"], r"init_sparsity=1.0 is invalid; accepted: "
                                                                      r"a number in \[0, 1\)"),
    (["--task", "detection"], "task='detection' is invalid; accepted: classification"),
])
def test_bad_settings_exit_2_naming_the_flag_and_what_is_accepted(flags, message, capsys):
    assert cli.main(["finetune", *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snella finetune: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert "SnellaConfig." not in err and "target_sparsity" not in err  # the flag's name, not the library's


def test_a_setting_without_its_allocator_is_still_checked_but_not_against_the_target():
    assert TrainConfig(method="lora", sparsity=0.0, init_sparsity=0.5).init_sparsity == 0.5
    assert TrainConfig(competition="none", sparsity=0.0).competition == "none"  # no allocator at sparsity 0
    with pytest.raises(ValueError, match="competition='none' is invalid"):
        TrainConfig(competition="none", sparsity=0.3)
