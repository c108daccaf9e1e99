"""Online kernel two-sample test (MMD) over a sliding window, calibrated to an expected run time.

Cobb, Van Looveren and Klaise, "Sequential Multivariate Change Detection with Calibrated and
Memoryless False Detection Rates", AISTATS 2022 (arXiv 2108.00883). The statistic is the unbiased
estimate of the squared maximum mean discrepancy (Gretton et al., JMLR 2012) between a fixed
reference set ``R`` (``N`` points) and the last ``W`` inputs ``X``, with a Gaussian kernel
``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))``::

    MMD^2 = sum_{i != j} k(r_i, r_j) / (N (N - 1))      constant, computed once at fit
          + sum_{i != j} k(x_i, x_j) / (W (W - 1))      running sum over window pairs
          - 2 sum_{i, j} k(x_i, r_j) / (W N)            running sum over window x reference

Because it compares joint distributions, it sees changes that leave every marginal alone (a
rotation, a change of correlation), which per-feature tests cannot.

Cost per input: ``N`` kernel values against the reference and ``W`` against the window. The two
running sums are adjusted when an input enters and the oldest leaves; the window's kernel matrix
and each window point's reference sum are cached, so the leaving point's share is known without
evaluating the kernel again.

Calibration (at ``fit``, never on the hot path). The threshold is set so that, with no drift, the
expected number of updates until the first false alarm, counted from the first update, equals
``ert``. Part of the reference is kept as ``R``; the rest (held out, so independent of ``R``) is a
pool from which no-drift streams are drawn without replacement, ``n_bootstrap`` of them. With the
pool's kernel values computed once, every stream's whole statistic trajectory costs sums of cached
numbers only. Thresholds, as in Cobb et al.:

* warm-up, steps ``t = 2 .. W-1`` (the window holds the ``t`` inputs seen so far; step 1 has no pair
  and never alarms): one threshold per step, the ``1 - 1/ert`` quantile of the statistic at step
  ``t`` among the simulated streams that have not alarmed yet, so the false-alarm hazard is
  ``1/ert`` at each step;
* steps ``t >= W`` (full window): one threshold, chosen so that the hazard of the surviving streams,
  estimated as alarms / steps at risk (the maximum-likelihood rate of a constant hazard with
  censored streams: a stream that never alarms within the simulated horizon counts its steps, not
  an alarm), makes the mean run length exactly ``ert``::

      ert = sum_{t=0}^{W-2} S_t + S_{W-1} / hazard       S_t: simulated survival after step t

How exact it is. On streams simulated from the pool itself the mean run length comes out within
a few percent of ``ert``. On fresh data it also depends on how well the pool stands for the real
distribution: the no-drift statistic depends on the kept ``R`` (through the witness
``E k(x, X) - mean_j k(x, r_j)``, of size ~1/sqrt(N)), and the pool estimates that dependence with
an error of relative size ~sqrt(N / n_pool). Measured (bench/drift_mmd.py, d = 2, W = 100,
N = 300, ERT = 500): over reference draws the fresh-data mean run length averaged close to the ERT
but varied by about 15 % (sd) from draw to draw with 2,000 held-out rows, about 10 % with 6,000.
More held-out rows (``n_pool``) or a smaller ``n_ref`` tighten it. A small pool also biases it
short: streams drawn from 1,700 held-out rows left the fresh-data run length at 0.80 ERT on average
(d = 20, 6 reference draws, sd 0.16 between draws), 2,700 rows at 1.16 and 5,000 at 1.07; hence
``n_pool`` 5,000 by default, and a calibration reference of a few thousand rows.

An empirical p-value of the current full-window statistic (its rank among simulated no-drift
full-window statistics) is reported too; it is a marginal p-value of one window, not of the
sequential test, and ``None`` during warm-up.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> det = OnlineMMD(ert=100, window_size=20, n_ref=100, n_bootstrap=1000, seed=1)
>>> det = det.fit(rng.normal(size=(400, 2)))
>>> drifted = rng.multivariate_normal([0, 0], [[1, 0.95], [0.95, 1]], size=200)
>>> _ = det.update(drifted)
>>> det.first_drift_at is not None
True
"""

