"""Tests of the `snella` command line: help, config precedence, exit codes on bad input, and the run tools
(evaluate, predict, merge) on runs trained on a small striped-image ImageFolder built here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snella import cli
from snella.training.config import TrainConfig
from snella.training.runs import load_run

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--model", "vit_fmnist_d128", "--model-kwargs", "depth=2,embed_dim=32,num_heads=2", "--no-progress"]


@pytest.fixture(scope="module")
def stripes(tmp_path_factory) -> Path:
    """An ImageFolder with train/ and test/ splits: 28 px grey images of horizontal or vertical stripes,
    and one corrupt file in the training data."""
    root = tmp_path_factory.mktemp("stripes")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 10)):
        for label in ("horizontal", "vertical"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                stripes = (np.arange(28) // 2 % 2 == 0) * 150  # (28,)
                image = rng.integers(0, 80, size=(28, 28)) + (stripes[:, None] if label == "horizontal" else stripes)
                Image.fromarray(image.astype(np.uint8)).save(folder / f"{i}.png")
    (root / "train" / "horizontal" / "broken.png").write_bytes(b"not a png")
    return root


def finetune_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", *TINY_MODEL, "--data", str(data), "--batch-size", "16", "--warmup-epochs", "0",
            "--output-dir", str(out), "--skip-bad-images", *extra]


@pytest.fixture(scope="module")
def full_run(stripes, tmp_path_factory) -> Path:
    """Full fine-tuning, which learns the stripes even from a random backbone."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert cli.main(finetune_args(stripes, out, "--method", "full", "--lr", "3e-3", "--epochs", "6")) == 0
    return out


