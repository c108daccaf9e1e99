"""The alarm on the share of flagged adversarial inputs (agent/detect/adversarial/rate.py): on benign
traffic flagged at the calibrated rate it rejects no more often than its budget allows; a rise is caught
within a look or two; a fall is no alarm; the minimum excess gates small rises."""

from __future__ import annotations

import numpy as np

from agent.config import RateAlarm
from agent.detect.adversarial.rate import FlaggedShare

Q = 0.05


def _run(share: FlaggedShare, rng, seconds: int, flagged_share: float, rate: int = 50, start: int = 0) -> list:
    """``seconds`` of traffic at ``rate`` inputs/s, each flagged with probability ``flagged_share``; the
    results of the looks that were tested."""
    results = []
    for second in range(start, start + seconds):
        share.record(rng.random(rate) < flagged_share, at=second + 0.5)
        result = share.look(second + 1.0)
        if result is not None and result.tested:
            results.append(result)
    return results


def test_benign_traffic_rejects_within_a_short_budget():
    """A budget of one false alarm per minute, with a 10 s look: alpha 1/6 per look, so at most about 60
    rejections in an hour (and the reference's own sampling error in the variance makes it fewer)."""
    rng = np.random.default_rng(3)
    share = FlaggedShare(Q, 5000, RateAlarm(false_alarm_budget="1/1min", look_interval_seconds=10, min_excess=1e-6))
    results = _run(share, rng, 3600, Q)
    assert len(results) >= 350
    rejections = sum(bool(result.rejected) for result in results)
    assert rejections <= 60 + 3 * np.sqrt(60)


def test_an_attack_is_caught_and_a_fall_or_a_small_rise_is_not():
    rng = np.random.default_rng(4)
    share = FlaggedShare(Q, 5000, RateAlarm(look_interval_seconds=10))   # the default budget, 1/30d
    assert not any(r.rejected for r in _run(share, rng, 60, 0.0))        # nothing flagged: a fall
    assert not any(r.rejected for r in _run(share, rng, 300, 0.08, start=60))  # 3 points above: under min_excess
    assert not share.test.drift_detected
    caught = _run(share, rng, 30, 0.5, start=360)                        # half the inputs flagged
    # Within two looks (the first window may still reach back over benign rows).
    assert ("flagged",) in [r.rejected for r in caught[:2]] and share.test.drift_detected
    assert share.test.n_alarms == 1
    assert abs(share.share - 0.5) < 0.1
    _run(share, rng, 60, Q, start=390)                                   # the attack stops: the flag clears
    assert not share.test.drift_detected and share.test.n_alarms == 1
