"""`snella bench memory` / `snella bench speed`: every method in its own process on the same model,
batch, input and optimizer; CSV rows, a markdown table of ratios, and a bar chart.

Two harnesses, because one allocator setting cannot serve both measures:

- ``memory``: the worker runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so every large tensor is its own
  mmap and the resident set follows the live tensors (the peak is exact); but every large allocation
  then costs fresh pages, which slows methods that allocate many temporaries. Its step times are
  recorded, not reported as speed.
- ``speed``: the worker runs with the default allocator (what users get), and the methods are run in
  ``repeats`` interleaved rounds (A B C, A B C, ...) so that a drift of the machine's speed hits every
  method alike; a method's time is the median over its rounds. Its memory is not recorded.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from snella.bench.worker import METHODS

DEFAULT_MODELS = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224")
# The figures the targets are stated against (issue 4): ratios to these, measured in the same run.
REFERENCES = ("full", "lora-32", "gps-style", "snell-reference")


def hardware_tag() -> str:
    """'cpu2-x86_64' or 'cuda-<name>': goes into file names so results from machines never mix."""
    import torch

    if torch.cuda.is_available():
        return "cuda-" + torch.cuda.get_device_name(0).replace(" ", "_")
    return f"cpu{os.cpu_count()}-{platform.machine()}"


HARNESSES = ("memory", "speed")


def run_one(method: str, model: str, batch: int, *, steps: int = 3, warmup: int = 1, rank: int = 32,
            sparsity: float = 0.8, image_size: int = 224, device: str = "cpu", ballast_mb: int = 0,
            model_kwargs: Optional[dict] = None, timeout: Optional[float] = None, harness: str = "memory") -> dict:
    """Run one measurement in a fresh process (so peaks never mix) and return its row."""
    if harness not in HARNESSES:
        raise ValueError(f"unknown harness {harness!r}; accepted: {', '.join(HARNESSES)}")
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if harness == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large tensors as their own mmaps: RSS follows live tensors
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "snella.bench.worker", "--method", method, "--model", model,
               "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--rank", str(rank),
               "--sparsity", str(sparsity), "--image-size", str(image_size), "--device", device,
               "--ballast-mb", str(ballast_mb), "--model-kwargs", json.dumps(model_kwargs or {}), "--json", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark of {method} on {model} (batch {batch}) failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def _harness(row: dict) -> str:
    return row.get("harness", "memory")  # rows written before the speed harness existed are memory runs


def add_ratios(rows: list[dict]) -> list[dict]:
    """Per (model, batch): each method's memory and time over each reference method's, same run and harness."""
    for row in rows:
        for ref in REFERENCES:
            other = next((r for r in rows if r["method"] == ref and r["model"] == row["model"]
                          and r["batch"] == row["batch"] and r.get("run") == row.get("run")
                          and _harness(r) == _harness(row)), None)
            if other:
                if "peak_memory_mb" in row and "peak_memory_mb" in other:
                    row[f"mem_vs_{ref}"] = round(row["peak_memory_mb"] / other["peak_memory_mb"], 3)
                row[f"time_vs_{ref}"] = round(row["step_seconds"] / other["step_seconds"], 3)
    return rows


def _key(row: dict) -> tuple:
    return row["model"], int(row["batch"]), row["method"], _harness(row)


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """The rows of an earlier results file with ``rows`` added; a new row replaces an old one of the
    same (model, batch, method, harness), so ViT-B, L and H can be measured by separate commands into one file.
    Ratios are only ever taken between rows of the same run (its ``run`` column)."""
    if not path.is_file():
        return list(rows)
    with open(path, newline="") as f:
        old = [{k: _number(v) for k, v in r.items() if v != "" and not k.startswith(("mem_vs_", "time_vs_"))}
               for r in csv.DictReader(f)]
    new_keys = {_key(r) for r in rows}
    kept = [r for r in old if _key(r) not in new_keys]
    order = {model: i for i, model in enumerate(DEFAULT_MODELS)}
    merged = kept + list(rows)
    return sorted(merged, key=lambda r: (order.get(r["model"], len(order)), r["model"], int(r["batch"])))


def _number(text: str):
    """A CSV cell back as int or float where it is one."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(rows: list[dict], metric: str) -> str:
    """A table of one metric ('peak_memory_mb' or 'step_seconds') with its ratios to the references:
    memory from the memory harness, time from the speed harness."""
    kind = "mem" if metric == "peak_memory_mb" else "time"
    rows = [r for r in rows if _harness(r) == ("memory" if kind == "mem" else "speed") and metric in r]
    refs = [r for r in REFERENCES if any(f"{kind}_vs_{r}" in row for row in rows)]
    unit = "peak MB" if kind == "mem" else "s / step"
    lines = [f"| model | batch | method | {unit} | " + " | ".join(f"x {r}" for r in refs) + " |",
             "|---|---|---|---|" + "---|" * len(refs)]
    for row in rows:
        ratios = " | ".join(f"{row[f'{kind}_vs_{r}']:.2f}" if f"{kind}_vs_{r}" in row else "" for r in refs)
        lines.append(f"| {row['model']} | {row['batch']} | {row['method']} | {row[metric]:g} | {ratios} |")
    return "\n".join(lines)


