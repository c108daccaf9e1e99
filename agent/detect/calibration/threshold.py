"""The feature-squeezing threshold, set on benign data alone at a target false-positive rate.

The threshold is the one the paper uses: a target false-positive rate on benign inputs (5% by
default). Precisely, with ``n`` benign scores and ``k = floor(target_fpr * n)``, the threshold is the
smallest value with at most ``k`` benign scores strictly above it: the ``(n - k)``-th smallest score
(numpy's ``quantile(scores, 1 - target_fpr, method="inverted_cdf")``). An input is flagged when its
score is strictly above the threshold, so on the calibration data at most ``target_fpr`` is flagged.

>>> threshold_at_fpr([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], target_fpr=0.2)
0.8
"""

from __future__ import annotations

import math

import numpy as np

from agent.detect.calibration import CalibrationError

THRESHOLD_RULE = ("smallest threshold with at most floor(target_fpr * n) of the n benign scores strictly above it; "
                  "flag when score > threshold")


def threshold_at_fpr(scores: np.ndarray, target_fpr: float) -> float:
    """The smallest threshold with at most ``floor(target_fpr * n)`` of ``scores`` strictly above it."""
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if scores.size == 0:
        raise CalibrationError("sidewatch: no benign scores to set a threshold on")
    if not 0.0 <= target_fpr < 1.0:
        raise CalibrationError(f"sidewatch: target false-positive rate must be in [0, 1), got {target_fpr}")
    # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28.
    allowed_above = math.floor(target_fpr * scores.size + 1e-9)
    return float(scores[scores.size - 1 - allowed_above])


JOINT_THRESHOLD_RULE = (
    "each detector's score goes to its benign level (the share of the n calibration scores at or below it); "
    "the combined statistic is the largest level, its threshold the smallest with at most floor(target_fpr * n) "
    "of the n calibration rows strictly above it; each detector's threshold is its largest calibration score "
    "whose level is at or below that threshold; flag when any score > its threshold, i.e. when "
    "max(score / threshold) > 1")


def joint_thresholds(scores: np.ndarray, target_fpr: float) -> np.ndarray:
    """One threshold per detector (column of ``scores`` [n, D], benign), set JOINTLY: flagging a row when any
    score is over its threshold flags at most ``floor(target_fpr * n)`` of the n rows (not ``target_fpr`` per
    detector, which would add up). Every detector gets the same benign level, so none is favoured by its scale.

    >>> s = np.array([[0.1, 5.0], [0.2, 1.0], [0.3, 2.0], [0.4, 3.0], [0.5, 4.0], [0.6, 6.0], [0.7, 7.0],
    ...               [0.8, 8.0], [0.9, 10.0], [1.0, 9.0]])
    >>> t = joint_thresholds(s, target_fpr=0.2)
    >>> t.tolist(), int(np.any(s > t, axis=1).sum())
    ([0.8, 8.0], 2)
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise CalibrationError(f"sidewatch: joint thresholds need benign scores [n, detectors], got shape "
                               f"{list(scores.shape)}")
    if not np.all(np.isfinite(scores)):
        raise CalibrationError("sidewatch: some benign scores are not finite; the reference holds inputs the "
                               "detectors cannot take")
    n = scores.shape[0]
    levels = np.stack([np.searchsorted(np.sort(column), column, side="right") for column in scores.T], axis=1) / n
    level = threshold_at_fpr(levels.max(axis=1), target_fpr)
    # threshold_at_fpr leaves at least one row at or below `level` in every column, so no column is empty.
    return np.array([column[levels[:, i] <= level].max() for i, column in enumerate(scores.T)])
