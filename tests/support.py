"""Helpers the tests import by name (tests/ is on sys.path, see conftest.py): what is missing here is skipped,
and failed in CI, where scripts/setup.sh installs everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch


def in_ci() -> bool:
    """Whether the tests run in CI (CI=true there): what a newcomer's machine lacks must fail, not skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(message: str, module_level: bool = False) -> None:
    """Skip the test (or, with ``module_level``, the whole module) for something this machine lacks; in CI,
    fail with ``message`` (which says how to install it)."""
    if in_ci():
        pytest.fail(f"{message}\nIn CI this is a failure, not a skip: scripts/setup.sh installs it.", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


REPO = Path(__file__).resolve().parents[1]


def torchrun_finetune(config_file: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`snella finetune --config FILE` in two CPU processes under torchrun; fails the test with the output if it
    fails, else returns the finished process (its stdout holds what the ranks printed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "snella", "finetune", "--config", str(config_file)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def merged_outputs_without_snella(weights: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """The outputs on ``x`` of a `snella merge` file loaded by its JSON's own "load" line, in a fresh Python in
    which snella cannot be imported (as a user without snella would)."""
    info = json.loads(weights.with_suffix(".json").read_text())
    torch.save(x, tmp_path / "x.pt")
    load = info["load"].replace("JSON", repr(str(weights.with_suffix(".json")))).replace("WEIGHTS", repr(str(weights)))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["snella"] = None  # as if snella were not installed
        import torch
        {load}
        with torch.no_grad():
            torch.save(model.eval()(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "y.pt")
