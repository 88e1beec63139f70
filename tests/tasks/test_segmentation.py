"""Segmentation as a task: tiny ViT + head runs through `finetune`, resume is exact, image/mask folders train, bad masks
are refused through the CLI, and evaluate / predict / merge work on a finished run."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from support import merged_outputs_without_snella, square_mask_folder, torchrun_finetune
from snella import cli
from snella.train import NonFiniteLossError, finetune
from snella.training.config import TrainConfig

TINY = dict(model="vit_fmnist_d128", model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, train_limit=64,
            test_limit=16, epochs=3, batch_size=16, warmup_epochs=1, lr=1e-2, progress=False, device="cpu",
            transform="flip-crop")  # the crops drawn from the run's generator: resume must replay them
METRIC_KEYS = ("test_miou", "test_mdice", "test_pixel_accuracy")
BINARY_KEYS = ("test_mae", "test_s_measure", "test_e_measure_mean", "test_weighted_f")


def run(config: TrainConfig) -> tuple[dict, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = finetune(config)
    return metrics, printed.getvalue()


@pytest.fixture(scope="module")
def composites_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "run"
    metrics, printed = run(TrainConfig.for_task("segmentation", output_dir=str(out), **TINY))
    return metrics, out, printed


def test_the_task_defaults_are_the_embedded_composites():
    config = TrainConfig.for_task("segmentation")
    assert (config.data, config.model, config.transform, config.random_shift) == (
        "fmnist-composites", "snella-default", "resize", 0)
    parsed = cli.config_from_args(cli.build_parser("finetune").parse_args(["finetune", "--task", "segmentation",
                                                                            "--epochs", "1"]))
    assert parsed.data == "fmnist-composites" and parsed.epochs == 1  # task defaults under the flags


@pytest.mark.parametrize("settings, message", [
    ({"decoder": "unet"}, "decoder='unet' is invalid; accepted: the default None: it is a segmentation setting"),
    ({"ignore_index": 0, "task": "segmentation", "random_shift": 0}, None),  # allowed value, checked at load
    ({"task": "segmentation", "random_shift": 2}, "random_shift=2 is invalid; accepted: 0 for task='segmentation'"),
    ({"task": "segmentation", "random_shift": 0, "decoder": "segformer"}, "decoder='segformer' is invalid"),
    ({"task": "segmentation", "random_shift": 0, "transform": "vtab"}, "transform='vtab' is invalid; accepted: flip"),
    ({"task": "segmentation", "random_shift": 0, "dice_weight": -1}, "dice_weight=-1.0 is invalid"),
    ({"task": "segmentation", "random_shift": 0, "num_classes": 1}, "num_classes=1 is invalid"),
    ({"task": "segmentation", "random_shift": 0, "head": ["head"]}, "head=\\['head'\\] is invalid"),
])
def test_each_setting_is_checked_and_other_tasks_refuse_segmentation_settings(settings, message):
    if message is None:
        assert TrainConfig(**settings).ignore_index == 0
        return
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_a_tiny_vit_learns_composites_and_writes_metrics_and_overlays(composites_run):
    metrics, out, printed = composites_run
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and metrics["steps"] == 3 * 4
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]  # from ~ln(11) down
    assert history[-1]["train_pixel_acc"] > history[0]["train_pixel_acc"]
    saved = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert 0 < saved[key] <= 1 and saved[key] == metrics[key]
    assert saved["test_images"] == 16 and "test_mae" not in saved  # 11 classes: no binary measures
    assert set(saved["test_iou"]) == {"background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                      "Shirt", "Sneaker", "Bag", "Ankle boot"}
    # the pixel accuracy is the background IoU's numerator over all pixels: never below the IoU of background
    assert saved["test_pixel_accuracy"] >= saved["test_iou"]["background"]
    assert (out / "overlays.png").stat().st_size > 5000 and Image.open(out / "overlays.png").size[1] > 400
    assert Image.open(out / "curves.png").size[0] > 800  # loss, pixel accuracy, density: three panels
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.startswith("decode_head.") for k in adapter) and any("snella_A" in k for k in adapter)
    assert f"test mIoU         {100 * metrics['test_miou']:.2f}%" in printed


def test_a_segmentation_run_stopped_and_resumed_equals_the_uninterrupted_one(composites_run, tmp_path: Path):
    expected, reference, _ = composites_run
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError):
        run(TrainConfig.for_task("segmentation", output_dir=str(out), debug_nan_step=2 * 4 + 2, **TINY))
    resumed, _ = run(TrainConfig.for_task("segmentation", output_dir=str(out), resume=True, **TINY))
    for key in METRIC_KEYS:
        assert resumed[key] == expected[key]
    for mine, theirs in zip(resumed["history"], expected["history"]):
        assert {k: v for k, v in mine.items() if k != "seconds"} == {k: v for k, v in theirs.items() if k != "seconds"}
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_image_mask_folder_trains_one_epoch_with_the_binary_measures(tmp_path: Path):
    folder = square_mask_folder(tmp_path / "squares")
    settings = {**TINY, "epochs": 1, "train_limit": None, "test_limit": None, "batch_size": 4, "warmup_epochs": 0,
                "image_size": 28}  # files default to 224 px inputs
    metrics, _ = run(TrainConfig.for_task("segmentation", data=f"seg:{folder}", output_dir=str(tmp_path / "run"),
                                          **settings))
    assert metrics["steps"] == 3 and metrics["test_images"] == 4
    for key in METRIC_KEYS + BINARY_KEYS:
        assert 0 <= metrics[key] <= 1, key
    assert set(metrics["test_iou"]) == {"background", "foreground"}
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["binary"] is True and run_json["input"]["image_size"] == 28


def test_a_bad_mask_is_refused_through_the_cli_naming_the_file(tmp_path: Path, capsys):
    folder = square_mask_folder(tmp_path / "bad", bad="size")
    code = cli.main(["finetune", "--task", "segmentation", "--data", f"seg:{folder}", "--model", "vit_fmnist_d128",
                     "--model-kwargs", "depth=1,embed_dim=16,num_heads=2", "--epochs", "1", "--no-progress",
                     "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"mask {folder / 'train' / 'masks' / '03.png'} is 28x20" in err and "must have its image's size" in err


def test_evaluate_predict_and_merge_on_a_finished_run(composites_run, tmp_path: Path, capsys):
    metrics, out, _ = composites_run
    # evaluate: the run's own test split gives the numbers of metrics.json
    assert cli.main(["evaluate", "--run", str(out), "--limit", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 16 and result["miou"] == pytest.approx(metrics["test_miou"], abs=1e-12)
    assert result["pixel_accuracy"] == pytest.approx(metrics["test_pixel_accuracy"], abs=1e-12)

    # predict: one mask PNG per image at the image's size; the labels are the model's argmax on the resized image
    from snella.training.runs import load_run

    loaded = load_run(out, "cpu")
    rng = np.random.default_rng(1)
    files = []
    for i, size in enumerate([(56, 56), (70, 60)]):  # (width, height): one at the model's input, one larger
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(files[-1])
    assert cli.main(["predict", "--run", str(out), *map(str, files), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    masks = [np.asarray(Image.open(p["mask"])) for p in predicted]
    assert [m.shape for m in masks] == [(56, 56), (60, 70)]
    x = torch.from_numpy(np.asarray(Image.open(files[0]).convert("RGB"), np.float32) / 255).permute(2, 0, 1)
    with torch.no_grad():
        expected = loaded.model(((x - 0.5) / 0.5)[None]).argmax(1)[0].numpy()  # (56, 56): no resize needed
    assert np.array_equal(masks[0], expected)
    assert sum(predicted[0]["fractions"].values()) == pytest.approx(1.0)

    # merge: the files load without snella and compute the adapted model's logits
    output = tmp_path / "merged.safetensors"
    assert cli.main(["merge", "--run", str(out), "--output", str(output)]) == 0
    info = json.loads(output.with_suffix(".json").read_text())
    assert info["max_abs_logit_diff"] < 1e-4 and info["classes"][0] == "background"
    example = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        adapted = load_run(out, "cpu").model(example)
    torch.testing.assert_close(merged_outputs_without_snella(output, example, tmp_path), adapted, atol=1e-4,
                               rtol=1e-4)


@pytest.mark.slow  # two processes under torchrun: over 10 s
def test_two_cpu_processes_agree_on_a_segmentation_run(tmp_path: Path):
    out = tmp_path / "ddp"
    config = TrainConfig.for_task("segmentation", output_dir=str(out), **{**TINY, "epochs": 2})
    config_file = config.save_yaml(tmp_path / "ddp.yaml")
    torchrun_finetune(config_file, tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_agree"] is True and metrics["steps"] == 2 * 4
    first, second = metrics["rank_results"]
    assert first["checksum"] == second["checksum"]
    # the test metrics were summed over the two ranks' halves: one process scoring all 16 images agrees
    from snella.tasks.segmentation import SegmentationTask
    from snella.training.runs import load_run

    loaded = load_run(out, "cpu")
    alone = SegmentationTask().evaluate_run(loaded, None, "test", 8, "fp32", 16)
    assert alone["images"] == metrics["test_images"] == 16
    assert alone["miou"] == pytest.approx(metrics["test_miou"], abs=1e-9)
    assert alone["pixel_accuracy"] == pytest.approx(metrics["test_pixel_accuracy"], abs=1e-9)
