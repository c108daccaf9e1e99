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
