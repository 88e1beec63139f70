"""Per-image measures of a binary foreground map that polyp / camouflaged-object papers (and GPS) report.

MAE, S-measure (Fan et al., ICCV 2017), E-measure (Fan et al., IJCAI 2018) and weighted F-measure (Margolin et
al., CVPR 2014), written from the formulas of the authors' MATLAB code as PySODMetrics (lartpang/PySODMetrics,
MIT) states them, so the numbers compare with published ones:

- ``pred`` is a map in [0, 1] (the foreground probability), min-max normalised per image first (MATLAB's
  ``mapminmax``) unless it is constant; ``gt`` is a boolean mask.
- S-measure: alpha = 0.5; E-measure: the "mean" score averages the curve of thresholds 0..255 over images and
  then over thresholds, "adaptive" thresholds at ``min(2 * mean(pred), 1)``; both divide the enhanced-alignment
  sum by ``H*W - 1`` as the MATLAB code does (so identical masks score ``H*W / (H*W - 1)``, not exactly 1);
- weighted F-measure: beta^2 = 1, a 7x7 Gaussian (sigma 5), distances by the Euclidean distance transform;
  an empty ground truth scores 0.
"""

from __future__ import annotations

import numpy as np

EPS = np.spacing(1)  # MATLAB's eps, as the reference code uses
CURVE_POINTS = 256  # E-measure thresholds 0..255 on the prediction scaled to uint8


def normalize_prediction(pred: np.ndarray) -> np.ndarray:
    """``pred`` as float64, min-max scaled to [0, 1] unless constant (MATLAB ``mapminmax``)."""
    pred = np.asarray(pred, dtype=np.float64)
    low, high = pred.min(), pred.max()
    return (pred - low) / (high - low) if high != low else pred


def mae(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute error between a map in [0, 1] and a boolean mask, both ``(H, W)``."""
    return float(np.mean(np.abs(pred - gt)))


def _s_object(values: np.ndarray) -> float:
    mean = values.mean()
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return 2 * mean / (mean ** 2 + 1 + std + EPS)


def _ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """The S-measure's region similarity of one quadrant (its own SSIM variant, as the reference defines it)."""
    n = pred.size
    x, y = pred.mean(), gt.mean()
    sigma_x = ((pred - x) ** 2).sum() / (n - 1 + EPS)
    sigma_y = ((gt - y) ** 2).sum() / (n - 1 + EPS)
    sigma_xy = ((pred - x) * (gt - y)).sum() / (n - 1 + EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x ** 2 + y ** 2) * (sigma_x + sigma_y)
    if alpha != 0:
        return alpha / (beta + EPS)
    return 1.0 if beta == 0 else 0.0


def s_measure(pred: np.ndarray, gt: np.ndarray, alpha: float = 0.5) -> float:
    """Structure measure: ``alpha * object score + (1 - alpha) * region score`` (clipped at 0).

    Args:
        pred: ``(H, W)`` map in [0, 1].
        gt: ``(H, W)`` boolean mask.
        alpha: weight of the object-aware part.
    """
    fraction = gt.mean()
    if fraction == 0:
        return float(1 - pred.mean())
    if fraction == 1:
        return float(pred.mean())
    gt_f = gt.astype(np.float64)
    # object-aware: foreground and background similarity, weighted by the foreground share
    obj = fraction * _s_object(pred[gt]) + (1 - fraction) * _s_object(1 - pred[~gt])
    # region-aware: 4 quadrants split at the foreground centroid (+1: MATLAB's 1-based inclusive ranges)
    h, w = gt.shape
    cy, cx = np.argwhere(gt).mean(axis=0).round()
    cy, cx = int(cy) + 1, int(cx) + 1
    area = h * w
    weights = (cx * cy / area, cy * (w - cx) / area, (h - cy) * cx / area)
    weights = weights + (1 - sum(weights),)
    quads = ((slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)), (slice(cy, h), slice(0, cx)),
             (slice(cy, h), slice(cx, w)))
    region = sum(wt * _ssim(pred[q], gt_f[q]) for wt, q in zip(weights, quads))
    return float(max(0.0, alpha * obj + (1 - alpha) * region))


