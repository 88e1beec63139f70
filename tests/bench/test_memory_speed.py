"""The memory/speed harness measures what it claims: known extra memory shows up, methods that keep
more state show more, and the files it writes hold the rows and ratios."""

import csv

import pytest

from snella.bench import memory_speed as ms

TINY = dict(model="vit_tiny_patch16_224", image_size=32, steps=1, warmup=1,
            model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2})


def run(method, batch=1, **kw):
    args = dict(TINY, **kw)
    model = args.pop("model")
    return ms.run_one(method, model, batch, timeout=300, **args)


def test_known_extra_tensor_shows_as_that_much_more_memory():
    plain = run("linear")
    ballast = run("linear", ballast_mb=150)
    assert ballast["peak_memory_mb"] - plain["peak_memory_mb"] == pytest.approx(150, rel=0.1)


def test_full_size_optimizer_state_costs_more_than_low_rank_factors():
    """GPS-style keeps gradients and AdamW state for whole matrices (12 bytes per entry at least)."""
    gps = run("gps-style")
    lora = run("lora-32")
    tuned_entries = gps["trainable_params"]
    assert gps["peak_memory_mb"] - lora["peak_memory_mb"] > 0.5 * 12 * tuned_entries / 2 ** 20


def test_suite_writes_rows_ratios_tables_and_chart(tmp_path):
    rows = ms.run_suite(models=[TINY["model"]], batches=[2], methods=["full", "lora-32", "snella-fused"],
                        output_dir=str(tmp_path), steps=1, warmup=1, image_size=32,
                        model_kwargs=TINY["model_kwargs"], log=lambda *_: None)
    assert [r["method"] for r in rows] == ["full", "lora-32", "snella-fused"]
    snella = rows[2]
    assert snella["mem_vs_full"] == pytest.approx(snella["peak_memory_mb"] / rows[0]["peak_memory_mb"], abs=1e-3)
    assert snella["time_vs_lora-32"] == pytest.approx(snella["step_seconds"] / rows[1]["step_seconds"], abs=1e-3)
    (csv_path,) = tmp_path.glob("memory-speed-*.csv")
    assert "torch" in csv_path.name and "cpu" in csv_path.name
    with open(csv_path) as f:
        saved = list(csv.DictReader(f))
    assert [r["method"] for r in saved] == ["full", "lora-32", "snella-fused"]
    assert float(saved[2]["peak_memory_mb"]) == snella["peak_memory_mb"]
    (table,) = tmp_path.glob("memory-*.md")
    assert "| vit_tiny_patch16_224 | 2 | snella-fused |" in table.read_text()
    (png,) = tmp_path.glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown benchmark method 'dora'"):
        ms.run_suite(methods=["dora"], output_dir="unused")


def test_results_of_separate_runs_merge_and_ratios_stay_within_a_run(tmp_path):
    """ViT-B, L and H are measured by separate commands into one file: rows accumulate, a re-measured
    (model, batch, method) replaces its old row, and no ratio mixes two runs."""
    path = tmp_path / "results.csv"

    def row(model, method, mb, run):
        return {"model": model, "batch": 8, "method": method, "peak_memory_mb": mb, "step_seconds": mb / 100,
                "run": run}

    first = ms.add_ratios([row("vit_large_patch16_224", "full", 400.0, "r1"),
                           row("vit_large_patch16_224", "lora-32", 300.0, "r1"),
                           row("vit_base_patch16_224", "full", 200.0, "r1")])
    ms.write_csv(first, path)
    second = [row("vit_base_patch16_224", "full", 100.0, "r2"), row("vit_base_patch16_224", "lora-32", 50.0, "r2")]
    merged = ms.add_ratios(ms.merge_rows(path, second))
    assert [(r["model"], r["method"], r["peak_memory_mb"]) for r in merged] == [
        ("vit_base_patch16_224", "full", 100.0), ("vit_base_patch16_224", "lora-32", 50.0),
        ("vit_large_patch16_224", "full", 400), ("vit_large_patch16_224", "lora-32", 300)]
    assert merged[1]["mem_vs_full"] == 0.5 and merged[3]["mem_vs_full"] == 0.75
    lone = ms.add_ratios(ms.merge_rows(path, [row("vit_large_patch16_224", "lora-8", 290.0, "r3")]))
    assert "mem_vs_full" not in next(r for r in lone if r["method"] == "lora-8")  # no r3 full: no ratio