@pytest.fixture(scope="module")
def snella_run(stripes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("snella") / "run"
    # fgvc: random crops and flips, so training reads images through a DataLoader instead of a tensor cache
    assert cli.main(finetune_args(stripes, out, "--epochs", "2", "--transform", "fgvc")) == 0
    return out


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "snella", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


# ---------------------------------------------------------------- parsing


def test_python_m_snella_lists_the_commands():
    done = run_cli("--help")
    assert done.returncode == 0
    for command in ("finetune", "evaluate", "predict", "merge", "pretrain"):
        assert f"    {command}  " in done.stdout


def test_finetune_help_shows_groups_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["finetune", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for group in ("model:", "data:", "method:", "optimisation:", "run:"):
        assert group in text
    assert "--model-kwargs MAP" in text and "(default: snella-default)" in text


def test_yaml_then_flags(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("lr: 1.0e-1\nepochs: 5\nmethod: lora\n")
    args = cli.build_parser("finetune").parse_args(["finetune", "--config", str(tmp_path / "c.yaml"), "--lr", "0.2",
                                                    "--target-modules", "qkv", "fc1", "--no-train-cls-token"])
    config = cli.config_from_args(args)
    assert (config.lr, config.epochs, config.method) == (0.2, 5, "lora")
    assert config.target_modules == ["qkv", "fc1"] and config.train_cls_token is False
    assert config.r == TrainConfig().r  # untouched settings keep the recipe's defaults
    packaged = cli.config_from_args(cli.build_parser("finetune").parse_args(["finetune", "--config", "full"]))
    assert packaged.method == "full" and packaged.lr == 1e-3


@pytest.mark.parametrize("args, message", [
    (["finetune", "--config", "{yaml}", "--no-progress"], r"unknown setting\(s\) \['epoch'\]"),
    (["finetune", "--epochs", "x"], "epochs='x' is invalid; accepted: an integer"),
    (["finetune", "--data", "/no/such/folder", "--output-dir", "{tmp}/o"], "data source '/no/such/folder' is neither"),
    (["finetune", "--output-dir", "{tmp}"], r"already holds a run \(config.yaml\)"),
    (["evaluate", "--run", "{tmp}/nothing"], "run folder .* does not exist"),
])
def test_bad_input_exits_2_with_one_message(args, message, tmp_path: Path, capsys):
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    (tmp_path / "config.yaml").write_text("lr: 1\n")  # makes tmp_path look like a run folder
    args = [a.format(yaml=tmp_path / "bad.yaml", tmp=tmp_path) for a in args]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"snella {args[0]}: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_corrupt_image_is_named_or_skipped(stripes, snella_run, tmp_path: Path, capsys):
    assert cli.main(finetune_args(stripes, tmp_path / "o", "--no-skip-bad-images")) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err and "Traceback" not in err
    metrics = json.loads((snella_run / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1  # the run with --skip-bad-images trained on the 48 good images
    assert metrics["steps"] == 2 * 3 and metrics["test_images"] == 20


def test_non_finite_loss_exits_1(stripes, tmp_path: Path, capsys):
    assert cli.main(finetune_args(stripes, tmp_path / "o", "--debug-nan-step", "2")) == 1
    err = capsys.readouterr().err
    assert "stopped: loss became nan at epoch 1, step 2" in err and "--lr" in err


def test_pretrain_is_delegated_to_snella_pretrain(monkeypatch):
    calls = []
    fake = types.ModuleType("snella.pretrain")
    fake.add_arguments = lambda parser: parser.add_argument("--epochs", type=int, default=4)
    fake.main = lambda args: calls.append(args.epochs)
    monkeypatch.setitem(sys.modules, "snella.pretrain", fake)
    monkeypatch.setattr("snella.pretrain", fake, raising=False)
    assert cli.main(["pretrain", "--epochs", "3"]) == 0
    assert calls == [3]


# ---------------------------------------------------------------- evaluate, predict, merge


def test_full_fine_tuning_learns_and_evaluate_agrees(full_run, capsys):
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9  # the loop really optimises: stripes are easy once the backbone trains
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert cli.main(["evaluate", "--run", str(full_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == metrics["test_accuracy"] and result["images"] == 20
    assert cli.main(["evaluate", "--run", str(full_run), "--split", "trainval", "--precision", "bf16"]) == 0
    line = capsys.readouterr().out.strip()  # "accuracy 100.00% on <data> [trainval], 48 images"
    assert line.startswith("accuracy ") and line.endswith("[trainval], 48 images")  # the corrupt file stays skipped
    assert float(line.split()[1].rstrip("%")) >= 90.0  # bf16 autocast keeps the answers


def test_predict_gives_sorted_top_k_labels(full_run, stripes, capsys):
    folder = stripes / "test"
    assert cli.main(["predict", "--run", str(full_run), str(folder), "--top-k", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 20
    run = load_run(full_run, "cpu")
    transform = run.spec.build(train=False)
    for item in results:
        top = item["top"]
        assert len(top) == 2  # k is capped at the number of classes
        assert top[0]["probability"] >= top[1]["probability"] and sum(t["probability"] for t in top) == pytest.approx(1)
        image = transform(Image.open(item["file"]).convert(transform.image_mode))[None]  # (1, C, H, W)
        with torch.no_grad():
            probs = run.model(image).softmax(1)[0]
        assert top[0]["index"] == int(probs.argmax())
        assert top[0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    correct = sum(Path(item["file"]).parent.name == item["top"][0]["label"] for item in results)
    assert correct >= 18
    assert cli.main(["predict", "--run", str(full_run), str(stripes / "train" / "horizontal" / "broken.png")]) == 2
    assert "broken.png" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_run(stripes, tmp_path_factory) -> Path:
    """SNELLA on a tiny Hugging Face ViT folder (an hf: run)."""
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path_factory.mktemp("hf") / "vit"
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, num_labels=2)).save_pretrained(folder)
    out = tmp_path_factory.mktemp("hfrun") / "run"
    assert cli.main(["finetune", "--model", f"hf:{folder}", "--data", str(stripes), "--epochs", "1", "--batch-size",
                     "16", "--warmup-epochs", "0", "--output-dir", str(out), "--skip-bad-images", "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("run_fixture, recipe, library", [("snella_run", "vit_kwargs", "timm"),
                                                          ("hf_run", "transformers_config", "transformers")])
def test_merged_checkpoint_loads_without_snella(run_fixture, recipe, library, request, tmp_path: Path, capsys):
    run = request.getfixturevalue(run_fixture)
    output = tmp_path / "merged" / "model.safetensors"
    old_umask = os.umask(0o022)
    try:
        assert cli.main(["merge", "--run", str(run), "--output", str(output)]) == 0
    finally:
        os.umask(old_umask)
    assert output.stat().st_mode & 0o777 == 0o644  # not safetensors' own 0600
    info = json.loads(output.with_suffix(".json").read_text())
    assert recipe in info and library in info["load"]
    assert info["classes"] == ["horizontal", "vertical"] and info["max_abs_logit_diff"] < 1e-4
    x = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = load_run(run, "cpu").model(x)  # the tuned model, adapter not merged
    # The JSON's own "load" line, with its JSON and WEIGHTS placeholders filled in, in a process without snella.
    load = info["load"].replace("JSON", repr(str(output.with_suffix(".json")))).replace("WEIGHTS", repr(str(output)))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["snella"] = None  # as if snella were not installed
        try:
            import snella
        except ImportError:
            pass
        else:
            raise SystemExit("snella is importable")
        import torch
        {load}
        with torch.no_grad():
            out = model.eval()(torch.load({str(tmp_path / 'x.pt')!r}))
        torch.save(getattr(out, "logits", out), {str(tmp_path / 'y.pt')!r})
        assert "snella" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-4)
    assert cli.main(["merge", "--run", str(run), "--output", str(tmp_path / "m.pt")]) == 2
    assert "ending in .safetensors" in capsys.readouterr().err


def test_a_model_without_default_targets_is_told_to_pass_target_modules(tmp_path: Path, capsys):
    # A ResNet: no family of snella/targets.py matches its convs.
    args = ["finetune", "--model", "resnet18", "--image-size", "28", "--train-limit", "8", "--test-limit", "8",
            "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--no-progress"]
    assert cli.main([*args, "--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snella finetune: error: no default targets for ResNet"), err
    assert "pass --target-modules NAME" in err and "SnellaConfig(" not in err, err
    assert "SnellaConfig(" not in err and "layer1.0.conv1" in err  # the modules that exist are listed
    assert "e.g. --target-modules qkv proj fc1 fc2" in err
    # The advice works: the example for ResNet trains.
    assert cli.main([*args, "--output-dir", str(tmp_path / "b"), "--target-modules", "conv1", "conv2"]) == 0
    assert cli.main([*args, "--output-dir", str(tmp_path / "c"), "--target-modules", "nothing_here"]) == 2
    assert "--target-modules nothing_here matched no module of ResNet" in capsys.readouterr().err
