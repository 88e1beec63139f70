"""S-measure, E-measure, weighted F-measure and MAE: hand-derived values and a plain independent transcription."""

from __future__ import annotations

import numpy as np
import pytest

import sod_reference as ref
from snella.segmentation import structure


def _box(h=8, w=10, rows=(2, 5), cols=(3, 7)) -> np.ndarray:
    gt = np.zeros((h, w), dtype=bool)
    gt[rows[0]:rows[1], cols[0]:cols[1]] = True
    return gt


def test_identical_masks():
    gt = _box()
    pred, n = gt.astype(np.float64), gt.size
    assert structure.s_measure(pred, gt) == pytest.approx(1.0, abs=1e-12)
    assert structure.weighted_f_measure(pred, gt) == pytest.approx(1.0, abs=1e-12)
    assert structure.mae(pred, gt) == 0.0
    # divided by H*W - 1 as the MATLAB code: identical masks score N / (N - 1)
    assert structure.e_measure_adaptive(pred, gt) == pytest.approx(n / (n - 1), abs=1e-12)
    curve = structure.e_measure_curve(pred, gt)
    # threshold 0 marks every pixel foreground: the alignment is 0 everywhere, each pixel scores 1/4
    assert curve[0] == pytest.approx(n / 4 / (n - 1)) and np.allclose(curve[1:], n / (n - 1))
    assert curve.mean() == pytest.approx((n / 4 + 255 * n) / (256 * (n - 1)))


def test_empty_and_full_ground_truth():
    pred = np.full((4, 4), 0.25)
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert structure.s_measure(pred, empty) == pytest.approx(0.75)
    assert structure.s_measure(pred, full) == pytest.approx(0.25)
    assert structure.weighted_f_measure(pred, empty) == 0.0
    # empty gt: the enhanced matrix is 1 - FM; FM = pred >= min(2 * 0.25, 1) is all 0 -> 16 / 15
    assert structure.e_measure_adaptive(pred, empty) == pytest.approx(16 / 15)
    gt = _box(4, 4, (0, 1), (0, 4))
    assert structure.mae(pred, gt) == pytest.approx((12 * 0.25 + 4 * 0.75) / 16)


def test_inverted_mask_scores_low():
    gt = _box()
    pred = (~gt).astype(np.float64)
    assert structure.mae(pred, gt) == 1.0
    assert structure.weighted_f_measure(pred, gt) < 0.05
    assert structure.s_measure(pred, gt) < 0.5 < structure.s_measure(gt.astype(float) * 0.8 + 0.1, gt)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_the_plain_transcription(seed):
    rng = np.random.default_rng(seed)
    # an irregular object; its centroid (row 4.08, col 5.08) has no .5 to round, where numpy's round-half-even
    # (the reference code's) and MATLAB's round-half-away differ
    gt = _box(9, 11, (2, 7), (3, 8))
    gt[2, 3] = False
    raw = np.clip(gt * 0.7 + rng.normal(0, 0.25, gt.shape), 0, 1)
    pred = structure.normalize_prediction(raw)
    assert np.allclose(pred, ref.minmax(raw)) and pred.min() == 0.0 and pred.max() == 1.0
    assert structure.s_measure(pred, gt) == pytest.approx(ref.s_measure(pred, gt), abs=1e-10)
    assert structure.e_measure_adaptive(pred, gt) == pytest.approx(ref.e_measure_adaptive(pred, gt), abs=1e-10)
    assert np.allclose(structure.e_measure_curve(pred, gt), ref.e_measure_curve(pred, gt), atol=1e-10)
    assert structure.mae(pred, gt) == pytest.approx(np.abs(pred - gt).mean())


def test_weighted_f_against_the_plain_transcription():
    # constant over the object, so every tie of "nearest object pixel" carries the same error
    rng = np.random.default_rng(5)
    gt = _box(9, 11, (2, 7), (3, 8))
    pred = np.where(gt, 0.8, rng.uniform(0, 0.6, gt.shape))
    assert structure.weighted_f_measure(pred, gt) == pytest.approx(ref.weighted_f(pred, gt), abs=1e-10)
    single = np.zeros((7, 7), bool)
    single[2, 4] = True  # one object pixel: every nearest pixel is that one
    pred = rng.uniform(0, 1, single.shape)
    assert structure.weighted_f_measure(pred, single) == pytest.approx(ref.weighted_f(pred, single), abs=1e-10)


def test_normalize_prediction_keeps_a_constant_map():
    assert np.array_equal(structure.normalize_prediction(np.full((2, 2), 0.3)), np.full((2, 2), 0.3))
    assert np.allclose(structure.normalize_prediction(np.array([[0.2, 0.6], [0.4, 0.2]])), [[0.0, 1.0], [0.5, 0.0]])
