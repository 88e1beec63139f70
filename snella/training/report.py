"""What a run reports: peak memory and the final summary printed for a person."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any, Optional

import torch


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> Optional[int]:
    """A field of /proc/self/status in kB (Linux), or None elsewhere."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak memory of training: CUDA's max allocated bytes, or on CPU the growth of the peak RSS.

    On CPU the kernel's peak-RSS mark is reset at ``start()`` (Linux /proc/self/clear_refs), so
    the peak is that of training, not of data loading; the reported value is that peak minus the
    RSS at ``start()``: the memory training added on top of the loaded model and data.
    Elsewhere it falls back to ``ru_maxrss``, which cannot be reset.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base_kb = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            pass
        self.base_kb = _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak_kb = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak_kb - self.base_kb, 0) / 1024

    @property
    def kind(self) -> str:
        return "CUDA max allocated" if self.device.type == "cuda" else "CPU peak RSS growth"


def human_bytes(n: float) -> str:
    """A byte count as '512 B', '42.5 KB', '1.2 MB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def human_seconds(seconds: float) -> str:
    """Seconds as '12.3s' or '4m05.2s'."""
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m{secs:04.1f}s" if minutes else f"{secs:.1f}s"


def summary(metrics: dict[str, Any], result_lines: list[str]) -> str:
    """The lines printed at the end of a run; ``result_lines``: the task's (its test metrics), after the first."""
    total = metrics.get("total_params") or 1
    lines = [
        f"snella finetune: {metrics['method']} on {metrics['data']} done in {human_seconds(metrics['wall_seconds'])}",
        *result_lines,
        f"  trainable params  {metrics['trainable_params']:,} ({100 * metrics['trainable_params'] / total:.2f}% "
        f"of {metrics['total_params']:,})",
        f"  adapter size      {human_bytes(metrics['adapter_bytes'])} on disk",
        f"  peak memory       {metrics['peak_memory_mb']:.0f} MB ({metrics['peak_memory_kind']})",
        f"  train time        {human_seconds(metrics['train_seconds'])} for {metrics['epochs']} epochs",
    ]
    if metrics.get("final_density") is not None:
        lines.append(f"  update density    {100 * metrics['final_density']:.1f}% of dW entries kept")
    if metrics.get("skipped_images"):
        lines.append(f"  skipped images    {metrics['skipped_images']} unreadable (--skip-bad-images)")
    lines.append(f"  outputs           {metrics['output_dir']}")
    return "\n".join(lines)


def print_summary(metrics: dict[str, Any], result_lines: list[str]) -> None:
    """Print ``summary(metrics, result_lines)`` to stdout."""
    print(summary(metrics, result_lines), file=sys.stdout, flush=True)
