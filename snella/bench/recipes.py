"""`snella bench recipes`: SNELLA's recipe choices compared on the suite's val split (issue 10 items 2 and 3).

Each variant changes one setting of the suite's SNELLA-32 (layer score, reallocation schedule, initial
sparsity, an EMA of the adapter weights, BatchNorm statistics) and is trained on every task's train
split and scored on its val split, at the learning rate the last full suite chose for SNELLA-32 on that
(backbone, task), or the middle of SNELLA-32's grid. Test splits are never read: what wins here may
become a default, and the suite's test table then shows what it gives.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from snella.bench.accuracy import (GROUPS, METHODS, Job, SuiteConfig, load_suite, results_stem, run_jobs,
                                   write_csv)

METHOD = "snella-32"


@dataclass(frozen=True)
class Variant:
    """One recipe: TrainConfig settings over SNELLA-32's, and an optional EMA of the trainable parameters."""

    about: str
    overrides: dict[str, Any] = field(default_factory=dict)
    ema_decay: Optional[float] = None


VARIANTS: dict[str, Variant] = {
    "suite": Variant("the suite's SNELLA-32: sensitivity score, reallocation every 5 steps, init sparsity 0.01"),
    "frobenius": Variant("layer score ||dW||_F (the seed paper's) instead of the sensitivity EMAs",
                         {"score": "frobenius"}),
    "epoch": Variant("reallocate once per epoch (the authors' schedule)",
                     {"allocation": "epoch", "allocation_interval": None}),
    "steps-20": Variant("reallocate every 20 steps", {"allocation_interval": 20}),
    "adaptive-5": Variant("check every 5 steps, reallocate only when the scores moved (total variation > 0.05)",
                          {"allocation": "adaptive", "allocation_interval": 5, "adaptive_threshold": 0.05}),
    "init-0.25": Variant("initial sparsity 0.25 instead of 0.01", {"init_sparsity": 0.25}),
    "ema-0.99": Variant("evaluate an EMA (decay 0.99, warmed up) of the trainable parameters", ema_decay=0.99),
    "bn-update": Variant("re-estimate BatchNorm statistics while training (torch's train mode)",
                         {"bn_stats": "update"}),
}
SCHEDULE_VARIANTS = ("suite", "steps-20", "epoch", "adaptive-5")  # the paper's open question 3