from __future__ import annotations

import math
from typing import Any, Self

import numpy as np

from agent.detect.drift.base import DriftDetector
from agent.detect.drift.result import DriftResult

KIND = "online_mmd"
FORMAT_VERSION = 1

# Simulated streams run this many full-window steps after warm-up, so that the hazard is estimated
# over several window lengths, past the transient right after the window first fills.
HORIZON_WINDOWS = 4
# Simulated full-window statistics kept for the empirical p-value.
N_NULL_STATISTICS = 2000
# Streams simulated at once: bounds the memory of the simulation to a few MB.
SIM_CHUNK = 256


# --- the kernel ---------------------------------------------------------------------------------------


def row_norms(a: np.ndarray) -> np.ndarray:
    """``|a_i|^2`` per row."""
    return np.einsum("ij,ij->i", a, a)


def squared_distances(a: np.ndarray, b: np.ndarray, a_sq=None, b_sq=None) -> np.ndarray:
    """``|a_i - b_j|^2`` for every pair, ``[len(a), len(b)]``, via one matrix product.

    ``a_sq``/``b_sq``: the rows' squared norms, when the caller keeps them (the reference's and the
    window's are cached, so the hot path does not recompute them for every input).
    """
    a_sq = row_norms(a) if a_sq is None else a_sq
    b_sq = row_norms(b) if b_sq is None else b_sq
    d2 = a @ b.T
    d2 *= -2.0
    d2 += a_sq[:, None]
    d2 += b_sq[None, :]
    # |a|^2 + |b|^2 - 2 a.b can come out a hair below zero for near-identical points.
    return np.maximum(d2, 0.0, out=d2)


def gaussian_kernel(a: np.ndarray, b: np.ndarray, sigma: float, a_sq=None, b_sq=None) -> np.ndarray:
    """``exp(-|a_i - b_j|^2 / (2 sigma^2))`` for every pair."""
    d2 = squared_distances(a, b, a_sq, b_sq)
    d2 *= -0.5 / (sigma * sigma)
    return np.exp(d2, out=d2)


def median_bandwidth(x: np.ndarray) -> float:
    """The median heuristic: the median distance between distinct points of ``x`` (1.0 if it is 0)."""
    d2 = squared_distances(x, x)
    upper = d2[np.triu_indices(len(x), k=1)]
    sigma = float(np.sqrt(np.median(upper))) if upper.size else 0.0
    # All points equal (or a single one): any bandwidth gives the same kernel; 1.0 avoids a 0 divide.
    return sigma if sigma > 0.0 else 1.0


def _reference_term(ref: np.ndarray, sigma: float) -> float:
    """``sum_{i != j} k(r_i, r_j) / (N (N - 1))``: the constant part of the statistic."""
    k_rr = gaussian_kernel(ref, ref, sigma)
    n = len(ref)
    return float((k_rr.sum() - np.trace(k_rr)) / (n * (n - 1)))


# --- simulation and calibration (fit time only) ---------------------------------------------------


def _draw_streams(rng: np.random.Generator, n_streams: int, m_pool: int, length: int) -> np.ndarray:
    """``[n_streams, length]`` pool indices: each row a uniformly random ordered sample without replacement.

    The ``length`` smallest of ``m_pool`` random keys, in key order: cheaper than sorting all keys.
    """
    keys = rng.random((n_streams, m_pool))
    idx = np.argpartition(keys, length - 1, axis=1)[:, :length]
    return np.take_along_axis(idx, np.argsort(np.take_along_axis(keys, idx, axis=1), axis=1), axis=1)


