"""`snella merge` of Hugging Face segmentation runs (SegFormer, prompt-free SAM): the transformers weights + config
load without snella and compute the adapted model's logits; `snella predict --output-dir` writes the masks there."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from support import merged_outputs_without_snella, square_mask_folder
from snella import cli
from snella.train import finetune
from snella.training.config import TrainConfig
from snella.training.runs import load_run

# What a user computes from the loaded transformers model (the raw low-resolution logits).
RAW_CALL = {"segformer": "model(pixel_values=X).logits",
            "sam": "model(pixel_values=X, multimask_output=False).pred_masks[:, 0]"}


@pytest.fixture(scope="module")
def hf_runs(tiny_segformer_dir, tiny_sam_dir, tmp_path_factory) -> dict:
    """A 2-epoch SNELLA run of each tiny HF model on binary squares (SegFormer at 32 px, SAM at its 64 px)."""
    root = tmp_path_factory.mktemp("hfseg")
    runs = {}
    for kind, folder, side in (("segformer", tiny_segformer_dir, 32), ("sam", tiny_sam_dir, 64)):
        data = square_mask_folder(root / f"squares-{kind}", side=side)
        out = root / f"run-{kind}"
        config = TrainConfig.for_task("segmentation", model=f"hf:{folder}", data=f"seg:{data}", image_size=side,
                                      epochs=2, batch_size=4, lr=1e-2, warmup_epochs=0, train_limit=None,
                                      test_limit=None, r=4, progress=False, device="cpu", output_dir=str(out))
        with contextlib.redirect_stdout(io.StringIO()):
            finetune(config)
        runs[kind] = (out, side)
    return runs


@pytest.mark.parametrize("kind", ["segformer", "sam"])
def test_a_merged_hf_run_loads_in_transformers_alone_and_gives_the_adapted_logits(kind, hf_runs, tmp_path, one_thread):
    out, side = hf_runs[kind]
    output = tmp_path / "merged.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["merge", "--run", str(out), "--output", str(output)]) == 0
    info = json.loads(output.with_suffix(".json").read_text())
    assert info["transformers_class"] == {"segformer": "SegformerForSemanticSegmentation", "sam": "SamModel"}[kind]
    assert info["max_abs_logit_diff"] < 1e-4 and info["max_abs_rebuild_diff"] < 1e-4
    assert info["classes"] == ["background", "foreground"] and info["binary"] is True

    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        adapted = load_run(out, "cpu").model.eval()(x)  # (2, 1, side, side): the run's model, adapter unmerged
    raw = merged_outputs_without_snella(output, x, tmp_path, call=RAW_CALL[kind])  # (2, 1, s, s) low resolution
    assert raw.shape[-1] < side  # the transformers model's own output, not snella's wrapper
    # the wrapper's post-processing, transcribed: bilinear upsampling to the input size
    upsampled = F.interpolate(raw, size=(side, side), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsampled, adapted, atol=1e-4, rtol=1e-4)


def test_predict_writes_masks_to_the_output_dir(hf_runs, tmp_path, capsys):
    out, side = hf_runs["segformer"]
    image = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    target = tmp_path / "masks" / "nested"
    assert cli.main(["predict", "--run", str(out), str(image), "--output-dir", str(target), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert predicted[0]["mask"] == str(target / "scan.png")
    mask = np.asarray(Image.open(target / "scan.png"))
    assert mask.shape == (40, 50) and set(np.unique(mask)) <= {0, 255}  # binary: 0/255 at the image's size
    assert not (out / "predictions").exists()

    from snella.training.tools import predict

    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="is a file; accepted: a folder"):
        predict(str(out), [str(image)], output_dir=str(tmp_path / "afile"))
