"""Change detection on scalar streams (the adversarial score, the top-1 confidence), with river's
``drift.PageHinkley`` and ``drift.ADWIN`` doing the detection, behind the interface of the other
drift detectors: ``update(values)`` takes an array and returns the detector, ``drift_detected``,
``n``, ``n_skipped`` (NaN/Inf values are skipped and counted), ``result`` (a DriftResult),
``reset()``, ``state_dict()`` / ``load_state_dict()``, ``calibration_dict()`` /
``from_calibration()``.

river's detectors work one value at a time and reset themselves at the value after a detection;
the wrappers keep that, so with no change the run lengths between alarms are independent.
``drift_detected`` says whether the last :meth:`update` had an alarm, ``alarm_positions`` where in
its input, and ``result`` describes the last alarm of that update, or else the state after its
last value.

:class:`PageHinkleyChange`. river's default threshold (50) is not tied to a false-alarm rate, so
the threshold is calibrated for an expected run time (ERT, the mean number of values between false
alarms with no change). Values are first replaced by their rank in the reference, the reference's
empirical CDF at the value (``transform="rank"``, the default; mid-rank for ties), standardised as
a uniform variable: ``(F(x) - 1/2) * sqrt(12)``. Why: the calibration can only bootstrap the
reference, and for a heavy-tailed stream (the top-1 confidence, the adversarial score) the
alarms come from the few extreme values a reference of a few thousand happens to hold, so the
run length varied from 0.5 to 1.7 ERT between random 3,000-image references of the bundled model's
confidence. Ranks have no tail: a shift of the distribution still moves their mean, and the run
length no longer hangs on the reference's extremes. ``transform="standardise"`` keeps the values,
standardised with the reference mean and standard deviation. Either way ``delta`` and
``threshold`` are in standard deviations of what PH sees (PH subtracts its own running mean, so
only the scale matters). The calibration runs ``n_streams`` bootstrap streams
from the standardised reference through the Page-Hinkley recursion, vectorised over the streams in
numpy with the same floating-point operations, in the same order, as river's ``PageHinkley.update``
(a test checks the paths agree with river's), records the statistic ``max(test_increase,
test_decrease)`` (for ``mode="both"``), and :func:`agent.detect.drift.ert.calibrate_ert` picks the
threshold whose mean first-alarm time on them is the ERT (run lengths counted from the first value;
no alarm can come before ``min_instances``), with streams of 5 ERTs. Bootstrap streams are
i.i.d.: a stream whose values are autocorrelated will alarm more often than the ERT says.
Measured on fresh i.i.d. streams (``bench/drift_report.py``, ERT 500) the run length came out
within about 10% of the ERT, a few percent short of it, with standardised values and streams of
2 ERTs: the reference sample's tail is not the truth's, and ert.py extrapolates censored streams
as if the alarm rate were constant while Page-Hinkley's rises as its running sums settle; ranks
and streams of 5 ERTs address both.

:class:`AdwinChange`. ADWIN's ``delta`` is a confidence parameter of its cut test and is left as
a parameter; :meth:`AdwinChange.fit` measures the run length it gives on bootstrap streams from the
reference, for the record. ADWIN is fed the raw values, not standardised ones: its bound assumes
values in [0, 1] (the top-1 confidence is; the feature-squeezing score is in [0, 2]). With river's
default ``delta=0.002`` false alarms on i.i.d. data are rare: ``bench/drift_report.py`` saw none
in 10^6 values of a gamma-distributed score and a mean run length of about 13,000 on a
heavy-tailed (lognormal) one. ADWIN checks for a cut every ``clock`` (32) values, so it is also
slow: about 120 values to see a 2-standard-deviation step in a score of scale 0.1, against about 7
for Page-Hinkley at ERT 500 and 23 at ERT 10,000.

State. PageHinkley's state is a handful of floats, saved by name as JSON. ADWIN's window lives in
river's Rust extension; its own pickled state (bytes from ``__getstate__``, a serde encoding of
the bucket lists) is saved base64-encoded in the JSON, with the river version: it is loaded only
under the same river version, since the encoding is river's private business. Nothing is
unpickled, so loading a state cannot run code.
"""