def _simulate_null_trajectories(
    a_pool: np.ndarray,
    k_pool: np.ndarray,
    rr_mean: float,
    n_ref: int,
    window: int,
    length: int,
    n_streams: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Statistic trajectories ``[n_streams, length]`` of no-drift streams drawn from the pool.

    ``a_pool[p]`` is ``sum_j k(pool_p, r_j)`` and ``k_pool`` the pool's kernel matrix, so a stream is
    only a sequence of pool indices. Each stream draws without replacement: a bootstrap with
    replacement would put duplicates in a window, and each duplicate pair adds k = 1, biasing the
    statistic up and the thresholds with it. Column ``u`` is step ``t = u + 1``; column 0 is NaN.
    """
    m_pool = len(a_pool)
    steps = np.arange(1, length + 1)
    m = np.minimum(steps, window).astype(np.float64)  # points in the window at each step
    with np.errstate(divide="ignore", invalid="ignore"):
        pair_scale = np.where(m >= 2, 2.0 / (m * (m - 1.0)), np.nan)
    cross_scale = 2.0 / (m * n_ref)

    k_flat = np.ascontiguousarray(k_pool).ravel()
    out = np.empty((n_streams, length))
    for start in range(0, n_streams, SIM_CHUNK):
        b = min(SIM_CHUNK, n_streams - start)
        idx = _draw_streams(rng, b, m_pool, length)
        # Window x reference sums: a difference of cumulative sums over the stream.
        a_cum = np.cumsum(a_pool[idx], axis=1)
        cross = a_cum.copy()
        cross[:, window:] -= a_cum[:, :-window]
        # Window pair sums. Pairs at lag k (1 <= k < W) are the k-th diagonal of the stream's kernel
        # matrix; the window ending at u holds the lag-k pairs whose later point lies in
        # [u - W + k + 1, u], a difference of that diagonal's cumulative sums.
        # Flat indices and ndarray.take: about twice as fast as k_pool[rows, cols] for this gather,
        # which dominates the fit's time.
        row_offset = idx * m_pool
        pairs = np.zeros((b, length))
        for lag in range(1, min(window, length)):
            diag = k_flat.take(row_offset[:, :-lag] + idx[:, lag:])  # k(p_{u-lag}, p_u), u = lag..
            diag_cum = np.cumsum(diag, axis=1)
            pairs[:, lag:] += diag_cum
            if length > window:
                pairs[:, window:] -= diag_cum[:, : length - window]
        out[start : start + b] = rr_mean + pairs * pair_scale - cross * cross_scale
    return out


def _solve_constant_hazard_threshold(traj: np.ndarray, hazard: float) -> float:
    """Threshold ``c`` at which ``alarms / steps at risk`` over the trajectories ``[S, H]`` equals ``hazard``.

    A trajectory alarms at its first step above ``c``; one that never does is censored and counts all
    ``H`` steps. The estimate falls as ``c`` rises, so bisection finds it.
    """
    running_max = np.maximum.accumulate(traj, axis=1)
    horizon = traj.shape[1]

    def rate(c: float) -> float:
        below = (running_max <= c).sum(axis=1)  # steps before the first crossing
        crossed = below < horizon
        at_risk = np.where(crossed, below + 1, horizon).sum()
        return float(crossed.sum()) / float(at_risk)

    lo, hi = float(traj.min()) - 1e-12, float(traj.max())  # rate(lo) = 1, rate(hi) = 0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if rate(mid) > hazard:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            break
    return hi


def _calibrate(traj: np.ndarray, ert: float, window: int) -> dict[str, Any]:
    """Per-step warm-up thresholds and the full-window threshold from no-drift trajectories."""
    n_streams = traj.shape[0]
    hazard = 1.0 / ert
    alive = np.ones(n_streams, dtype=bool)
    survival = [1.0, 1.0]  # S_0, S_1: step 1 never alarms
    warmup: list[float] = []
    for u in range(1, window - 1):  # steps t = 2 .. W-1
        values = traj[alive, u]
        threshold = float(np.quantile(values, 1.0 - hazard))
        warmup.append(threshold)
        alive &= traj[:, u] <= threshold
        survival.append(float(alive.mean()))
        if not alive.any():
            raise ValueError("sidewatch: no simulated stream survived warm-up: raise n_bootstrap or ert")
    # survival holds S_0 .. S_{W-1}; the warm-up contributes sum_{t=0}^{W-2} S_t to the mean run length.
    s_last = survival[window - 1] if window >= 2 else 1.0
    head = sum(survival[: window - 1])
    if ert - head <= s_last:
        raise ValueError(f"sidewatch: ert={ert} is too small for window_size={window}: use ert > {head + s_last:.1f}")
    target_hazard = s_last / (ert - head)
    full = traj[alive, window - 1 :]
    threshold = _solve_constant_hazard_threshold(full, target_hazard)
    running_max = np.maximum.accumulate(full, axis=1)
    return {
        "warmup_thresholds": warmup,
        "threshold": threshold,
        "target_hazard": target_hazard,
        "simulated_alarms": int((running_max[:, -1] > threshold).sum()),
        "simulated_streams_full_window": len(full),
    }


# --- the detector ---------------------------------------------------------------------------------


class OnlineMMD(DriftDetector):
    """Sliding-window online MMD drift detector with a threshold calibrated for an expected run time.

    Parameters
    ----------
    ert
        Expected run time: mean number of updates (rows) until the first false alarm with no drift.
    window_size
        ``W``, the number of most recent inputs compared with the reference (at least 2).
    sigma
        Gaussian kernel bandwidth, or ``"median"``: ``median_scale`` times the median pairwise
        distance of the kept reference. One bandwidth serves every feature, so features should be
        on comparable scales.
    median_scale
        The factor on the median distance. Half the median by default: at the same ERT a narrower
        kernel sees a change of correlation sooner (bench/drift.py, 20 features, 10 pairs going to
        correlation 0.9: mean delay 90 updates at scale 1, 62 at 1/sqrt(2) (alibi-detect's
        convention), 48 at 1/2), while mean shifts are seen about as soon (1 sd: 40, 43, 44).
    n_ref
        Reference points kept for the statistic (``N``); each update costs ``N + W`` kernel values.
    n_bootstrap
        Simulated no-drift streams at calibration. The warm-up thresholds are ``1 - 1/ert``
        quantiles, so this should be well above ``ert`` (10x is comfortable). Fit time grows as
        ``n_bootstrap * 5 W * W`` cached-number sums (about 5 s for 5000, W = 100, on one core).
    n_pool
        At most this many held-out reference rows to simulate from (at least ``2 * window_size``).
        Their kernel matrix lives in memory during fit: ``8 * n_pool^2`` bytes (200 MB for 5000).
    seed
        Seed for the reference split and the simulation: the same seed and data give the same
        thresholds.

    ``fit(reference)`` needs at least ``n_ref + 2 * window_size`` finite rows: ``n_ref`` are kept,
    the rest (up to ``n_pool``) are held out to simulate no-drift streams.

    After ``update``: ``result`` (a :class:`DriftResult`: statistic, threshold and p-value after the
    last row; ``drift`` if any row of the call crossed its threshold), and
    :class:`~agent.detect.drift.base.DriftDetector`'s alarm state: ``drift_detected`` (the same
    ``drift``), ``n`` (rows taken since fit/reset), ``n_skipped`` (rows with NaN/Inf; saved as
    ``skipped``), ``n_detections`` (rows that crossed their threshold), ``alarm_positions`` (their
    positions in the last update's input); and ``first_drift_at`` (``n`` at the first alarm since
    fit/reset, or None). The detector keeps running after an alarm; ``reset()`` starts a new stream
    (warm-up again) with the same calibration.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = OnlineMMD(ert=100, window_size=20, n_ref=100, n_bootstrap=1000, seed=1).fit(rng.normal(size=(400, 2)))
    >>> det.update(rng.normal(size=(10, 2))).result.p_value is None     # warm-up: the window is not full yet
    True
    >>> det.update(rng.normal(loc=2.0, size=(30, 2))).drift_detected
    True
    >>> det.first_drift_at <= det.n == 40
    True
    """

    def __init__(
        self,
        ert: float = 500,
        window_size: int = 100,
        sigma: float | str = "median",
        median_scale: float = 0.5,
        n_ref: int = 300,
        n_bootstrap: int = 5000,
        n_pool: int = 5000,
        seed: int | None = 0,
    ) -> None:
        self.ert = ert
        self.window_size = window_size
        self.sigma = sigma
        self.median_scale = median_scale
        self.n_ref = n_ref
        self.n_bootstrap = n_bootstrap
        self.n_pool = n_pool
        self.seed = seed
        self._check_params()
        self._fitted = False
        super().__init__()

    def _check_params(self) -> None:
        for name in ("window_size", "n_ref", "n_bootstrap", "n_pool"):
            value = getattr(self, name)
            if isinstance(value, np.integer):  # numpy integers from a config or an array are fine
                setattr(self, name, int(value))
        if not (isinstance(self.window_size, int) and self.window_size >= 2):
            raise ValueError(f"sidewatch: window_size must be an int >= 2, got {self.window_size!r}")
        if not (isinstance(self.n_ref, int) and self.n_ref >= 2):
            raise ValueError(f"sidewatch: n_ref must be an int >= 2, got {self.n_ref!r}")
        if not (isinstance(self.n_bootstrap, int) and self.n_bootstrap >= 1):
            raise ValueError(f"sidewatch: n_bootstrap must be a positive int, got {self.n_bootstrap!r}")
        if not (isinstance(self.n_pool, int) and self.n_pool >= 2 * self.window_size):
            raise ValueError(f"sidewatch: n_pool must be an int >= 2 * window_size, got {self.n_pool!r}")
        if not (math.isfinite(float(self.ert)) and self.ert > 1):
            raise ValueError(f"sidewatch: ert must be a finite number > 1, got {self.ert!r}")
        if not (math.isfinite(float(self.median_scale)) and self.median_scale > 0):
            raise ValueError(f"sidewatch: median_scale must be a positive number, got {self.median_scale!r}")
        if isinstance(self.sigma, str):
            if self.sigma != "median":
                raise ValueError(f"sidewatch: sigma must be a positive number or 'median', got {self.sigma!r}")
        elif not (math.isfinite(float(self.sigma)) and self.sigma > 0):
            raise ValueError(f"sidewatch: sigma must be a positive number or 'median', got {self.sigma!r}")

    # -- calibration ---------------------------------------------------------------------------

    def fit(self, reference: np.ndarray) -> OnlineMMD:
        """Keep ``n_ref`` reference rows and calibrate the thresholds on the others (rows with NaN/Inf dropped)."""
        x = np.asarray(reference, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"sidewatch: reference must be 2-D [N, d], got shape {x.shape}")
        x = x[np.isfinite(x).all(axis=1)]
        w = self.window_size
        if len(x) < self.n_ref + 2 * w:
            raise ValueError(
                f"sidewatch: reference has {len(x)} finite rows; "
                f"need n_ref + 2 * window_size = {self.n_ref + 2 * w}"
            )
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(x))
        ref = x[order[: self.n_ref]]
        pool = x[order[self.n_ref : self.n_ref + self.n_pool]]
        sigma = self.median_scale * median_bandwidth(ref) if self.sigma == "median" else float(self.sigma)

        a_pool = gaussian_kernel(pool, ref, sigma).sum(axis=1)
        k_pool = gaussian_kernel(pool, pool, sigma)
        # Streams are as long as the pool allows, up to warm-up plus HORIZON_WINDOWS windows.
        length = min(len(pool), (1 + HORIZON_WINDOWS) * w)
        traj = _simulate_null_trajectories(
            a_pool, k_pool, _reference_term(ref, sigma), self.n_ref, w, length, self.n_bootstrap, rng
        )
        cal = _calibrate(traj, float(self.ert), w)
        full = traj[:, w - 1 :].ravel()
        null_stats = np.sort(rng.choice(full, size=min(N_NULL_STATISTICS, full.size), replace=False))
        self._set_calibration(ref, sigma, cal["warmup_thresholds"], cal["threshold"], null_stats)
        self.calibration_info_ = {
            "target_hazard": cal["target_hazard"],
            "simulated_alarms": cal["simulated_alarms"],
            "simulated_streams_full_window": cal["simulated_streams_full_window"],
            "simulated_steps": length,
            "pool_size": len(pool),
        }
        return self

    def _set_calibration(
        self, ref: np.ndarray, sigma: float, warmup: list[float], threshold: float, null_stats: np.ndarray
    ) -> None:
        if len(warmup) != self.window_size - 2:
            raise ValueError(f"sidewatch: expected {self.window_size - 2} warm-up thresholds, got {len(warmup)}")
        self.reference_ = np.array(ref, dtype=np.float64)
        self._reference_sq = row_norms(self.reference_)
        self.sigma_ = float(sigma)
        # Recomputed, not stored: it follows from the reference and the bandwidth.
        self._rr_mean = _reference_term(self.reference_, self.sigma_)
        self.n_features_ = self.reference_.shape[1]
        # warmup_thresholds_[t - 1] is the threshold at step t < W; step 1 has no window pair: +inf.
        self.warmup_thresholds_ = np.array([math.inf] + list(warmup), dtype=np.float64)
        self.threshold_ = float(threshold)
        self.null_statistics_ = np.sort(np.asarray(null_stats, dtype=np.float64))
        self.calibration_info_: dict[str, Any] | None = None  # what the simulation said; fit sets it
        self._fitted = True
        self.reset()

    def calibration_dict(self) -> dict[str, Any]:
        """The calibration as JSON-serialisable data, for an artifact; ``from_calibration`` reads it back."""
        self._require_fitted()
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "ert": float(self.ert),
            "window_size": self.window_size,
            "sigma": self.sigma if isinstance(self.sigma, str) else float(self.sigma),
            "median_scale": float(self.median_scale),
            "sigma_used": self.sigma_,
            "n_ref": self.n_ref,
            "n_bootstrap": self.n_bootstrap,
            "n_pool": self.n_pool,
            "seed": self.seed,
            "reference": self.reference_.tolist(),
            "warmup_thresholds": self.warmup_thresholds_[1:].tolist(),
            "threshold": self.threshold_,
            "null_statistics": self.null_statistics_.tolist(),
        }

    @classmethod
    def from_calibration(cls, data: dict[str, Any]) -> OnlineMMD:
        """A fitted detector, at the start of a stream, from ``calibration_dict()`` output."""
        if data.get("kind") != KIND or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"not an {KIND} calibration of format {FORMAT_VERSION}: "
                f"kind={data.get('kind')!r}, format_version={data.get('format_version')!r}"
            )
        reference = np.asarray(data["reference"], dtype=np.float64)
        det = cls(
            ert=data["ert"],
            window_size=int(data["window_size"]),
            sigma=data["sigma"],
            median_scale=float(data.get("median_scale", 1.0)),
            n_ref=len(reference),
            n_bootstrap=int(data["n_bootstrap"]),
            n_pool=int(data["n_pool"]),
            seed=data["seed"],
        )
        det._set_calibration(
            reference,
            float(data["sigma_used"]),
            [float(v) for v in data["warmup_thresholds"]],
            float(data["threshold"]),
            np.asarray(data["null_statistics"], dtype=np.float64),
        )
        return det

    # -- the stream ----------------------------------------------------------------------------

    def reset(self) -> Self:
        """Start a new stream: empty window, counters at zero. The calibration stays."""
        self._require_fitted()
        w, d = self.window_size, self.n_features_
        self.first_drift_at: int | None = None  # n at the first alarm since fit/reset
        self._window = np.zeros((w, d))  # ring buffer: the row seen at step t sits in slot (t-1) % W
        self._window_sq = np.zeros(w)  # squared norms of the window rows
        self._k_ww = np.zeros((w, w))  # kernel between window slots; 0 on the diagonal and empty slots
        self._k_wr = np.zeros(w)  # sum_j k(slot, r_j) per slot
        self._sum_pairs = 0.0  # sum over unordered window pairs of k
        self._sum_cross = 0.0  # sum over window x reference of k
        return super().reset()

    @property
    def result(self) -> DriftResult:
        """Statistic, threshold and p-value after the last row; ``drift``: whether any row of the last
        ``update`` crossed its threshold. Before any row: NaN, an infinite threshold, no p-value."""
        p_value = None
        if self.n >= self.window_size and self.null_statistics_.size:
            stat = self._last_statistic
            exceed = self.null_statistics_.size - np.searchsorted(self.null_statistics_, stat, side="left")
            p_value = float((1 + exceed) / (1 + self.null_statistics_.size))
        return DriftResult(statistic=float(self._last_statistic), threshold=self.threshold_at(max(self.n, 1)),
                           p_value=p_value, drift=self._drift)

    def threshold_at(self, step: int) -> float:
        """The threshold at step ``step`` (1-based count of rows since fit/reset)."""
        return float(self.warmup_thresholds_[step - 1]) if step < self.window_size else self.threshold_

    def statistic(self) -> float:
        """MMD^2 between the current window and the reference, from the running sums (NaN below 2 rows)."""
        m = min(self.n, self.window_size)
        if m < 2:
            return math.nan
        return (
            self._rr_mean
            + 2.0 * self._sum_pairs / (m * (m - 1))
            - 2.0 * self._sum_cross / (m * len(self.reference_))
        )

    def update(self, x: np.ndarray) -> Self:
        """Feed rows ``[n, d]`` (or one row ``[d]``) in order; rows with NaN/Inf are skipped and counted.

        ``result`` then holds the statistic, threshold and p-value after the last row, and ``drift``:
        whether any row of this call crossed its threshold (an alarm inside a batch is not lost).
        """
        self._require_fitted()
        rows = np.asarray(x, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows[None, :]
        if rows.ndim != 2 or rows.shape[1] != self.n_features_:
            raise ValueError(f"sidewatch: expected rows of {self.n_features_} features, got shape {np.shape(x)}")
        finite = np.isfinite(rows).all(axis=1)
        self.n_skipped += int(rows.shape[0] - finite.sum())
        rows = rows[finite]
        alarms: list[int] = []  # rows (of the finite ones) that crossed their threshold
        # Chunks of at most W rows: within a chunk each ring slot is overwritten at most once, so the
        # chunk's kernel values against the window can all be computed before the loop.
        for start in range(0, len(rows), self.window_size):
            alarms += [start + i for i in self._update_chunk(rows[start : start + self.window_size])]
        self.n_detections += len(alarms)
        self.alarm_positions = np.flatnonzero(finite)[alarms].tolist()
        self._drift = bool(alarms)
        self._last_statistic = float(self.statistic())
        return self

    def _update_chunk(self, rows: np.ndarray) -> list[int]:
        """Feed at most W rows; returns the indices of those that crossed their threshold."""
        w = self.window_size
        count = len(rows)
        # All kernel values this chunk needs, in three matrix products: N + W per row.
        sigma, rows_sq = self.sigma_, row_norms(rows)
        k_ref = gaussian_kernel(rows, self.reference_, sigma, rows_sq, self._reference_sq).sum(axis=1)
        k_old = gaussian_kernel(rows, self._window, sigma, rows_sq, self._window_sq)  # the window as it was
        k_new = gaussian_kernel(rows, rows, sigma, rows_sq, rows_sq) if count > 1 else None  # this chunk
        slots = (self.n + np.arange(count)) % w
        alarms = []
        for i in range(count):
            slot = int(slots[i])
            filled = min(self.n, w)
            k_row = k_old[i]  # a row of a fresh array: free to overwrite
            if i:
                k_row[slots[:i]] = k_new[i, :i]  # slots already overwritten by earlier rows of the chunk
            if filled < w:
                k_row[filled:] = 0.0  # empty slots (the new row goes into slot `filled`)
            else:
                k_row[slot] = 0.0  # the leaving row's slot: no pair with it
                # The oldest row leaves: take out its pairs and its reference sum, both cached.
                self._sum_pairs -= self._k_ww[slot].sum()
                self._sum_cross -= self._k_wr[slot]
            self._k_ww[slot, :] = k_row
            self._k_ww[:, slot] = k_row
            self._sum_pairs += k_row.sum()
            self._k_wr[slot] = k_ref[i]
            self._sum_cross += k_ref[i]
            self._window[slot] = rows[i]
            self._window_sq[slot] = rows_sq[i]
            self.n += 1
            # Running sums drift only by rounding (relative ~1e-16 per update, a random walk), far
            # below the statistic's resolution even after 1e9 updates, so they are never resynced.
            if self.statistic() > self.threshold_at(self.n):
                alarms.append(i)
                if self.first_drift_at is None:
                    self.first_drift_at = self.n
        return alarms

    def window(self) -> np.ndarray:
        """The rows now in the window, oldest first (a copy)."""
        w = self.window_size
        if self.n < w:
            return self._window[: self.n].copy()
        start = self.n % w
        return np.concatenate([self._window[start:], self._window[:start]])

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Calibration and stream state as JSON-serialisable data; ``load_state_dict`` resumes exactly.

        Floats go through JSON as Python floats, whose repr round-trips bit for bit, so a restored
        detector's running sums, cached kernel values and thresholds equal the originals.
        """
        self._require_fitted()
        r = self.result
        return {
            "calibration": self.calibration_dict(),
            "stream": {
                "n": self.n,
                "skipped": self.n_skipped,
                "first_drift_at": self.first_drift_at,
                "n_detections": self.n_detections,
                "alarm_positions": list(self.alarm_positions),
                "window": self._window.tolist(),
                "window_sq": self._window_sq.tolist(),
                "k_ww": self._k_ww.tolist(),
                "k_wr": self._k_wr.tolist(),
                "sum_pairs": self._sum_pairs,
                "sum_cross": self._sum_cross,
                # NaN and Inf are not JSON: None stands for them (statistic NaN, threshold Inf).
                "result": {
                    "statistic": r.statistic if math.isfinite(r.statistic) else None,
                    "threshold": r.threshold if math.isfinite(r.threshold) else None,
                    "p_value": r.p_value,
                    "drift": bool(r.drift),
                },
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> Self:
        """Replace parameters, calibration and stream state with ``state_dict()`` output; returns self."""
        restored = OnlineMMD.from_calibration(state["calibration"])
        self.__dict__.update(restored.__dict__)
        s = state["stream"]
        w, d = self.window_size, self.n_features_
        self.n = int(s["n"])
        self.n_skipped = int(s["skipped"])
        self.first_drift_at = None if s["first_drift_at"] is None else int(s["first_drift_at"])
        # Saved since the alarm state moved to DriftDetector; an older state has neither.
        self.n_detections = int(s.get("n_detections", 0))
        self.alarm_positions = [int(p) for p in s.get("alarm_positions", [])]
        self._window = np.asarray(s["window"], dtype=np.float64).reshape(w, d)
        self._window_sq = np.asarray(s["window_sq"], dtype=np.float64).reshape(w)
        self._k_ww = np.asarray(s["k_ww"], dtype=np.float64).reshape(w, w)
        self._k_wr = np.asarray(s["k_wr"], dtype=np.float64).reshape(w)
        self._sum_pairs = float(s["sum_pairs"])
        self._sum_cross = float(s["sum_cross"])
        # The saved threshold and p-value follow from n and the statistic; result recomputes them.
        r = s["result"]
        self._last_statistic = math.nan if r["statistic"] is None else float(r["statistic"])
        self._drift = bool(r["drift"])
        return self

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("sidewatch: OnlineMMD is not fitted: call fit(reference) or from_calibration() first")

    def __repr__(self) -> str:
        return (
            f"OnlineMMD(ert={self.ert}, window_size={self.window_size}, sigma={self.sigma!r}, "
            f"median_scale={self.median_scale}, "
            f"n_ref={self.n_ref}, n_bootstrap={self.n_bootstrap}, n_pool={self.n_pool}, seed={self.seed})"
        )
