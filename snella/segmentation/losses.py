"""Segmentation losses: cross-entropy (+ Dice) for multi-class logits, BCE + Dice for one-logit binary masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import Tensor, nn

from snella.segmentation.data import DEFAULT_IGNORE_INDEX


class SegmentationLoss(nn.Module):
    """``loss(logits (B, C, H, W), target (B, H, W))`` averaged over the pixels that are not ``ignore_index``.

    - C > 1: cross-entropy, plus ``dice_weight`` times smp's soft multi-class Dice loss (mean over the classes
      present in the batch's targets, as smp computes it; off by default);
    - C == 1 (binary, foreground where the logit is > 0): binary cross-entropy plus ``dice_weight`` times smp's
      soft binary Dice loss (on by default, weight 1: the polyp recipes' BCE + Dice).

    Args:
        binary: whether the logits have one channel (binary) or one per class.
        dice_weight: weight of the Dice term; None for the default of the kind (binary 1.0, multi-class 0.0).
        ignore_index: label excluded from both terms.
    """

    def __init__(self, binary: bool, dice_weight: float | None = None, ignore_index: int = DEFAULT_IGNORE_INDEX) -> None:
        super().__init__()
        if dice_weight is None:
            dice_weight = 1.0 if binary else 0.0
        if dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight}")
        self.binary, self.dice_weight, self.ignore_index = binary, float(dice_weight), ignore_index
        self.dice = DiceLoss("binary" if binary else "multiclass", from_logits=True, ignore_index=ignore_index)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        channels = logits.shape[1]
        if (channels == 1) != self.binary:
            raise ValueError(f"logits have {channels} channel(s) but the loss is {'binary' if self.binary else 'multi-class'}"
                             f" (binary: 1 channel; multi-class: one per class)")
        target = target.long()
        if self.binary:
            valid = target != self.ignore_index  # (B, H, W)
            bce = F.binary_cross_entropy_with_logits(logits[:, 0], (target == 1).float(), reduction="none")
            loss = (bce * valid).sum() / valid.sum().clamp_min(1)
        else:
            loss = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss
