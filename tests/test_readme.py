"""The README's quick start runs as written and does what it says."""

import os
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs_as_written(tmp_path, capsys):
    code = quick_start_code()
    assert len(code.strip().splitlines()) <= 11
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(code, "README-quick-start", "exec"), scope)
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "trainable params: 5,317,090 || all params: 91,122,668" in printed  # the figure the README quotes
    size = (tmp_path / "my-adapter" / "adapter_model.safetensors").stat().st_size
    assert 20e6 < size < 22e6  # "~21 MB"
    # The merged plain model reproduces the trained adapter's output.
    model, merged = scope["model"], scope["merged"]
    assert not any("snella" in n for n, _ in merged.named_modules())
    x = torch.randn(1, 3, 224, 224)
    model.eval()
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-4)
