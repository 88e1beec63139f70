"""Tests of reopening runs: finding images to predict on, and building the backbone a run names."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm

from snella.training.config import TrainConfig
from snella.training.runs import build_backbone, find_images, load_run


def test_find_images_takes_files_and_searches_folders(tmp_path: Path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "a/b/notes.txt", "a/.hidden.png", "3.bmp"):
        (tmp_path / name).write_bytes(b"x")
    found = find_images([str(tmp_path / "a"), str(tmp_path / "3.bmp")])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/1.png", "a/b/2.JPG", "3.bmp"]
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        find_images([str(tmp_path / "missing.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        find_images([str(tmp_path / "empty")])


def test_a_failed_download_is_reported_as_bad_input(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Name or service not known")
        raise AssertionError("only the download should be tried")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ValueError, match=r"could not download pretrained weights .* --weights FILE"):
        build_backbone(TrainConfig(model="vit_tiny_patch16_224", pretrained=True), 10)


def test_load_run_explains_what_is_missing(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="has no config.yaml"):
        load_run(tmp_path)
    TrainConfig(model="vit_fmnist_d128").save_yaml(tmp_path / "config.yaml")
    (tmp_path / "run.json").write_text('{"classes": ["a", "b"], "input": {}}')
    with pytest.raises(FileNotFoundError, match="has no adapter/: the run did not finish .* --resume"):
        load_run(tmp_path)