def bar_chart(rows: list[dict], path: Path) -> Path:
    """Peak memory and step time per method, one panel pair per (model, batch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys((r["model"], r["batch"]) for r in rows))
    fig = Figure(figsize=(12, 3.2 * len(groups)))
    FigureCanvasAgg(fig)
    panels = (("peak_memory_mb", "peak memory (MB)", "memory"), ("step_seconds", "s / step (speed harness)", "speed"))
    for i, (model, batch) in enumerate(groups):
        for j, (metric, label, harness) in enumerate(panels):
            sub = [r for r in rows if r["model"] == model and r["batch"] == batch and _harness(r) == harness
                   and metric in r]
            names = [r["method"] for r in sub]
            ax = fig.add_subplot(len(groups), 2, 2 * i + j + 1)
            if not sub:  # e.g. a model measured by the memory harness only
                ax.text(0.5, 0.5, f"not measured by the {harness} harness", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9, color="gray")
                ax.set_title(f"{model}, batch {batch}: {label}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            colors = ["tab:red" if n.startswith("snella") else "tab:orange" if n.startswith("snell") else "tab:gray"
                      for n in names]
            ax.barh(names, [r[metric] for r in sub], color=colors)
            ax.set_title(f"{model}, batch {batch}: {label}", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def run_suite(models: Sequence[str] = DEFAULT_MODELS, batches: Sequence[int] = (8,), methods: Sequence[str] = METHODS,
              output_dir: str = "bench/results", steps: int = 3, warmup: int = 1, rank: int = 32,
              sparsity: float = 0.8, image_size: int = 224, device: str = "cpu",
              model_kwargs: Optional[dict] = None, log=print, harness: str = "memory", repeats: int = 1,
              timeout: Optional[float] = None, keep_going: bool = False) -> list[dict]:
    """Measure every (model, batch, method) and write CSV, tables and chart; rows are returned.

    ``harness`` "memory" (peak memory; one run per method) or "speed" (step time; ``repeats``
    interleaved rounds, the median taken): see the module's docstring. ``timeout``: seconds one
    worker may take. ``keep_going``: a method whose worker fails or times out is logged and left
    out, and the others are measured (for an unattended run on a lent machine). The files are
    rewritten after each (model, batch), so a run cut short keeps what it measured.
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown benchmark method {m!r}; accepted: {', '.join(METHODS)}")
    if harness not in HARNESSES:
        raise ValueError(f"unknown harness {harness!r}; accepted: {', '.join(HARNESSES)}")
    if repeats < 1 or (harness == "memory" and repeats != 1):
        raise ValueError(f"repeats={repeats}: the speed harness takes 1 or more, the memory harness exactly 1")
    run = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rows: list[dict] = []
    csv_path = None
    for model in models:
        for batch in batches:
            times: dict[str, list[float]] = {m: [] for m in methods}
            last: dict[str, dict] = {}
            for round_ in range(repeats):
                for method in methods:  # interleaved: every round visits every method
                    try:
                        row = run_one(method, model, batch, steps=steps, warmup=warmup, rank=rank, sparsity=sparsity,
                                      image_size=image_size, device=device, model_kwargs=model_kwargs,
                                      harness=harness, timeout=timeout)
                    except (RuntimeError, subprocess.TimeoutExpired) as error:
                        if not keep_going:
                            raise
                        log(f"{model} b{batch} {method:16s} FAILED, left out: {str(error).strip()[-400:]}")
                        continue
                    times[method].append(row["step_seconds"])
                    last[method] = row
                    memory = f"{row['peak_memory_mb']:9.1f} MB" if harness == "memory" else f"round {round_ + 1}/{repeats}"
                    log(f"{model} b{batch} {method:16s} {memory} {row['step_seconds']:8.3f} s/step")
                    if harness == "memory":  # one round: the row is final, keep it at once (a run cut short keeps it)
                        _write_results(rows + [{**row, "run": run, "harness": harness}], output_dir, chart=False)
            for method in [m for m in methods if times[m]]:
                row = {**last[method], "step_seconds": round(statistics.median(times[method]), 4),
                       "run": run, "harness": harness}
                if harness == "speed":
                    row.pop("peak_memory_mb")  # the default allocator keeps freed memory: not a peak of live tensors
                    row["repeats"] = repeats
                    row["round_seconds"] = " ".join(f"{t:.3f}" for t in times[method])
                rows.append(row)
            csv_path = _write_results(rows, output_dir)  # after each (model, batch), with the chart
    log(f"wrote {csv_path}")
    return rows


def _write_results(rows: list[dict], output_dir: str, chart: bool = True) -> Path:
    """Merge ``rows`` into the results file of this hardware and versions; rewrite its tables (and chart)."""
    import torch
    import timm

    tag = f"{hardware_tag()}-torch{torch.__version__.split('+')[0]}-timm{timm.__version__}"
    out = Path(output_dir)
    all_rows = add_ratios(merge_rows(out / f"memory-speed-{tag}.csv", rows))
    csv_path = write_csv(all_rows, out / f"memory-speed-{tag}.csv")
    (out / f"memory-{tag}.md").write_text(markdown_table(all_rows, "peak_memory_mb") + "\n")
    (out / f"speed-{tag}.md").write_text(markdown_table(all_rows, "step_seconds") + "\n")
    if chart:
        bar_chart(all_rows, out / f"memory-speed-{tag}.png")
    return csv_path
