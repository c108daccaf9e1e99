"""Two live streams against each other: a canary's moment features against the stable version's, same time.

:class:`TwoSampleMomentTest` is :class:`~agent.detect.drift.moments.MomentTest` with a second stream in
place of the reference mean. Rows of both streams go into the same time slots (``stream="a"``, the
canary, and ``stream="b"``, the stable version); a look tests, per feature, the difference of the two
window means in units of the features' scale (fitted on the stable version's rows)::

    D    = mean_a - mean_b
    e_c  = (S_a,c - n_a,c mean_a) / N_a  -  (S_b,c - n_b,c mean_b) / N_b          per cluster c
    V    = max( k / (k - 1) * sum e_c**2 ,  deff * (1 / N_a + 1 / N_b) )
    t    = D / sqrt(V),  Student t with k - 1 degrees of freedom

``V`` is the cluster-robust variance of ``D`` with clusters shared in time: a burst both streams see (the
traffic's own mix moving through the day, a client whose requests are split between the versions) moves
both means and cancels in ``D``, so the comparison flags what differs between the versions, not what
changed in the traffic. The floor is the i.i.d. variance of a difference of two means, times the group's
median design effect, as in MomentTest. There is no reference term: both means are estimated from the
window, and both sampling errors are in ``V``.

Clusters are consecutive slots, and what they must hold depends on how requests are split between the
versions, because the dependence they must span is runs of similar requests (a client's burst):

* ``sticky=True`` (the default): a router that keeps a client (a session, a header) on one version puts
  whole runs into one stream, so a cluster holds at least ``cluster_rows`` rows of *each* stream, as a
  MomentTest's clusters do. The canary's share sets the pace: at 10% of 10 requests/s, 20 clusters of 60
  canary rows are a 20-minute window.
* ``sticky=False``: a split per request (a weighted random router) shares every run between the versions,
  and ``cluster_rows`` rows of the two streams together span the runs. Simulated (runs of 20 requests at
  10/s, 10% to the canary, clusters of 60 rows): p-values below 0.01 and 0.001 at 0.57 and 0.19 times
  their nominal rate with a random split; with sticky runs counted this way, 1.4 and 2.4 times (too many):
  hence the default.

A window reaches back until it holds ``min_slots`` clusters *and* ``window_rows`` rows of each stream (so a
window never resolves less than about ``1 / sqrt(window_rows)`` reference sds: 0.06 at the default 300).
A look needs ``min_rows`` new rows of each stream. The effect gate, the flag that holds and the results
are MomentTest's. The state is not saved: a comparison lasts as long as two versions serve, and after a
restart it starts again on fresh rows.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> test = TwoSampleMomentTest(["x", "y"], reference_mean=[0, 0], reference_scale=[1, 1], min_effect=0.3,
...                            slot_seconds=1, cluster_rows=20, min_slots=10, window_rows=300)
>>> for second in range(60):                  # canary (a) and stable (b) answer alike...
...     _ = test.update(rng.normal(size=(30, 2)), at=second, stream="a")
...     _ = test.update(rng.normal(size=(90, 2)), at=second, stream="b")
>>> result = test.look(1e-6)
>>> result.tested, result.rejected, test.drift_detected
(True, (), False)
>>> for second in range(60, 120):             # ...until the canary's y is off by one sd
...     _ = test.update(rng.normal(size=(30, 2)) + [0, 1], at=second, stream="a")
...     _ = test.update(rng.normal(size=(90, 2)), at=second, stream="b")
>>> result = test.look(1e-6)
>>> result.rejected, round(result.effect, 1), test.drift_detected
(('y',), 1.0, True)
"""

from __future__ import annotations

import math
from typing import Any, Self

import numpy as np

from agent.detect.drift.moments import MomentResult, MomentTest

STREAMS = {"a": 0, "b": 1}
# The fewest rows of each stream a window holds (module docstring).
WINDOW_ROWS = 300


