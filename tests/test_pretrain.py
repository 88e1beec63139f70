"""Tests for snella.pretrain: the loop on a tiny Fashion-MNIST written to tmp_path, its files, inputs and CLI."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from snella.backbones import create_backbone
from snella.data import build_transform, load_dataset
from snella.data.builtin import FASHION_MNIST_ENV
from snella.pretrain import add_arguments, load_fashion_mnist, main, pretrain, random_crop_flip

N_TRAIN, N_TEST = 80, 40
TINY = {"depth": 1}  # one block instead of six: the loop is the same, 6x cheaper


def write_idx(path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def learnable_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise whose brightness is the label (20 grey levels per class): learnt in a few steps."""
    return (20 * labels[:, None, None] + rng.integers(0, 60, (len(labels), 28, 28))).astype(np.uint8)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny models gain nothing from more, and on a busy machine spin-waiting costs 20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_fmnist(tmp_path, monkeypatch):
    """A Fashion-MNIST folder of N_TRAIN / N_TEST learnable images, made the one the loader reads."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for part, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = np.arange(n) % 10
        write_idx(folder / f"{part}-images-idx3-ubyte.gz", learnable_images(labels, rng), 2051)
        write_idx(folder / f"{part}-labels-idx1-ubyte.gz", labels, 2049)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(folder))
    return folder


def test_pretrain_writes_weights_that_create_backbone_loads_and_the_loss_falls(tiny_fmnist, tmp_path):
    path = tmp_path / "out" / "w.safetensors"
    summary = pretrain(str(path), epochs=5, batch_size=16, lr=3e-3, seed=0, warmup_epochs=1.0, limit=64,
                       model_kwargs=TINY)

    saved = load_file(str(path))
    model = create_backbone("vit_fmnist_d128", 10, weights=path, **TINY)
    state = model.state_dict()
    assert saved.keys() == state.keys() and "head.weight" in saved  # the head is kept
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    # another class count: the backbone loads, the head stays new
    five = create_backbone("vit_fmnist_d128", 5, weights=path, **TINY).state_dict()
    assert torch.equal(five["blocks.0.mlp.fc2.weight"], saved["blocks.0.mlp.fc2.weight"])
    assert five["head.weight"].shape == (5, 128)

    losses = summary["epoch_losses"]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.3, losses  # 2.09 -> 1.60 when written
    assert summary["train_images"] == 64 and summary["test_images"] == N_TEST
    assert 0.0 <= summary["test_accuracy"] <= 1.0

    written = json.loads(path.with_suffix(".json").read_text())
    assert written["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert written["recipe"]["epochs"] == 5 and written["recipe"]["limit"] == 64
    assert written["recipe"]["model_kwargs"] == TINY
    assert written["command"].startswith("snella pretrain --epochs 5 --batch-size 16 --lr 0.003 --seed 0")
    assert f"--output {path}" in written["command"] and written["torch"] == torch.__version__


def test_main_maps_its_flags_onto_pretrain_and_a_seed_reproduces_the_weights(tiny_fmnist, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    first = tmp_path / "cli.safetensors"
    args = parser.parse_args(["--output", str(first), "--epochs", "1", "--batch-size", "8", "--limit", "16",
                              "--seed", "3", "--augment", "--lr", "0.01"])
    assert main(args) == 0
    assert str(first) in capsys.readouterr().out
    command = json.loads(first.with_suffix(".json").read_text())["command"]
    assert command.endswith(f"--augment --limit 16 --output {first}")

    # two steps of batch 8 with the same seed, augmentation on: the same weights, bit for bit
    same = tmp_path / "same.safetensors"
    pretrain(str(same), epochs=1, batch_size=8, lr=0.01, seed=3, limit=16, augment=True)
    a, b = load_file(str(first)), load_file(str(same))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_inputs_are_bit_for_bit_what_fine_tuning_feeds(tiny_fmnist):
    train_x, train_y, test_x, test_y = load_fashion_mnist(limit=30)
    assert train_x.shape == (30, 1, 28, 28) and test_x.shape == (30, 1, 28, 28)
    transform = build_transform("none", 28, train=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    for split, images, labels in (("trainval", train_x, train_y), ("test", test_x, test_y)):
        dataset = load_dataset("fashion-mnist", split, transform)
        for i in range(len(images)):
            image, label = dataset[i]  # (3, 28, 28), grey replicated
            assert label == int(labels[i])
            assert torch.equal(image, images[i].expand(3, -1, -1)), (split, i)


def test_random_crop_flip_gives_a_padded_crop_of_each_image_maybe_flipped():
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # a black pixel after normalisation
    seen = set()
    for i in range(len(x)):
        crops = {(dy, dx): padded[i, :, dy:dy + 28, dx:dx + 28] for dy in range(5) for dx in range(5)}
        matches = [(dy, dx, flip) for (dy, dx), crop in crops.items() for flip in (False, True)
                   if torch.equal(out[i], crop.flip(-1) if flip else crop)]
        assert matches, f"image {i} is no crop of its padded input"
        seen.update(matches)
    # 64 draws of 50 equally likely outcomes: both flips and offsets at both ends appear
    assert {m[2] for m in seen} == {False, True}
    assert {m[0] for m in seen} >= {0, 4} and {m[1] for m in seen} >= {0, 4}
    # pad 0: only flips
    plain = random_crop_flip(x, 0, torch.Generator().manual_seed(2))
    assert all(torch.equal(plain[i], x[i]) or torch.equal(plain[i], x[i].flip(-1)) for i in range(len(x)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(epochs=0), "epochs"),
    (dict(lr=0.0), "lr"),
    (dict(limit=0), "limit"),
    (dict(output="weights.pth"), "output"),
    (dict(epochs=1, warmup_epochs=2.0), "warmup_epochs"),
])
def test_bad_values_are_named(kwargs, field, tmp_path):
    kwargs = {"output": str(tmp_path / "w.safetensors"), **kwargs}
    with pytest.raises(ValueError, match=field):
        pretrain(**kwargs)
