"""The table that sets the paper's GPU memory beside ours reads the right rows and divides the right way."""

from snella.bench import memory_speed as ms
from snella.bench import paper


def test_table_puts_the_papers_figures_beside_ours(tmp_path):
    rows = [
        {"model": "vit_base_patch16_224", "batch": 8, "method": "lora-32", "peak_memory_mb": 1600.0,
         "step_seconds": 0.05, "harness": "memory"},
        {"model": "vit_base_patch16_224", "batch": 8, "method": "full", "peak_memory_mb": 2500.0,
         "step_seconds": 0.04, "harness": "memory"},
        {"model": "vit_base_patch16_224", "batch": 8, "method": "snell-fused", "peak_memory_mb": 1840.3,
         "step_seconds": 0.06, "harness": "memory"},
        {"model": "vit_base_patch16_224", "batch": 8, "method": "snell-fused", "peak_memory_mb": 1.0,
         "step_seconds": 9.0, "harness": "speed"},  # not read: speed rows carry no peak
        {"model": "vit_base_patch16_224", "batch": 64, "method": "lora-8", "peak_memory_mb": 1.0,
         "step_seconds": 9.0, "harness": "memory"},  # not read: another batch
    ]
    path = ms.write_csv(rows, tmp_path / "r.csv")
    table = paper.comparison_table(paper.read_rows(path))
    lines = table.splitlines()
    assert "| ViT-B/16 | SNELL-32 | 1673 | 1840 | 1.10 | 1.15 | 0.0600 | 1.50 |" in lines
    assert "| ViT-B/16 | LoRA-8 | 1546 |  |  |  |  |  |" in lines  # the paper's figure even when ours is missing
    assert "| ViT-B/16 | GPS(-style) | 2428 |  |  |  |  |  |" in lines
    assert not any("ViT-L/16" in line for line in lines)  # no rows for it: no lines
    assert paper.main([str(path), "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text() == table + "\n"


def test_a_failing_method_is_left_out_with_keep_going(tmp_path, monkeypatch):
    """On a lent machine a hung or failing worker must not lose the other rows (and the files are written)."""
    import subprocess

    def fake_run_one(method, model, batch, **kw):
        if method == "snell-reference":
            raise subprocess.TimeoutExpired("worker", kw["timeout"])
        return {"method": method, "model": model, "batch": batch, "peak_memory_mb": 10.0, "step_seconds": 1.0}

    monkeypatch.setattr(ms, "run_one", fake_run_one)
    rows = ms.run_suite(models=["m"], methods=["full", "snell-reference", "lora-8"], output_dir=str(tmp_path),
                        timeout=5, keep_going=True, log=lambda *_: None)
    assert [r["method"] for r in rows] == ["full", "lora-8"]
    assert len(list(tmp_path.glob("memory-speed-*.csv"))) == 1
    try:
        ms.run_suite(models=["m"], methods=["snell-reference"], output_dir=str(tmp_path), timeout=5,
                     log=lambda *_: None)
    except subprocess.TimeoutExpired:
        pass
    else:
        raise AssertionError("without keep_going a timeout must stop the run")
