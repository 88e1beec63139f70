"""scripts/gpu_check.sh on a machine without a GPU: it stops at once with a message that says so (exit 2)."""

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the whole check")
def test_gpu_check_fails_cleanly_without_a_gpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "RESULTS": str(tmp_path)})
    assert proc.returncode == 2
    assert "no CUDA device here" in proc.stderr
    assert not list(tmp_path.glob("*.csv"))  # nothing measured, nothing written
