"""Thresholds calibrated to an expected run time (ERT): the mean number of updates, without drift,
until the first false alarm.

An online drift detector raises an alarm when its statistic exceeds a threshold. A per-update
false-positive rate is the wrong target for it: the statistic of a sliding window is strongly
correlated from one update to the next, so exceedances come in runs, and what an operator lives
with is how long the detector runs, on data that has not drifted, before its first false alarm.
Cobb et al. ("Sequential multivariate change detection with calibrated and memoryless false
detection rates", AISTATS 2022, arXiv 2108.00883) set the threshold so that this run length has a
chosen expectation, the ERT, by simulation; alibi-detect's online detectors do it the same way.

Method (what :func:`threshold_for_ert` computes)
------------------------------------------------
1. Simulate ``S`` streams without drift, each ``L`` updates long, and run the detector's statistic
   over each: an array ``T[s, t]`` (one statistic) or ``T[s, t, j]`` (``d`` features). How the
   streams are made belongs to the detector; the univariate detectors bootstrap their reference
   data (``agent.detect.drift.univariate``).
2. The first ``warmup`` updates cannot alarm (a sliding window that is not full yet); they still
   count in the run length. The run length is counted from the first update.
3. With ``d`` features an alarm is raised when ANY feature exceeds its own threshold. All features
   get thresholds at one common per-feature exceedance level ``alpha``: feature ``j``'s threshold
   is the value that its simulated statistic (pooled over streams and post-warm-up updates)
   exceeds with frequency ``alpha``. A feature whose statistic is noisier does not use up the
   alarm budget of the others, and one scalar (``alpha``) is left to search for.
4. For a given ``alpha`` each simulated stream yields the update of its first alarm, or none by
   the horizon ``L`` (censored). Streams are censored at a few ERTs, so the mean run length is
   estimated as for a constant hazard (a geometric run length after the warm-up): the hazard is
   ``alarms / exposure``, exposure being the updates at risk summed over streams (until the alarm,
   inclusive, or until the horizon), and ``ERT_hat = warmup + exposure / alarms``. Without
   censoring this is exactly the sample mean of the run lengths; censored at two ERTs, at most
   about a seventh of the streams (exp(-2)) are censored, so the constant-hazard assumption only
   bears on the tail. The estimate's relative standard error is about ``1 / sqrt(alarms)``: 5%
   with 500 streams.
5. ``ERT_hat(alpha)`` decreases as ``alpha`` grows; bisection (on ``log alpha``) finds the largest
   ``alpha`` with ``ERT_hat(alpha) >= ERT``, and the thresholds are the per-feature quantiles there.

An alarm is ``statistic > threshold`` (strict). Thresholds are set on the simulation only; the
statistic's trajectories on real traffic never feed back.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> cal = threshold_for_ert(rng.random((2000, 400)), ert=100)   # i.i.d. uniform statistic
>>> round(float(cal.thresholds), 2)                               # alarm rate 1/100 per update
0.99
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BISECTION_STEPS = 60


@dataclass(frozen=True, eq=False)
class ERTCalibration:
    """Thresholds for a target ERT, and what the simulation says about them."""

    thresholds: float | np.ndarray  # float for a [S, L] trajectory, [d] for [S, L, d]
    level: float  # the common per-feature exceedance level alpha (per post-warm-up update)
    ert: float  # the target
    estimated_ert: float  # warmup + exposure / alarms on the simulated streams, at these thresholds
    alarms: int  # simulated streams that alarmed before the horizon
    exposure: int  # post-warm-up updates at risk, summed over the simulated streams
    n_streams: int
    length: int  # the horizon L (updates per simulated stream)
    warmup: int


def run_length_estimate(first_alarm: np.ndarray, length: int, warmup: int) -> tuple[float, int, int]:
    """Mean run length from censored runs: ``(warmup + exposure / alarms, alarms, exposure)``.

    ``first_alarm[s]`` is the 1-based update of stream ``s``'s first alarm, or 0 for none by
    ``length``. The estimate is infinite without alarms.
    """
    first_alarm = np.asarray(first_alarm, dtype=np.int64)
    alarmed = first_alarm > 0
    exposure = int(np.where(alarmed, first_alarm - warmup, length - warmup).sum())
    alarms = int(alarmed.sum())
    return (warmup + exposure / alarms if alarms else math.inf), alarms, exposure


def _tail_levels(values: np.ndarray) -> np.ndarray:
    """For each value, the fraction of ``values`` at or above it (its empirical upper-tail level)."""
    flat = values.ravel()
    ordered = np.sort(flat)
    at_or_above = flat.size - np.searchsorted(ordered, flat, side="left")
    return (at_or_above / flat.size).reshape(values.shape)


def _threshold_at_level(values: np.ndarray, level: float) -> float:
    """The largest value whose upper-tail level is above ``level``.

    ``statistic > threshold`` then holds, on the simulated values, exactly where the value's
    upper-tail level is ``<= level``, even with ties (discrete statistics).
    """
    flat = np.sort(values.ravel())
    at_or_above = flat.size - np.searchsorted(flat, flat, side="left")
    keep = at_or_above / flat.size > level
    return float(flat[keep].max()) if keep.any() else -math.inf


def threshold_for_ert(trajectories: np.ndarray, ert: float, *, warmup: int = 0) -> ERTCalibration:
    """Thresholds so that the simulated streams' mean run length is ``ert`` (see the module docstring).

    ``trajectories``: the statistic without drift, ``[n_streams, length]`` or
    ``[n_streams, length, d]``; entries of the first ``warmup`` updates are ignored. float32 is
    fine (it halves the memory) and is not copied.
    """
    traj = np.asarray(trajectories)
    single = traj.ndim == 2
    if single:
        traj = traj[:, :, None]
    if traj.ndim != 3:
        raise ValueError(f"sidewatch: trajectories must be [n_streams, length(, d)], got shape {traj.shape}")
    n_streams, length, d = traj.shape
    if not 0 <= warmup < length:
        raise ValueError(f"sidewatch: warmup ({warmup}) must lie in [0, length={length})")
    if not ert > warmup + 1:
        raise ValueError(f"sidewatch: ert ({ert}) must exceed warmup + 1 ({warmup + 1}): no alarm can come sooner")
    at_risk = traj[:, warmup:, :]

    # Per (stream, update): the smallest upper-tail level over features. An alarm at level alpha
    # happens exactly where it is <= alpha; its running minimum gives each stream's first alarm.
    joint = np.full(at_risk.shape[:2], np.inf)
    for j in range(d):
        np.minimum(joint, _tail_levels(at_risk[:, :, j]), out=joint)
    running_min = np.minimum.accumulate(joint, axis=1)
    steps = running_min.shape[1]

    def estimate(level: float) -> tuple[float, int, int]:
        before = (running_min > level).sum(axis=1)  # updates at risk before the first alarm
        first = np.where(before < steps, warmup + before + 1, 0)
        return run_length_estimate(first, length, warmup)

    lo, hi = 0.5 / at_risk[:, :, 0].size, 1.0  # estimate(lo) is infinite: nothing is that rare
    if estimate(hi)[0] >= ert:
        lo = hi
    else:
        for _ in range(BISECTION_STEPS):  # invariant: estimate(lo) >= ert > estimate(hi)
            mid = math.sqrt(lo * hi)
            if estimate(mid)[0] >= ert:
                lo = mid
            else:
                hi = mid
    estimated, alarms, exposure = estimate(lo)
    thresholds = np.array([_threshold_at_level(at_risk[:, :, j], lo) for j in range(d)])
    return ERTCalibration(
        thresholds=float(thresholds[0]) if single else thresholds,
        level=float(lo), ert=float(ert), estimated_ert=float(estimated), alarms=alarms,
        exposure=exposure, n_streams=n_streams, length=length, warmup=warmup)


def calibrate_ert(
    simulate: Callable[[int, int, np.random.Generator], np.ndarray],
    ert: float,
    *,
    n_streams: int = 500,
    horizon: float = 2.0,
    warmup: int = 0,
    rng: np.random.Generator | int | None = None,
) -> ERTCalibration:
    """Simulate ``n_streams`` streams of ``ceil(horizon * ert)`` updates and calibrate on them.

    ``simulate(n_streams, length, rng)`` returns the statistic's trajectories without drift,
    ``[n_streams, length]`` or ``[n_streams, length, d]``. Memory is one such array.
    """
    if horizon <= 1:
        raise ValueError(f"sidewatch: horizon ({horizon}) must exceed 1 ERT")
    if n_streams < 10:
        raise ValueError(f"sidewatch: n_streams ({n_streams}) is too few to estimate a run length")
    rng = np.random.default_rng(rng)
    length = math.ceil(horizon * ert)
    return threshold_for_ert(simulate(n_streams, length, rng), ert, warmup=warmup)
