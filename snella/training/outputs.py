"""The output folder of a run: its default name, the files it holds, and refusing to overwrite a run."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from snella.training.checkpoint import CHECKPOINT_DIR, checkpoint_path
from snella.training.config import TrainConfig

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"          # what evaluate / predict / merge need besides the config: classes, input
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"
ALLOCATION_PLOT = "allocation.png"
CURVES_PLOT = "curves.png"
RUN_OUTPUTS = (CONFIG_FILE, RUN_FILE, METRICS_FILE, ADAPTER_DIR, CHECKPOINT_DIR, ALLOCATION_PLOT, CURVES_PLOT)
# Any of these present means the folder holds a run (finished or not).
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR)


def default_output_dir(config: TrainConfig, now: float | None = None) -> Path:
    """runs/<method>-<data>-<YYYYmmdd-HHMMSS>, with the data source reduced to a short safe name."""
    data = config.data.rstrip("/").split(":")[-1].rstrip("/").split("/")[-1] or "data"
    data = re.sub(r"[^A-Za-z0-9_.-]+", "-", data)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return Path("runs") / f"{config.method}-{data}-{stamp}"


def holds_run(directory: Path) -> bool:
    """Whether ``directory`` holds a run, finished or not."""
    return any((directory / name).exists() for name in RUN_MARKERS)


def check_output_dir(directory: Path, overwrite: bool, resume: bool) -> None:
    """Refuse a folder holding a run unless told to overwrite it or resume it; refuse to resume nothing.

    Raises:
        ValueError: the folder holds a run and neither flag is set, both flags are set, or
            ``directory`` is a file.
        FileNotFoundError: ``resume`` without a checkpoint in the folder.
    """
    if overwrite and resume:
        raise ValueError("--overwrite and --resume contradict each other: give one")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"output_dir {directory} is a file, not a folder")
    if resume:
        if not checkpoint_path(directory).is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path(directory)}; the run in "
                                    f"{directory} never finished an epoch (start again with --overwrite)")
        return
    if holds_run(directory) and not overwrite:
        found = ", ".join(n for n in RUN_MARKERS if (directory / n).exists())
        raise ValueError(f"output_dir {directory} already holds a run ({found}); "
                         "pass --overwrite to replace it, --resume to continue it, or choose another --output-dir")


def clear_run(directory: Path) -> None:
    """Delete a previous run's outputs from ``directory`` (other files there are left alone)."""
    for name in RUN_OUTPUTS:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (a temp file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def save_tensors(state: Mapping[str, Any], path: Path, metadata: Optional[dict[str, str]] = None) -> Path:
    """Write tensors to a safetensors file atomically, with the permissions of any new file (0666 & ~umask).

    safetensors itself creates its files with mode 0600, which other users (a shared run folder, a
    served model) could not read.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    tmp.replace(path)
    return path


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a missing or invalid file is named in the error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {path.parent} the output folder of a snella run?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def folder_bytes(directory: Path) -> int:
    """Total size of the files under ``directory``."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
