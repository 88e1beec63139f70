"""Tests of TrainConfig: the default recipe, YAML and command-line values, validation, packaged configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from snella.training.config import PACKAGED_CONFIGS, TrainConfig, parse_mapping, read_yaml


def test_defaults_are_the_documented_recipe():
    c = TrainConfig()
    assert (c.model, c.data, c.train_split, c.test_split, c.method) == ("snella-default", "mnist5k", "trainval",
                                                                        "test", "snella")
    assert (c.r, c.chunks, c.sparsity, c.lr, c.weight_decay) == (8, 2, 0.3, 2e-2, 1e-4)
    assert (c.epochs, c.batch_size, c.warmup_epochs, c.transform, c.allocation) == (15, 128, 1, "none", "epoch")
    assert c.random_shift == 1  # docs/default-recipe.md
    assert c.head is None and c.train_cls_token  # the model's classifier + the class token train


def test_strings_from_yaml_or_flags_become_typed_values():
    c = TrainConfig.from_dict({"lr": "1e-3", "epochs": "3", "progress": "false", "model_kwargs": "depth=2,img_size=32",
                               "target_modules": "qkv", "val_split": "none", "train_split": "train"})
    assert c.lr == 0.001 and c.epochs == 3 and c.progress is False and c.val_split is None
    assert c.model_kwargs == {"depth": 2, "img_size": 32}
    assert c.target_modules == ["qkv"]


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['epoch', 'lrr'\]"):
        TrainConfig.from_dict({"lrr": 1, "epoch": 3})


@pytest.mark.parametrize("field, value, accepted", [
    ("epochs", "x", "an integer"), ("epochs", 0, "a positive integer"), ("method", "dora", "snella, snell, lora"),
    ("sparsity", 1.0, r"\[0, 1\)"), ("r", 5, "a multiple of chunks=2"), ("warmup_epochs", 30, "at most epochs=15"),
    ("allocation", "steps", "allocation_interval"), ("device", "gpu", "auto, cpu, cuda"),
    ("init_sparsity", 0.6, "at most sparsity=0.3"), ("progress", "maybe", "true or false"),
    ("random_shift", -1, "an integer >= 0"),
    ("resume", True, "only with output_dir"),
])
def test_bad_values_name_the_field_and_what_is_accepted(field, value, accepted):
    with pytest.raises(ValueError, match=accepted) as err:
        TrainConfig.from_dict({field: value})
    assert field in str(err.value)


def test_validating_on_the_training_data_is_refused():
    with pytest.raises(ValueError, match="val_split"):
        TrainConfig(val_split="val")  # "val" is part of the default "trainval"
    assert TrainConfig(train_split="train", val_split="val").val_split == "val"


def test_yaml_round_trip_and_overrides(tmp_path: Path):
    c = TrainConfig(method="lora", lr=3e-3, model_kwargs={"depth": 2}, target_modules=["qkv", "fc1"])
    path = c.save_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(path) == c
    assert TrainConfig.from_yaml(path, {"lr": 0.5}).lr == 0.5


def test_yaml_errors(tmp_path: Path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("lr: [1, \n")
    with pytest.raises(ValueError, match="not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="packaged config"):
        read_yaml(tmp_path / "missing.yaml")
    (tmp_path / "typo.yaml").write_text("lr: 0.1\nbatchsize: 8\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown setting\(s\) \['batchsize'\]"):
        TrainConfig.from_yaml(tmp_path / "typo.yaml")


@pytest.mark.parametrize("path", sorted(PACKAGED_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_packaged_configs_load_by_name(path: Path):
    data = read_yaml(path.stem)
    assert data, f"{path} is empty"
    config = TrainConfig.from_yaml(path.stem)
    for key, value in data.items():
        assert getattr(config, key) == value or getattr(config, key) == pytest.approx(value)
    assert path.read_text().startswith("#"), "each packaged config opens with what it is and its command"


def test_parse_mapping_forms():
    assert parse_mapping("a=1, b=x,c=0.5") == {"a": 1, "b": "x", "c": 0.5}
    assert parse_mapping("{a: [1, 2], b: true}") == {"a": [1, 2], "b": True}
    assert parse_mapping("") == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_mapping("depth")


def test_differences_ignore_run_only_settings():
    a, b = TrainConfig(), TrainConfig(progress=False, output_dir="x", debug_step_delay=0.1, lr=0.5)
    assert a.differences(b) == {"lr": (0.02, 0.5)}
