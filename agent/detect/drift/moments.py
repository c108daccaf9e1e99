"""Drift as a shift in the mean of moment features, tested at wall-clock looks under a false-alarm budget.

:class:`MomentFeatures` turns each live row into features whose *means* move under the drifts that
matter; :class:`MomentTest` tests, at each look, whether any feature's mean over the look's window
left its reference mean, with a p-value valid for bursty traffic, an effect size, and a flag that
holds. The budget's side (``alpha`` per test, when looks are due) is :mod:`agent.detect.drift.budget`.

The test (per feature, at a look)
---------------------------------
The look's window is cut into time slots of ``slot_seconds`` (slot ``floor(at / slot_seconds)``).
With ``S_b`` the sum of slot ``b``, ``n_b`` its rows, ``N = sum n_b`` and ``k`` non-empty slots, in
units of the reference scale (``z = (x - mu_ref) / scale``)::

    mean = sum S_b / N
    V    = max( k / (k - 1) * sum (S_b - n_b mean)**2 / N**2 ,  1 / N )  +  1 / n_ref
    t    = mean / sqrt(V),   p = 2 * P(T_{k-1} > |t|)   (Student t, k - 1 degrees of freedom)

The first term of ``V`` is the cluster-robust (CR1, batch-means) variance of the mean, slots as
clusters: benign traffic is not i.i.d. (bursts of one class, one client's repeated inputs), and a
run of similar rows inflates the variance of the mean far above ``scale**2 / N``; the robust
variance measures it from the spread of the slot sums, as long as dependence does not reach much
across slots. With equal slots it is exactly the batch-means variance, and ``t`` has ``k - 1``
degrees of freedom. The floor ``1 / N`` (``scale**2 / N`` in the feature's own units) is the i.i.d.
variance under the null: the robust estimate is never allowed below it, which guards against
degenerate slots (nearly constant rows) and only makes the test more conservative. Its price: on
i.i.d. traffic the floor binds about half the time, the statistic is then nearly normal while its
critical value is Student's (7.8 instead of 5.2 at ``alpha = 2.3e-7`` with 19 degrees of freedom),
so a shift needs up to 2.3 times the rows a known-variance test would. More slots per look narrow
that gap, as long as benign bursts stay shorter than a slot.

The reference is a sample too. ``mu_ref`` is the mean of ``n_ref`` reference rows (``reference_rows``),
off from the source's own mean by about ``scale / sqrt(n_ref)``; a long window resolves that
difference, and a test that took ``mu_ref`` as exact would reject benign traffic from the same source
more often than ``alpha`` once windows hold more rows than the reference. So ``V`` also holds the
variance of ``mu_ref``, ``1 / n_ref`` in units of the scale (an upper bound: every scale is at least the
reference sd), as a two-sample test would. Measured before it was added (bench/false_alarms.py, MNIST
block means, a 3,000-image reference): at 1,000 requests/s, 24,484 p-values below the default alpha in
1.2 simulated days where about one was expected.

Bursts shared by a group of features. A burst can leave a feature with no variation in the window
at all (a class that, in runs of 20 requests, happens to be absent for the whole minute): its robust
variance is then zero, the floor ``1 / N`` is far below the real variance, and the test rejects with
a tiny p. The dependence comes from the rows, so features of one group (:class:`MomentFeatures`: the
continuous columns, the projections, a scalar's bins, the class shares) share it. With ``groups``,
each feature's variance is also floored at the group's median design effect (robust variance over
``1 / N``) times ``1 / N``. Simulated, 10 classes in runs of 20, 3 s slots, 60 s looks: at 10
requests/s false rejections at ``alpha = 1e-3`` are 43 times ``alpha`` per class share without the
group floor and below ``alpha`` with it; at 100 requests/s, 2 times and below; i.i.d. traffic is
unaffected (its design effects are near 1).

Clusters and the window
-----------------------
Dependence that reaches across clusters is what the robust variance cannot see: with runs of ``L``
similar rows and clusters of ``b`` rows it misses about ``L / (3 b)`` of the variance (the covariance
of neighbouring clusters, from the runs cut by their boundary). Slots alone are clusters of a fixed
*time*, so the rows they hold fall with the rate; bench/false_alarms.py's bursty traffic at 10
requests/s (runs of 20 of one class, and a daily trough at 5 requests/s where a run lasts 4 s, longer
than a 3 s slot) broke the budget that way: 1.0 rejecting looks per 10 minutes and 1.8 per hour
against budgets of one, and 3 p-values below the 1/30d alpha in 4 simulated days of MNIST traffic
(0.13 expected; 22 below 1e-5 where 4.9 were expected). Three remedies were weighed:

* longer slots: clusters then grow in rows at high rates too, where they need not, and a 60 s look
  holds fewer of them (3 slots of 20 s: 2 degrees of freedom, a critical ``|t|`` in the thousands at
  ``alpha ~ 1e-7``);
* clusters of at least ``cluster_rows`` rows, whole consecutive slots merged until they hold that
  many: at 100 requests/s and above every 3 s slot is a cluster (the look, its delays and its
  degrees of freedom as before); at 10/s a look of 600 rows makes only about 14 clusters of 40;
* so the window reaches back: a look tests every row since the last tested look and, when those make
  fewer than ``min_slots`` clusters, the clusters just before them (already tested at earlier looks,
  which the union bound allows: it needs no independence between looks). At 10 requests/s a window
  holds about 1,100 rows (two looks); at 1 request/s about 14 minutes; at 100/s one look.

Measured with the last two (bench/false_alarms.py, 4 simulated days at 10/s, bursty, both sources;
20 clusters a window): p-values below 1e-5 observed / expected (MNIST; synthetic), looks with some
p < alpha per period at 1/10min and 1/1h (MNIST), and the mean delay at 10/s over the shifts, the
class mix and brightened MNIST (the correlation change apart) at ``min_effect`` 0.3:

======================  ==============  ================  ======================
clusters                p < 1e-5        evidence looks    delay at 10/s
======================  ==============  ================  ======================
slots (before)          22/4.9; 1/3.2   1.08; 1.78        80 s (correlation 457)
30 rows                 7/4.9; 2/3.2    0.70; 0.67        100 s (139)
40 rows (the default)   1/4.9; 1/3.2    0.68; 0.53        122 s (151)
60 rows                 0/4.9; 1/3.2    0.61; 0.45        146 s (151)
100 rows                2/4.9; 2/3.2    0.66; 0.58        -
======================  ==============  ================  ======================

The delays at 100/s did not move (68-79 s). 40 rows is the least that put the deep tail below its
nominal rate on both sources. It assumes benign runs shorter than about half a cluster; a unit test
(runs of 20 at 5 rows/s, on columns that owe half their variance to the class) has slots as clusters
reject at 5 times alpha = 0.01 and clusters of 40 rows at under 2 times. Traffic with longer runs of
similar requests needs a larger ``cluster_rows``. More clusters a window would lower the critical
value (6.7 at 29 degrees of freedom instead of 7.7 at 19) but lengthen the windows at low rates, and
a change's effect is diluted by the rows before it until they leave the window.

A look is tested when at least ``min_rows`` rows came since the last tested look and the window holds
``min_slots`` clusters; otherwise it is *not tested*: its alpha is left unspent and its rows wait for
the next look (low traffic: a window with three requests). Rows older than the last tested window are
dropped: no later window reaches further back.

Drift that matters
------------------
With enough rows every tiny difference is significant. Each feature's effect is the standardised
mean difference ``|mean| = |x_mean - mu_ref| / scale``, and a feature rejects only if ``p < alpha``
*and* the effect less ``effect_se`` standard errors reaches ``min_effect``:
``|mean| - effect_se * sqrt(V) >= min_effect`` (a lower confidence bound on the effect, 97.7% one-sided
at the default ``effect_se = 2``). Every scale is a reference standard deviation (for a share, the
binomial ``sqrt(p (1 - p))``), so ``min_effect`` is in standard deviations for every feature.

Why the bound and not the plain effect: the plain effect of a window scatters by ``sqrt(V)``, about
0.03 at 10 requests/s (about 1,100 rows a window) on top of the population effect. The MNIST test
sample against the validation reference (same source: benign for the product) has a population effect
of 0.23 (bench/false_alarms.py); at 10/s its window effects reached 0.31, and with the plain effect
gated at 0.3 it alarmed once in 200,000 requests (4 rejecting looks); gated on the bound, with
``effect_se`` 1 or 2, no benign stream alarmed (the test sample, the demo's benign stream, held-out
synthetic draws, 200,000 requests each at 10 and 100/s). The bound costs delay where the drift's own
effect is near ``min_effect``: the correlation change (population effect 0.37) took 151 s at 10/s
with the plain effect, 175 s with ``effect_se`` 1 and 253 s with 2; the other scenarios (0.48 and
more) moved by less than 10 s. The default ``min_effect`` of the sidecar (0.3, with ``effect_se`` 2)
sits between the benign streams (population effects up to 0.23) and the drifts (from 0.37).

A flag that holds
-----------------
``drift_detected`` rises at the first look in which some feature rejects (``n_alarms`` counts the
rises) and holds until ``clear_looks`` consecutive *tested* looks in which the effect of every feature
that rejected while the flag was up is below ``clear_ratio * min_effect`` (hysteresis), or
:meth:`MomentTest.reset`. Only those features: the largest of some 50-100 noisy effects sits near
``clear_ratio * min_effect`` at a few hundred rows a look, and a rule over all of them kept the flag up
for most of a simulated month of benign traffic. Looks not tested
neither count towards clearing nor interrupt it. With ``min_effect = 0`` the flag holds until reset.

Moment features
---------------
So that a change in shape or in correlation shows up as a change of some mean, for a continuous
matrix ``X [n, D]`` (image block means, tabular columns):

(a) each column standardised: ``z_j = (x_j - m_j) / s_j`` (reference mean and sd, the sd floored at
    ``scale_floor`` times the root mean square of the columns' sds; its scale is taken as 1, an upper
    bound on its sd, so a shift of ``s_j`` is an effect of 1);
(b) squared random projections ``(z . u_i)**2`` for ``projections`` seeded unit vectors ``u_i``:
    their means are ``u_i' Cov(z) u_i``, so they move when variances or correlations change,
    even with every marginal mean unchanged;
(c) for chosen scalar columns (confidence, entropy, a score), the shares of the reference-decile bins
    (every bin holds reference values): shape changes of the scalar;
(d) the share of each predicted class (``n_classes``);
(e) named shares (``shares``, optional): per-row values in [0, 1] whose mean is a rate (a missing-value
    indicator, the share of a category, an out-of-vocabulary rate), each in its own group or in the group
    ``share_groups`` names. A rate that is 0 in the reference is still tested, which decile bins cannot do.

Share features take the binomial sd of their reference share, smoothed (``(c + 1/2) / (n + 1)``) so
that a bin or class absent from the reference keeps a finite scale. A live row with NaN or Inf (or a
class id out of range) gives NaN in its features, and the test skips the whole row.

>>> import numpy as np
>>> from agent.detect.drift.budget import AlarmBudget
>>> rng = np.random.default_rng(0)
>>> features = MomentFeatures(projections=4).fit(continuous=rng.normal(size=(5000, 3)))
>>> features.names[:4], len(features.names)
(['x0', 'x1', 'x2', 'proj0_sq'], 7)
>>> test = features.make_test(min_effect=0.2)
>>> alpha = AlarmBudget.parse("1/30d").alpha(look_seconds=60, tests=len(features.names))
>>> for second in range(60):                      # a minute of benign traffic, 50 rows/s
...     _ = test.update(features.transform(continuous=rng.normal(size=(50, 3))), at=second)
>>> result = test.look(alpha)
>>> result.tested, result.rows, result.slots, result.rejected, test.drift_detected
(True, 3000, 20, (), False)
>>> for second in range(60, 120):                 # then the second column shifts by half an sd
...     _ = test.update(features.transform(continuous=rng.normal(size=(50, 3)) + [0, 0.5, 0]), at=second)
>>> result = test.look(alpha)
>>> result.rejected, round(result.effect, 1), test.drift_detected, test.n_alarms
(('x1',), 0.5, True, 1)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Self, Sequence

import numpy as np
from scipy import stats

from agent.detect.drift.base import DriftDetector
from agent.detect.drift.result import DriftResult

STATE_KIND = "sidewatch-drift-state"
# Defaults of MomentTest (module docstring, "Clusters and the window"): a cluster holds at least
# CLUSTER_ROWS rows (whole slots), and a window at least MIN_CLUSTERS clusters.
CLUSTER_ROWS = 40
MIN_CLUSTERS = 20
# A feature's effect counts at EFFECT_SE standard errors below its estimate ("Drift that matters").
EFFECT_SE = 2.0
CALIBRATION_KIND = "sidewatch-drift-calibration"
FORMAT_VERSION = 1


def _vector(x: Any, size: int, what: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(x, dtype=np.float64), (size,)).copy()
    if not np.isfinite(arr).all():
        raise ValueError(f"sidewatch: {what} must be finite")
    return arr


# eq=False: numpy array fields (see DriftResult).
@dataclass(frozen=True, eq=False)
class MomentResult:
    """What one look found. Per-feature arrays (``t``, ``p``, ``effects``) are for attribution; when the
    look was not tested they are NaN and ``rows``/``slots`` are what is carried into the next look.

    ``statistic`` is the largest ``|t|``, ``threshold`` the ``|t|`` critical value at ``alpha`` with
    ``slots - 1`` degrees of freedom, ``p_value`` the smallest p, ``effect`` the largest effect,
    ``rejected`` the features with ``p < alpha`` and ``effect >= min_effect``, and ``drift`` the held
    flag after this look.
    """

    tested: bool
    rows: int
    slots: int
    statistic: float
    threshold: float
    p_value: float
    effect: float
    alpha: float
    rejected: tuple[str, ...]
    drift: bool
    t: np.ndarray
    p: np.ndarray
    effects: np.ndarray
    # Each feature's effect less effect_se standard errors: what min_effect gates (None before it existed).
    effect_bounds: np.ndarray | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (arrays as lists; NaN stays NaN)."""
        return {"tested": self.tested, "rows": self.rows, "slots": self.slots, "statistic": self.statistic,
                "threshold": self.threshold, "p_value": self.p_value, "effect": self.effect, "alpha": self.alpha,
                "rejected": list(self.rejected), "drift": self.drift,
                "t": self.t.tolist(), "p": self.p.tolist(), "effects": self.effects.tolist(),
                "effect_bounds": None if self.effect_bounds is None else self.effect_bounds.tolist()}


