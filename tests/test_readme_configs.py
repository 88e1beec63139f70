"""The YAML configs the README names (`--config NAME`) exist, are the packaged ones, parse and validate; those that
train the default pair (snella-default on mnist5k) run for one step as `snella finetune --config NAME` would."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from snella import cli
from snella.training.config import PACKAGED_CONFIGS, TrainConfig, read_yaml

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_config_names() -> list[str]:
    """The names in the README's "(or a packaged name: `lora`, `snell`, ...)"."""
    listing = re.search(r"or a packaged name: ([^)]*)\)", README.read_text())
    assert listing, "the README no longer lists the packaged configs after 'or a packaged name:'"
    return re.findall(r"`([\w.-]+)`", listing.group(1))


NAMES = readme_config_names()


def test_the_readme_names_every_packaged_config_and_only_those():
    assert sorted(NAMES) == sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", NAMES)
def test_config_parses_and_validates(name: str):
    settings = read_yaml(name)  # by packaged name, as --config takes it
    assert settings and settings == read_yaml(str(PACKAGED_CONFIGS / f"{name}.yaml"))
    config = TrainConfig.from_dict(settings, source=name)  # raises naming any bad field or value
    assert {k: getattr(config, k) for k in settings} == settings  # every setting taken as written
    header = (PACKAGED_CONFIGS / f"{name}.yaml").read_text().splitlines()[1]
    assert header.strip("# ").startswith(f"snella finetune --config {name}")  # its launch command, as the style asks


def cheap(name: str) -> bool:
    """Whether the config trains the default pair (the project's ViT on mnist5k): seconds for a step here."""
    config = TrainConfig.from_dict(read_yaml(name))
    return (config.model, config.data) == (TrainConfig().model, TrainConfig().data)


@pytest.mark.parametrize("name", [n for n in NAMES if cheap(n)])
def test_cheap_config_trains_for_a_step(name: str, tmp_path: Path):
    out = tmp_path / "run"
    argv = ["finetune", "--config", name, "--epochs", "1", "--warmup-epochs", "0", "--train-limit", "32",
            "--batch-size", "32", "--test-limit", "32", "--no-progress", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["test_images"] == 32
    saved = read_yaml(str(out / "config.yaml"))
    assert all(saved[k] == v for k, v in read_yaml(name).items() if k not in ("epochs", "warmup_epochs",
                                                                             "train_limit"))  # the config's settings


def test_the_expensive_config_is_the_only_one_not_run():
    assert [n for n in NAMES if not cheap(n)] == ["vtab-vit-b16"]  # ViT-B at 224 px on VTAB data the user has
