"""Per-feature drift of a sliding window against a reference sample: the windowed Cramér-von Mises
test, with thresholds calibrated to an expected run time (ERT).

The detector follows river's shape: the constructor holds parameters only, :meth:`fit` takes the
reference data, ``update(x)`` takes rows ``[n, d]`` (or one row ``[d]``) and returns the
detector, and ``result`` is a :class:`~agent.detect.drift.result.DriftResult` with one entry per
feature, describing the window after the last row. A row holding NaN or Inf is skipped whole and
counted in ``n_skipped``; it never enters the window. (Binned PSI / Jensen-Shannon distances over a
window of requests, once here, are test references now: ``tests/support/reference_math.py``. The
dashboards' PSI is the fleet's, :mod:`agent.detect.drift.fleet`, and the time window's,
:mod:`agent.detect.drift.window`.)

WindowedCVM
-----------
After each row, each feature's window of the last ``W`` values is compared with the reference by
the two-sample Cramér-von Mises statistic (Anderson 1962), the one ``scipy.stats.cramervonmises_2samp``
computes. With reference size ``K``, window size ``m``, ``R_y`` the number of reference values
below window value ``y``::

    U = K * sum_{i=1..K} C_i**2 + m * sum_y R_y**2,   C_i = #{window values below the i-th reference value}
    T = U / (K m (K + m)) - (4 K m - 1) / (6 (K + m))

Why Cramér-von Mises rather than Kolmogorov-Smirnov: KS looks at the single largest gap between
the two empirical CDFs, so a sliding KS statistic moves on a coarse lattice (steps of 1/W) and
ERT thresholds fall between lattice points; CVM integrates the squared gap over the whole
distribution, takes many distinct values (fine thresholds) and has more power against the usual
covariate shift, a small move of the whole distribution. It also updates cheaply (below), where
KS needs the maximum over every point of both samples.

Fast updates. ``sum_i C_i**2 = sum_{y, y'} (K - max(R_y, R_y'))`` over ordered pairs of window
values, so ``T`` needs only ``P = sum_{y, y'} max(R_y, R_y')`` and ``S = sum_y R_y**2``, integers
kept exactly (int64). A value entering the window adds ``2 sum_y max(r, R_y) + r`` to ``P``; one
leaving subtracts ``2 sum_y max(r, R_y) - r``. Each row costs one vectorised ``searchsorted`` for
its ranks ``R`` and ``O(W)`` integer operations per feature; a batch of rows is done at once with a
sliding-window view (no Python loop over rows or features). Batched and row-by-row updates give
identical results. Measured (CPU time, W = 100, a shared 2-core machine): about 1 us per row for
d = 1 and 10 us per row for d = 49 in batches of 64, of which the O(W d) pair sums are half; one
row at a time costs 30 to 40 us, mostly numpy's per-call overhead.

Ties. A window value equal to a reference value (discrete features, or replayed reference rows)
gets a rank drawn uniformly among the positions it ties with, as if both samples had been jittered
by an infinitesimal noise. That keeps the statistic's null distribution that of continuous data,
whatever the feature (a constant feature does not alarm on itself), at a small cost in power for
discrete features. The draw is a hash of (``seed``, row number, feature), so results do not depend
on how rows are batched, and a restored detector continues exactly.

Compact reference. The reference kept is ``K = min(n_quantiles, N)`` order statistics of the
``N`` reference values, at ranks ``floor((k + 1/2) N / K)``: 500 values per feature instead of
the whole sample. Its empirical CDF is within ``1/K`` of the full reference's, far below the
window's own noise (``1/sqrt(W)``, 0.1 for W = 100), while the reference's sampling noise stays
that of all ``N`` values. The calibration simulates exactly this construction, so the thresholds
account for it.

Calibration (:meth:`WindowedCVM.fit`, never on the hot path; method in ``agent.detect.drift.ert``).
Each simulated stream bootstraps the reference rows (rows whole, so correlated features stay
correlated and the joint "any feature" alarm is calibrated with them): a bootstrap reference of
``N`` rows, reduced to ``K`` order statistics as above, and a stream of rows drawn from the
reference, with ties broken at random as in the detector (every drawn value ties with the
bootstrap reference, so the tie rule is what makes the simulated statistic behave as on fresh
continuous data). The statistic is run over each stream;
the thresholds (one per feature, at a common per-feature exceedance level) make the mean run
length, from the first update and counting the ``W - 1`` warm-up updates in which no alarm can
come, equal the ERT. Drawing the bootstrap reference afresh per stream reproduces the reference's
own sampling noise, which a fixed reference would hide (too many false alarms in service). The
ERT so calibrated is an average over reference samples; given one reference it varies less the
larger ``N`` is relative to ``W``.

p-value. Anderson's (1962) asymptotic approximation, as ``cramervonmises_2samp(method="asymptotic")``:
the statistic is standardised with its exact mean and variance and read off the limiting
distribution. With a compact reference the statistic is first divided by
``K (N + m) / (N (K + m))`` (it then behaves as with the full reference). It is the p-value of the
current window alone, not corrected for testing after every row: alarms use the calibrated
thresholds, the p-value is for display.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> cvm = WindowedCVM(window=50, ert=300, n_bootstrap=200).fit(rng.normal(size=(2000, 3)))
>>> cvm.update(rng.normal(size=(100, 3))).drift_detected
False
>>> cvm.update(rng.normal(size=(100, 3)) + [0.0, 0.0, 1.0]).result.drift.tolist()
[False, False, True]
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Self

import numpy as np

from agent.detect.drift.base import DriftDetector
from agent.detect.drift.ert import ERTCalibration, calibrate_ert
from agent.detect.drift.result import DriftResult

STATE_KIND = "sidewatch-drift-state"
CALIBRATION_KIND = "sidewatch-drift-calibration"
FORMAT_VERSION = 1

# Bounds on temporary arrays (elements) in batched updates and in the calibration simulation.
_MAX_PAIR_ELEMENTS = 4_000_000
_MAX_DRAW_ELEMENTS = 2_000_000


# --- helpers (BinnedDistance in tests/support/reference_math.py uses them too) ---------------------------


def _as_reference(reference: Any) -> np.ndarray:
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim == 1:
        ref = ref[:, None]
    if ref.ndim != 2:
        raise ValueError(f"sidewatch: reference must be [n, d], got shape {ref.shape}")
    ref = ref[np.isfinite(ref).all(axis=1)]  # a reference row with NaN/Inf is dropped, as in traffic
    if ref.shape[0] < 10 or ref.shape[1] < 1:
        raise ValueError(f"sidewatch: need at least 10 finite reference rows and 1 feature, got {ref.shape}")
    return ref


def _feature_keys(sorted_values: np.ndarray) -> np.ndarray:
    """[d, k] sorted rows -> one sorted complex array (feature, value), for one vectorised searchsorted.

    numpy orders complex numbers by real part, then imaginary part, in sort and searchsorted alike,
    and compares the floats exactly (no rounding: ties with the reference stay ties).
    """
    d, k = sorted_values.shape
    keys = np.empty((d, k), dtype=np.complex128)
    keys.real = np.arange(d)[:, None]
    keys.imag = sorted_values
    return keys.ravel()


def _searchsorted_features(keys: np.ndarray, sorted_values: np.ndarray, rows: np.ndarray, side: str) -> np.ndarray:
    """Per feature j, ``searchsorted(sorted_values[j], rows[:, j], side)``: int64 [n, d].

    Few rows of many features: one searchsorted over the complex keys (one numpy call, where a
    loop over 50 features costs 50). Many rows or one feature: a loop over features, since
    comparing floats is cheaper than comparing complex numbers, and the loop's overhead is shared.
    """
    n, d = rows.shape
    if d == 1 or n >= 32:
        out = np.empty((d, n), dtype=np.int64)
        for j in range(d):
            out[j] = np.searchsorted(sorted_values[j], rows[:, j], side=side)
        return out.T
    query = np.empty((n, d), dtype=np.complex128)
    query.real = np.arange(d)
    query.imag = rows
    return np.searchsorted(keys, query.ravel(), side=side).reshape(n, d) - np.arange(d) * sorted_values.shape[1]


def _check_rows(x: Any, d: int) -> np.ndarray:
    rows = np.asarray(x, dtype=np.float64)
    if rows.ndim == 1:
        rows = rows[None, :]
    if rows.ndim != 2 or rows.shape[1] != d:
        raise ValueError(f"sidewatch: expected rows of {d} features, got shape {np.shape(x)}")
    return rows


def _tie_uniform(seed: int, sample_numbers: np.ndarray, d: int) -> np.ndarray:
    """Uniform [0, 1) numbers from a hash (splitmix64) of (seed, row number, feature): [n, d].

    A hash rather than a random generator, so a row's draws do not depend on how rows are batched.
    """
    with np.errstate(over="ignore"):
        z = (np.asarray(sample_numbers, dtype=np.uint64)[:, None] * np.uint64(d)
             + np.arange(d, dtype=np.uint64)[None, :]
             + np.uint64(seed % 2**64) * np.uint64(0xD1342543DE82EF95))
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- the Cramér-von Mises statistic --------------------------------------------------------------


def _cvm_statistic(P: np.ndarray, S: np.ndarray, m: np.ndarray | int, K: int) -> np.ndarray:
    """T from the exact integer sums (module docstring), for windows of m >= 1 values."""
    U = K * (m * m * K - P) + m * S
    return U / (K * m * (K + m)) - (4.0 * K * m - 1.0) / (6.0 * (K + m))


def _advance(window: np.ndarray, P: np.ndarray, S: np.ndarray, count: int, codes: np.ndarray, K: int):
    """Feed ``codes`` ([..., d, n] ranks in the reference) to windows ``[..., d, W]`` holding ``count``
    codes each (oldest first, after ``W - count`` empty slots marked -1).

    Returns the statistic after each code ``[..., d, n]``, the window size after each ``[n]``, and
    the new window, P and S. Leading axes (simulated streams) advance in lockstep. Features lead
    and time is the last axis, so the sliding windows below are read contiguously.
    """
    W = window.shape[-1]
    n = codes.shape[-1]
    seq = np.concatenate([window, codes.astype(window.dtype)], axis=-1)  # [..., d, W + n], C-contiguous
    # views[..., i, :] = seq[..., i : i + W] (a sliding-window view; np.ndarray is cheaper to call
    # than sliding_window_view, which matters for one row at a time)
    step = seq.strides[-1]
    views = np.ndarray(seq.shape[:-1] + (n + 1, W), dtype=seq.dtype, buffer=seq,
                       strides=seq.strides + (step,))
    total = _sum_type(W, K)
    new = codes.astype(np.int64)
    steps = np.arange(n)
    # Arriving code i meets seq[i + 1 : i + W]: views[i + 1] less its last entry, itself (max = new).
    # Empty slots (-1) there add `new` each and are taken off again.
    add = np.maximum(seq[..., W:, None], views[..., 1:, :]).sum(axis=-1, dtype=total)
    empties = np.maximum(0, (W - count) - (steps + 1))
    dP = 2 * (add - (empties + 1) * new) + new
    dS = new * new
    # Leaving code seq[i] (a real one once the window is full) meets the whole window views[i].
    first = max(0, W - count)
    if first < n:
        old = seq[..., first:n].astype(np.int64)
        rem = np.maximum(seq[..., first:n, None], views[..., first:n, :]).sum(axis=-1, dtype=total)
        dP[..., first:] -= 2 * rem - old
        dS[..., first:] -= old * old
    P_t = P[..., None] + np.cumsum(dP, axis=-1)
    S_t = S[..., None] + np.cumsum(dS, axis=-1)
    m = np.minimum(count + steps + 1, W)
    T = _cvm_statistic(P_t, S_t, m, K)
    return T, m, seq[..., n:].copy(), P_t[..., -1], S_t[..., -1]


def _sum_type(W: int, K: int) -> type:
    """The narrowest integer type for a sum of W codes of at most K (int32 sums run faster)."""
    return np.int32 if W * (K + 1) < 2**31 else np.int64


def _window_sums(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P and S of windows given whole ([..., d, m], no empty slots), recomputed from scratch."""
    c = codes.astype(np.int64)
    P = np.maximum(c[..., :, None], c[..., None, :]).sum(axis=(-2, -1))
    return P, (c * c).sum(axis=-1)


