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


@pytest.mark.slow  # over 10 s: `-m "not slow"` skips it in a quick loop; CI runs it
def test_known_extra_tensor_shows_as_that_much_more_memory():
    plain = run("linear")
    ballast = run("linear", ballast_mb=150)
    assert ballast["peak_memory_mb"] - plain["peak_memory_mb"] == pytest.approx(150, rel=0.1)


@pytest.mark.slow  # over 10 s: `-m "not slow"` skips it in a quick loop; CI runs it
def test_full_size_optimizer_state_costs_more_than_low_rank_factors():
    """GPS-style keeps gradients and AdamW state for whole matrices (12 bytes per entry at least)."""
    gps = run("gps-style")
    lora = run("lora-32")
    tuned_entries = gps["trainable_params"]
    assert gps["peak_memory_mb"] - lora["peak_memory_mb"] > 0.5 * 12 * tuned_entries / 2 ** 20


@pytest.mark.slow  # over 10 s: `-m "not slow"` skips it in a quick loop; CI runs it
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


def test_speed_harness_interleaves_rounds_and_takes_medians(tmp_path, monkeypatch):
    """`bench speed`: rounds visit every method in turn (a drift of the machine hits all alike), a
    method's time is its median round, and speed rows carry no memory figure."""
    calls = []
    fake = {"full": [3.0, 1.0, 2.0], "snella-fused": [2.5, 9.0, 2.0]}

    def fake_run_one(method, model, batch, **kw):
        calls.append((method, kw["harness"]))
        t = fake[method][sum(1 for m, _ in calls if m == method) - 1]
        return {"method": method, "model": model, "batch": batch, "peak_memory_mb": 999.0, "step_seconds": t}

    monkeypatch.setattr(ms, "run_one", fake_run_one)
    rows = ms.run_suite(models=["m"], batches=[8], methods=["full", "snella-fused"], output_dir=str(tmp_path),
                        harness="speed", repeats=3, log=lambda *_: None)
    assert calls == [("full", "speed"), ("snella-fused", "speed")] * 3
    by = {r["method"]: r for r in rows}
    assert by["full"]["step_seconds"] == 2.0 and by["snella-fused"]["step_seconds"] == 2.5
    assert by["snella-fused"]["time_vs_full"] == 1.25
    assert by["snella-fused"]["round_seconds"] == "2.500 9.000 2.000"
    assert "peak_memory_mb" not in by["full"] and "mem_vs_full" not in by["snella-fused"]
    # a memory run of the same methods lands beside the speed rows, not over them
    monkeypatch.setattr(ms, "run_one", lambda method, model, batch, **kw: {
        "method": method, "model": model, "batch": batch, "peak_memory_mb": {"full": 200.0}.get(method, 100.0),
        "step_seconds": 7.0})
    ms.run_suite(models=["m"], batches=[8], methods=["full", "snella-fused"], output_dir=str(tmp_path),
                 log=lambda *_: None)
    (csv_path,) = tmp_path.glob("memory-speed-*.csv")
    with open(csv_path) as f:
        saved = list(csv.DictReader(f))
    assert sorted((r["method"], r["harness"]) for r in saved) == [
        ("full", "memory"), ("full", "speed"), ("snella-fused", "memory"), ("snella-fused", "speed")]
    speed_table = next(tmp_path.glob("speed-*.md")).read_text()
    memory_table = next(tmp_path.glob("memory-*.md")).read_text()
    assert "| m | 8 | snella-fused | 2.5 | 1.25 |" in speed_table and "7" not in speed_table.split("\n", 2)[2]
    assert "| m | 8 | snella-fused | 100 | 0.50 |" in memory_table


def test_harnesses_set_the_allocator_of_the_worker(monkeypatch, tmp_path):
    """The memory harness forces large tensors onto mmap (resident memory follows live tensors); the
    speed harness runs with the default allocator, even if the caller's environment set it."""
    import json
    import subprocess

    seen = {}

    def fake_run(cmd, env, **kw):
        seen[cmd[cmd.index("--method") + 1]] = env.get("MALLOC_MMAP_THRESHOLD_")
        out = cmd[cmd.index("--json") + 1]
        with open(out, "w") as f:
            json.dump({"step_seconds": 1.0, "peak_memory_mb": 1.0}, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(ms.subprocess, "run", fake_run)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1234")
    ms.run_one("full", "m", 8, harness="memory")
    ms.run_one("lora-8", "m", 8, harness="speed")
    assert seen == {"full": "65536", "lora-8": None}
    with pytest.raises(ValueError, match="unknown harness 'fast'"):
        ms.run_one("full", "m", 8, harness="fast")
    with pytest.raises(ValueError, match="repeats=2"):
        ms.run_suite(methods=["full"], output_dir=str(tmp_path), repeats=2)


def test_cli_routes_memory_and_speed_to_their_harnesses(monkeypatch):
    """`snella bench memory` runs the memory harness once per method; `snella bench speed --repeats N`
    runs the speed harness in N rounds."""
    import argparse

    from snella.bench import cli

    seen = []
    monkeypatch.setattr(ms, "run_suite", lambda **kw: seen.append((kw["harness"], kw["repeats"], kw["steps"])) or [])
    parser = argparse.ArgumentParser()
    cli.add_bench_arguments(parser)
    assert cli.run_bench(parser.parse_args(["memory", "--models", "m", "--steps", "2"])) == 0
    assert cli.run_bench(parser.parse_args(["speed", "--models", "m", "--repeats", "4"])) == 0
    assert cli.run_bench(parser.parse_args(["speed", "--models", "m"])) == 0
    assert seen == [("memory", 1, 2), ("speed", 4, 3), ("speed", 3, 3)]
