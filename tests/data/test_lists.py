"""Tests of the list layouts: VTAB-1k text lists and FGVC json files, and their validation errors."""

import json
import re

import pytest
import torch

from snella.data import build_transform, load_dataset

RAW = build_transform("none", 8, train=False, mean=(0.0,), std=(1.0,))


def write_list(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


@pytest.fixture
def vtab_task(tmp_path, make_image):
    """A VTAB-1k task: 9 PNGs under images/, labels 0..4 (4 only in test)."""
    task = tmp_path / "vtab" / "dtd"
    for i in range(9):
        make_image(str(task / "images" / f"{i:03d}.png"), 20 * i)
    train = [f"images/{i:03d}.png {i % 3}" for i in range(4)]
    val = [f"images/{i:03d}.png {i % 3}" for i in range(4, 6)]
    write_list(task / "train800.txt", train)
    write_list(task / "val200.txt", val)
    write_list(task / "train800val200.txt", train + val)
    write_list(task / "test.txt", ["images/006.png 4", "", "images/007.png 0", "images/008.png 3"])
    return task


def test_vtab_splits_labels_classes_and_pixels(vtab_task):
    sizes = {s: len(load_dataset(str(vtab_task), s)) for s in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 4, "val": 2, "trainval": 6, "test": 3}
    test = load_dataset(f"vtab:{vtab_task}", "test", RAW)
    assert test.classes == ["0", "1", "2", "3", "4"]  # max label over every list + 1
    assert test.targets == [4, 0, 3]
    assert load_dataset(str(vtab_task), "train").classes == test.classes
    image, label = test[1]  # images/007.png, value 140
    assert label == 0
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([140, 70, 115]) / 255.0, atol=1e-6, rtol=0)
    assert test.paths[1] == str(vtab_task / "images" / "007.png")


def test_vtab_trainval_falls_back_to_train_plus_val(vtab_task):
    (vtab_task / "train800val200.txt").unlink()
    data = load_dataset(str(vtab_task), "trainval")
    assert len(data) == 6 and data.targets == [0, 1, 2, 0, 1, 2]


def test_vtab_path_with_spaces(vtab_task, make_image):
    make_image(str(vtab_task / "my images" / "a b.png"), 3)
    write_list(vtab_task / "test.txt", ["my images/a b.png 2"])
    assert load_dataset(str(vtab_task), "test").paths == [str(vtab_task / "my images" / "a b.png")]


def test_vtab_missing_files_are_listed_with_line_numbers(vtab_task):
    write_list(vtab_task / "train800.txt", ["images/000.png 0", "images/gone1.png 1", "images/gone2.png 1"])
    with pytest.raises(FileNotFoundError) as error:
        load_dataset(str(vtab_task), "train")
    message = str(error.value)
    assert "2 of 3 image(s) listed in " + str(vtab_task / "train800.txt") in message
    assert f"line 2: {vtab_task / 'images' / 'gone1.png'}" in message
    assert f"line 3: {vtab_task / 'images' / 'gone2.png'}" in message


@pytest.mark.parametrize("line, message", [
    ("images/000.png", "line 2: malformed line 'images/000.png'"),
    ("images/000.png one", "line 2: label 'one' is not an integer"),
    ("images/000.png -1", "line 2: label -1 is negative"),
])
def test_vtab_bad_lines_are_named(vtab_task, line, message):
    write_list(vtab_task / "val200.txt", ["images/004.png 1", line])
    with pytest.raises(ValueError, match=re.escape(f"{vtab_task / 'val200.txt'}, {message}")):
        load_dataset(str(vtab_task), "val")


def test_vtab_missing_list_is_named(vtab_task):
    (vtab_task / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(vtab_task / "test.txt"))):
        load_dataset(f"vtab:{vtab_task}", "test")


def test_vtab_skip_bad_images(vtab_task, make_corrupt):
    make_corrupt(str(vtab_task / "images" / "001.png"))
    data = load_dataset(str(vtab_task), "train", skip_bad_images=True)
    assert data.bad_images == [str(vtab_task / "images" / "001.png")]
    assert data.targets == [0, 2, 0]


@pytest.fixture
def fgvc_task(tmp_path, make_image):
    """An FGVC task in VPT's CUB layout: paths relative to images/, labels 1-based."""
    task = tmp_path / "fgvc" / "cub"
    train, val, test = {}, {}, {}
    for cls in (1, 2, 3):
        for i in range(4):
            rel = f"{cls:03d}.bird/{i}.jpg"
            make_image(str(task / "images" / rel), 30 * cls + i)
            (train if i < 2 else val if i == 2 else test)[rel] = cls
    for name, mapping in (("train", train), ("val", val), ("test", test)):
        (task / f"{name}.json").write_text(json.dumps(mapping))
    return task


def test_fgvc_images_folder_labels_and_splits(fgvc_task):
    sizes = {s: len(load_dataset(str(fgvc_task), s)) for s in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 6, "val": 3, "trainval": 9, "test": 3}
    train = load_dataset(f"fgvc:{fgvc_task}", "train", RAW)
    assert train.classes == ["1", "2", "3"]  # original label values, mapped to 0..2
    assert train.targets == [0, 0, 1, 1, 2, 2]
    assert train.paths[2] == str(fgvc_task / "images" / "002.bird" / "0.jpg")
    image, label = train[2]
    assert label == 1
    torch.testing.assert_close(image[:, 1, 1], torch.tensor([60, 30, 195]) / 255.0, atol=4 / 255, rtol=0)
    trainval = load_dataset(str(fgvc_task), "trainval")
    assert trainval.paths[:6] == train.paths and trainval.targets[6:] == [0, 1, 2]


def test_fgvc_paths_relative_to_the_json_folder(tmp_path, make_image):
    task = tmp_path / "flowers"
    make_image(str(task / "jpg" / "a.jpg"), 5)
    make_image(str(task / "jpg" / "b.jpg"), 9)
    (task / "train.json").write_text(json.dumps({"jpg/a.jpg": 0, "jpg/b.jpg": 1}))
    (task / "test.json").write_text(json.dumps({"jpg/b.jpg": 1}))
    data = load_dataset(str(task), "trainval")
    assert data.paths == [str(task / "jpg" / "a.jpg"), str(task / "jpg" / "b.jpg")]
    assert data.classes == ["0", "1"]
    # no val.json: train and val are a held-out split of train.json
    assert len(load_dataset(str(task), "train")) + len(load_dataset(str(task), "val")) == 2


def test_fgvc_missing_file_is_named(fgvc_task):
    mapping = json.loads((fgvc_task / "test.json").read_text())
    mapping["009.bird/lost.jpg"] = 1
    (fgvc_task / "test.json").write_text(json.dumps(mapping))
    with pytest.raises(FileNotFoundError) as error:
        load_dataset(str(fgvc_task), "test")
    message = str(error.value)
    assert "1 of 4 image(s) listed in " + str(fgvc_task / "test.json") in message
    assert str(fgvc_task / "images" / "009.bird" / "lost.jpg") in message


@pytest.mark.parametrize("content, message", [
    ('{"001.bird/0.jpg": "one"}', "entry '001.bird/0.jpg' has label 'one'; expected a non-negative integer"),
    ('{"001.bird/0.jpg": -2}', "has label -2"),
    ('["001.bird/0.jpg"]', "expected a json object"),
    ('{"001.bird/0.jpg": 1,', "is not valid json"),
])
def test_fgvc_bad_json_is_named(fgvc_task, content, message):
    (fgvc_task / "val.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        load_dataset(str(fgvc_task), "train")
    assert str(fgvc_task / "val.json") in str(error.value)
