"""Segmentation losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from snella.segmentation.losses import SegmentationLoss


def test_cross_entropy_skips_ignored_pixels():
    logits = torch.tensor([[[[2.0, 5.0]], [[0.0, -5.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 255]]])
    assert SegmentationLoss(binary=False)(logits, target).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_cross_entropy_plus_dice():
    logits, target = torch.zeros(1, 2, 2, 2), torch.tensor([[[0, 0], [1, 1]]])
    # CE log 2; each class: soft dice 2 * (2 * 0.5) / (4 * 0.5 + 2) = 0.5, loss 0.5
    assert SegmentationLoss(binary=False, dice_weight=1.0)(logits, target).item() == pytest.approx(math.log(2) + 0.5)
    assert SegmentationLoss(binary=False)(logits, target).item() == pytest.approx(math.log(2))  # dice off by default


def test_binary_bce_plus_dice_with_an_ignored_pixel():
    logits, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[1, 1], [0, 255]]])
    # BCE over the 3 counted pixels: log 2; dice: intersection 1, predicted 1.5, true 2 -> 1 - 2 / 3.5
    loss = SegmentationLoss(binary=True)(logits, target)
    assert loss.item() == pytest.approx(math.log(2) + 3 / 7, abs=1e-6)
    assert SegmentationLoss(binary=True, dice_weight=0.0)(logits, target).item() == pytest.approx(math.log(2))


def test_loss_falls_as_logits_approach_the_target():
    target = torch.tensor([[[1, 0], [0, 1]]])
    good = (target.float() * 8 - 4)[:, None]
    loss = SegmentationLoss(binary=True)
    assert loss(good, target) < 0.05 < loss(-good, target)


def test_channel_count_must_fit_the_kind():
    with pytest.raises(ValueError, match="logits have 3 channel"):
        SegmentationLoss(binary=True)(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dice_weight must be >= 0"):
        SegmentationLoss(binary=True, dice_weight=-1)
