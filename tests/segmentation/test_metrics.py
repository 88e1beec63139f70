"""SegmentationMetrics: hand-computed IoU / Dice / accuracy, the ignore index, binary per-image means, merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sod_reference as ref
from snella.segmentation.metrics import SegmentationMetrics, predictions


def _logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits ``(B, C, H, W)`` whose argmax is ``labels`` ``(B, H, W)``."""
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float() * 4 - 2


TARGET = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])
PRED = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 1]]])


def test_multiclass_values_by_hand():
    metrics = SegmentationMetrics(3)
    metrics.update(_logits(PRED, 3), TARGET)
    out = metrics.compute()
    # 7 counted pixels (one ignored). class 0: tp 1, fp 1, fn 1; class 1: tp 3, fp 1, fn 0; class 2: tp 1, fp 0, fn 1
    assert out["iou"] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert out["dice"] == pytest.approx([2 / 4, 6 / 7, 2 / 3])
    assert out["miou"] == pytest.approx(19 / 36) and out["mdice"] == pytest.approx(85 / 126)
    assert out["pixel_accuracy"] == pytest.approx(5 / 7)
    assert metrics.confusion.sum() == 7 and metrics.confusion[1, 1] == 3 and metrics.confusion[2, 0] == 1


def test_absent_class_is_left_out_of_the_means():
    metrics = SegmentationMetrics(4)
    metrics.update(_logits(PRED, 4), TARGET)
    out = metrics.compute()
    assert np.isnan(out["iou"][3]) and out["miou"] == pytest.approx(19 / 36)


def test_streaming_equals_one_batch():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 3, 5, 7), torch.randint(0, 3, (6, 5, 7))
    target[0, 0, :3] = 255
    whole, parts = SegmentationMetrics(3), SegmentationMetrics(3)
    whole.update(logits, target)
    for i in range(0, 6, 2):
        parts.update(logits[i:i + 2], target[i:i + 2])
    assert parts.compute() == whole.compute()


def test_binary_per_image_dice_iou_and_structural_measures():
    gt = torch.zeros(2, 4, 4, dtype=torch.long)
    gt[0, :2, :2] = 1  # 4 object pixels
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    pred[0, :2, 1:3] = 1  # 2 of them found, 2 false positives
    logits = (pred.float() * 6 - 3)[:, None]  # (2, 1, 4, 4)
    metrics = SegmentationMetrics(2, binary=True)
    metrics.update(logits, gt)
    out = metrics.compute()
    # image 0: dice 2*2/(4+4), IoU 2/6; image 1: both empty -> 1 and 1
    assert out["image_dice"] == pytest.approx((0.5 + 1) / 2) and out["image_iou"] == pytest.approx((1 / 3 + 1) / 2)
    assert out["iou"][1] == pytest.approx(2 / 6)  # dataset-level foreground IoU: tp 2, fp 2, fn 2
    probs = torch.sigmoid(logits[:, 0]).double().numpy()
    expected = {"s_measure": [], "e_measure_adaptive": [], "weighted_f": [], "mae": []}
    curves = []
    for p, g in zip(probs, gt.numpy().astype(bool)):
        p = ref.minmax(p)
        expected["s_measure"].append(ref.s_measure(p, g))
        expected["e_measure_adaptive"].append(ref.e_measure_adaptive(p, g))
        expected["weighted_f"].append(ref.weighted_f(p, g))
        expected["mae"].append(np.abs(p - g).mean())
        curves.append(ref.e_measure_curve(p, g))
    for name, values in expected.items():
        assert out[name] == pytest.approx(np.mean(values), abs=1e-10), name
    assert out["e_measure_mean"] == pytest.approx(np.mean(curves), abs=1e-10)
    assert out["e_measure_max"] == pytest.approx(np.mean(curves, axis=0).max(), abs=1e-10)


def test_state_sum_across_ranks_equals_one_accumulator():
    torch.manual_seed(1)
    logits, target = torch.randn(4, 1, 6, 6), torch.randint(0, 2, (4, 6, 6))
    whole, rank0, rank1 = (SegmentationMetrics(2, binary=True) for _ in range(3))
    whole.update(logits, target)
    rank0.update(logits[:2], target[:2])
    rank1.update(logits[2:], target[2:])
    merged = SegmentationMetrics.from_state(rank0.state() + rank1.state(), 2, binary=True)  # what all_reduce gives
    got, expected = merged.compute(), whole.compute()
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    with pytest.raises(ValueError, match=r"needs \(4,\)"):
        SegmentationMetrics.from_state(rank0.state(), 2)


def test_bad_inputs_are_named():
    metrics = SegmentationMetrics(3)
    with pytest.raises(ValueError, match=r"target labels \[3\] are outside 0..2"):
        metrics.update(torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 3], [1, 2]]]))
    with pytest.raises(ValueError, match="logits have 1 channel"):
        metrics.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="binary task has num_classes=2"):
        SegmentationMetrics(3, binary=True)


def test_predictions_from_logits():
    assert predictions(torch.tensor([[[[-0.1, 0.2]]]])).tolist() == [[[0, 1]]]
    assert predictions(torch.tensor([[[[1.0]], [[3.0]], [[2.0]]]])).tolist() == [[[1]]]


@pytest.mark.slow
def test_all_reduce_over_two_cpu_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(str(tmp_path),), nprocs=2, join=True)
    torch.manual_seed(1)
    logits, target = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4, 6, 6))
    whole = SegmentationMetrics(3)
    whole.update(logits, target)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"{rank}.pt"), whole.state())


def _rank(rank: int, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    torch.manual_seed(1)
    logits, target = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4, 6, 6))
    metrics = SegmentationMetrics(3)
    metrics.update(logits[2 * rank:2 * rank + 2], target[2 * rank:2 * rank + 2])
    state = metrics.state()
    dist.all_reduce(state)
    torch.save(SegmentationMetrics.from_state(state, 3).state(), f"{folder}/{rank}.pt")
    dist.destroy_process_group()
