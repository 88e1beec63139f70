"""Independent, deliberately plain transcriptions of the structural measures, for the tests only.

Written from the papers' definitions (Fan et al. 2017 S-measure, Fan et al. 2018 E-measure, Margolin et al. 2014
weighted F-measure) with the conventions of their MATLAB code that PySODMetrics keeps (S-measure's object score
with std, the centroid rounded and shifted by one, E-measure divided by H*W - 1, 7x7 Gaussian of sigma 5):
pixel loops and brute force instead of histograms, cumulative sums and distance transforms.
"""

from __future__ import annotations

import math

import numpy as np

EPS = np.spacing(1)


def minmax(pred):
    pred = np.asarray(pred, dtype=np.float64)
    return (pred - pred.min()) / (pred.max() - pred.min()) if pred.max() > pred.min() else pred


def _mean(values):
    return sum(values) / len(values)


def _std(values):
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def s_measure(pred, gt, alpha=0.5):
    h, w = gt.shape
    pixels = [(i, j) for i in range(h) for j in range(w)]
    fg = [pred[i, j] for i, j in pixels if gt[i, j]]
    bg = [1 - pred[i, j] for i, j in pixels if not gt[i, j]]
    mu = len(fg) / (h * w)
    if mu == 0:
        return 1 - _mean([pred[i, j] for i, j in pixels])
    if mu == 1:
        return _mean([pred[i, j] for i, j in pixels])

    def o(values):
        x = _mean(values)
        return 2 * x / (x * x + 1 + _std(values) + EPS)

    s_object = mu * o(fg) + (1 - mu) * o(bg)
    coords = [(i, j) for i, j in pixels if gt[i, j]]
    cy = round(_mean([c[0] for c in coords])) + 1
    cx = round(_mean([c[1] for c in coords])) + 1
    s_region = 0.0
    for rows, cols in ((range(0, cy), range(0, cx)), (range(0, cy), range(cx, w)),
                       (range(cy, h), range(0, cx)), (range(cy, h), range(cx, w))):
        xs = [pred[i, j] for i in rows for j in cols]
        ys = [float(gt[i, j]) for i in rows for j in cols]
        weight = len(xs) / (h * w)
        if not xs:
            continue
        n = len(xs)
        mx, my = _mean(xs), _mean(ys)
        sx = sum((x - mx) ** 2 for x in xs) / (n - 1 + EPS)
        sy = sum((y - my) ** 2 for y in ys) / (n - 1 + EPS)
        sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (n - 1 + EPS)
        a, b = 4 * mx * my * sxy, (mx * mx + my * my) * (sx + sy)
        q = a / (b + EPS) if a != 0 else (1.0 if b == 0 else 0.0)
        s_region += weight * q
    return max(0.0, alpha * s_object + (1 - alpha) * s_region)


def e_measure_binary(fm, gt):
    """E-measure of a binary foreground map ``fm`` by its enhanced-alignment matrix, pixel by pixel."""
    h, w = gt.shape
    n = h * w
    fm, gt = fm.astype(np.float64), gt.astype(np.float64)
    if gt.sum() == 0:
        enhanced = 1 - fm
    elif gt.sum() == n:
        enhanced = fm
    else:
        phi_fm, phi_gt = fm - fm.mean(), gt - gt.mean()
        enhanced = np.zeros_like(fm)
        for i in range(h):
            for j in range(w):
                align = 2 * phi_gt[i, j] * phi_fm[i, j] / (phi_gt[i, j] ** 2 + phi_fm[i, j] ** 2 + EPS)
                enhanced[i, j] = (align + 1) ** 2 / 4
    return enhanced.sum() / (n - 1 + EPS)


def e_measure_curve(pred, gt):
    scaled = np.floor(pred * 255)
    return np.array([e_measure_binary(scaled >= t, gt) for t in range(256)])


def e_measure_adaptive(pred, gt):
    return e_measure_binary(pred >= min(2 * pred.mean(), 1.0), gt)


def weighted_f(pred, gt, beta2=1.0):
    h, w = gt.shape
    if not gt.any():
        return 0.0
    fg = [(i, j) for i in range(h) for j in range(w) if gt[i, j]]
    error = np.abs(pred - gt)
    spread, dist = error.copy(), np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            if not gt[i, j]:
                d, (a, b) = min((math.hypot(i - a, j - b), (a, b)) for a, b in fg)
                spread[i, j], dist[i, j] = error[a, b], d
    r = 3
    kernel = np.array([[math.exp(-(x * x + y * y) / 50.0) for x in range(-r, r + 1)] for y in range(-r, r + 1)])
    kernel /= kernel.sum()
    blurred = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        blurred[i, j] += kernel[di + r, dj + r] * spread[i + di, j + dj]
    weighted = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            e = min(error[i, j], blurred[i, j]) if gt[i, j] else error[i, j]
            weighted[i, j] = e * (1.0 if gt[i, j] else 2 - math.exp(math.log(0.5) / 5 * dist[i, j]))
    tp = gt.sum() - weighted[gt].sum()
    fp = weighted[~gt].sum()
    recall = 1 - weighted[gt].mean()
    precision = tp / (tp + fp + EPS)
    return (1 + beta2) * recall * precision / (recall + beta2 * precision + EPS)
