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


def merged_outputs_without_snella(weights: Path, x: torch.Tensor, tmp_path: Path, call: str = "model(X)") -> torch.Tensor:
    """The outputs on ``x`` of a `snella merge` file loaded by its JSON's own "load" line, in a fresh Python in
    which snella cannot be imported (as a user without snella would); ``call`` computes them from ``model`` (in
    eval mode) and ``X`` (e.g. ``"model(pixel_values=X).logits"`` for a transformers model)."""
    info = json.loads(weights.with_suffix(".json").read_text())
    torch.save(x, tmp_path / "x.pt")
    load = info["load"].replace("JSON", repr(str(weights.with_suffix(".json")))).replace("WEIGHTS", repr(str(weights)))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["snella"] = None  # as if snella were not installed
        import torch
        {load}
        with torch.no_grad():
            model.eval()
            X = torch.load({str(tmp_path / 'x.pt')!r})
            torch.save({call}, {str(tmp_path / 'y.pt')!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "y.pt")


def square_mask_folder(root: Path, bad: str = "", side: int = 28) -> Path:
    """train/ and test/ sub-splits of images/ + masks/ (the Kvasir-SEG layout): a bright square on noise, its mask
    0/255. ``bad="size"``: the 4th training mask is cut to 20 rows."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 80, (side, side, 3), dtype=np.uint8)
            mask = np.zeros((side, side), np.uint8)
            top, left = rng.integers(0, side // 2, 2)
            image[top:top + side * 3 // 7, left:left + side * 3 // 7] = 220
            mask[top:top + side * 3 // 7, left:left + side * 3 // 7] = 255
            Image.fromarray(image).save(root / split / "images" / f"{i:02d}.png")
            if bad == "size" and split == "train" and i == 3:
                mask = mask[:20]
            Image.fromarray(mask).save(root / split / "masks" / f"{i:02d}.png")
    return root
