"""Drift over a window in time: the last T seconds of a feature against its reference bins.

The ERT-calibrated detectors compare the last W requests with the reference; a threshold for a
run length in requests needs a window in requests. Dashboards often want "the last 5 minutes"
instead, whatever the traffic rate: this keeps one histogram per second over the reference-decile
bins (the same bins the fleet PSI uses), drops the seconds older than T, and reports the PSI and the
Jensen-Shannon divergence of what is left. Its threshold is a fixed PSI (0.2 is the usual "significant
shift"), not an ERT: the false-alarm rate of a time window depends on the traffic rate.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Self

import numpy as np

from agent.detect.drift.result import DriftResult


class TimeWindowPSI:
    """PSI (and Jensen-Shannon divergence) of a feature's values over the last ``seconds`` against
    reference bins: ``edges`` (inner bin edges) and ``reference_ratios`` (the reference's share per bin).

    Not a :class:`~agent.detect.drift.base.DriftDetector`: its ``n`` is the values in the time
    window now, not a running count, and its flag is read from the window whenever asked, as the
    window ages with the clock, not with updates. It follows river's shape all the same: ``update``
    and ``reset`` return the detector, ``result`` is a DriftResult.

    >>> clock = iter([0.0, 0.0, 1.0, 1.0, 30.0]).__next__
    >>> window = TimeWindowPSI(edges=[0.5], reference_ratios=[0.5, 0.5], seconds=10, clock=clock)
    >>> window.update([0.1, 0.2, 0.9, 0.8]).psi
    0.0
    >>> window.update([0.9] * 8).drift_detected        # 2 of 12 values below the edge, against half
    True
    >>> window.n                                       # 30 s later: everything has aged out
    0
    """

    def __init__(self, edges, reference_ratios, seconds: float, psi_threshold: float = 0.2,
                 floor: float = 1e-4, clock: Callable[[], float] = time.time) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.reference = np.clip(np.asarray(reference_ratios, dtype=np.float64), floor, None)
        self.seconds = float(seconds)
        self.psi_threshold = float(psi_threshold)
        self.floor = floor
        self._clock = clock
        # (whole second, counts per bin); the sum over the deque is kept alongside.
        self._seconds: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self._total = np.zeros(len(self.reference), dtype=np.int64)

    def _evict(self, now: float) -> None:
        oldest = int(now - self.seconds)
        while self._seconds and self._seconds[0][0] <= oldest:
            self._total -= self._seconds.popleft()[1]

    def reset(self) -> Self:
        """Empty the window; keep the bins."""
        self._seconds.clear()
        self._total[:] = 0
        return self

    def update(self, values) -> Self:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        now = self._clock()
        self._evict(now)
        if values.size:
            counts = np.bincount(np.searchsorted(self.edges, values, side="right"), minlength=len(self.reference))
            second = int(now)
            if self._seconds and self._seconds[-1][0] == second:
                self._seconds[-1][1][:] += counts
            else:
                self._seconds.append((second, counts.astype(np.int64)))
            self._total += counts
        return self

    @property
    def n(self) -> int:
        """Values in the window now."""
        self._evict(self._clock())
        return int(self._total.sum())

    def _shares(self) -> np.ndarray | None:
        n = self.n
        return None if n == 0 else np.clip(self._total / n, self.floor, None)

    @property
    def psi(self) -> float:
        p = self._shares()
        return float("nan") if p is None else float(np.sum((p - self.reference) * np.log(p / self.reference)))

    @property
    def js(self) -> float:
        """Jensen-Shannon divergence in bits."""
        p = self._shares()
        if p is None:
            return float("nan")
        p, q = p / p.sum(), self.reference / self.reference.sum()
        m = (p + q) / 2
        return float(0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m)))

    @property
    def drift_detected(self) -> bool:
        """Whether the PSI of the window now exceeds ``psi_threshold``."""
        return bool(self.result.drift)

    @property
    def result(self) -> DriftResult:
        psi = self.psi
        return DriftResult(statistic=psi, threshold=self.psi_threshold, p_value=None,
                           drift=bool(psi > self.psi_threshold))

    def state_dict(self) -> dict:
        return {"seconds": [[second, counts.tolist()] for second, counts in self._seconds]}

    def load_state_dict(self, state: dict) -> Self:
        self._seconds = collections.deque((int(s), np.asarray(c, dtype=np.int64)) for s, c in state["seconds"])
        self._total = np.zeros(len(self.reference), dtype=np.int64)
        for _, counts in self._seconds:
            self._total += counts
        self._evict(self._clock())
        return self