from __future__ import annotations

import base64
from typing import Any, Self

import numpy as np
import river
from river import drift, stats

from agent.detect.drift.base import DriftDetector, json_float
from agent.detect.drift.ert import calibrate_ert
from agent.detect.drift.prediction import _one_dimensional
from agent.detect.drift.result import DriftResult

CALIBRATION_VERSION = 2
RANK_REFERENCE_POINTS = 2000


def _finite(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Finite values as float64 and their positions in the input."""
    arr = _one_dimensional(values, np.float64)
    positions = np.flatnonzero(np.isfinite(arr))
    return arr[positions], positions


class PageHinkleyPaths:
    """The Page-Hinkley recursion of river's ``drift.PageHinkley.update`` (river 0.26), vectorised
    over many independent streams, without detection or reset: what calibration simulates.

    ``step(x)`` takes one value per stream and returns the statistic that river compares with its
    threshold (NaN before ``min_instances`` values).
    """

    def __init__(self, n_paths: int, delta: float, alpha: float, min_instances: int, mode: str):
        self.delta, self.alpha, self.min_instances, self.mode = delta, alpha, min_instances, mode
        self.n = 0.0
        self.mean = np.zeros(n_paths)
        self.sum_increase = np.zeros(n_paths)
        self.sum_decrease = np.zeros(n_paths)
        self.min_increase = np.full(n_paths, np.inf)
        self.max_decrease = np.full(n_paths, -1.0)  # river starts it at -1

    def step(self, x: np.ndarray) -> np.ndarray:
        # river's stats.Mean.update with w = 1.0: n += w; mean += (w / n) * (x - mean)
        self.n += 1.0
        self.mean += (1.0 / self.n) * (x - self.mean)
        dev = x - self.mean
        self.sum_increase = self.alpha * self.sum_increase + dev - self.delta
        self.sum_decrease = self.alpha * self.sum_decrease + dev + self.delta
        np.minimum(self.min_increase, self.sum_increase, out=self.min_increase)
        np.maximum(self.max_decrease, self.sum_decrease, out=self.max_decrease)
        if self.n < self.min_instances:
            return np.full(self.mean.shape, np.nan)
        return _ph_statistic(
            self.sum_increase - self.min_increase, self.max_decrease - self.sum_decrease, self.mode
        )


def _ph_statistic(test_increase, test_decrease, mode: str):
    """What river compares with the threshold: an alarm is ``statistic > threshold``."""
    if mode == "up":
        return test_increase
    if mode == "down":
        return test_decrease
    return np.maximum(test_increase, test_decrease)


class PageHinkleyChange(DriftDetector):
    """Page-Hinkley change detection on a scalar stream, threshold calibrated for an ERT.

    Parameters
    ----------
    ert
        Expected run time: the mean number of values between false alarms with no change.
    delta
        river's ``delta``, the drift allowed per value before it counts towards a change, in
        standard deviations of the transformed values: about half the smallest shift worth detecting.
    transform
        ``"rank"``: values become their reference CDF, standardised (see the module docstring);
        ``"standardise"``: values minus the reference mean, over its standard deviation.
    alpha, min_instances, mode
        As in river's ``drift.PageHinkley``.
    threshold
        Use this threshold (in standard deviations of the transformed values) instead of calibrating one.
    n_streams, seed
        Bootstrap streams for the calibration and their seed.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = PageHinkleyChange(ert=300).fit(rng.normal(0.1, 0.05, 5000))
    >>> _ = det.update(rng.normal(0.1, 0.05, 100))
    >>> _ = det.update(rng.normal(0.3, 0.05, 100))
    >>> det.drift_detected
    True
    """

    kind = "page_hinkley"

    def __init__(
        self,
        ert: float = 500.0,
        delta: float = 0.1,
        alpha: float = 1 - 0.0001,
        min_instances: int = 30,
        mode: str = "both",
        threshold: float | None = None,
        n_streams: int = 1000,
        seed: int = 0,
        transform: str = "rank",
    ):
        if mode not in ("up", "down", "both"):
            raise ValueError(f"sidewatch: mode must be 'up', 'down' or 'both', not {mode!r}")
        if transform not in ("rank", "standardise"):
            raise ValueError(f"sidewatch: transform must be 'rank' or 'standardise', not {transform!r}")
        if threshold is None and not ert > min_instances:
            raise ValueError("sidewatch: ert must exceed min_instances (no alarm comes earlier)")
        self.ert = float(ert)
        self.delta = float(delta)
        self.alpha = float(alpha)
        self.min_instances = int(min_instances)
        self.mode = mode
        self.threshold = threshold
        self.n_streams = int(n_streams)
        self.seed = int(seed)
        self.transform = transform
        self.mean_: float | None = None
        self.std_: float | None = None
        self.reference_: np.ndarray | None = None  # sorted reference values (transform "rank")
        self.threshold_: float | None = None
        self.simulation_: dict[str, float] = {}
        self._ph: drift.PageHinkley | None = None
        self.reset()

    def _check_fitted(self) -> None:
        if self.threshold_ is None:
            raise RuntimeError("sidewatch: PageHinkleyChange is not fitted; call fit() first")

    def _new_river(self) -> drift.PageHinkley:
        return drift.PageHinkley(
            min_instances=self.min_instances,
            delta=self.delta,
            threshold=self.threshold_,
            alpha=self.alpha,
            mode=self.mode,
        )

    def fit(self, reference: Any) -> PageHinkleyChange:
        """Standardisation from the reference values, then the threshold (by bootstrap simulation
        unless one was given). Non-finite reference values are dropped."""
        ref, _ = _finite(reference)
        if ref.size < 2:
            raise ValueError("sidewatch: need at least 2 finite reference values")
        std = float(ref.std())
        if not std > 0:
            raise ValueError("sidewatch: the reference values are constant; cannot standardise")
        self.mean_, self.std_ = float(ref.mean()), std
        if self.transform == "rank":
            # At most RANK_REFERENCE_POINTS evenly spaced order statistics: the CDF within 1/2000,
            # far below a window's noise, and a small artifact.
            ordered = np.sort(ref)
            k = min(RANK_REFERENCE_POINTS, ordered.size)
            self.reference_ = ordered[np.floor((np.arange(k) + 0.5) * ordered.size / k).astype(np.int64)]
        if self.threshold is not None:
            self.threshold_, self.simulation_ = float(self.threshold), {}
        else:
            self.threshold_, self.simulation_ = self._simulate_threshold(self._transformed(ref))
        self.reset()
        return self

    def _transformed(self, values: np.ndarray) -> np.ndarray:
        """What PH sees: standardised reference ranks (mid-rank for ties), or standardised values."""
        if self.transform == "standardise":
            return (values - self.mean_) / self.std_
        ref = self.reference_
        below = np.searchsorted(ref, values, side="left")
        at_or_below = np.searchsorted(ref, values, side="right")
        cdf = (below + at_or_below) / (2.0 * ref.size)
        return (cdf - 0.5) * np.sqrt(12.0)

    def _simulate_threshold(self, z_ref: np.ndarray) -> tuple[float, dict[str, float]]:
        def simulate(n_paths: int, length: int, rng: np.random.Generator) -> np.ndarray:
            # Bootstrap streams from the standardised reference through river's recursion.
            paths = np.zeros((n_paths, length), dtype=np.float32)
            ph = PageHinkleyPaths(n_paths, self.delta, self.alpha, self.min_instances, self.mode)
            chunk = 512
            for start in range(0, length, chunk):
                steps = min(chunk, length - start)
                draws = z_ref[rng.integers(0, z_ref.size, size=(steps, n_paths))]
                for i in range(steps):
                    stat = ph.step(draws[i])
                    if start + i >= self.min_instances - 1:
                        paths[:, start + i] = stat
            return paths

        # Streams of 5 ERTs: the estimate extrapolates past the horizon as if the alarm rate were
        # constant, and PH's is not (it rises as the running sums settle).
        cal = calibrate_ert(
            simulate, self.ert, n_streams=self.n_streams, horizon=5.0, warmup=self.min_instances - 1, rng=self.seed
        )
        return float(cal.thresholds), {
            "estimated_ert": cal.estimated_ert,
            "alarms": cal.alarms,
            "n_streams": cal.n_streams,
            "length": cal.length,
        }

    # --- streaming ---------------------------------------------------------------------------

    def reset(self) -> Self:
        """Forget the traffic seen; keep the standardisation and the threshold."""
        self._ph = self._new_river() if self.threshold_ is not None else None
        return super().reset()

    def _river_statistic(self) -> float:
        ph = self._ph
        if ph._x_mean.n < self.min_instances:
            return float("nan")
        return float(
            _ph_statistic(ph._sum_increase - ph._min_increase, ph._max_decrease - ph._sum_decrease, self.mode)
        )

    def update(self, values: Any) -> PageHinkleyChange:
        """Feed values in order; returns the detector."""
        self._check_fitted()
        vals, positions = _finite(values)
        self.n_skipped += int(np.size(values)) - vals.size
        self.n += vals.size
        self.alarm_positions = []
        ph = self._ph
        z = self._transformed(vals).tolist()
        for i, x in enumerate(z):
            ph.update(x)
            if ph.drift_detected:
                self.alarm_positions.append(int(positions[i]))
                self._last_statistic = self._river_statistic()
                self.n_detections += 1
        if vals.size and not self.alarm_positions:
            self._last_statistic = self._river_statistic()
        self._drift = bool(self.alarm_positions)
        return self

    @property
    def result(self) -> DriftResult:
        """Statistic and threshold in reference standard deviations; PH has no p-value (NaN)."""
        self._check_fitted()
        return DriftResult(
            statistic=self._last_statistic,
            threshold=float(self.threshold_),
            p_value=float("nan"),
            drift=self._drift,
        )

    # --- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The streaming state (river's PageHinkley fields by name), JSON-serialisable."""
        self._check_fitted()
        ph = self._ph
        return {
            "kind": self.kind,
            **self._alarm_state(),
            "page_hinkley": {
                "mean_n": float(ph._x_mean.n),
                "mean": float(ph._x_mean._mean),
                "sum_increase": float(ph._sum_increase),
                "sum_decrease": float(ph._sum_decrease),
                "min_increase": json_float(ph._min_increase),  # starts at +inf: null
                "max_decrease": float(ph._max_decrease),
                "drift_detected": bool(ph.drift_detected),  # river resets at the next value
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> PageHinkleyChange:
        self._check_fitted()
        if state.get("kind") != self.kind:
            raise ValueError(f"sidewatch: state for {state.get('kind')!r} does not fit {self.kind!r}")
        s = state["page_hinkley"]
        ph = self._new_river()
        ph._x_mean = stats.Mean()
        ph._x_mean.n = float(s["mean_n"])
        ph._x_mean._mean = float(s["mean"])
        ph._sum_increase = float(s["sum_increase"])
        ph._sum_decrease = float(s["sum_decrease"])
        ph._min_increase = float("inf") if s["min_increase"] is None else float(s["min_increase"])
        ph._max_decrease = float(s["max_decrease"])
        ph._drift_detected = bool(s["drift_detected"])
        self._ph = ph
        self._load_alarm_state(state)
        return self

    def calibration_dict(self) -> dict[str, Any]:
        """Parameters, standardisation and threshold, JSON-serialisable."""
        self._check_fitted()
        return {
            "kind": self.kind,
            "calibration_version": CALIBRATION_VERSION,
            "ert": self.ert,
            "delta": self.delta,
            "alpha": self.alpha,
            "min_instances": self.min_instances,
            "mode": self.mode,
            "threshold": float(self.threshold_),
            "threshold_given": self.threshold is not None,
            "n_streams": self.n_streams,
            "seed": self.seed,
            "mean": self.mean_,
            "std": self.std_,
            "transform": self.transform,
            "reference": None if self.reference_ is None else self.reference_.tolist(),
            "units": "standard deviations of the transformed values",
            "simulation": dict(self.simulation_),
        }

    @classmethod
    def from_calibration(cls, d: dict[str, Any]) -> PageHinkleyChange:
        if d.get("kind") != cls.kind or d.get("calibration_version") != CALIBRATION_VERSION:
            raise ValueError(f"sidewatch: not a {cls.kind} calibration (version {CALIBRATION_VERSION})")
        det = cls(
            ert=d["ert"], delta=d["delta"], alpha=d["alpha"], min_instances=d["min_instances"],
            mode=d["mode"], threshold=d["threshold"] if d.get("threshold_given") else None,
            n_streams=d["n_streams"], seed=d["seed"], transform=d["transform"],
        )
        det.mean_, det.std_ = float(d["mean"]), float(d["std"])
        if d.get("reference") is not None:
            det.reference_ = np.asarray(d["reference"], dtype=np.float64)
        det.threshold_ = float(d["threshold"])
        det.simulation_ = dict(d.get("simulation", {}))
        det.reset()
        return det


class AdwinChange(DriftDetector):
    """ADWIN change detection (river's ``drift.ADWIN``) on a scalar stream.

    Parameters are river's. ``fit(reference)`` is optional: it measures the run length with no
    change on ``n_streams`` bootstrap streams of up to ``horizon`` values from the reference
    (``run_length_``); detection works without it.

    ``result.statistic`` is ADWIN's current window mean (its estimate of the stream's level);
    ADWIN's cut threshold adapts to the window, so ``result.threshold`` and ``result.p_value`` are
    NaN.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = AdwinChange()
    >>> _ = det.update(rng.normal(0.1, 0.05, 1000))
    >>> _ = det.update(rng.normal(0.3, 0.05, 200))
    >>> det.drift_detected
    True
    """

    kind = "adwin"

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 32,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
        n_streams: int = 100,
        horizon: int = 20000,
        seed: int = 0,
    ):
        self.delta = float(delta)
        self.clock = int(clock)
        self.max_buckets = int(max_buckets)
        self.min_window_length = int(min_window_length)
        self.grace_period = int(grace_period)
        self.n_streams = int(n_streams)
        self.horizon = int(horizon)
        self.seed = int(seed)
        self.run_length_: dict[str, float] = {}
        self.reset()

    def _new_river(self) -> drift.ADWIN:
        return drift.ADWIN(
            delta=self.delta,
            clock=self.clock,
            max_buckets=self.max_buckets,
            min_window_length=self.min_window_length,
            grace_period=self.grace_period,
        )

    def fit(self, reference: Any) -> AdwinChange:
        """Measure the no-change run length on bootstrap streams from the reference."""
        ref, _ = _finite(reference)
        if ref.size < 2:
            raise ValueError("sidewatch: need at least 2 finite reference values")
        rng = np.random.default_rng(self.seed)
        lengths = np.full(self.n_streams, self.horizon, dtype=np.int64)
        for s in range(self.n_streams):
            adwin = self._new_river()
            for t, x in enumerate(ref[rng.integers(0, ref.size, size=self.horizon)].tolist()):
                adwin.update(x)
                if adwin.drift_detected:
                    lengths[s] = t + 1
                    break
        censored = lengths >= self.horizon
        self.run_length_ = {
            # With censored streams this mean is a lower bound on the true mean run length.
            "mean_run_length_lower_bound": float(lengths.mean()),
            "censored_fraction": float(censored.mean()),
            "median_run_length": float(np.median(lengths)),
            "n_streams": self.n_streams,
            "horizon": self.horizon,
        }
        self.reset()
        return self

    # --- streaming ---------------------------------------------------------------------------

    def reset(self) -> Self:
        """Forget the traffic seen: a new ADWIN window."""
        self._adwin = self._new_river()
        return super().reset()

    def update(self, values: Any) -> AdwinChange:
        """Feed values in order; returns the detector."""
        vals, positions = _finite(values)
        self.n_skipped += int(np.size(values)) - vals.size
        self.n += vals.size
        self.alarm_positions = []
        adwin = self._adwin
        for i, x in enumerate(vals.tolist()):
            adwin.update(x)
            if adwin.drift_detected:
                self.alarm_positions.append(int(positions[i]))
                self._last_statistic = float(adwin.estimation)
                self.n_detections += 1
        if vals.size and not self.alarm_positions:
            self._last_statistic = float(adwin.estimation)
        self._drift = bool(self.alarm_positions)
        return self

    @property
    def width(self) -> int:
        """ADWIN's current window length."""
        return int(self._adwin.width)

    @property
    def result(self) -> DriftResult:
        return DriftResult(
            statistic=self._last_statistic,
            threshold=float("nan"),
            p_value=float("nan"),
            drift=self._drift,
        )

    # --- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; ADWIN's window as river's own state bytes, base64 (see module doc)."""
        return {
            "kind": self.kind,
            "river_version": river.__version__,
            **self._alarm_state(),
            "adwin_drift_detected": bool(self._adwin.drift_detected),  # river resets at the next value
            "adwin_state": base64.b64encode(self._adwin._helper.__getstate__()).decode("ascii"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> AdwinChange:
        if state.get("kind") != self.kind:
            raise ValueError(f"sidewatch: state for {state.get('kind')!r} does not fit {self.kind!r}")
        if state.get("river_version") != river.__version__:
            raise ValueError(
                f"sidewatch: ADWIN state saved under river {state.get('river_version')}, "
                f"this is river {river.__version__}; its encoding is river's own, start afresh"
            )
        adwin = self._new_river()
        adwin._helper.__setstate__(base64.b64decode(state["adwin_state"]))
        adwin._drift_detected = bool(state["adwin_drift_detected"])
        self._adwin = adwin
        self._load_alarm_state(state)
        return self

    def calibration_dict(self) -> dict[str, Any]:
        """Parameters and the measured run length, JSON-serialisable."""
        return {
            "kind": self.kind,
            "calibration_version": CALIBRATION_VERSION,
            "delta": self.delta,
            "clock": self.clock,
            "max_buckets": self.max_buckets,
            "min_window_length": self.min_window_length,
            "grace_period": self.grace_period,
            "n_streams": self.n_streams,
            "horizon": self.horizon,
            "seed": self.seed,
            "run_length": dict(self.run_length_),
        }

    @classmethod
    def from_calibration(cls, d: dict[str, Any]) -> AdwinChange:
        if d.get("kind") != cls.kind or d.get("calibration_version") != CALIBRATION_VERSION:
            raise ValueError(f"sidewatch: not an {cls.kind} calibration (version {CALIBRATION_VERSION})")
        det = cls(
            delta=d["delta"], clock=d["clock"], max_buckets=d["max_buckets"],
            min_window_length=d["min_window_length"], grace_period=d["grace_period"],
            n_streams=d["n_streams"], horizon=d["horizon"], seed=d["seed"],
        )
        det.run_length_ = dict(d.get("run_length", {}))
        return det
