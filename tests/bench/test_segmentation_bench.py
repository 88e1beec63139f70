"""`snella bench segmentation`: the lr is chosen on val mIoU only, the summary's arithmetic is right, every run's
settings follow the protocol (sweep: train -> val; final: train+val -> test), and one real run in its own process
returns the metrics its metrics.json holds."""

from __future__ import annotations

import math

import pytest

from snella.bench import segmentation as S


def _row(benchmark="composites", method="snella-32", lr=1e-2, miou=0.5, mdice=0.6, split="val", seed=0, **extra):
    return {"benchmark": benchmark, "method": method, "lr": lr, "miou": miou, "mdice": mdice, "score_split": split,
            "seed": seed, "trainable_params": 100, "adapter_bytes": 2048, "peak_memory_mb": 50.0,
            "train_seconds": 10.0, **extra}


def test_the_lr_is_chosen_on_val_miou_with_ties_going_to_the_smaller_lr():
    rows = [_row(lr=3e-3, miou=0.3), _row(lr=1e-2, miou=0.4), _row(lr=3e-2, miou=0.4),
            _row(method="lora-8", lr=1e-3, miou=0.2), _row(method="lora-8", lr=1e-2, miou=0.1)]
    assert S.choose_lrs(rows) == {("composites", "snella-32"): 1e-2, ("composites", "lora-8"): 1e-3}
    with pytest.raises(ValueError, match="'test'.*'val' only"):
        S.choose_lrs([_row(split="test")])


def test_summary_goal_edges_and_table():
    rows = [_row(method="snella-32", miou=m, mdice=d, seed=s, split="test") for s, (m, d) in
            enumerate([(0.50, 0.60), (0.40, 0.50), (0.30, 0.70)])]
    rows += [_row(method="lora-8", miou=0.45, mdice=0.5, seed=s, split="test", peak_memory_mb=30.0) for s in range(3)]
    summaries = S.summarise(rows)
    snella, lora = summaries
    assert snella["miou"][0] == pytest.approx(40.0) and snella["miou"][1] == pytest.approx(10.0)  # sd of 50, 40, 30
    assert snella["mdice"][0] == pytest.approx(60.0) and lora["peak_memory_mb"] == 30.0
    goal = S.goal_check(summaries)["composites"]
    assert goal["met"] is False and goal["best"] == "lora-8" and goal["lora"] == pytest.approx(45.0)
    config = S.SegBenchConfig(benchmarks=("composites",), methods=("snella-32", "lora-8"))
    chosen = {("composites", "snella-32"): 3e-3, ("composites", "lora-8"): 3e-3}
    assert [e["method"] for e in S.edge_choices(chosen, config)] == ["snella-32"]  # lora-8's grid is 1e-3..1e-2
    table = S.markdown(summaries, chosen)
    assert "| snella-32 | 40.0 ± 10.0 | 60.0 ± 10.0 | 0.1K | 2 KB | 50 MB | 10s | 0.003 |" in table
    assert "| lora-8 | **45.0 ± 0.0** |" in table


def test_runs_follow_the_protocol_and_every_method_has_three_rates():
    config = S.SegBenchConfig()
    for name in S.METHODS:
        for bench in S.BENCHMARKS:
            lrs = config.lrs(bench, name)
            assert len(lrs) == 3 and all(math.isclose(b / a, 10 ** 0.5, rel_tol=0.06) for a, b in zip(lrs, lrs[1:]))
    sweep = S.job_settings(S.SegJob("liver", "snella-32", 3e-3, 0, "sweep"), config, "/tmp/x")
    assert (sweep["train_split"], sweep["test_split"], sweep["val_split"]) == ("train", "val", None)
    assert sweep["data"] == "liver" and sweep["model"] == "tf_efficientnet_lite0" and sweep["lr"] == 3e-3
    assert sweep["r"] == 32 and sweep["allocation"] == "steps"
    final = S.job_settings(S.SegJob("composites", "lora-8", 1e-3, 2, "final"), config, "/tmp/x")
    assert (final["train_split"], final["test_split"], final["seed"], final["method"]) == ("trainval", "test", 2, "lora")
    with pytest.raises(ValueError, match=r"methods=\['nope'\] is invalid; accepted: one or more of linear"):
        S.SegBenchConfig(methods=("nope",))


def test_one_run_in_its_own_process_returns_its_metrics():
    tiny = {"model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2}}
    config = S.SegBenchConfig(benchmarks=("composites",), epochs=1, train_limit=16, test_limit=8, pretrained=False,
                              overrides=tiny)
    row = S.run_job(S.SegJob("composites", "snella-32", 1e-2, 0, "sweep"), config)
    assert row["score_split"] == "val" and row["images"] == 8 and row["steps"] == 2  # 16 images, batch 8
    assert 0 <= row["miou"] <= 1 and 0 <= row["mdice"] <= 1 and row["trainable_params"] > 0
    assert row["adapter_bytes"] > 0 and row["peak_memory_mb"] > 0 and 0 < row["final_density"] <= 1
