"""The alarm on the share of inputs flagged adversarial, under a false-alarm budget in time.

The squeezing threshold lets through its calibrated false-positive rate ``q`` of benign inputs (5% for
the bundled model), so single flags are no alarm. What is: more flags than ``q`` explains. Per model
version, a one-sided :class:`~agent.detect.drift.moments.MomentTest` on the flagged indicator (1 for
an input over the threshold, else 0) tests at each look whether its mean is above ``q``, with the
variance of a share (``q (1 - q)``, floored and robust to bursts as in drift) plus the error of ``q``
itself (measured on ``n`` reference inputs), at the level its own budget sets (``RateAlarm``:
``false_alarm_budget``, one test per look, so ``alpha = budget.alpha(look, 1)``). The alarm also
needs the share above ``q`` by at least ``min_excess`` (an effect of ``min_excess / sqrt(q (1 - q))``
reference sds), and holds until the share is back for a few looks. This replaces the fixed rule
"above three times the target rate over 5 minutes", whose false-alarm rate depended on the traffic.

>>> import numpy as np
>>> from agent.config import RateAlarm
>>> alarm = FlaggedShare(0.05, 5000, RateAlarm(look_interval_seconds=10, slot_seconds=1))
>>> rng = np.random.default_rng(0)
>>> for second in range(100, 180):        # 50 inputs/s: 5% flagged, then 60% from second 140
...     share = 0.6 if second >= 140 else 0.05
...     alarm.record(rng.random(50) < share, at=second)
...     _ = alarm.look(second + 0.5)
>>> alarm.test.drift_detected, alarm.test.n_alarms, round(alarm.share, 1)   # the share of the last tested look
(True, 1, 0.6)
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np

from agent.config import AlarmBudget, RateAlarm
from agent.detect.drift.budget import LookClock
from agent.detect.drift.moments import MomentResult, MomentTest
from agent.detect.registry import DetectorRegistry
from agent.metrics import BoundedModels, DetectionMetrics


class FlaggedShare:
    """The one-sided share test of one model version (module docstring). Not thread-safe."""

    def __init__(self, target_fpr: float, reference_count: int, settings: RateAlarm) -> None:
        # A threshold calibrated for 0% still lets some benign inputs through: at least one reference's worth.
        q = min(max(float(target_fpr), 1.0 / (reference_count + 1)), 0.5)
        self.target = q
        self.scale = math.sqrt(q * (1.0 - q))
        self.test = MomentTest(["flagged"], [q], [self.scale], settings.min_excess / self.scale,
                               slot_seconds=settings.slot_seconds, alternative="greater",
                               reference_rows=max(int(reference_count), 1), cluster_rows=settings.cluster_rows,
                               min_slots=settings.min_clusters)
        self.clock = LookClock(settings.look_interval_seconds)
        self.alpha = AlarmBudget.parse(settings.false_alarm_budget).alpha(settings.look_interval_seconds, 1)
        # Inputs and flags in the window (carried with it when a look is not tested): the share shown.
        self._window = [0, 0]
        self.share = math.nan

    def record(self, flagged: Any, at: float) -> None:
        flagged = np.asarray(flagged, dtype=np.float64).reshape(-1, 1)
        if len(flagged):
            self.test.update(flagged, at)
            self._window[0] += len(flagged)
            self._window[1] += int(np.count_nonzero(flagged))

    def look(self, now: float) -> MomentResult | None:
        """The look's result when one was due at ``now``, else None; ``share`` is the tested window's."""
        if not self.clock.due(now):
            return None
        result = self.test.look(self.alpha)
        if result.tested:
            self.share = self._window[1] / self._window[0]
            self._window = [0, 0]
        return result


class FlaggedShareWatch:
    """One :class:`FlaggedShare` per calibrated model version: fed from the scoring threads, looked at
    (and exported) from the tap's thread."""

    def __init__(self, registry: DetectorRegistry, settings: RateAlarm, metrics: DetectionMetrics,
                 bounded: BoundedModels, clock=time.time) -> None:
        self._lock = threading.Lock()
        self._metrics = metrics
        self._clock = clock
        self._shares: dict[tuple[str, str], tuple[tuple[str, str], FlaggedShare]] = {}
        for calibrated in registry:
            artifact = calibrated.artifact
            share = FlaggedShare(artifact.target_fpr, int(artifact.benign_scores.get("count", 0)), settings)
            labels = bounded.admit(calibrated.model, calibrated.version)
            self._shares[(calibrated.model, calibrated.version)] = (labels, share)
            metrics.rate_detected.labels(*labels).set(0.0)
            metrics.rate_alarms.labels(*labels)

    def record(self, model: str, version: str, flagged: np.ndarray) -> None:
        """Called from any scoring thread with the flags of the rows just scored."""
        entry = self._shares.get((model, version))
        if entry is not None:
            with self._lock:
                entry[1].record(flagged, self._clock())

    def look(self) -> None:
        """Look at every version whose look is due, and export what it found."""
        now = self._clock()
        for labels, share in self._shares.values():
            with self._lock:
                alarms = share.test.n_alarms
                result = share.look(now)
            if result is None or not result.tested:
                continue
            m = self._metrics
            m.rate_statistic.labels(*labels).set(result.statistic)
            m.rate_threshold.labels(*labels).set(result.threshold)
            m.rate_share.labels(*labels).set(share.share)
            m.rate_detected.labels(*labels).set(1.0 if result.drift else 0.0)
            if share.test.n_alarms > alarms:
                m.rate_alarms.labels(*labels).inc(share.test.n_alarms - alarms)

