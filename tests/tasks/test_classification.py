"""Classification as a task changed nothing: tiny runs give the numbers the loop gave before the task interface.

The pinned values were computed on the code before the refactoring (commit 20e0ca7, where classification was
wired into snella/train.py) with these exact settings; after it, the same runs matched them bit for bit
(trainable-state sha256 included) on the development machine. Losses and checksums are compared to 1e-9
relative so that another CPU's last-bit rounding does not fail the test, while any change of behaviour does.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from snella.tasks import get_task
from snella.tasks.classification import ClassificationTask
from snella.train import finetune
from snella.training.config import TrainConfig

# The TINY run of tests/test_train.py: a 2-block, width-32 ViT on 192 real MNIST digits, 3 epochs.
TINY = dict(model="vit_fmnist_d128", model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, data="mnist5k",
            train_limit=192, test_limit=100, epochs=3, batch_size=32, warmup_epochs=1, sparsity=0.5, lr=1e-2,
            progress=False)
# name -> (overrides, test accuracy, checksum [sum, sum of squares] of the trainable parameters,
#          per-epoch train loss, per-epoch train accuracy, per-epoch val accuracy), all from commit 20e0ca7
PINNED = {
    "snella": ({}, 0.1, [25.474091840077563, 46.09163587908218],
               [2.314994970957438, 2.3245158990224204, 2.2897918224334717],
               [0.0625, 0.08333333333333333, 0.13020833333333334], None),
    "lora": ({"method": "lora"}, 0.13, [-3.6698111007081025, 25.83568900113459],
             [2.3213747342427573, 2.3183860778808594, 2.2953919172286987],
             [0.0625, 0.08854166666666667, 0.11979166666666667], None),
    "full": ({"method": "full", "lr": 1e-3}, 0.1, [153.80978826204185, 180.8341974130619],
             [2.3141090472539267, 2.2994285424550376, 2.2853885889053345],
             [0.08854166666666667, 0.11458333333333333, 0.13020833333333334], None),
    "snella-val": ({"train_split": "train", "val_split": "val"}, 0.1, [25.18537467171336, 44.344381468694976],
                   [2.3185078303019204, 2.324185291926066, 2.303332765897115],
                   [0.07291666666666667, 0.057291666666666664, 0.109375], [0.09, 0.18, 0.14]),
}


def test_classification_is_the_default_task():
    assert TrainConfig().task == "classification" and isinstance(get_task("classification"), ClassificationTask)


@pytest.mark.parametrize("name", list(PINNED))
def test_a_tiny_run_gives_the_numbers_of_the_loop_before_tasks(name, tmp_path: Path, one_thread):
    # one thread, as the numbers were recorded: a second one sums in another order (checksums move by 1e-8)
    overrides, accuracy, checksum, losses, train_acc, val_acc = PINNED[name]
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = finetune(TrainConfig(**{**TINY, "output_dir": str(tmp_path / "run"), **overrides}))
    assert metrics["test_accuracy"] == accuracy and metrics["test_images"] == 100
    assert metrics["rank_results"][0]["checksum"] == pytest.approx(checksum, rel=1e-9)
    assert [h["train_loss"] for h in metrics["history"]] == pytest.approx(losses, rel=1e-9)
    assert [h["train_acc"] for h in metrics["history"]] == train_acc  # counts of 192 images: exact
    assert [h.get("val_acc") for h in metrics["history"]] == (val_acc or [None] * 3)
