"""`snella bench recipes`: the variants are valid settings, the summaries and tables say what the rows say,
and the learning rates come from a suite's JSON."""

from __future__ import annotations

import json

import pytest

from snella.bench import recipes as R
from snella.training.config import TrainConfig


def test_every_variant_is_a_valid_snella_config():
    base = R.METHODS[R.METHOD].settings
    for name, variant in R.VARIANTS.items():
        config = TrainConfig(**{**base, **variant.overrides})
        for key, value in variant.overrides.items():
            assert getattr(config, key) == value, name


def _row(variant, task, acc, seed, group="natural", reallocations=4, seconds=10.0):
    return {"backbone": "vit", "variant": variant, "task": task, "accuracy": acc, "seed": seed, "group": group,
            "reallocations": reallocations, "seconds": seconds}


def test_summaries_and_tables():
    rows = [_row("suite", "a", 0.8, 0), _row("suite", "a", 0.6, 1), _row("suite", "s", 0.5, 0, "structured"),
            _row("epoch", "a", 0.9, 0, reallocations=1, seconds=8.0), _row("epoch", "s", 0.7, 0, "structured", 1, 8.0)]
    summaries = R.summarise_variants(rows)
    suite = summaries[0]
    assert suite["tasks"] == pytest.approx({"a": 70.0, "s": 50.0})
    assert suite["mean"] == pytest.approx(60.0) and suite["reallocations"] == 4
    epoch = summaries[1]
    assert epoch["mean"] == pytest.approx(80.0) and epoch["task_reallocations"] == {"a": 1, "s": 1}
    text = R.markdown_variants(summaries)
    assert "| suite | 70.0 | 50.0 | 70.0 | 50.0 | 60.0 | +0.0 | 10 | 4.0 |" in text
    assert "| epoch | 90.0 | 70.0 | 90.0 | 70.0 | 80.0 | +20.0 | 8 | 1.0 |" in text
    assert "| epoch | 90.0 / 1 | 70.0 / 1 | 80.0 | 8 |" in text  # the schedules table


def test_learning_rates_come_from_the_suite_or_the_middle_of_the_grid(tmp_path):
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"chosen_lrs": {"vit/digits/snella-32": 0.03, "vit/digits/lora-8": 0.1}}))
    lrs = R.recipe_lrs(["vit"], ["digits", "count"], path)
    grid = R.METHODS["snella-32"].lrs["vit"]
    assert lrs == {("vit", "digits"): 0.03, ("vit", "count"): grid[1]}


def test_an_unknown_variant_is_refused(tmp_path):
    from snella.bench.accuracy import SuiteConfig

    with pytest.raises(ValueError, match="variants=\\['fast'\\].*suite"):
        R.run_recipes(SuiteConfig(output_dir=str(tmp_path)), ["fast"], [0], None)