def recipe_lrs(backbones: Sequence[str], tasks: Sequence[str], suite_json: Optional[Path]) -> dict[tuple[str, str], float]:
    """(backbone, task) -> SNELLA-32's learning rate: the one a full suite chose on val (its JSON's
    ``chosen_lrs``), else the middle of SNELLA-32's grid."""
    chosen = json.loads(Path(suite_json).read_text())["chosen_lrs"] if suite_json else {}
    out = {}
    for backbone in backbones:
        grid = METHODS[METHOD].lrs[backbone]
        for task in tasks:
            out[backbone, task] = chosen.get(f"{backbone}/{task}/{METHOD}", grid[len(grid) // 2])
    return out


def summarise_variants(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (backbone, variant): val accuracy per task (mean over seeds, %), the mean of the group
    means, seconds per run and reallocations per run (means)."""
    out = []
    for backbone, variant in dict.fromkeys((r["backbone"], r["variant"]) for r in rows):
        mine = [r for r in rows if r["backbone"] == backbone and r["variant"] == variant]
        tasks, groups, task_reallocs = {}, {}, {}
        for task in dict.fromkeys(r["task"] for r in mine):
            of_task = [r for r in mine if r["task"] == task]
            tasks[task] = statistics.fmean(100 * r["accuracy"] for r in of_task)
            counts = [r["reallocations"] for r in of_task if r.get("reallocations") is not None]
            task_reallocs[task] = statistics.fmean(counts) if counts else None
            groups.setdefault(of_task[0]["group"], []).append(tasks[task])
        means = {g: statistics.fmean(v) for g, v in groups.items()}
        reallocs = [r["reallocations"] for r in mine if r.get("reallocations") is not None]
        out.append({"backbone": backbone, "variant": variant, "tasks": tasks, "task_reallocations": task_reallocs,
                    "groups": means,
                    "mean": statistics.fmean(means.values()),
                    "seconds": statistics.fmean(r["seconds"] for r in mine),
                    "reallocations": statistics.fmean(reallocs) if reallocs else None})
    return out


def markdown_variants(summaries: Sequence[dict[str, Any]], schedule_variants: Sequence[str] = SCHEDULE_VARIANTS) -> str:
    """Per backbone: every variant's val accuracy, its difference from 'suite', its cost; then the
    reallocation schedules alone with reallocations per run (the adaptive-interval question)."""
    lines = []
    for backbone in dict.fromkeys(s["backbone"] for s in summaries):
        rows = [s for s in summaries if s["backbone"] == backbone]
        base = next((s for s in rows if s["variant"] == "suite"), None)
        tasks = list(rows[0]["tasks"])
        groups = [g for g in GROUPS if g in rows[0]["groups"]]
        lines += [f"**{backbone}** (val accuracy %, mean over seeds)", "",
                  "| variant | " + " | ".join(tasks) + " | " + " | ".join(f"{g} mean" for g in groups)
                  + " | mean | vs suite | s / run | reallocations / run |",
                  "|---|" + "---|" * (len(tasks) + len(groups) + 4)]
        for s in rows:
            delta = f"{s['mean'] - base['mean']:+.1f}" if base is not None else ""
            realloc = f"{s['reallocations']:.1f}" if s["reallocations"] is not None else ""
            lines.append(f"| {s['variant']} | " + " | ".join(f"{s['tasks'][t]:.1f}" for t in tasks) + " | "
                         + " | ".join(f"{s['groups'][g]:.1f}" for g in groups)
                         + f" | {s['mean']:.1f} | {delta} | {s['seconds']:.0f} | {realloc} |")
        schedules = [s for v in schedule_variants for s in rows if s["variant"] == v]
        if len(schedules) > 1:
            lines += ["", f"**{backbone}**, reallocation schedules: val accuracy % / reallocations per run", "",
                      "| schedule | " + " | ".join(tasks) + " | mean | s / run |", "|---|" + "---|" * (len(tasks) + 2)]
            for s in schedules:
                cells = [f"{s['tasks'][t]:.1f} / {s['task_reallocations'][t]:.0f}"
                         if s["task_reallocations"][t] is not None else f"{s['tasks'][t]:.1f}" for t in tasks]
                lines.append(f"| {s['variant']} | " + " | ".join(cells) + f" | {s['mean']:.1f} | {s['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def run_recipes(config: SuiteConfig, variants: Sequence[str], seeds: Sequence[int], suite_json: Optional[Path],
                log: Callable[[str], None] = print, command: str = "") -> dict[str, Any]:
    """Train every variant on every task's train split and score it on val; write CSV, markdown and JSON.

    Args:
        config: tasks, backbones, recipe (epochs, batch size, ...), workers and output folder of the suite.
        variants: keys of VARIANTS.
        seeds: training seeds of every (variant, task).
        suite_json: a full suite's JSON, whose SNELLA-32 learning rates are used (None: the grid's middle).

    Returns:
        rows, summaries, files written, wall seconds.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants={list(variants)!r} is invalid; accepted: one or more of {', '.join(VARIANTS)}")
    start = time.perf_counter()
    load_suite(config, log)
    lrs = recipe_lrs(config.backbones, config.tasks, suite_json)
    jobs = [Job(b, t, METHOD, lrs[b, t], seed, "sweep", variant=v)
            for b in config.backbones for t in config.tasks for v in variants for seed in seeds]
    rows = run_jobs(jobs, config.workers, log)
    summaries = summarise_variants(rows)
    wall = time.perf_counter() - start
    out, tag = Path(config.output_dir), results_stem("recipes", config.tag)
    csv_path = write_csv(rows, out / f"{tag}.csv")
    header = [f"Command: `{command or 'snella bench recipes'}` ({wall / 60:.1f} min wall, {config.workers} workers). "
              f"SNELLA-32 variants trained on train, scored on **val** (test never read), seeds {list(seeds)}, "
              f"{config.epochs} epochs; lr per (backbone, task): "
              + ("the full suite's choice (" + str(suite_json) + ")" if suite_json else "the middle of the grid")
              + ".", "", "Variants: " + "; ".join(f"{v}: {VARIANTS[v].about}" for v in variants), ""]
    md_path = out / f"{tag}.md"
    md_path.write_text("\n".join(header) + "\n" + markdown_variants(summaries) + "\n")
    json_path = out / f"{tag}.json"
    json_path.write_text(json.dumps({"summaries": summaries, "lrs": {"/".join(k): v for k, v in lrs.items()},
                                     "wall_seconds": wall}, indent=1))
    log(f"wrote {csv_path}, {md_path} and {json_path} in {wall / 60:.1f} min")
    return {"rows": rows, "summaries": summaries, "files": [csv_path, md_path, json_path], "wall_seconds": wall}
