"""Tests of SnellaConfig: defaults, validation of every field, per-matrix sparsity, and the JSON file."""

from __future__ import annotations

import json
import re

import pytest

from snella import SnellaConfig
from snella.config import CONFIG_NAME
from snella.functional import COMPETITION_MODES, KERNELS


def test_defaults_follow_the_authors_scripts():
    config = SnellaConfig()
    assert (config.r, config.chunks, config.kernel, config.competition) == (32, 2, "mixed", "magnitude")
    assert config.sparsity == 0.0 and config.chunk_scale == 0.1 and config.split_qkv


@pytest.mark.parametrize("field, value, accepted", [
    ("sparsity", 1.0, "[0, 1)"),
    ("sparsity", -0.1, "[0, 1)"),
    ("sparsity", True, "[0, 1)"),
    ("sparsity", "0.5", "[0, 1)"),
    ("r", 0, "positive integer"),
    ("r", 8.0, "positive integer"),
    ("chunks", 0, "positive integer"),
    ("kernel", "cubic", ", ".join(KERNELS)),
    ("competition", "hard", ", ".join(COMPETITION_MODES)),
    ("adapter_dropout", 1.0, "[0, 1)"),
    ("adapter_drop_path", -0.5, "[0, 1)"),
    ("init_scale", 0.0, "positive"),
    ("target_modules", "blocks.(", "valid regular expression"),
    ("exclude_modules", "[qkv", "valid regular expression"),
    ("target_modules", ["qkv", 3], "list of module names"),
])
def test_bad_values_name_the_field_the_value_and_what_is_accepted(field, value, accepted):
    with pytest.raises(ValueError) as err:
        SnellaConfig(**{field: value})
    message = str(err.value)
    assert field in message and repr(value) in message and accepted in message


def test_rank_must_split_into_chunks():
    with pytest.raises(ValueError, match=r"r=10 .*multiple of chunks=3"):
        SnellaConfig(r=10, chunks=3)
    assert SnellaConfig(r=12, chunks=3).r == 12


@pytest.mark.parametrize("pattern, message", [
    ({"(": 0.5}, "valid regular expressions"),
    ({r".*\.v": 1.5}, r"sparsity_pattern['.*\\.v']=1.5"),
    ({r".*\.v": -0.2}, "[0, 1)"),
])
def test_bad_sparsity_pattern(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SnellaConfig(sparsity_pattern=pattern)


def test_sparsity_for_first_full_match_wins():
    config = SnellaConfig(sparsity=0.2, sparsity_pattern={r".*qkv\.v": 0.9, r"blocks\.0\..*": 0.5, r".*\.v": 0.1})
    assert config.sparsity_for("blocks.0.attn.qkv.v") == 0.9  # first pattern, though the second matches too
    assert config.sparsity_for("blocks.0.attn.qkv.q") == 0.5
    assert config.sparsity_for("blocks.1.mlp.v") == 0.1
    assert config.sparsity_for("blocks.1.mlp.fc1") == 0.2
    # full matches, not searches: 'qkv' alone does not select 'blocks.1.attn.qkv.q'
    assert SnellaConfig(sparsity=0.3, sparsity_pattern={"qkv": 0.8}).sparsity_for("blocks.1.attn.qkv.q") == 0.3


def test_json_round_trip(tmp_path):
    config = SnellaConfig(r=16, chunks=4, kernel="piecewise", sparsity=0.75, sparsity_pattern={r".*\.v": 0.5},
                          competition="soft", target_modules=("qkv", "fc1"), exclude_modules=r"blocks\.0\..*",
                          modules_to_save=["head"], parameters_to_save=["cls_token"], split_qkv=False,
                          adapter_dropout=0.1, adapter_drop_path=0.1, init_scale=0.5)
    assert config.target_modules == ["qkv", "fc1"]  # a tuple becomes a list, as JSON will give it back
    path = config.save(tmp_path)
    assert path == tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    assert data["method"] == "snella" and data["sparsity"] == 0.75
    assert SnellaConfig.load(tmp_path) == config


def test_load_errors_name_the_file_or_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / CONFIG_NAME))):
        SnellaConfig.load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SnellaConfig.load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"method": "snella", "r": 8, "lora_alpha": 16, "rank": 4}))
    with pytest.raises(ValueError, match=r"unknown SnellaConfig field\(s\) \['lora_alpha', 'rank'\].*'sparsity'"):
        SnellaConfig.load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"r": 8, "sparsity": 1.2}))
    with pytest.raises(ValueError, match="sparsity=1.2"):  # a file is validated like code is
        SnellaConfig.load(tmp_path)
