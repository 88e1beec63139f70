"""SegmentationMetrics: a streaming accumulator (confusion matrix + per-image binary measures), mergeable across ranks.

Dataset-level measures come from the confusion matrix summed over every pixel that is not ``ignore_index``:
per-class IoU ``tp / (tp + fp + fn)`` and Dice ``2 tp / (2 tp + fp + fn)``, their means over the classes that
occur (in the ground truth or the prediction; a class absent from both has no score), and pixel accuracy.
For binary tasks (one logit per pixel, foreground where it is > 0) it also keeps the per-image means polyp papers
report: Dice and IoU of each image's foreground (1 when both are empty), and MAE, S-measure, E-measure
(mean, max and adaptive) and weighted F-measure of the foreground probability (``snella.segmentation.structure``).
The structural measures see the whole image: ignored pixels count as background there.

Under DDP every rank updates its own accumulator; ``state()`` is one float64 tensor whose all-reduced sum,
given to ``from_state``, is the accumulator of all ranks together (``state()`` is on the CPU: move it to the
process group's device for NCCL). Sums are float64, exact for pixel counts below 2^53.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_confusion_matrix

from snella.segmentation import structure
from snella.segmentation.data import DEFAULT_IGNORE_INDEX

# Per-image sums kept for binary tasks, in state order (then the E-measure curve, then the image count).
IMAGE_MEASURES = ("image_dice", "image_iou", "mae", "s_measure", "e_measure_adaptive", "weighted_f")


def predictions(logits: Tensor) -> Tensor:
    """Labels ``(B, H, W)`` from logits ``(B, C, H, W)``: argmax, or for one channel (binary) ``logit > 0``."""
    if logits.ndim != 4:
        raise ValueError(f"expected logits (B, C, H, W), got shape {tuple(logits.shape)}")
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


class SegmentationMetrics:
    """Accumulates the measures of a segmentation test set batch by batch.

    Args:
        num_classes: classes of the labels, background included (2 for a binary task).
        ignore_index: label of pixels counted nowhere in the confusion matrix.
        binary: one-logit binary task: also keep the per-image measures (needs ``num_classes == 2``).
        structural: with ``binary``, compute S-/E-/weighted F-measure and MAE (CPU, per image).
    """

    def __init__(self, num_classes: int, ignore_index: int = DEFAULT_IGNORE_INDEX, binary: bool = False,
                 structural: bool = True) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
        if binary and num_classes != 2:
            raise ValueError(f"a binary task has num_classes=2 (background, foreground), got {num_classes}")
        self.num_classes, self.ignore_index, self.binary = num_classes, ignore_index, binary
        self.structural = structural and binary
        self._state = torch.zeros(self.state_size(num_classes, binary), dtype=torch.float64)

    @staticmethod
    def state_size(num_classes: int, binary: bool) -> int:
        """Length of ``state()``: the confusion matrix, then (binary) the per-image sums, curve and count."""
        extra = len(IMAGE_MEASURES) + structure.CURVE_POINTS + 1 if binary else 0
        return num_classes * num_classes + extra

    @property
    def confusion(self) -> Tensor:
        """``(C, C)`` pixel counts, rows = ground truth, columns = prediction."""
        C = self.num_classes
        return self._state[:C * C].view(C, C)

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch: logits ``(B, C, H, W)`` (C = 1 for binary) and labels ``(B, H, W)``."""
        if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match: expected "
                             "(B, C, H, W) and (B, H, W)")
        expected = 1 if self.binary else self.num_classes
        if logits.shape[1] != expected:
            raise ValueError(f"logits have {logits.shape[1]} channel(s); this {'binary' if self.binary else 'multi-class'}"
                             f" accumulator expects {expected}")
        target = target.long()
        bad = ((target < 0) | (target >= self.num_classes)) & (target != self.ignore_index)
        if bad.any():
            raise ValueError(f"target labels {sorted(set(target[bad].unique().tolist()))[:8]} are outside 0.."
                             f"{self.num_classes - 1} and not the ignore index {self.ignore_index}")
        preds = predictions(logits)
        confusion = multiclass_confusion_matrix(preds, target, self.num_classes, ignore_index=self.ignore_index,
                                                validate_args=False)  # (C, C)
        C = self.num_classes
        self._state[:C * C] += confusion.flatten().to(self._state)
        if self.binary:
            self._update_images(torch.sigmoid(logits[:, 0].float()), preds, target)

    def _update_images(self, probs: Tensor, preds: Tensor, target: Tensor) -> None:
        """Per-image binary measures; ``probs``, ``preds``, ``target`` are ``(B, H, W)``."""
        C = self.num_classes
        sums = self._state[C * C:]
        valid = target != self.ignore_index
        fg_t, fg_p = (target == 1) & valid, (preds == 1) & valid
        inter = (fg_t & fg_p).flatten(1).sum(1).double()  # (B,)
        total = fg_t.flatten(1).sum(1).double() + fg_p.flatten(1).sum(1).double()
        empty = total == 0
        sums[0] += torch.where(empty, 1.0, 2 * inter / total.clamp_min(1)).sum().cpu()
        sums[1] += torch.where(empty, 1.0, inter / (total - inter).clamp_min(1)).sum().cpu()
        sums[-1] += probs.shape[0]
        if not self.structural:
            return
        for prob, gt in zip(probs.cpu().double().numpy(), (target == 1).cpu().numpy()):
            pred = structure.normalize_prediction(prob)
            sums[2] += structure.mae(pred, gt)
            sums[3] += structure.s_measure(pred, gt)
            sums[4] += structure.e_measure_adaptive(pred, gt)
            sums[5] += structure.weighted_f_measure(pred, gt)
            curve = len(IMAGE_MEASURES)
            sums[curve:curve + structure.CURVE_POINTS] += torch.from_numpy(structure.e_measure_curve(pred, gt))

    def state(self) -> Tensor:
        """A copy of the accumulated sums as one float64 tensor: sum it across ranks, then ``from_state``."""
        return self._state.clone()

    @classmethod
    def from_state(cls, state: Tensor, num_classes: int, ignore_index: int = DEFAULT_IGNORE_INDEX,
                   binary: bool = False, structural: bool = True) -> "SegmentationMetrics":
        """An accumulator holding ``state`` (e.g. the all-reduced sum of every rank's ``state()``)."""
        metrics = cls(num_classes, ignore_index, binary, structural)
        if state.shape != metrics._state.shape:
            raise ValueError(f"state has shape {tuple(state.shape)}; num_classes={num_classes}, binary={binary} "
                             f"needs ({metrics._state.numel()},)")
        metrics._state = state.detach().to("cpu", torch.float64).clone()
        return metrics

    def compute(self) -> dict[str, float | list[float]]:
        """The measures so far: ``miou``, ``mdice``, ``pixel_accuracy``, ``iou``/``dice`` per class (NaN for a
        class absent from ground truth and prediction), and for binary tasks the per-image means."""
        conf = self.confusion
        tp = conf.diag()
        fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
        union = tp + fp + fn
        nan = torch.full_like(tp, float("nan"))
        iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
        dice = torch.where(union > 0, 2 * tp / (union + tp).clamp_min(1), nan)
        total = conf.sum()
        out: dict[str, float | list[float]] = {
            "miou": float(np.nanmean(iou.numpy())) if (union > 0).any() else float("nan"),
            "mdice": float(np.nanmean(dice.numpy())) if (union > 0).any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
            "iou": iou.tolist(),
            "dice": dice.tolist(),
        }
        if self.binary:
            sums = self._state[self.num_classes ** 2:]
            count = float(sums[-1])
            names = IMAGE_MEASURES if self.structural else IMAGE_MEASURES[:2]
            for i, name in enumerate(names):
                out[name] = float(sums[i]) / count if count else float("nan")
            if self.structural:
                curve = sums[len(IMAGE_MEASURES):len(IMAGE_MEASURES) + structure.CURVE_POINTS] / max(count, 1.0)
                out["e_measure_mean"] = float(curve.mean()) if count else float("nan")
                out["e_measure_max"] = float(curve.max()) if count else float("nan")
        return out
