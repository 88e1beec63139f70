"""Tests of the output folder rules: default name, refusing to overwrite a run, clearing one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snella.training.config import TrainConfig
from snella.training.outputs import check_output_dir, clear_run, default_output_dir, folder_bytes, read_json, write_json


def test_default_name_has_method_data_and_time():
    name = default_output_dir(TrainConfig(method="lora", data="imagefolder:/data/my pets/"), now=0).as_posix()
    assert name.startswith("runs/lora-my-pets-19") and len(name.split("-")[-1]) == 6


def test_a_folder_holding_a_run_is_refused_unless_asked(tmp_path: Path):
    check_output_dir(tmp_path / "new", overwrite=False, resume=False)  # nothing there: fine
    (tmp_path / "config.yaml").write_text("lr: 1\n")
    with pytest.raises(ValueError, match=r"already holds a run \(config.yaml\); pass --overwrite"):
        check_output_dir(tmp_path, overwrite=False, resume=False)
    check_output_dir(tmp_path, overwrite=True, resume=False)
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        check_output_dir(tmp_path, overwrite=False, resume=True)
    with pytest.raises(ValueError, match="contradict"):
        check_output_dir(tmp_path, overwrite=True, resume=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(tmp_path / "file", overwrite=False, resume=False)


def test_clear_run_removes_run_files_only(tmp_path: Path):
    for name in ("config.yaml", "metrics.json", "curves.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "last.pt").write_text("x")
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_json_helpers(tmp_path: Path):
    write_json(tmp_path / "m.json", {"a": [1, 2]})
    assert read_json(tmp_path / "m.json") == {"a": [1, 2]}
    assert folder_bytes(tmp_path) == len(json.dumps({"a": [1, 2]}, indent=2)) + 1
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="snella run"):
        read_json(tmp_path / "none.json")
