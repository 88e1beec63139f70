"""Tests of load_dataset's source parsing, layout detection and argument errors."""

import json

import pytest

from snella.data import SPLITS, load_dataset
from snella.data.load import detect_layout, parse_source


def test_detect_layout(tmp_path):
    for name, marker in (("v", "test.txt"), ("f", "train.json"), ("h", "dataset_dict.json"), ("h2", "state.json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text("{}")
    (tmp_path / "i").mkdir()
    assert [detect_layout(str(tmp_path / n)) for n in ("v", "f", "h", "h2", "i")] == \
        ["vtab", "fgvc", "hf", "hf", "imagefolder"]


def test_parse_source_prefixes_and_builtins(tmp_path):
    assert parse_source("mnist5k") == ("builtin", "mnist5k")
    assert parse_source(f"fgvc:{tmp_path}") == ("fgvc", str(tmp_path))
    assert parse_source(str(tmp_path)) == ("imagefolder", str(tmp_path))


def test_prefix_overrides_detection(tmp_path, make_image):
    # A folder with a train.json is FGVC when detected, but "imagefolder:" reads it as class folders.
    make_image(str(tmp_path / "cls" / "a.png"), 1)
    (tmp_path / "train.json").write_text(json.dumps({"cls/a.png": 0}))
    assert load_dataset(f"imagefolder:{tmp_path}", "trainval").classes == ["cls"]
    assert load_dataset(str(tmp_path), "trainval").classes == ["0"]


def test_unknown_source_lists_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'cifar10' is neither a built-in dataset \(digits, faces, "
                                                 r"fashion-mnist, mnist5k\).*vtab:<folder>"):
        load_dataset("cifar10", "train")
    with pytest.raises(FileNotFoundError, match="folder .*nope does not exist"):
        load_dataset(f"vtab:{tmp_path / 'nope'}", "train")


def test_vtab_prefix_on_a_folder_without_lists(tmp_path):
    with pytest.raises(FileNotFoundError, match="train800.txt for split 'train' does not exist"):
        load_dataset(f"vtab:{tmp_path}", "train")


def test_unknown_split_lists_splits():
    with pytest.raises(ValueError, match="unknown split 'validation'; expected one of train, val, trainval, test"):
        load_dataset("digits", "validation")
    assert SPLITS == ("train", "val", "trainval", "test")