class MomentTest(DriftDetector):
    """Per-feature tests of the window mean against ``reference_mean`` at each look (module docstring).

    ``names``, ``reference_mean`` and ``reference_scale`` (> 0) describe the ``F`` features;
    ``min_effect`` (a number or one per feature) is the smallest effect, in reference sds, that may
    alarm; ``groups`` (one label per feature, optional) pools the design-effect floor over features
    that share a label. ``update(values [n, F], at)`` adds rows arriving at time ``at`` (seconds; one time for the
    batch, or one per row) to their slot of ``slot_seconds``; ``look(alpha)`` tests what was added since the
    last tested look, with the rows before it when needed to make ``min_slots`` clusters of at least
    ``cluster_rows`` rows (module docstring), and returns a :class:`MomentResult` (its ``slots`` are the
    window's clusters, its ``rows`` the window's rows). A look needs ``min_rows`` new rows to be tested.

    ``alternative="greater"`` makes every test one-sided: only a rise of the mean is evidence (a share
    of flagged inputs above its calibrated rate); ``p`` and the threshold are then one-sided and the
    effect is the rise (0 for a fall).

    The counters are :class:`~agent.detect.drift.base.DriftDetector`'s: ``n`` rows taken, ``n_skipped``,
    ``n_detections`` (the flag's rises, also ``n_alarms``); ``alarm_positions`` stays empty, as alarms
    come at looks, not at rows. ``n_looks`` and ``n_tested`` count looks, ``last`` is the last result.
    """

    kind = "moment_test"

    def __init__(self, names: Sequence[str], reference_mean: Any, reference_scale: Any, min_effect: Any,
                 slot_seconds: float = 3.0, min_slots: int = MIN_CLUSTERS, min_rows: int = 30,
                 clear_looks: int = 3, clear_ratio: float = 0.5, groups: Sequence[Any] | None = None,
                 reference_rows: int | None = None, alternative: str = "two-sided",
                 cluster_rows: int = CLUSTER_ROWS, effect_se: float = EFFECT_SE) -> None:
        self.names = [str(name) for name in names]
        f = len(self.names)
        if f < 1 or len(set(self.names)) != f:
            raise ValueError("sidewatch: a MomentTest needs at least one feature and distinct names")
        self.reference_mean = _vector(reference_mean, f, "reference_mean")
        self.reference_scale = _vector(reference_scale, f, "reference_scale")
        if (self.reference_scale <= 0).any():
            raise ValueError("sidewatch: reference_scale must be > 0 for every feature")
        self.min_effect = _vector(min_effect, f, "min_effect")
        if (self.min_effect < 0).any():
            raise ValueError("sidewatch: min_effect must be >= 0")
        if not (math.isfinite(slot_seconds) and slot_seconds > 0):
            raise ValueError(f"sidewatch: slot_seconds must be > 0, got {slot_seconds!r}")
        if min_slots < 2 or min_rows < 1 or clear_looks < 1 or not 0 < clear_ratio <= 1 or cluster_rows < 1:
            raise ValueError("sidewatch: need min_slots >= 2, min_rows >= 1, cluster_rows >= 1, clear_looks >= 1, "
                             "0 < clear_ratio <= 1")
        self.slot_seconds = float(slot_seconds)
        self.cluster_rows = int(cluster_rows)
        if not (math.isfinite(effect_se) and effect_se >= 0):
            raise ValueError(f"sidewatch: effect_se must be >= 0, got {effect_se!r}")
        self.effect_se = float(effect_se)
        self.min_slots = int(min_slots)
        self.min_rows = int(min_rows)
        self.clear_looks = int(clear_looks)
        self.clear_ratio = float(clear_ratio)
        if reference_rows is not None and reference_rows < 1:
            raise ValueError(f"sidewatch: reference_rows must be >= 1, got {reference_rows!r}")
        # The reference mean's own variance, in units of the scale (0: the reference taken as exact).
        self.reference_rows = None if reference_rows is None else int(reference_rows)
        self._reference_variance = 0.0 if reference_rows is None else 1.0 / reference_rows
        if alternative not in ("two-sided", "greater"):
            raise ValueError(f"sidewatch: alternative must be 'two-sided' or 'greater', got {alternative!r}")
        # "greater": only a rise of the mean counts (a rate of flagged inputs above its calibrated share).
        self.alternative = alternative
        self.groups = None if groups is None else [str(g) for g in groups]
        if self.groups is not None and len(self.groups) != f:
            raise ValueError(f"sidewatch: {len(self.groups)} groups for {f} features")
        # Features sharing a group, when some group has several (the design-effect floor pools over them).
        self._group_members = [] if self.groups is None else [
            members for g in dict.fromkeys(self.groups)
            if len(members := np.flatnonzero(np.asarray(self.groups) == g)) > 1]
        self._inv_scale = 1.0 / self.reference_scale
        self._fingerprint = hashlib.sha256(json.dumps(self._config(), sort_keys=True).encode()).hexdigest()
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"names": self.names, "reference_mean": self.reference_mean.tolist(),
                "reference_scale": self.reference_scale.tolist(), "min_effect": self.min_effect.tolist(),
                "slot_seconds": self.slot_seconds, "min_slots": self.min_slots, "min_rows": self.min_rows,
                "clear_looks": self.clear_looks, "clear_ratio": self.clear_ratio, "groups": self.groups,
                "reference_rows": self.reference_rows,
                **({} if self.alternative == "two-sided" else {"alternative": self.alternative}),
                **({} if self.cluster_rows == 1 else {"cluster_rows": self.cluster_rows}),
                **({} if self.effect_se == 0 else {"effect_se": self.effect_se})}

    @property
    def n_features(self) -> int:
        return len(self.names)

    def reset(self) -> Self:
        """Forget the window, the flag and the counters; keep the parameters. Returns the test."""
        self._slot_row: dict[int, int] = {}       # slot id -> row in _counts / _sums (insertion order)
        self._counts = np.zeros(32, dtype=np.int64)
        self._sums = np.zeros((32, self.n_features))  # sums of (x - mu_ref) / scale per slot
        # Rows added since the last tested look, and the earliest slot they fell in (every window holds them).
        self._new_rows = 0
        self._new_from: int | None = None
        self._quiet = 0
        # The features that rejected while the flag has been up: the ones whose quiet clears it.
        self._alarmed = np.zeros(self.n_features, dtype=bool)
        self.n_looks = 0
        self.n_tested = 0
        self.last: MomentResult | None = None
        return super().reset()

    @property
    def n_alarms(self) -> int:
        """Rises of the flag since the last reset."""
        return self.n_detections

    @property
    def pending_rows(self) -> int:
        """Rows added since the last tested look: the next tested window holds all of them."""
        return self._new_rows

    @property
    def kept_rows(self) -> int:
        """Rows kept for the next window: the new ones and the older ones a window may reach back to."""
        return int(self._counts[:len(self._slot_row)].sum())

    # --- feeding ----------------------------------------------------------------------------------

    def _row(self, slot: int) -> int:
        """The row of ``slot`` in the counts and sums, added (the arrays doubled when full) if new."""
        row = self._slot_row.get(slot)
        if row is None:
            row = len(self._slot_row)
            if row == len(self._counts):
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
                self._sums = np.concatenate([self._sums, np.zeros_like(self._sums)])
            self._slot_row[slot] = row
        return row

    def _add(self, slot: int, count: int, raw_sums: np.ndarray) -> None:
        row = self._row(slot)
        self._counts[row] += count
        self._sums[row] += (raw_sums - count * self.reference_mean) * self._inv_scale
        self._new_rows += count
        if self._new_from is None or slot < self._new_from:
            self._new_from = slot

    def update(self, values: Any, at: Any) -> Self:
        """Add rows ``[n, F]`` (or one row ``[F]``) that arrived at ``at`` (seconds, one for all or one
        per row). A row with NaN or Inf (or a non-finite time) is skipped and counted in ``n_skipped``."""
        rows = np.asarray(values, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows[None, :]
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise ValueError(f"sidewatch: expected rows of {self.n_features} features, got shape {np.shape(values)}")
        times = np.asarray(at, dtype=np.float64)
        if times.ndim == 0:
            if not math.isfinite(float(times)):
                raise ValueError(f"sidewatch: the time of a batch must be finite, got {at!r}")
            ok = np.isfinite(rows).all(axis=1)
        else:
            if times.shape != (rows.shape[0],):
                raise ValueError(f"sidewatch: one time per row expected, got {times.shape} for {rows.shape[0]} rows")
            ok = np.isfinite(rows).all(axis=1) & np.isfinite(times)
        taken = int(ok.sum())
        self.n_skipped += rows.shape[0] - taken
        if taken < rows.shape[0]:
            rows = rows[ok]
            times = times if times.ndim == 0 else times[ok]
        if taken == 0:
            return self
        self.n += taken
        if times.ndim == 0:
            self._add(math.floor(float(times) / self.slot_seconds), taken, rows.sum(axis=0))
            return self
        slots = np.floor(times / self.slot_seconds).astype(np.int64)
        if slots[0] == slots[-1] and (slots == slots[0]).all():
            self._add(int(slots[0]), taken, rows.sum(axis=0))
            return self
        order = np.argsort(slots, kind="stable")
        slots = slots[order]
        starts = np.flatnonzero(np.concatenate([[True], slots[1:] != slots[:-1]]))
        sums = np.add.reduceat(rows[order], starts, axis=0)
        counts = np.diff(np.append(starts, taken))
        for slot, count, raw in zip(slots[starts].tolist(), counts.tolist(), sums):
            self._add(slot, count, raw)
        return self

    # --- looking ----------------------------------------------------------------------------------

    def _window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """The window a look tests, from the slots kept: every slot since the last tested look, then
        older ones back to ``min_slots`` clusters (module docstring). Returns the clusters' counts and
        sums, the kept slots' positions in time order, the first of them in the window, and whether the
        look can be tested (``min_rows`` new rows, ``min_slots`` clusters) as 0/1."""
        k = len(self._slot_row)
        ids = np.fromiter(self._slot_row.keys(), dtype=np.int64, count=k)
        order = np.argsort(ids, kind="stable")
        counts = self._counts[:k][order]
        if self._new_rows == 0 or self._new_from is None:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.n_features)), order, k, 0
        first_new = int(np.searchsorted(ids[order], self._new_from))
        # Clusters of whole slots, at least cluster_rows rows each, built from the newest slot back.
        starts: list[int] = []
        rows = 0
        complete = 0
        for i in range(k - 1, -1, -1):
            rows += int(counts[i])
            if rows >= self.cluster_rows:
                starts.append(i)
                rows = 0
                if i <= first_new and len(starts) >= self.min_slots:
                    complete = 1
                    break
        if not complete and rows:                 # the oldest rows, too few for a cluster of their own
            if starts:
                starts[-1] = 0
            else:
                starts.append(0)
            complete = int(len(starts) >= self.min_slots)
        complete &= int(self._new_rows >= self.min_rows)
        starts.reverse()
        if not starts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.n_features)), order, k, 0
        sums = self._sums[:k][order[starts[0]:]]
        cuts = np.asarray(starts) - starts[0]
        return (np.add.reduceat(counts[starts[0]:], cuts), np.add.reduceat(sums, cuts, axis=0), order,
                starts[0], complete)

    def _keep_from(self, order: np.ndarray, first: int) -> None:
        """Drop the slots before position ``first`` (time order): no later window reaches them."""
        keep = order[first:]
        ids = np.fromiter(self._slot_row.keys(), dtype=np.int64, count=len(self._slot_row))
        counts, sums = self._counts[keep].copy(), self._sums[keep].copy()
        cap = max(32, 1 << max(0, len(keep) - 1).bit_length())
        self._counts = np.zeros((cap, *counts.shape[1:]), dtype=np.int64)
        self._sums = np.zeros((cap, *sums.shape[1:]))
        self._counts[:len(keep)] = counts
        self._sums[:len(keep)] = sums
        self._slot_row = {int(slot): i for i, slot in enumerate(ids[keep].tolist())}

    def look(self, alpha: float) -> MomentResult:
        """Test the window (every row added since the last tested look, and older rows back to
        ``min_slots`` clusters), each feature at level ``alpha``; update the flag. When the window
        cannot be completed (too few rows or clusters) the look is not tested and its rows wait."""
        if not 0 < alpha < 1:
            raise ValueError(f"sidewatch: alpha must be in (0, 1), got {alpha!r}")
        self.n_looks += 1
        counts, sums, order, first, complete = self._window()
        k = len(counts)
        n_rows = int(counts.sum())
        if not complete:
            nan = np.full(self.n_features, np.nan)
            self.last = MomentResult(False, n_rows, k, math.nan, math.nan, math.nan, math.nan, float(alpha),
                                     (), self._drift, nan, nan.copy(), nan.copy())
            return self.last
        mean = sums.sum(axis=0) / n_rows
        dev = sums - counts[:, None] * mean
        robust = k / (k - 1) * np.einsum("bf,bf->f", dev, dev) / n_rows**2
        variance = self._floored_variance(robust, 1.0 / n_rows) + self._reference_variance
        self.last = self._decide(mean, variance, n_rows, k, alpha)
        self._keep_from(order, first)
        self._new_rows = 0
        self._new_from = None
        return self.last

    def _floored_variance(self, robust: np.ndarray, iid: float) -> np.ndarray:
        """The robust variance of each feature's mean, floored at the i.i.d. variance ``iid`` times the
        group's median design effect (module docstring, "Bursts shared by a group of features")."""
        floor = np.ones(self.n_features)          # design effect: robust variance over the i.i.d. one
        for members in self._group_members:
            floor[members] = max(1.0, float(np.median(robust[members])) / iid)
        return np.maximum(robust, floor * iid)

    def _decide(self, mean: np.ndarray, variance: np.ndarray, n_rows: int, k: int, alpha: float) -> MomentResult:
        """Test each feature's ``mean`` (in units of its scale) with ``variance`` and ``k - 1`` degrees of
        freedom at ``alpha``, gate it on its effect, and update the held flag."""
        t = mean / np.sqrt(variance)
        df = k - 1
        if self.alternative == "greater":
            p = stats.t.sf(t, df)
            effects = np.maximum(mean, 0.0)
            critical = float(stats.t.isf(alpha, df))
        else:
            p = np.minimum(1.0, 2.0 * stats.t.sf(np.abs(t), df))
            effects = np.abs(mean)
            critical = float(stats.t.isf(alpha / 2, df))
        # The gate: the effect less effect_se standard errors (a lower confidence bound) >= min_effect.
        bounds = (mean if self.alternative == "greater" else effects) - self.effect_se * np.sqrt(variance)
        rejected = (p < alpha) & (bounds >= self.min_effect)
        if rejected.any():
            if not self._drift:
                self.n_detections += 1
            self._drift = True
            self._alarmed |= rejected
            self._quiet = 0
        elif self._drift:
            alarmed = self._alarmed
            if (effects[alarmed] < self.clear_ratio * self.min_effect[alarmed]).all():
                self._quiet += 1
                if self._quiet >= self.clear_looks:
                    self._drift = False
                    self._alarmed[:] = False
                    self._quiet = 0
            else:
                self._quiet = 0
        self.n_tested += 1
        evidence = t if self.alternative == "greater" else np.abs(t)
        statistic = float(evidence.max())
        self._last_statistic = statistic
        return MomentResult(
            tested=True, rows=n_rows, slots=k, statistic=statistic, threshold=critical,
            p_value=float(p.min()), effect=float(effects.max()), alpha=float(alpha),
            rejected=tuple(name for name, r in zip(self.names, rejected) if r), drift=self._drift,
            t=t, p=p, effects=effects, effect_bounds=bounds)

    @property
    def result(self) -> DriftResult:
        """The last tested look as a DriftResult: ``|t|`` and p per feature, the critical ``|t|``, and
        which features rejected (NaN and no drift before any tested look)."""
        last = self.last
        if last is None or not last.tested:
            nan = np.full(self.n_features, np.nan)
            return DriftResult(nan, math.nan, nan.copy(), np.zeros(self.n_features, dtype=bool))
        evidence = last.t if self.alternative == "greater" else np.abs(last.t)
        return DriftResult(evidence, last.threshold, last.p, np.isin(self.names, last.rejected))

    # --- persistence ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The slots kept (ids, rows and sums, exact; the new rows among them), the flag and the counters,
        JSON-serialisable."""
        k = len(self._slot_row)
        return {
            "kind": STATE_KIND, "detector": self.kind, "format_version": FORMAT_VERSION,
            "config_sha256": self._fingerprint,
            "slots": list(self._slot_row), "counts": self._counts[:k].tolist(), "sums": self._sums[:k].tolist(),
            "new_rows": self._new_rows, "new_from": self._new_from,
            "alarm": self._alarm_state(), "quiet_looks": self._quiet,
            "alarmed": [name for name, a in zip(self.names, self._alarmed) if a],
            "n_looks": self.n_looks, "n_tested": self.n_tested,
        }

    def load_state_dict(self, state: dict[str, Any]) -> Self:
        """Restore a :meth:`state_dict` taken with the same parameters; the stream continues exactly."""
        if state.get("kind") != STATE_KIND or state.get("detector") != self.kind \
                or state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sidewatch: not a {self.kind} state of format {FORMAT_VERSION}: "
                             f"kind={state.get('kind')!r}, detector={state.get('detector')!r}")
        if state.get("config_sha256") != self._fingerprint:
            raise ValueError("sidewatch: this moment_test state was taken with other features or parameters")
        slots = [int(s) for s in state["slots"]]
        counts = np.asarray(state["counts"], dtype=np.int64)
        sums = np.asarray(state["sums"], dtype=np.float64).reshape(-1, self.n_features)
        if len(slots) != len(set(slots)) or counts.shape != (len(slots),) or sums.shape[0] != len(slots) \
                or (counts < 1).any():
            raise ValueError("sidewatch: the moment_test window in this state is malformed")
        self.reset()
        cap = max(32, 1 << max(0, len(slots) - 1).bit_length())
        self._counts = np.zeros(cap, dtype=np.int64)
        self._sums = np.zeros((cap, self.n_features))
        self._counts[:len(slots)] = counts
        self._sums[:len(slots)] = sums
        self._slot_row = {slot: i for i, slot in enumerate(slots)}
        # A state without them (every slot kept was new) is read as such.
        self._new_rows = int(state.get("new_rows", counts.sum()))
        new_from = state.get("new_from", min(slots) if slots else None)
        self._new_from = None if new_from is None or self._new_rows == 0 else int(new_from)
        self._load_alarm_state(state["alarm"])
        self._quiet = int(state["quiet_looks"])
        self._alarmed = np.isin(self.names, state.get("alarmed", []))
        self.n_looks = int(state["n_looks"])
        self.n_tested = int(state["n_tested"])
        return self


class MomentFeatures:
    """The moment features of the module docstring, fitted on reference rows.

    ``projections`` squared random projections of the standardised continuous columns (seeded by
    ``seed``), ``bins`` reference-quantile bins per scalar column, ``n_classes`` class shares (0: none);
    ``scale_floor`` floors a continuous column's sd (and a projection's) at that fraction of the root
    mean square sd of its group. After :meth:`fit`: ``names``, ``reference_mean``, ``reference_scale``
    (one per feature), :meth:`transform`, :meth:`make_test`, and the JSON round trip
    :meth:`calibration_dict` / :meth:`from_calibration`.
    """

    kind = "moment_features"

    def __init__(self, projections: int = 16, bins: int = 10, n_classes: int = 0, scale_floor: float = 0.1,
                 seed: int = 0) -> None:
        if projections < 0 or bins < 2 or n_classes < 0 or not 0 < scale_floor <= 1:
            raise ValueError("sidewatch: need projections >= 0, bins >= 2, n_classes >= 0, 0 < scale_floor <= 1")
        self.projections = int(projections)
        self.bins = int(bins)
        self.n_classes = int(n_classes)
        self.scale_floor = float(scale_floor)
        self.seed = int(seed)
        self.continuous_names: list[str] = []
        self.scalar_names: list[str] = []
        self.column_mean = np.zeros(0)
        self.column_scale = np.ones(0)
        self.projection_vectors = np.zeros((0, 0))
        self.scalar_edges: list[np.ndarray] = []
        self.share_names: list[str] = []
        self.share_groups: list[str] = []
        self.names: list[str] = []
        self.reference_mean = np.zeros(0)
        self.reference_scale = np.ones(0)
        self.n_reference = 0

    # --- fitting ----------------------------------------------------------------------------------

    def fit(self, continuous: Any = None, scalars: Mapping[str, Any] | None = None, classes: Any = None,
            continuous_names: Sequence[str] | None = None, shares: Mapping[str, Any] | None = None,
            share_groups: Mapping[str, str] | None = None) -> Self:
        """Fit on reference rows: ``continuous [n, D]``, ``scalars`` ``{name: [n]}``, ``classes [n]`` (class
        ids, needed when ``n_classes > 0``), ``shares`` ``{name: [n]}`` (values in [0, 1]; ``share_groups``
        ``{name: group}``, a share's own name by default). Rows with NaN, Inf, a class id or a share out of
        range are dropped."""
        if scalars is not None and not isinstance(scalars, Mapping):
            raise ValueError("sidewatch: reference scalars must be a mapping {name: values}")
        if shares is not None and not isinstance(shares, Mapping):
            raise ValueError("sidewatch: reference shares must be a mapping {name: values}")
        if continuous is None and not scalars and not shares and self.n_classes == 0:
            raise ValueError("sidewatch: MomentFeatures needs continuous columns, scalars, shares or classes")
        if self.n_classes and classes is None:
            raise ValueError(f"sidewatch: n_classes={self.n_classes} needs the reference's class ids")
        self.continuous_names, self.column_mean, self.column_scale = [], np.zeros(0), np.ones(0)
        self.projection_vectors = np.zeros((0, 0))
        x = None if continuous is None else np.asarray(continuous, dtype=np.float64)
        if x is not None and (x.ndim != 2 or x.shape[1] < 1):
            raise ValueError(f"sidewatch: continuous reference must be [n, D], got shape {x.shape}")
        self.scalar_names = [str(name) for name in (scalars or {})]
        s = self._scalar_matrix(scalars, fitting=True)
        self.share_names = [str(name) for name in (shares or {})]
        groups = dict(share_groups or {})
        self.share_groups = [str(groups.get(name, name)) for name in self.share_names]
        h = self._share_matrix(shares)
        c = None if not self.n_classes else np.asarray(classes, dtype=np.float64).reshape(-1)
        n = {len(a) for a in (x, s, c, h) if a is not None}
        if len(n) != 1:
            raise ValueError(f"sidewatch: reference inputs differ in rows: {sorted(n)}")
        ok = np.ones(n.pop(), dtype=bool)
        for a in (x, s):
            if a is not None:
                ok &= np.isfinite(a).all(axis=1)
        if c is not None:
            ok &= self._valid_classes(c)
        if h is not None:
            ok &= ~np.isnan(h).any(axis=1)
        if ok.sum() < 10:
            raise ValueError(f"sidewatch: need at least 10 finite reference rows, got {int(ok.sum())}")
        x, s, c, h = (None if a is None else a[ok] for a in (x, s, c, h))
        self.n_reference = int(ok.sum())

        if x is not None:
            d = x.shape[1]
            names = [f"x{j}" for j in range(d)] if continuous_names is None else [str(v) for v in continuous_names]
            if len(names) != d:
                raise ValueError(f"sidewatch: {len(names)} continuous_names for {d} columns")
            self.continuous_names = names
            self.column_mean = x.mean(axis=0)
            self.column_scale = self._floored(x.std(axis=0))
            u = np.random.default_rng(self.seed).normal(size=(self.projections, d))
            self.projection_vectors = u / np.linalg.norm(u, axis=1, keepdims=True)
        self.scalar_edges = [] if s is None else [self._edges(s[:, i]) for i in range(s.shape[1])]

        self.names = self._feature_names()
        reference = self._features(x, s, c, h)
        self.reference_mean = reference.mean(axis=0)
        scale = np.empty(len(self.names))
        d, k = len(self.continuous_names), self.projection_vectors.shape[0] if x is not None else 0
        scale[:d] = 1.0
        scale[d:d + k] = self._floored(reference[:, d:d + k].std(axis=0))
        shares = reference[:, d + k:]
        smoothed = (shares.sum(axis=0) + 0.5) / (self.n_reference + 1.0)
        scale[d + k:] = np.sqrt(smoothed * (1.0 - smoothed))
        self.reference_scale = scale
        return self

    def _floored(self, sd: np.ndarray) -> np.ndarray:
        """Each sd, at least ``scale_floor`` times the group's root mean square sd (1 if all are 0)."""
        if sd.size == 0:
            return sd
        rms = float(np.sqrt(np.mean(sd * sd)))
        return np.maximum(sd, self.scale_floor * rms) if rms > 0 else np.ones_like(sd)

    def _edges(self, values: np.ndarray) -> np.ndarray:
        """Inner edges of the reference-quantile bins, each a reference value; every bin holds reference values."""
        edges = np.unique(np.quantile(values, np.arange(1, self.bins) / self.bins, method="inverted_cdf"))
        return edges[edges > values.min()]

    # --- transforming -----------------------------------------------------------------------------

    def _feature_names(self) -> list[str]:
        names = list(self.continuous_names)
        names += [f"proj{i}_sq" for i in range(self.projection_vectors.shape[0] if self.continuous_names else 0)]
        for name, edges in zip(self.scalar_names, self.scalar_edges):
            names += [f"{name}_bin{b}" for b in range(len(edges) + 1)]
        names += [f"class_{c}" for c in range(self.n_classes)]
        return names + list(self.share_names)

    def _valid_classes(self, c: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.isfinite(c) & (c >= 0) & (c < self.n_classes) & (c == np.floor(c))

    def _scalar_matrix(self, scalars: Any, fitting: bool = False) -> np.ndarray | None:
        if not self.scalar_names:
            if scalars is not None and len(scalars) and not fitting:
                raise ValueError("sidewatch: these MomentFeatures were fitted without scalars")
            return None
        if scalars is None:
            raise ValueError(f"sidewatch: scalars {self.scalar_names} are needed")
        if isinstance(scalars, Mapping):
            if list(scalars) != self.scalar_names and set(scalars) != set(self.scalar_names):
                raise ValueError(f"sidewatch: scalars must be {self.scalar_names}, got {list(scalars)}")
            return np.stack([np.asarray(scalars[name], dtype=np.float64).reshape(-1) for name in self.scalar_names],
                            axis=1)
        s = np.asarray(scalars, dtype=np.float64)
        s = s[:, None] if s.ndim == 1 else s
        if s.ndim != 2 or s.shape[1] != len(self.scalar_names):
            raise ValueError(f"sidewatch: scalars must be [n, {len(self.scalar_names)}], got shape {s.shape}")
        return s

    def _share_matrix(self, shares: Any) -> np.ndarray | None:
        """``{name: [n]}`` in :attr:`share_names` order -> ``[n, H]``; a value outside [0, 1] becomes NaN."""
        if not self.share_names:
            if shares:
                raise ValueError("sidewatch: these MomentFeatures were fitted without shares")
            return None
        if not isinstance(shares, Mapping) or set(shares) != set(self.share_names):
            raise ValueError(f"sidewatch: shares must be a mapping with keys {self.share_names}")
        h = np.stack([np.asarray(shares[name], dtype=np.float64).reshape(-1) for name in self.share_names], axis=1)
        with np.errstate(invalid="ignore"):
            h[~((h >= 0) & (h <= 1))] = np.nan
        return h

    def _features(self, x: np.ndarray | None, s: np.ndarray | None, c: np.ndarray | None,
                  h: np.ndarray | None = None) -> np.ndarray:
        n = next(len(a) for a in (x, s, c, h) if a is not None)
        out = np.empty((n, len(self.names)))
        col = 0
        if x is not None:
            d = x.shape[1]
            z = (x - self.column_mean) / self.column_scale
            out[:, :d] = z
            k = self.projection_vectors.shape[0]
            if k:
                np.square(z @ self.projection_vectors.T, out=out[:, d:d + k])
            col = d + k
        if s is not None:
            for i, edges in enumerate(self.scalar_edges):
                width = len(edges) + 1
                block = out[:, col:col + width]
                block[:] = 0.0
                values = s[:, i]
                block[np.arange(n), np.searchsorted(edges, values, side="right")] = 1.0
                block[~np.isfinite(values)] = np.nan
                col += width
        if c is not None:
            block = out[:, col:col + self.n_classes]
            block[:] = 0.0
            ok = self._valid_classes(c)
            block[np.flatnonzero(ok), c[ok].astype(np.int64)] = 1.0
            block[~ok] = np.nan
        if h is not None:
            out[:, len(self.names) - h.shape[1]:] = h
        return out

    def transform(self, continuous: Any = None, scalars: Any = None, classes: Any = None,
                  shares: Mapping[str, Any] | None = None) -> np.ndarray:
        """Live rows -> moment features ``[n, F]`` (the inputs :meth:`fit` had: ``continuous [n, D]``,
        ``scalars`` as ``{name: [n]}`` or ``[n, S]`` in :attr:`scalar_names` order, ``classes [n]``,
        ``shares`` ``{name: [n]}``). A bad value (NaN, Inf, a class id or a share out of range) makes its
        row's features from it NaN."""
        if not self.names:
            raise ValueError("sidewatch: MomentFeatures is not fitted")
        x = None
        if self.continuous_names:
            if continuous is None:
                raise ValueError("sidewatch: continuous columns are needed")
            x = np.asarray(continuous, dtype=np.float64)
            x = x[None, :] if x.ndim == 1 else x
            if x.ndim != 2 or x.shape[1] != len(self.continuous_names):
                raise ValueError(f"sidewatch: continuous must be [n, {len(self.continuous_names)}], got {x.shape}")
        elif continuous is not None:
            raise ValueError("sidewatch: these MomentFeatures were fitted without continuous columns")
        s = self._scalar_matrix(scalars)
        c = None
        if self.n_classes:
            if classes is None:
                raise ValueError("sidewatch: class ids are needed")
            c = np.asarray(classes, dtype=np.float64).reshape(-1)
        elif classes is not None:
            raise ValueError("sidewatch: these MomentFeatures were fitted without classes")
        h = self._share_matrix(shares)
        if len({len(a) for a in (x, s, c, h) if a is not None}) != 1:
            raise ValueError("sidewatch: inputs differ in rows")
        return self._features(x, s, c, h)

    def make_test(self, min_effect: Any, **kwargs: Any) -> MomentTest:
        """A :class:`MomentTest` on these features (``kwargs``: its other parameters; ``test_class``, a
        subclass to make instead, e.g. the two-sample test of agent/detect/drift/two_sample.py)."""
        test_class = kwargs.pop("test_class", MomentTest)
        kwargs.setdefault("groups", self.groups)
        kwargs.setdefault("reference_rows", self.n_reference or None)
        return test_class(self.names, self.reference_mean, self.reference_scale, min_effect, **kwargs)

    @property
    def groups(self) -> list[str]:
        """Each feature's group, for :class:`MomentTest`'s design-effect floor: ``continuous``,
        ``projections``, one per scalar (its bins), ``classes``, and ``share:<group>`` per share."""
        groups = ["continuous"] * len(self.continuous_names)
        groups += ["projections"] * (self.projection_vectors.shape[0] if self.continuous_names else 0)
        for name, edges in zip(self.scalar_names, self.scalar_edges):
            groups += [f"scalar:{name}"] * (len(edges) + 1)
        return groups + ["classes"] * self.n_classes + [f"share:{g}" for g in self.share_groups]

    # --- persistence ------------------------------------------------------------------------------

    def calibration_dict(self) -> dict[str, Any]:
        """Everything :meth:`transform` needs and the reference moments, JSON-serialisable (floats exact)."""
        if not self.names:
            raise ValueError("sidewatch: MomentFeatures is not fitted")
        return {
            "kind": CALIBRATION_KIND, "detector": self.kind, "format_version": FORMAT_VERSION,
            "projections": self.projections, "bins": self.bins, "n_classes": self.n_classes,
            "scale_floor": self.scale_floor, "seed": self.seed, "n_reference": self.n_reference,
            "continuous_names": self.continuous_names, "column_mean": self.column_mean.tolist(),
            "column_scale": self.column_scale.tolist(), "projection_vectors": self.projection_vectors.tolist(),
            "scalar_names": self.scalar_names, "scalar_edges": [e.tolist() for e in self.scalar_edges],
            "share_names": self.share_names, "share_groups": self.share_groups,
            "names": self.names, "reference_mean": self.reference_mean.tolist(),
            "reference_scale": self.reference_scale.tolist(),
        }

    @classmethod
    def from_calibration(cls, d: dict[str, Any]) -> MomentFeatures:
        """Fitted features from :meth:`calibration_dict`'s output (no refit)."""
        if d.get("kind") != CALIBRATION_KIND or d.get("detector") != cls.kind \
                or d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sidewatch: not a {cls.kind} calibration of format {FORMAT_VERSION}: "
                             f"kind={d.get('kind')!r}, detector={d.get('detector')!r}, "
                             f"format_version={d.get('format_version')!r}")
        features = cls(projections=d["projections"], bins=d["bins"], n_classes=d["n_classes"],
                       scale_floor=d["scale_floor"], seed=d["seed"])
        features.n_reference = int(d["n_reference"])
        features.continuous_names = [str(v) for v in d["continuous_names"]]
        dim = len(features.continuous_names)
        features.column_mean = np.asarray(d["column_mean"], dtype=np.float64).reshape(dim)
        features.column_scale = np.asarray(d["column_scale"], dtype=np.float64).reshape(dim)
        vectors = np.asarray(d["projection_vectors"], dtype=np.float64)
        features.projection_vectors = vectors.reshape(-1, dim) if dim else np.zeros((0, 0))
        features.scalar_names = [str(v) for v in d["scalar_names"]]
        features.scalar_edges = [np.asarray(e, dtype=np.float64).reshape(-1) for e in d["scalar_edges"]]
        features.share_names = [str(v) for v in d.get("share_names", [])]
        features.share_groups = [str(v) for v in d.get("share_groups", features.share_names)]
        if len(features.share_groups) != len(features.share_names):
            raise ValueError("sidewatch: moment_features calibration: one group per share expected")
        features.names = [str(v) for v in d["names"]]
        if features.names != features._feature_names() or len(features.scalar_edges) != len(features.scalar_names):
            raise ValueError("sidewatch: moment_features calibration: names do not match its columns, scalars and classes")
        f = len(features.names)
        features.reference_mean = np.asarray(d["reference_mean"], dtype=np.float64).reshape(f)
        features.reference_scale = np.asarray(d["reference_scale"], dtype=np.float64).reshape(f)
        if (features.column_scale <= 0).any() or (features.reference_scale <= 0).any():
            raise ValueError("sidewatch: moment_features calibration: scales must be > 0")
        return features