def _cvm_limit_cdf(x: np.ndarray, nodes: int = 33) -> np.ndarray:
    """CDF of the limiting Cramér-von Mises distribution (Anderson and Darling 1952)::

        F(x) = 1 / (pi sqrt(x)) sum_j C(2j, j) / 4**j sqrt(4j + 1) exp(-z_j) K_{1/4}(z_j),  z_j = (4j + 1)**2 / (16 x)

    with K_{1/4}(z) = int_0^inf exp(-z cosh t) cosh(t / 4) dt by the trapezoidal rule (accurate to
    rounding with 33 nodes: the integrand is smooth, even and decays doubly exponentially). Terms
    are kept while exp(-2 z_j) > e^-40. numpy only.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.shape)
    ok = x > 0.0
    if not ok.any():
        return out
    xx = np.minimum(x[ok], 20.0)[:, None]  # 1 - F(20) is below 1e-40
    terms = int((math.sqrt(320.0 * xx.max()) - 1.0) / 4.0) + 1
    j = np.arange(terms)
    coef = np.concatenate([[1.0], np.cumprod((2 * j[1:] - 1) / (2 * j[1:]))])  # C(2j, j) / 4**j
    z = (4 * j + 1) ** 2 / (16.0 * xx)  # [m, terms]
    # exp(-z) K(z) = exp(-2z) int exp(-z (cosh t - 1)) cosh(t/4) dt; the integrand is below e^-40 past t_max.
    t_max = np.arccosh(1.0 + 40.0 / z)
    t = t_max[..., None] * np.linspace(0.0, 1.0, nodes)  # [m, terms, nodes]
    f = np.exp(-z[..., None] * (np.cosh(t) - 1.0)) * np.cosh(t / 4.0)
    integral = (f.sum(axis=-1) - 0.5 * (f[..., 0] + f[..., -1])) * (t_max / (nodes - 1))
    series = (coef * np.sqrt(4 * j + 1) * np.exp(-2.0 * z) * integral).sum(axis=-1)
    out[ok] = np.minimum(series / (np.pi * np.sqrt(xx[:, 0])), 1.0)
    return out


def _cvm_p_value(T: np.ndarray, m: int, K: int, N: int) -> np.ndarray:
    """Asymptotic p-value of the CVM statistic (module docstring): reference of K order statistics of N."""
    if m == 0:
        return np.full(np.shape(T), np.nan)
    scale = K * (N + m) / (N * (K + m))
    total, k = N + m, N * m
    mean = (1.0 + 1.0 / total) / 6.0
    var = (total + 1.0) * (4.0 * k * total - 3.0 * (N * N + m * m) - 2.0 * k) / (45.0 * total**2 * 4.0 * k)
    tn = 1.0 / 6.0 + (np.asarray(T) / scale - mean) / math.sqrt(45.0 * var)
    return np.clip(1.0 - _cvm_limit_cdf(tn), 0.0, 1.0)


def _simulate_cvm(reference: np.ndarray, K: int, W: int, n_streams: int, length: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Trajectories ``[n_streams, length, d]`` (float32) of the statistic on bootstrap streams without drift.

    Per stream: a bootstrap reference of N rows, reduced to its K order statistics, and ``length``
    rows drawn from the reference. The statistic only looks at order, so values are replaced by
    their dense rank among the reference's distinct values (exact integers). A drawn value equal
    to a reference value gets a rank drawn uniformly among the positions it ties with, as in the
    detector; here every draw ties, since all come from the reference, which is what makes
    continuous and discrete features alike.
    """
    N, d = reference.shape
    dense = np.empty((d, N), dtype=np.int64)
    for j in range(d):
        dense[j] = np.unique(reference[:, j], return_inverse=True)[1]
    span = int(dense.max()) + 1  # keys of one (feature, stream) block lie in [0, span)
    ranks = np.floor((np.arange(K) + 0.5) * N / K).astype(np.int64)
    code_type = np.int16 if K < np.iinfo(np.int16).max else np.int32
    out = np.empty((n_streams, length, d), dtype=np.float32)
    chunk = max(1, _MAX_DRAW_ELEMENTS // ((N + length) * d))
    for s0 in range(0, n_streams, chunk):
        c = min(chunk, n_streams - s0)
        ref_keys = dense[:, rng.integers(N, size=(c, N))]  # [d, c, N]
        ref_keys.sort(axis=-1)
        block = np.arange(d * c, dtype=np.int64).reshape(d, c, 1)
        flat = (ref_keys[:, :, ranks] + block * span).ravel()  # sorted: blocks (feature, stream) in order
        stream = (dense[:, rng.integers(N, size=(c, length))] + block * span).ravel()
        below = np.searchsorted(flat, stream, side="left")
        upto = np.searchsorted(flat, stream, side="right")
        codes = below + np.floor(rng.random(below.size) * (upto - below + 1)).astype(np.int64)
        codes = codes.reshape(d, c, length) - block * K
        codes = codes.transpose(1, 0, 2).astype(code_type)  # [c, d, length]
        window = np.full((c, d, W), -1, dtype=code_type)
        P = np.zeros((c, d), dtype=np.int64)
        S = np.zeros((c, d), dtype=np.int64)
        steps = max(1, _MAX_PAIR_ELEMENTS // (c * W * d))
        for t0 in range(0, length, steps):
            T, _, window, P, S = _advance(window, P, S, min(t0, W), codes[..., t0:t0 + steps], K)
            out[s0:s0 + c, t0:t0 + steps] = T.transpose(0, 2, 1)
    return out


# --- the detectors -------------------------------------------------------------------------------


class WindowedCVM(DriftDetector):
    """Sliding-window Cramér-von Mises drift test per feature, thresholds calibrated to an ERT.

    Parameters
    ----------
    window
        W, the number of most recent rows compared with the reference.
    ert
        Expected run time without drift: the mean number of rows until the first false alarm
        (any feature), counted from the first row, warm-up included. Must exceed ``window``.
    n_bootstrap
        Simulated streams for the calibration.
    n_quantiles
        Reference values kept per feature (order statistics; all of them for a smaller reference).
    horizon
        Simulated streams are ``horizon * ert`` rows long (censored there). Long, because each
        stream has its own bootstrap reference: streams with an unlucky one alarm early, the
        survivors alarm less and less often, and the estimate past the horizon assumes a constant
        rate. Measured (bench/drift.py, 5 references each): 2 ERTs left the run length at 1.08 ERT
        (synthetic) and 1.22 (MNIST); 5 ERTs at 1.00 and 1.19.
    seed
        Seeds the tie-breaking hash, and the calibration when ``fit`` gets no ``rng``.

    Attributes after ``fit``: ``thresholds_`` [d], ``reference_`` [d, K] (sorted), ``n_reference``,
    ``calibration_`` (an :class:`~agent.detect.drift.ert.ERTCalibration`, or None when loaded from
    a calibration dict). While streaming (:class:`~agent.detect.drift.base.DriftDetector`'s alarm
    state): ``n`` rows taken, ``n_skipped`` rows refused (NaN/Inf; saved as ``skipped``),
    ``n_detections`` rows after which some feature was in alarm (saved as ``n_alarm_steps``, also
    readable under that name), ``alarm_positions`` those rows' positions in the last update's input,
    ``first_alarm`` (the row number of the first alarm since the last reset, or None), and
    ``drift_detected``: whether some feature is in alarm after the last row taken. The detector keeps
    running after an alarm. No alarm before the window is full; the statistic and p-value of a
    partial window are reported all the same.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> cvm = WindowedCVM(window=50, ert=300, n_bootstrap=200).fit(rng.normal(size=(2000, 2)))
    >>> cvm.update(rng.normal(size=(100, 2))).drift_detected
    False
    >>> cvm.update(rng.normal(size=(100, 2)) + [0.0, 1.0]).result.drift.tolist()
    [False, True]
    >>> cvm.n, cvm.first_alarm is not None, cvm.reset().n
    (200, True, 0)
    """

    kind = "windowed_cvm"

    def __init__(self, window: int = 100, ert: float = 500.0, n_bootstrap: int = 500,
                 n_quantiles: int = 500, horizon: float = 5.0, seed: int = 0) -> None:
        self.window = int(window)
        self.ert = float(ert)
        self.n_bootstrap = int(n_bootstrap)
        self.n_quantiles = int(n_quantiles)
        self.horizon = float(horizon)
        self.seed = int(seed)
        self._check_parameters()
        self.thresholds_: np.ndarray | None = None
        self.calibration_: ERTCalibration | None = None
        super().__init__()

    def _check_parameters(self) -> None:
        if self.window < 2:
            raise ValueError(f"sidewatch: window ({self.window}) must be at least 2")
        if not self.ert > self.window:
            raise ValueError(f"sidewatch: ert ({self.ert}) must exceed window ({self.window}): "
                             f"no alarm can come before the window is full")
        if self.n_quantiles < 2:
            raise ValueError(f"sidewatch: n_quantiles ({self.n_quantiles}) must be at least 2")

    # --- calibration ----------------------------------------------------------------------------

    def fit(self, reference: Any, ert: float | None = None, window: int | None = None,
            n_bootstrap: int | None = None, rng: np.random.Generator | int | None = None) -> WindowedCVM:
        """Keep the reference ([N, d]) and calibrate the thresholds by bootstrap.

        ``ert``, ``window`` and ``n_bootstrap`` replace the constructor's when given; ``rng`` (a
        Generator or a seed) defaults to ``seed``. A calibration step, never a traffic one: for
        d = 49, W = 100, ERT = 500 and 500 streams it takes about 40 s of CPU and holds one float32
        array of 500 x 2500 x 49 statistics (245 MB).
        """
        if ert is not None:
            self.ert = float(ert)
        if window is not None:
            self.window = int(window)
        if n_bootstrap is not None:
            self.n_bootstrap = int(n_bootstrap)
        self._check_parameters()
        ref = _as_reference(reference)
        N = ref.shape[0]
        K = min(self.n_quantiles, N)
        ranks = np.floor((np.arange(K) + 0.5) * N / K).astype(np.int64)
        self._set_reference(np.sort(ref, axis=0)[ranks].T, N)
        rng = np.random.default_rng(self.seed if rng is None else rng)

        def simulate(n_streams: int, length: int, gen: np.random.Generator) -> np.ndarray:
            return _simulate_cvm(ref, K, self.window, n_streams, length, gen)

        self.calibration_ = calibrate_ert(simulate, self.ert, n_streams=self.n_bootstrap,
                                          horizon=self.horizon, warmup=self.window - 1, rng=rng)
        self.thresholds_ = np.asarray(self.calibration_.thresholds, dtype=np.float64)
        self._calibration_sha256 = self._make_fingerprint()
        self.reset()
        return self

    def _set_reference(self, quantiles: np.ndarray, n_reference: int) -> None:
        self.reference_ = np.ascontiguousarray(quantiles, dtype=np.float64)  # [d, K], rows sorted
        self.n_reference = int(n_reference)
        self.n_features, self._K = self.reference_.shape
        self._keys = _feature_keys(self.reference_)
        self._flat_reference = self.reference_.ravel()
        self._code_type = np.int16 if self._K < np.iinfo(np.int16).max else np.int32
        self._sum_type = _sum_type(self.window, self._K)

    def _make_fingerprint(self) -> str:
        return _fingerprint({"reference": self.reference_.tolist(), "thresholds": self.thresholds_.tolist(),
                             "window": self.window, "seed": self.seed, "n_reference": self.n_reference})

    def _check_fitted(self) -> None:
        if self.thresholds_ is None:
            raise RuntimeError("sidewatch: WindowedCVM is not calibrated: call fit() or from_calibration()")

    # --- streaming ------------------------------------------------------------------------------

    def reset(self) -> Self:
        """Forget the stream (window, counters, alarms); keep the calibration."""
        self._check_fitted()
        d = self.n_features
        self._window = np.full((d, self.window), -1, dtype=self._code_type)  # features x time
        self._count = 0
        self._P = np.zeros(d, dtype=np.int64)
        self._S = np.zeros(d, dtype=np.int64)
        self.first_alarm: int | None = None
        return super().reset()

    def _codes(self, rows: np.ndarray) -> np.ndarray:
        """Ranks of the rows' values in the reference (#reference values below), ties drawn uniformly."""
        K = self._K
        below = _searchsorted_features(self._keys, self.reference_, rows, "left")
        # A tie exists where the first reference value at or above equals the row's value.
        at = np.minimum(below, K - 1) + np.arange(self.n_features) * K
        tied = (below < K) & (self._flat_reference[at] == rows)
        if tied.any():
            upto = _searchsorted_features(self._keys, self.reference_, rows, "right")
            u = _tie_uniform(self.seed, self.n + 1 + np.arange(rows.shape[0]), self.n_features)
            drawn = below + np.floor(u * (upto - below + 1)).astype(np.int64)
            below = np.where(tied, drawn, below)
        return below

    def update(self, x: Any) -> Self:
        """Feed rows ``[n, d]`` (or one row ``[d]``); rows with NaN/Inf are skipped and counted."""
        self._check_fitted()
        rows = _check_rows(x, self.n_features)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            self.n_skipped += int((~finite).sum())
            rows = rows[finite]
        self.alarm_positions = []
        n = rows.shape[0]
        if n == 0:
            return self  # the window, and whether it is in alarm, stay as they were
        codes = self._codes(rows)
        if n == 1:
            alarm = self._advance_one(codes[0])
        else:
            T, m, self._window, self._P, self._S = _advance(self._window, self._P, self._S, self._count,
                                                            codes.T, self._K)
            self._count = int(m[-1])
            alarm = ((T > self.thresholds_[:, None]) & (m == self.window)).any(axis=0)
        self._drift = bool(alarm[-1])
        if alarm.any():
            steps = np.flatnonzero(alarm)
            self.n_detections += int(steps.size)
            self.alarm_positions = np.flatnonzero(finite)[steps].tolist()
            if self.first_alarm is None:
                self.first_alarm = self.n + 1 + int(steps[0])
        self.n += n
        return self

    def _advance_one(self, code: np.ndarray) -> np.ndarray:
        """One row's codes ([d]): what :func:`_advance` does, in fewer numpy calls (for row-by-row traffic)."""
        window, W, total = self._window, self.window, self._sum_type
        if self._count == W:
            old = window[:, 0].astype(np.int64)
            rem = np.maximum(window[:, :1], window).sum(axis=-1, dtype=total)  # the leaving code meets all
            window[:, :-1] = window[:, 1:]
            window[:, -1] = code
            add = np.maximum(window[:, -1:], window).sum(axis=-1, dtype=total)  # ... and itself, once: -code
            self._P += 2 * add - code - 2 * rem + old
            self._S += code * code - old * old
        else:
            window[:, :-1] = window[:, 1:]
            window[:, -1] = code
            self._count += 1
            add = np.maximum(window[:, -1:], window[:, W - self._count:]).sum(axis=-1, dtype=total)
            self._P += 2 * add - code
            self._S += code * code
        if self._count < W:
            return np.zeros(1, dtype=bool)
        return (_cvm_statistic(self._P, self._S, W, self._K) > self.thresholds_).any(keepdims=True)

    @property
    def statistic(self) -> np.ndarray:
        """The CVM statistic of the current window, per feature (NaN before any row)."""
        self._check_fitted()
        if self._count == 0:
            return np.full(self.n_features, np.nan)
        return _cvm_statistic(self._P, self._S, self._count, self._K)

    @property
    def result(self) -> DriftResult:
        """Statistic, threshold, p-value (asymptotic, for display) and drift flag per feature, now."""
        stat = self.statistic
        drift = (stat > self.thresholds_) & (self._count == self.window)
        return DriftResult(statistic=stat, threshold=self.thresholds_.copy(),
                           p_value=_cvm_p_value(stat, self._count, self._K, self.n_reference), drift=drift)

    @property
    def n_alarm_steps(self) -> int:
        """Rows after which some feature was in alarm: :attr:`n_detections`, under its saved name."""
        return self.n_detections

    def _in_alarm(self) -> bool:
        """Whether some feature is in alarm with the window as it is (what ``drift_detected`` reports)."""
        return self._count == self.window and bool((self.statistic > self.thresholds_).any())

    # --- persistence ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The stream's state, JSON-serialisable: the window's reference ranks, oldest first, and counters."""
        self._check_fitted()
        return {
            "kind": STATE_KIND, "detector": self.kind, "format_version": FORMAT_VERSION,
            "calibration_sha256": self._calibration_sha256,
            "window_codes": self._window[:, self.window - self._count:].T.tolist(),  # [m][d], oldest first
            "n": self.n, "skipped": self.n_skipped,
            "first_alarm": self.first_alarm, "n_alarm_steps": self.n_detections,
            "alarm_positions": list(self.alarm_positions),
        }

    def load_state_dict(self, state: dict[str, Any]) -> WindowedCVM:
        """Restore a :meth:`state_dict` taken under the same calibration; the stream continues exactly."""
        self._check_fitted()
        if state.get("kind") != STATE_KIND or state.get("detector") != self.kind:
            raise ValueError(f"sidewatch: not a {self.kind} state: kind={state.get('kind')!r}, "
                             f"detector={state.get('detector')!r}")
        if state.get("calibration_sha256") != self._calibration_sha256:
            raise ValueError("sidewatch: this state was taken under another calibration")
        codes = np.asarray(state["window_codes"], dtype=np.int64).reshape(-1, self.n_features)
        count = codes.shape[0]
        if count > self.window or codes.min(initial=0) < 0 or codes.max(initial=0) > self._K:
            raise ValueError("sidewatch: window_codes do not fit this detector")
        self.reset()
        self._window[:, self.window - count:] = codes.T
        self._count = count
        self._P, self._S = _window_sums(codes.T)
        self.n = int(state["n"])
        self.n_skipped = int(state["skipped"])
        self.first_alarm = None if state["first_alarm"] is None else int(state["first_alarm"])
        self.n_detections = int(state["n_alarm_steps"])
        self.alarm_positions = [int(p) for p in state.get("alarm_positions", [])]
        self._drift = self._in_alarm()
        return self

    def calibration_dict(self) -> dict[str, Any]:
        """Thresholds and the compact reference, JSON-serialisable (floats exact), for an artifact."""
        self._check_fitted()
        cal = self.calibration_
        return {
            "kind": CALIBRATION_KIND, "detector": self.kind, "format_version": FORMAT_VERSION,
            "window": self.window, "ert": self.ert, "n_bootstrap": self.n_bootstrap,
            "n_quantiles": self.n_quantiles, "horizon": self.horizon, "seed": self.seed,
            "n_reference": self.n_reference,
            "reference_quantiles": self.reference_.tolist(),
            "thresholds": self.thresholds_.tolist(),
            "simulation": None if cal is None else {
                "level": cal.level, "estimated_ert": cal.estimated_ert, "alarms": cal.alarms,
                "exposure": cal.exposure, "n_streams": cal.n_streams, "length": cal.length},
        }

    @classmethod
    def from_calibration(cls, d: dict[str, Any]) -> WindowedCVM:
        """A calibrated detector from :meth:`calibration_dict`'s output (no refit)."""
        if d.get("kind") != CALIBRATION_KIND or d.get("detector") != cls.kind:
            raise ValueError(f"sidewatch: not a {cls.kind} calibration: kind={d.get('kind')!r}, "
                             f"detector={d.get('detector')!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sidewatch: {cls.kind} calibration format_version {d.get('format_version')!r} "
                             f"is not {FORMAT_VERSION}")
        det = cls(window=d["window"], ert=d["ert"], n_bootstrap=d["n_bootstrap"],
                  n_quantiles=d["n_quantiles"], horizon=d["horizon"], seed=d["seed"])
        quantiles = np.asarray(d["reference_quantiles"], dtype=np.float64)
        thresholds = np.asarray(d["thresholds"], dtype=np.float64)
        if quantiles.ndim != 2 or thresholds.shape != (quantiles.shape[0],):
            raise ValueError("sidewatch: reference_quantiles must be [d, K] and thresholds [d]")
        if (np.diff(quantiles, axis=1) < 0).any():
            raise ValueError("sidewatch: reference_quantiles must be sorted per feature")
        det._set_reference(quantiles, d["n_reference"])
        det.thresholds_ = thresholds
        det._calibration_sha256 = det._make_fingerprint()
        det.reset()
        return det