def _enhanced_sum(fg_fg, fg_bg, gt_fg: int, size: int):
    """Sum of the enhanced-alignment matrix of a binarised map from its counts (arrays over thresholds allowed).

    ``fg_fg``/``fg_bg``: predicted-foreground pixels on gt foreground / background. Each of the 4 (pred, gt)
    combinations has one value of the alignment matrix, so the sum is 4 terms of count times value.
    """
    pred_fg = fg_fg + fg_bg
    pred_bg = size - pred_fg
    if gt_fg == 0:
        return pred_bg.astype(np.float64) if isinstance(pred_bg, np.ndarray) else float(pred_bg)
    if gt_fg == size:
        return pred_fg.astype(np.float64) if isinstance(pred_fg, np.ndarray) else float(pred_fg)
    bg_fg = gt_fg - fg_fg
    bg_bg = pred_bg - bg_fg
    mean_pred, mean_gt = pred_fg / size, gt_fg / size
    total = 0.0
    for count, p, g in ((fg_fg, 1 - mean_pred, 1 - mean_gt), (fg_bg, 1 - mean_pred, -mean_gt),
                        (bg_fg, -mean_pred, 1 - mean_gt), (bg_bg, -mean_pred, -mean_gt)):
        align = 2 * p * g / (p ** 2 + g ** 2 + EPS)
        total = total + count * (align + 1) ** 2 / 4
    return total


def e_measure_curve(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """E-measure of ``pred >= t / 255`` on the uint8-scaled map, for t = 0..255: ``(256,)`` float64."""
    scaled = (pred * 255).astype(np.uint8)  # truncation, as the reference
    fg_hist = np.bincount(scaled[gt], minlength=256)
    bg_hist = np.bincount(scaled[~gt], minlength=256)
    fg_fg = np.cumsum(fg_hist[::-1])[::-1]  # [t]: pixels >= t on gt foreground
    fg_bg = np.cumsum(bg_hist[::-1])[::-1]
    size = gt.size
    return np.asarray(_enhanced_sum(fg_fg, fg_bg, int(gt.sum()), size), dtype=np.float64) / (size - 1 + EPS)


def e_measure_adaptive(pred: np.ndarray, gt: np.ndarray) -> float:
    """E-measure of ``pred`` binarised at ``min(2 * mean(pred), 1)``."""
    binary = pred >= min(2 * pred.mean(), 1.0)
    fg_fg, fg_bg = int((binary & gt).sum()), int((binary & ~gt).sum())
    return float(_enhanced_sum(fg_fg, fg_bg, int(gt.sum()), gt.size) / (gt.size - 1 + EPS))


def _gaussian(side: int = 7, sigma: float = 5.0) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', side, sigma)``: normalised, tiny entries zeroed."""
    r = (side - 1) / 2
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h / h.sum()


def weighted_f_measure(pred: np.ndarray, gt: np.ndarray, beta2: float = 1.0) -> float:
    """Weighted F-measure: precision and recall weighted by pixel dependency and importance (0 if gt is empty)."""
    from scipy.ndimage import convolve, distance_transform_edt

    if not gt.any():
        return 0.0
    dist, (iy, ix) = distance_transform_edt(~gt, return_indices=True)  # to, and index of, the nearest gt pixel
    error = np.abs(pred - gt)
    # pixel dependency: a background pixel takes the error of its nearest foreground pixel, then blur
    spread = np.where(gt, error, error[iy, ix])
    blurred = convolve(spread, _gaussian(), mode="constant", cval=0.0)
    dependent = np.where(gt & (blurred < error), blurred, error)
    # pixel importance: background errors grow with the distance to the object, up to 2x
    importance = np.where(gt, 1.0, 2 - np.exp(np.log(0.5) / 5 * dist))
    weighted = dependent * importance
    tp = gt.sum() - weighted[gt].sum()
    fp = weighted[~gt].sum()
    recall = 1 - weighted[gt].mean()
    precision = tp / (tp + fp + EPS)
    return float((1 + beta2) * recall * precision / (recall + beta2 * precision + EPS))