class TwoSampleMomentTest(MomentTest):
    """Per-feature tests of stream ``a``'s window mean against stream ``b``'s (module docstring).

    Parameters are MomentTest's; ``reference_mean`` only centres the sums (it cancels in the difference)
    and ``reference_scale`` is the unit of every effect. ``update(values, at, stream)`` adds rows of one
    stream; ``look(alpha)`` tests the window.
    """

    kind = "two_sample_moment_test"

    def __init__(self, *args: Any, window_rows: int = WINDOW_ROWS, sticky: bool = True, **kwargs: Any) -> None:
        kwargs.pop("reference_rows", None)    # both means come from the window: no reference term
        if window_rows < 1:
            raise ValueError(f"sidewatch: window_rows must be >= 1, got {window_rows!r}")
        self.window_rows = int(window_rows)
        self.sticky = bool(sticky)
        super().__init__(*args, **kwargs)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "window_rows": self.window_rows, "sticky": self.sticky}

    def reset(self) -> Self:
        super().reset()
        self._counts = np.zeros((32, 2), dtype=np.int64)
        self._sums = np.zeros((32, 2, self.n_features))
        self._new_both = np.zeros(2, dtype=np.int64)
        return self

    @property
    def pending_rows(self) -> int:
        """Rows of the scarcer stream added since the last tested look."""
        return int(self._new_both.min())

    def update(self, values: Any, at: Any, stream: str = "a") -> Self:
        """Add rows ``[n, F]`` of ``stream`` (``a`` or ``b``) that arrived at ``at`` (seconds, one time
        for the batch). Rows with NaN or Inf are skipped and counted."""
        if stream not in STREAMS:
            raise ValueError(f"sidewatch: stream must be 'a' or 'b', got {stream!r}")
        if np.ndim(at) != 0:
            raise ValueError("sidewatch: a two-sample test takes one time per batch")
        self._stream = STREAMS[stream]
        return super().update(values, at)

    def _add(self, slot: int, count: int, raw_sums: np.ndarray) -> None:
        row = self._row(slot)
        s = self._stream
        self._counts[row, s] += count
        self._sums[row, s] += (raw_sums - count * self.reference_mean) * self._inv_scale
        self._new_both[s] += count
        self._new_rows = int(self._new_both.min())
        if self._new_from is None or slot < self._new_from:
            self._new_from = slot

    def _window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """MomentTest's window, reaching back until it also holds ``window_rows`` rows of each stream;
        counts are ``[clusters, 2]`` and sums ``[clusters, 2, F]``."""
        k = len(self._slot_row)
        ids = np.fromiter(self._slot_row.keys(), dtype=np.int64, count=k)
        order = np.argsort(ids, kind="stable")
        counts = self._counts[:k][order]
        empty = (np.zeros((0, 2), dtype=np.int64), np.zeros((0, 2, self.n_features)), order, k, 0)
        if self._new_from is None or self._new_both.max() == 0:
            return empty
        first_new = int(np.searchsorted(ids[order], self._new_from))
        starts: list[int] = []
        rows = np.zeros(2, dtype=np.int64)
        held = np.zeros(2, dtype=np.int64)
        complete = 0
        for i in range(k - 1, -1, -1):
            rows += counts[i]
            held += counts[i]
            if (rows >= self.cluster_rows).all() if self.sticky else rows.sum() >= self.cluster_rows:
                starts.append(i)
                rows[:] = 0
                if i <= first_new and len(starts) >= self.min_slots and (held >= self.window_rows).all():
                    complete = 1
                    break
        if not complete and rows.any():
            if starts:
                starts[-1] = 0
            else:
                starts.append(0)
            complete = int(len(starts) >= self.min_slots and (held >= self.window_rows).all())
        complete &= int(self._new_both.min() >= self.min_rows)
        starts.reverse()
        if not starts:
            return empty
        sums = self._sums[:k][order[starts[0]:]]
        cuts = np.asarray(starts) - starts[0]
        return (np.add.reduceat(counts[starts[0]:], cuts), np.add.reduceat(sums, cuts, axis=0), order,
                starts[0], complete)

    def look(self, alpha: float) -> MomentResult:
        """Test the difference of the two window means, each feature at level ``alpha``; update the flag."""
        if not 0 < alpha < 1:
            raise ValueError(f"sidewatch: alpha must be in (0, 1), got {alpha!r}")
        self.n_looks += 1
        counts, sums, order, first, complete = self._window()
        k = len(counts)
        totals = counts.sum(axis=0)
        n_rows = int(totals.sum())
        if not complete or (totals == 0).any():
            nan = np.full(self.n_features, np.nan)
            self.last = MomentResult(False, n_rows, k, math.nan, math.nan, math.nan, math.nan, float(alpha),
                                     (), self._drift, nan, nan.copy(), nan.copy())
            return self.last
        means = sums.sum(axis=0) / totals[:, None]                       # [2, F]
        dev = (sums - counts[:, :, None] * means[None]) / totals[None, :, None]
        e = dev[:, 0] - dev[:, 1]                                        # [clusters, F]
        robust = k / (k - 1) * np.einsum("cf,cf->f", e, e)
        variance = self._floored_variance(robust, 1.0 / totals[0] + 1.0 / totals[1])
        self.last = self._decide(means[0] - means[1], variance, n_rows, k, alpha)
        self._keep_from(order, first)
        self._new_both[:] = 0
        self._new_rows = 0
        self._new_from = None
        return self.last

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("sidewatch: a two-sample comparison is not saved (module docstring)")

    def load_state_dict(self, state: dict[str, Any]) -> Self:
        raise NotImplementedError("sidewatch: a two-sample comparison is not saved (module docstring)")
