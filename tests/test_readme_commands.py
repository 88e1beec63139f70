"""Every command in the README's ```bash blocks works: read from the README itself (an edit to a command changes
what runs here), each mapped to its fast variant or, where it needs the user's files, parsed and validated.

How each README command is tested (``plan``); a command that fits no row fails ``test_readme_command``:

  bash scripts/setup.sh                 syntax (bash -n); it runs scripts/fashion-mnist.sh before its stamp can
                                        end it (that script's logic: tests/scripts/, against fake apt-get/sudo);
                                        .venv/bin/snella is the console script pyproject.toml declares
  bash scripts/test.sh                  not run (it is this suite): it runs setup.sh then pytest tests, and .ci/run
                                        calls it
  snella finetune (no user files)       run as written + FAST_FINETUNE (1 epoch, 256 train / 200 test images); the
                                        summary's deterministic lines must be the README's
  snella finetune / torchrun with files parsed by the CLI's own parser and validated as a TrainConfig (YAML
  the user has (/data, /models, ...)    included), not run: the files do not exist here
  snella evaluate                       on the fast default run; a --data naming the user's files becomes an
                                        ImageFolder of real MNIST test digits at 40x40 RGB (another size and mode
                                        than the run's), and the accuracy must equal one computed by hand
  snella predict                        on the fast default run; image paths become real photos (scikit-image's
                                        cat, camera, astronaut with alpha, coins: JPEG/PNG, RGB/grey/RGBA, several
                                        sizes); predictions must equal those of the photos resized by hand
  snella merge                          on the fast default run, output in tmp; the file's mode, and the merged
                                        file loaded without snella by its JSON's own "load" line gives the run's
                                        logits
  snella finetune --task segmentation   run as written + FAST_SEGMENTATION (1 epoch, 64 train / 32 test composites);
  (no user files)                       its summary's lines must be the README's segmentation summary's
  snella evaluate/predict/merge --run   parsed, not run: tests/tasks/test_segmentation.py runs them on a tiny
  runs/seg-...                          segmentation run and checks their results
  snella bench accuracy                 run as written + FAST_ACCURACY (--quick, ViT, linear, 1 epoch, 32/16/32
                                        images: digits and Fashion-MNIST rotation)
  snella bench memory / speed           parsed and validated (timm model names, harness methods), not run: every
                                        method is its own process at ViT-B to ViT-H scale (minutes each);
                                        tests/bench/test_memory_speed.py runs the harnesses at a tiny size

The YAML configs the README names: tests/test_readme_configs.py. The Python quick start: tests/test_readme.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support import merged_outputs_without_snella
from snella import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FAST_FINETUNE = ["--epochs", "1", "--train-limit", "256", "--test-limit", "200", "--no-progress"]
FAST_SEGMENTATION = ["--epochs", "1", "--train-limit", "64", "--test-limit", "32", "--no-progress"]
SEGMENTATION_RUNS = "runs/seg-"  # README runs of the segmentation task are named so
FAST_ACCURACY = ["--quick", "--backbones", "vit", "--methods", "linear", "--epochs", "1", "--seeds", "0",
                 "--workers", "1", "--train-size", "32", "--val-size", "16", "--test-size", "32"]


# ---------------------------------------------------------------- the README's commands


@dataclass(frozen=True)
class Command:
    """One command of a ```bash block: its words (continuations joined, comments and `&&` split off)."""

    argv: tuple[str, ...]
    section: str

    def __str__(self) -> str:
        return shlex.join(self.argv)


def readme_commands(text: str) -> list[Command]:
    """The commands of every ```bash block of the README, in order, with the heading above each."""
    commands, section, fence, pending = [], "", None, ""
    for line in text.splitlines():
        if fence is None:
            if line.startswith("```"):
                fence = line[3:].strip()
            elif line.startswith("#"):
                section = line.lstrip("#").strip()
            continue
        if line.strip() == "```":
            fence = None
            continue
        if fence != "bash":
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words, pending = shlex.split(pending + line, comments=True), ""
        part: list[str] = []
        for word in words + ["&&"]:
            if word == "&&":
                if part:
                    commands.append(Command(tuple(part), section))
                part = []
            else:
                part.append(word)
    return commands


COMMANDS = readme_commands(README.read_text())


@dataclass
class Plan:
    """How a README command is tested: 'run' (``argv`` is its fast variant), 'parse', 'setup', 'suite', or
    'unknown' (a command this file does not know: the test fails and says so)."""

    how: str
    argv: list[str] = field(default_factory=list)  # the arguments after `snella`
    why: str = ""


def user_files(args: list[str]) -> list[str]:
    """Arguments naming absolute paths (bare or after a 'source:' prefix) that do not exist on this machine."""
    found = []
    for token in args:
        path = token.split(":", 1)[1] if re.match(r"^[a-z]+:/", token) else token
        if path.startswith("/") and not Path(path).exists():
            found.append(token)
    return found


def plan(command: Command) -> Plan:
    argv = list(command.argv)
    if argv[:2] == ["bash", "scripts/setup.sh"]:
        return Plan("setup", why="checked, not run: it would install into this machine's environment")
    if argv[:2] == ["bash", "scripts/test.sh"]:
        return Plan("suite", why="this test suite itself")
    if argv[:3] == ["python", "-m", "snella.bench.cpu_passes"]:
        return Plan("cpu_passes", argv[3:] + ["--repeats", "1"], "one repeat instead of 20")
    if argv[0] == "torchrun":
        if "-m" not in argv or argv[argv.index("-m") + 1] != "snella":
            return Plan("unknown", why="torchrun without -m snella")
        return Plan("parse", argv[argv.index("-m") + 2:], "several processes, the user's data")
    if argv[0] not in ("snella", ".venv/bin/snella") or len(argv) < 2:
        return Plan("unknown", why=f"not a snella command: {argv[0]}")
    args = argv[1:]
    files = user_files(args)
    if args[0] == "bench" and args[1:2] in (["memory"], ["speed"]):
        return Plan("parse", args, "minutes per method; the harness runs small in tests/bench/test_memory_speed.py")
    if args[0] == "bench" and args[1:2] == ["accuracy"]:
        return Plan("run", args + FAST_ACCURACY)
    if args[0] == "finetune" and (files or "--pretrained" in args):
        return Plan("parse", args, f"needs the user's files {files or ['a download']}")
    if args[0] == "finetune" and "segmentation" in args:
        return Plan("run", args + FAST_SEGMENTATION, "segmentation")
    if args[0] in ("evaluate", "predict", "merge") and any(a.startswith(SEGMENTATION_RUNS) for a in args):
        return Plan("parse", args, "a segmentation run: tests/tasks/test_segmentation.py runs these")
    if args[0] == "finetune":
        return Plan("run", args + FAST_FINETUNE)
    if args[0] in ("evaluate", "predict", "merge"):
        return Plan("run", args, "on the fast default run, with real photos / stand-ins for the user's files")
    return Plan("unknown", why=f"no fast variant for `snella {args[0]}`")


def test_the_readme_has_the_commands_this_file_maps():
    kinds = {(plan(c).how, plan(c).argv[0] if plan(c).argv else "") for c in COMMANDS}
    for expected in [("setup", ""), ("suite", ""), ("run", "finetune"), ("parse", "finetune"), ("run", "evaluate"),
                     ("run", "predict"), ("run", "merge"), ("run", "bench"), ("parse", "bench")]:
        assert expected in kinds, f"the README no longer has a command of kind {expected}: update this file"
    assert len(COMMANDS) >= 15


# ---------------------------------------------------------------- what the fast variants run on


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, str]:
    """The README's first plain `snella finetune` (the default run), fast variant: its folder and its stdout."""
    command = next(c for c in COMMANDS if plan(c).how == "run" and plan(c).argv[0] == "finetune")
    out = tmp_path_factory.mktemp("default") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main([*plan(command).argv, "--output-dir", str(out)]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photos from scikit-image as a user has them: JPEG and PNG, RGB, grey and RGBA, several sizes."""
    data = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("photos")
    folder = root / "photos"
    folder.mkdir()
    astronaut = data.astronaut()  # (512, 512, 3)
    alpha = np.tile(np.linspace(0, 255, 512, dtype=np.uint8), (512, 1))[..., None]  # (512, 512, 1)
    images = {
        root / "photo1.jpg": Image.fromarray(data.chelsea()),  # 451x300 RGB cat
        folder / "camera.png": Image.fromarray(data.camera()),  # 512x512 grey
        folder / "astronaut.png": Image.fromarray(np.concatenate([astronaut, alpha], axis=2)),  # RGBA
        folder / "coins.jpg": Image.fromarray(data.coins()),  # 384x303 grey JPEG
        folder / "small.png": Image.fromarray(data.camera()).resize((20, 14)),  # smaller than the model's input
    }
    for path, image in images.items():
        image.save(path)
    return {"file": root / "photo1.jpg", "folder": folder, **{p.name: p for p in images}}


def by_hand(path: Path, spec: dict) -> tuple[Image.Image, torch.Tensor]:
    """An independent transcription of the run's eval transform (run.json "input", transform 'none' made to fit):
    PIL's conversion to the run's channels, PIL's bicubic resize to its size if needed, (x / 255 - mean) / std."""
    assert spec["transform"] == "none"
    size = spec["image_size"]
    image = Image.open(path).convert("L" if spec["channels"] == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32).reshape(size, size, spec["channels"]) / 255.0
    tensor = (pixels - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return image, torch.from_numpy(tensor).permute(2, 0, 1)  # (C, H, W)


def substitute(args: list[str], mapping: dict[str, str]) -> list[str]:
    return [mapping.get(a, a) for a in args]


def parsed(args: list[str]):
    return cli.build_parser(args[0]).parse_args(args)


# ---------------------------------------------------------------- one test per README command


@pytest.mark.parametrize("command", COMMANDS, ids=[str(c) for c in COMMANDS])
def test_readme_command(command: Command, request, tmp_path: Path, capsys):
    how = plan(command)
    assert how.how != "unknown", (f"README command `{command}` ({command.section}) has no test: {how.why}. "
                                  "Map it in tests/test_readme_commands.py (plan).")
    if how.how == "setup":
        check_setup()
    elif how.how == "suite":
        check_test_script()
    elif how.how == "parse":
        check_parses(how.argv)
    elif how.how == "cpu_passes":
        check_cpu_passes(how.argv, capsys)
    elif how.argv[0] == "finetune" and how.why == "segmentation":
        check_segmentation_run(how.argv, tmp_path, capsys)
    elif how.argv[0] == "finetune":
        check_default_run(*request.getfixturevalue("default_run"))
    elif how.argv[0] == "evaluate":
        check_evaluate(how.argv, request.getfixturevalue("default_run")[0], tmp_path, capsys)
    elif how.argv[0] == "predict":
        check_predict(how.argv, request.getfixturevalue("default_run")[0], request.getfixturevalue("photos"),
                      tmp_path, capsys)
    elif how.argv[0] == "merge":
        check_merge(how.argv, request.getfixturevalue("default_run")[0], request.getfixturevalue("photos"), tmp_path,
                    capsys)
    else:
        request.getfixturevalue("fashion_mnist_parts")  # the quick suite's rotation task: skip here, fail in CI
        check_bench_accuracy(how.argv, tmp_path, capsys)


def check_cpu_passes(args: list[str], capsys) -> None:
    from snella.bench import cpu_passes

    cpu_passes.main(args)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| kth_abs")
            or line.startswith("| apply_multiplier") or line.startswith("| competition_grad")]
    assert len(rows) == 5 and all(float(row.split("|")[2]) > 0 for row in rows), rows


def check_setup() -> None:
    setup = REPO / "scripts" / "setup.sh"
    assert subprocess.run(["bash", "-n", str(setup)]).returncode == 0
    text = setup.read_text()
    assert 0 <= text.index("bash scripts/fashion-mnist.sh") < text.index("exit 0")
    assert 'snella = "snella.cli:main"' in (REPO / "pyproject.toml").read_text()  # .venv/bin/snella


def check_test_script() -> None:
    text = (REPO / "scripts" / "test.sh").read_text()
    assert "bash scripts/setup.sh" in text and re.search(r"-m pytest tests\b", text)
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def check_parses(args: list[str]) -> None:
    namespace = parsed(args)  # SystemExit (exit 2 with argparse's message) on a bad flag or value
    if args[0] in ("evaluate", "predict", "merge"):
        assert Path(namespace.run).name.startswith("seg-")  # the segmentation run the README trains
    elif args[0] == "finetune":
        config = cli.config_from_args(namespace)  # every value validated, the --config YAML read
        assert config.data and config.model
    else:  # bench memory / speed
        import timm

        import snella.backbones  # noqa: F401  (registers vit_fmnist_d128)
        from snella.bench.worker import METHODS

        assert all(timm.is_model(m) for m in namespace.models), namespace.models
        assert set(namespace.methods or METHODS) <= set(METHODS), namespace.methods


def check_default_run(run: Path, printed: str) -> None:
    readme = README.read_text()
    summary = readme[readme.index("snella finetune: snella on mnist5k done in"):]
    summary = summary[:summary.index("```")].splitlines()
    mine = printed[printed.index("snella finetune: "):].splitlines()
    assert [line[:20] for line in mine] == [line[:20] for line in summary]  # the same lines, in the same order
    for label in ("trainable params", "adapter size", "update density"):  # what one epoch does not change
        assert next(l for l in mine if label in l) == next(l for l in summary if label in l)
    assert json.loads((run / "metrics.json").read_text())["test_images"] == 200


def check_segmentation_run(args: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "seg"
    assert cli.main([*args, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    readme = README.read_text()
    summary = readme[readme.index("snella finetune: snella on fmnist-composites done in"):]
    summary = summary[:summary.index("```")].splitlines()
    mine = printed[printed.index("snella finetune: "):].splitlines()
    assert [line[:20] for line in mine] == [line[:20] for line in summary]
    for label in ("trainable params", "adapter size"):  # what one epoch does not change
        assert next(l for l in mine if label in l) == next(l for l in summary if label in l)
    assert (out / "overlays.png").is_file() and json.loads((out / "metrics.json").read_text())["test_images"] == 32


def check_evaluate(args: list[str], run: Path, tmp_path: Path, capsys) -> None:
    namespace = parsed(args)
    mapping = {namespace.run: str(run)}
    spec = json.loads((run / "run.json").read_text())["input"]
    expected = None
    if namespace.data and user_files([namespace.data]):
        # Stand-in for the user's dataset: real MNIST test digits at 40x40 RGB, another size and mode than the run's.
        from snella.data import load_dataset

        digits = load_dataset("mnist5k", "test")
        root = tmp_path / "digits40"
        for split, count in (("train", 1), ("test", 6)):
            for label in range(10):
                (root / split / str(label)).mkdir(parents=True)
                indices = [i for i, t in enumerate(digits.targets) if t == label][:count]
                for i in indices:
                    Image.fromarray(digits.images[i]).convert("RGB").resize((40, 40)).save(
                        root / split / str(label) / f"{i}.png")
        mapping[namespace.data] = f"imagefolder:{root}"
        from snella.training.runs import load_run

        model = load_run(run, "cpu").model
        files = sorted((root / namespace.split).rglob("*.png"))
        with torch.no_grad():
            logits = model(torch.stack([by_hand(f, spec)[1] for f in files]))
        correct = int((logits.argmax(1) == torch.tensor([int(f.parent.name) for f in files])).sum())
        expected = correct / len(files)
    assert cli.main(substitute(args, mapping)) == 0
    assert capsys.readouterr().out.startswith("accuracy ")
    assert cli.main([*substitute(args, mapping), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    if expected is not None:
        assert result["images"] == 60 and result["accuracy"] == pytest.approx(expected, abs=1e-9)


def check_predict(args: list[str], run: Path, photos: dict[str, Path], tmp_path: Path, capsys) -> None:
    namespace = parsed(args)
    mapping = {namespace.run: str(run)}
    for given in namespace.images:  # folders (a trailing / or no image suffix) -> the photo folder, files -> the cat
        is_folder = given.endswith("/") or not Path(given).suffix
        mapping[given] = str(photos["folder"] if is_folder else photos["file"])
    argv = substitute(args, mapping)
    assert cli.main(argv) == 0  # as the README runs it: one line per image
    lines = capsys.readouterr().out.strip().splitlines()
    assert cli.main([*argv, "--json"]) == 0
    results = {Path(r["file"]).name: r for r in json.loads(capsys.readouterr().out)}
    given = {Path(p) for p in mapping.values()} - {run}
    expected = {p.name for p in given if p.is_file()} | {p.name for g in given if g.is_dir() for p in g.iterdir()}
    assert set(results) == expected and len(expected) >= 2
    assert len(lines) == len(results) and all(line.count(" (") == namespace.top_k for line in lines)

    # The same photos resized by hand to the run's input, saved losslessly, predicted again: the same answers.
    spec = json.loads((run / "run.json").read_text())["input"]
    hand_dir = tmp_path / "by-hand"
    hand_dir.mkdir()
    tensors = {}
    for name in results:
        image, tensors[name] = by_hand(photos[name], spec)
        image.save(hand_dir / (Path(name).stem + ".png"))
    assert cli.main(["predict", "--run", str(run), str(hand_dir), "--top-k", str(namespace.top_k), "--json"]) == 0
    hand = {Path(r["file"]).stem: r for r in json.loads(capsys.readouterr().out)}
    from snella.training.runs import load_run

    model = load_run(run, "cpu").model
    for name, result in results.items():
        assert result["top"] == hand[Path(name).stem]["top"], name
        with torch.no_grad():
            probs = model(tensors[name][None]).softmax(1)[0]  # (classes,)
        assert result["top"][0]["index"] == int(probs.argmax())
        assert [t["probability"] for t in result["top"]] == pytest.approx(
            probs.sort(descending=True).values[:namespace.top_k].tolist(), abs=1e-6)


def check_merge(args: list[str], run: Path, photos: dict[str, Path], tmp_path: Path, capsys) -> None:
    namespace = parsed(args)
    output = tmp_path / Path(namespace.output).name
    assert cli.main(substitute(args, {namespace.run: str(run), namespace.output: str(output)})) == 0
    assert capsys.readouterr().out.startswith(f"wrote {output}")
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask
    info = json.loads(output.with_suffix(".json").read_text())
    spec = info["input"]
    x = torch.stack([by_hand(photos[n], spec)[1] for n in ("photo1.jpg", "camera.png", "astronaut.png")])
    from snella.training.runs import load_run

    with torch.no_grad():
        expected = load_run(run, "cpu").model(x)
    torch.testing.assert_close(merged_outputs_without_snella(output, x, tmp_path), expected, atol=1e-4, rtol=1e-4)


def check_bench_accuracy(args: list[str], tmp_path: Path, capsys) -> None:
    assert cli.main([*args, "--output-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| method | digits | rotation |" in table and "| linear |" in table
    results = json.loads(next(tmp_path.glob("accuracy-quick-*.json")).read_text())
    assert results["weights"]["vit"]["file"] == "snella/assets/vit_fmnist_d128.safetensors"  # no machine path
    assert results["settings"]["train_size"] == 32 and results["settings"]["tasks"] == ["digits", "rotation"]
