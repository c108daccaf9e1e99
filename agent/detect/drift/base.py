"""The alarm state every drift detector keeps, held once: :class:`DriftDetector` (river's
``base.DriftDetector`` shape).

A drift detector's constructor holds its parameters only; ``fit`` (or ``from_calibration``) gives it
its reference and thresholds; ``update(batch)`` feeds a batch in order and returns the detector;
``reset()`` forgets the stream, keeps the calibration and returns the detector too; ``result`` is a
:class:`~agent.detect.drift.result.DriftResult`. What the base holds, alike in every detector:

``n``                 values (rows, predictions) taken since the last reset
``n_skipped``         values skipped (NaN, Inf, a class id out of range): they never enter a window
``n_detections``      alarms since the last reset
``alarm_positions``   where the last update's alarms came, as positions in its input (skipped values count)
``drift_detected``    whether the detector is in alarm after the last update (each detector says when)

and the statistic the last update ended on (``_last_statistic``), for the detectors that keep one
(a per-feature detector reads its statistics from its window instead). :meth:`_alarm_state` and
:meth:`_load_alarm_state` save and restore all of it, as JSON.

>>> import math
>>> class AboveLevel(DriftDetector):
...     '''Alarms at every value above ``level``.'''
...     def __init__(self, level):
...         self.level = level
...         super().__init__()
...     def update(self, values):
...         taken = [(i, v) for i, v in enumerate(values) if math.isfinite(v)]
...         self.n += len(taken)
...         self.n_skipped += len(values) - len(taken)
...         self.alarm_positions = [i for i, v in taken if v > self.level]
...         self.n_detections += len(self.alarm_positions)
...         self._drift = bool(self.alarm_positions)
...         self._last_statistic = taken[-1][1] if taken else self._last_statistic
...         return self
...     @property
...     def result(self):
...         return DriftResult(self._last_statistic, self.level, None, self._drift)
>>> det = AboveLevel(1.0).update([0.5, float("nan"), 2.0])
>>> det.drift_detected, det.alarm_positions, (det.n, det.n_skipped, det.n_detections)
(True, [2], (2, 1, 1))
>>> det.reset().n, det.drift_detected
(0, False)
"""

from __future__ import annotations

import abc
import math
from typing import Any, Self

from agent.detect.drift.result import DriftResult


def json_float(x: float) -> float | None:
    """NaN and infinities are not JSON; they travel as null."""
    return float(x) if math.isfinite(x) else None


def from_json_float(x: float | None) -> float:
    return float("nan") if x is None else float(x)


class DriftDetector(abc.ABC):
    """Base of the drift detectors: the alarm state and its bookkeeping (see the module docstring).

    A subclass sets its parameters, then calls ``super().__init__()`` (or its own :meth:`reset`,
    when that works before ``fit``); its :meth:`reset` forgets its own stream state and ends with
    ``return super().reset()``.
    """

    def __init__(self) -> None:
        # Not self.reset(): a subclass's reset may need the calibration that fit() brings.
        DriftDetector.reset(self)

    def reset(self) -> Self:
        """Forget the stream's counters and alarms; returns the detector."""
        self.n = 0
        self.n_skipped = 0
        self.n_detections = 0
        self.alarm_positions: list[int] = []
        self._drift = False
        self._last_statistic = float("nan")
        return self

    @abc.abstractmethod
    def update(self, values: Any) -> Self:
        """Feed a batch in order; returns the detector."""

    @property
    @abc.abstractmethod
    def result(self) -> DriftResult:
        """Statistic, threshold, p-value and drift flag after the last update."""

    @property
    def drift_detected(self) -> bool:
        """Whether the detector is in alarm after the last update."""
        return self._drift

    @property
    def skipped(self) -> int:
        """:attr:`n_skipped`, under the name WindowedCVM and OnlineMMD have always used (and save)."""
        return self.n_skipped

    def _alarm_state(self) -> dict[str, Any]:
        """Values taken and skipped, alarms so far, where the last update alarmed, and its statistic."""
        return {
            "n": int(self.n),
            "n_skipped": int(self.n_skipped),
            "n_detections": int(self.n_detections),
            "drift": self._drift,
            "alarm_positions": list(self.alarm_positions),
            "last_statistic": json_float(self._last_statistic),
        }

    def _load_alarm_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_alarm_state` saved."""
        self.n = int(state["n"])
        self.n_skipped = int(state["n_skipped"])
        self.n_detections = int(state["n_detections"])
        self._drift = bool(state["drift"])
        self.alarm_positions = [int(p) for p in state.get("alarm_positions", [])]
        self._last_statistic = from_json_float(state["last_statistic"])
