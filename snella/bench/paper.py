"""The paper's peak-memory table (SNELL, GPU, batch 8) beside ours: one markdown table from a results CSV.

``python -m snella.bench.paper RESULTS.csv --out TABLE.md`` (``scripts/gpu_check.sh`` runs it). Ours are
the memory harness's rows (on CUDA: ``torch.cuda.max_memory_allocated``, and step times between
``torch.cuda.synchronize`` calls, valid as speed there: the CPU allocator setting of that harness does
not touch CUDA memory).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Optional

# SPEC.md section 8: peak training memory in MB at batch 8 (SNELL paper, GPU).
PAPER_MB = {
    "vit_base_patch16_224": {"gps-style": 2428, "lora-8": 1546, "snell-fused": 1673},
    "vit_large_patch16_224": {"gps-style": 7522, "lora-8": 4325, "snell-fused": 4519},
    "vit_huge_patch14_224": {"gps-style": 16119, "lora-8": 9325, "snell-fused": 9692},
}
MODEL_LABELS = {"vit_base_patch16_224": "ViT-B/16", "vit_large_patch16_224": "ViT-L/16",
                "vit_huge_patch14_224": "ViT-H/14"}
# Our methods in table order, with the names the paper's table uses.
METHOD_LABELS = {"full": "full", "lora-8": "LoRA-8", "lora-32": "LoRA-32", "gps-style": "GPS(-style)",
                 "snell-reference": "SNELL reference (authors' way)", "snell-fused": "SNELL-32",
                 "snella-fused": "SNELLA-32"}


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}" if a and b else ""


def _num(row: Optional[dict], key: str) -> Optional[float]:
    """A cell as a float (CSV cells are strings), None where the row or the cell is missing."""
    value = (row or {}).get(key)
    return None if value in (None, "") else float(value)


def comparison_table(rows: list[dict], batch: int = 8) -> str:
    """Markdown: per model and method, the paper's MB, ours, ours over the paper's, ours over LoRA-32,
    step time and its ratio to full fine-tuning. Only memory-harness rows at ``batch`` are read."""
    mine = {(r["model"], r["method"]): r for r in rows
            if r.get("harness", "memory") == "memory" and int(r["batch"]) == batch}
    lines = ["| model | method | paper MB | ours MB | ours / paper | ours x LoRA-32 | s / step | x full |",
             "|---|---|---|---|---|---|---|---|"]
    models = [m for m in PAPER_MB if any(k[0] == m for k in mine)]
    models += sorted({k[0] for k in mine} - set(models))
    for model in models:
        lora32 = _num(mine.get((model, "lora-32")), "peak_memory_mb")
        full_t = _num(mine.get((model, "full")), "step_seconds")
        for method, label in METHOD_LABELS.items():
            row = mine.get((model, method))
            paper = PAPER_MB.get(model, {}).get(method)
            if row is None and paper is None:
                continue
            mb, t = _num(row, "peak_memory_mb"), _num(row, "step_seconds")
            lines.append(f"| {MODEL_LABELS.get(model, model)} | {label} | {paper or ''} | "
                         f"{'' if mb is None else f'{mb:.0f}'} | {_ratio(mb, paper)} | {_ratio(mb, lora32)} | "
                         f"{'' if t is None else f'{t:.4f}'} | {_ratio(t, full_t)} |")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="a results CSV of `snella bench memory`")
    parser.add_argument("--out", type=Path, help="where to write the markdown (default: print it)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    table = comparison_table(read_rows(args.csv), args.batch)
    if args.out:
        args.out.write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
