"""Label-free prediction drift: the mix of predicted classes, and scalar summaries of the model's
output (top-1 confidence, entropy), each over a sliding window of the last ``W`` predictions.

Both detectors use one statistic, Pearson's chi-square of the category counts ``c_k`` in the window
against fixed reference frequencies ``p_k``::

    X2 = sum_k (c_k - W p_k)^2 / (W p_k)  =  (sum_k c_k^2 / p_k) / W  -  W

(the second form because ``sum_k c_k = W`` and ``sum_k p_k = 1``). The counts are integers kept
exactly, one in and one out per sample, so the statistic costs O(K) per sample and never drifts
numerically.

- :class:`ClassMixDrift`: the categories are the predicted classes and ``p`` the reference class
  frequencies.
- :class:`ScalarWindowDrift`: the categories are the bins between reference quantiles of the
  scalar (deciles by default) and ``p`` the fraction of the reference sample in each bin. This is
  a windowed two-sample test of the window against the reference sample. It was chosen over a
  windowed Kolmogorov-Smirnov or Cramer-von Mises statistic because it updates in O(K) per sample
  (KS/CVM need the sorted window, O(W) per sample), which is what makes the calibration below
  cheap, and because ties (confidence piles up at 1.0, entropy at 0) are handled exactly: tied
  reference values simply share a bin and the bin's frequency says how many there are. It is
  less powerful than KS for a small pure location shift, and also sees changes of shape.

Threshold. The chi-square distribution is only an approximation for small expected counts, and a
sliding window is tested at every sample, so the per-sample significance level says nothing about
how often the detector fires. As in Cobb et al. 2021 (arXiv 2108.00883), the threshold is instead
set for an expected run time (ERT): the mean number of samples between false alarms when nothing
has drifted. It is found by simulation at fit time: ``n_streams`` no-drift streams of i.i.d.
draws from the reference frequencies (an exact no-drift model for the class mix; for the scalar
it is exactly the bootstrap from the reference sample, since a bootstrap draw falls in bin ``k``
with probability ``p_k``) are run through the same windowed statistic, and
:func:`agent.detect.drift.ert.calibrate_ert` picks the threshold whose mean first-alarm time on
them is the ERT. A run length counts every sample from the (re)start, the ``W - 1`` needed to fill
the window included (ert.py's ``warmup``), so ``ert`` must be larger than ``window``. The p-value
in :attr:`result` comes from the chi-square distribution with ``K - 1`` degrees of freedom; it is
for dashboards, not for the decision.

Alarms. The statistic is tested after every sample once the window is full. On an alarm the
window is emptied (as river's detectors reset after a detection), so with no drift the run
lengths between alarms are independent and their mean is the ERT; with a lasting drift the
detector fires again about every ``W`` samples. ``drift_detected`` says whether the last
:meth:`update` raised an alarm; ``result`` describes the last alarm of that update, or else the
last full window (``NaN`` statistic before the first full window).

Cost. An update is a handful of numpy calls over the batch: about 30-50 microseconds per call
whatever its size, under a microsecond per value in micro-batches of 64 or more
(``bench/drift_report.py``). Feed micro-batches, not single predictions.

Input that cannot be a category (NaN, Inf, a class id that is not an integer in ``[0, K)``) is
skipped and counted in ``n_skipped``; ``n`` counts the samples used.

State. :meth:`state_dict` is JSON-serialisable (the window's contents in order and the counters);
loading it into a detector made from the same calibration continues exactly as an uninterrupted
run would. :meth:`calibration_dict` / :meth:`from_calibration` carry the parameters, reference
frequencies (and bin edges) and the threshold, so a detector is rebuilt without re-simulating.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Self

import numpy as np
from scipy import special

from agent.detect.drift.base import DriftDetector
from agent.detect.drift.ert import calibrate_ert
from agent.detect.drift.result import DriftResult

CALIBRATION_VERSION = 1


def _one_dimensional(values: Any, dtype: Any = None) -> np.ndarray:
    """A batch is a 1-D array (a scalar is a batch of one). Anything else is refused rather than
    flattened: [n, K] probabilities flattened would pass for n * K class ids."""
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim > 1:
        raise ValueError(f"sidewatch: expected a 1-D batch of values, got shape {arr.shape}")
    return arr.reshape(-1)


class _WindowChiSquare(DriftDetector):
    """Shared machinery: windowed chi-square of category ids against reference frequencies."""

    kind: ClassVar[str] = ""

    def __init__(self, window: int, ert: float, threshold: float | None, n_streams: int, seed: int):
        self.window = int(window)
        self.ert = float(ert)
        self.threshold = threshold
        self.n_streams = int(n_streams)
        self.seed = int(seed)
        if self.window < 2:
            raise ValueError("sidewatch: window must be at least 2")
        if threshold is None and not self.ert > self.window:
            raise ValueError(
                f"sidewatch: ert ({ert}) must exceed window ({window}): a run length includes the "
                "samples that fill the window"
            )
        self._freqs: np.ndarray | None = None
        self.threshold_: float | None = None
        self.simulation_: dict[str, float] = {}
        self.reset()

    # --- fitted reference -------------------------------------------------------------------

    def _set_reference(self, freqs: np.ndarray, normalise: bool = True) -> None:
        """``normalise=False`` keeps stored frequencies bit for bit (a restored detector must
        compute exactly the statistic the original did)."""
        freqs = np.asarray(freqs, dtype=np.float64)
        if freqs.ndim != 1 or freqs.size < 2:
            raise ValueError("sidewatch: need frequencies for at least 2 categories")
        if not np.all(np.isfinite(freqs)) or np.any(freqs <= 0):
            raise ValueError(
                "sidewatch: every reference frequency must be > 0 (a zero makes the chi-square "
                "infinite); fit from predictions with pseudo_count > 0 instead"
            )
        self._freqs = freqs / freqs.sum() if normalise else freqs.copy()
        self._inv_freqs = 1.0 / self._freqs
        self._counts = np.zeros(self._freqs.size, dtype=np.int64)

    @property
    def frequencies(self) -> np.ndarray:
        self._check_fitted()
        return self._freqs.copy()

    @property
    def n_categories(self) -> int:
        self._check_fitted()
        return int(self._freqs.size)

    def _check_fitted(self) -> None:
        if self._freqs is None or self.threshold_ is None:
            raise RuntimeError(f"sidewatch: {type(self).__name__} is not fitted; call fit() first")

    def _calibrate(self) -> None:
        """Set ``threshold_``: the given one, or the one whose simulated mean run length is the ERT."""
        if self.threshold is not None:
            self.threshold_ = float(self.threshold)
            self.simulation_ = {}
            return
        self.threshold_, self.simulation_ = self._simulate_threshold()

    def _statistic(self, counts: np.ndarray) -> np.ndarray:
        """Chi-square of full windows; ``counts`` is [..., K] (integers)."""
        return (counts * counts) @ self._inv_freqs / self.window - self.window

    def _simulate_threshold(self) -> tuple[float, dict[str, float]]:
        cal = calibrate_ert(
            self._simulate, self.ert, n_streams=self.n_streams, warmup=self.window - 1, rng=self.seed
        )
        return float(cal.thresholds), {
            "estimated_ert": cal.estimated_ert,
            "alarms": cal.alarms,
            "n_streams": cal.n_streams,
            "length": cal.length,
        }

    def _simulate(self, n_paths: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """No-drift statistic paths [n_paths, length]: i.i.d. draws from the reference frequencies
        through the same windowed statistic (float32 halves the memory; the first W - 1 entries,
        before the window is full, are not used)."""
        w, k = self.window, self._freqs.size
        paths = np.zeros((n_paths, length), dtype=np.float32)
        counts = np.zeros((n_paths, k), dtype=np.int64)
        history = np.zeros((w, n_paths), dtype=np.int64)  # ring buffer of each stream's window
        rows = np.arange(n_paths)
        cdf = np.cumsum(self._freqs)
        chunk = 512
        for start in range(0, length, chunk):
            steps = min(chunk, length - start)
            # Inverse-CDF draws; min() guards a uniform above cdf[-1] by rounding.
            draws = np.minimum(np.searchsorted(cdf, rng.random((steps, n_paths)), side="right"), k - 1)
            for i in range(steps):
                t = start + i
                if t >= w:
                    counts[rows, history[t % w]] -= 1
                new = draws[i]
                counts[rows, new] += 1
                history[t % w] = new
                if t >= w - 1:
                    paths[:, t] = self._statistic(counts)
        return paths

    # --- streaming ---------------------------------------------------------------------------

    def reset(self) -> Self:
        """Forget the traffic seen (window, counters); keep the reference and the threshold."""
        self._buffer = np.empty(0, dtype=np.int64)  # the window's contents, oldest first
        if self._freqs is not None:
            self._counts = np.zeros(self._freqs.size, dtype=np.int64)
        return super().reset()

    def _categories(self, values: Any) -> tuple[np.ndarray, np.ndarray]:
        """Valid category ids and their positions in the input."""
        raise NotImplementedError

    def update(self, values: Any) -> Self:
        """Feed a batch of samples in order; returns the detector."""
        self._check_fitted()
        cats, positions = self._categories(values)
        total = int(np.size(values))  # _categories refused anything but 1-D
        self.n_skipped += total - cats.size
        self.n += cats.size
        self.alarm_positions = []
        w, k = self.window, self._freqs.size
        pos = 0
        while pos < cats.size:
            # At most W samples at a time: after an alarm the window restarts empty, so no chunk
            # holds more than one alarm that matters.
            chunk = cats[pos : pos + w]
            c = chunk.size
            before = self._buffer.size
            seq = np.concatenate([self._buffer, chunk])
            # Sample j of the chunk is seq[before + j]; the sample leaving the window then is
            # seq[before + j - W], when that exists.
            leaving = before + np.arange(c) - w
            has_leaving = leaving >= 0
            delta = np.zeros((c, k), dtype=np.int64)
            delta[np.arange(c), chunk] += 1
            delta[np.flatnonzero(has_leaving), seq[leaving[has_leaving]]] -= 1
            counts = self._counts + np.cumsum(delta, axis=0)
            full = before + np.arange(1, c + 1) >= w
            stat = np.full(c, np.nan)
            stat[full] = self._statistic(counts[full])
            over = np.flatnonzero(stat > self.threshold_)
            if over.size:
                j = int(over[0])
                self._last_statistic = float(stat[j])
                self.alarm_positions.append(int(positions[pos + j]))
                self.n_detections += 1
                self._buffer = np.empty(0, dtype=np.int64)
                self._counts = np.zeros(k, dtype=np.int64)
                pos += j + 1
            else:
                self._buffer = seq[-w:]
                self._counts = counts[-1]
                if full.any():
                    self._last_statistic = float(stat[full][-1])
                pos += c
        self._drift = bool(self.alarm_positions)
        return self

    @property
    def statistic(self) -> float:
        return self._last_statistic

    @property
    def p_value(self) -> float:
        """Chi-square (K - 1 degrees of freedom) tail probability of :attr:`statistic`."""
        if math.isnan(self._last_statistic):
            return float("nan")
        return float(special.chdtrc(self._freqs.size - 1, self._last_statistic))

    @property
    def result(self) -> DriftResult:
        self._check_fitted()
        return DriftResult(
            statistic=self._last_statistic,
            threshold=float(self.threshold_),
            p_value=self.p_value,
            drift=self._drift,
        )

    # --- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The streaming state, JSON-serialisable."""
        return {
            "kind": self.kind,
            "window": self.window,
            "buffer": [int(v) for v in self._buffer],
            **self._alarm_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> Self:
        """Continue from a :meth:`state_dict` taken from a detector with the same calibration."""
        self._check_fitted()
        if state.get("kind") != self.kind or int(state.get("window", -1)) != self.window:
            raise ValueError(
                f"sidewatch: state for {state.get('kind')!r} window {state.get('window')} does not "
                f"fit {self.kind!r} window {self.window}"
            )
        buffer = np.asarray(state["buffer"], dtype=np.int64).reshape(-1)
        k = self._freqs.size
        if buffer.size > self.window or np.any(buffer < 0) or np.any(buffer >= k):
            raise ValueError("sidewatch: state buffer does not fit this detector")
        self._buffer = buffer
        self._counts = np.bincount(buffer, minlength=k).astype(np.int64)
        self._load_alarm_state(state)
        return self

    def _calibration_common(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "kind": self.kind,
            "calibration_version": CALIBRATION_VERSION,
            "window": self.window,
            "ert": self.ert,
            "threshold": float(self.threshold_),
            "threshold_given": self.threshold is not None,
            "n_streams": self.n_streams,
            "seed": self.seed,
            "frequencies": [float(f) for f in self._freqs],
            "simulation": dict(self.simulation_),
        }

    @staticmethod
    def _check_calibration(d: dict[str, Any], kind: str) -> None:
        if d.get("kind") != kind:
            raise ValueError(f"sidewatch: calibration is for {d.get('kind')!r}, not {kind!r}")
        if d.get("calibration_version") != CALIBRATION_VERSION:
            raise ValueError(f"sidewatch: unknown calibration_version {d.get('calibration_version')!r}")


class ClassMixDrift(_WindowChiSquare):
    """Drift of the predicted-class mix over the last ``window`` predictions.

    Parameters
    ----------
    window
        Predictions per window (W). Aim for an expected count ``W * p_k`` of 5 or more in the rarest
        class that matters.
    ert
        Expected run time: the mean number of predictions between false alarms with no drift.
    threshold
        Use this chi-square threshold instead of calibrating one (``ert`` is then only recorded).
    n_streams
        Simulated no-drift streams for the calibration (the run-length estimate has a relative
        standard error of about ``1 / sqrt(n_streams)``).
    seed
        Seed of the calibration's simulation.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = ClassMixDrift(window=100, ert=300).fit(frequencies=[0.5, 0.3, 0.2])
    >>> _ = det.update(rng.choice(3, size=150, p=[0.5, 0.3, 0.2]))
    >>> _ = det.update(rng.choice(3, size=200, p=[0.2, 0.3, 0.5]))
    >>> det.drift_detected
    True
    """

    kind = "class_mix"

    def __init__(
        self,
        window: int = 200,
        ert: float = 500.0,
        threshold: float | None = None,
        n_streams: int = 1000,
        seed: int = 0,
    ):
        super().__init__(window, ert, threshold, n_streams, seed)

    def fit(
        self,
        predictions: Any = None,
        *,
        frequencies: Any = None,
        n_classes: int | None = None,
        pseudo_count: float = 0.5,
    ) -> ClassMixDrift:
        """Set the reference class frequencies and calibrate the threshold.

        Either ``predictions`` (class ids predicted on the reference data; frequencies are
        ``(count + pseudo_count) / (n + K * pseudo_count)`` so that a class never predicted on the
        reference keeps a small nonzero frequency) or ``frequencies`` (all > 0).
        """
        if (predictions is None) == (frequencies is None):
            raise ValueError("sidewatch: give exactly one of predictions and frequencies")
        if frequencies is not None:
            freqs = np.asarray(frequencies, dtype=np.float64).reshape(-1)
            if n_classes is not None and freqs.size != n_classes:
                raise ValueError(f"sidewatch: {freqs.size} frequencies for {n_classes} classes")
        else:
            pred = np.asarray(predictions).reshape(-1)
            if pred.size == 0 or not np.issubdtype(pred.dtype, np.number):
                raise ValueError("sidewatch: predictions must be a non-empty array of class ids")
            ok = np.isfinite(pred) & (pred >= 0) & (pred == np.floor(pred))
            pred = pred[ok].astype(np.int64)
            k = int(n_classes) if n_classes is not None else int(pred.max()) + 1
            pred = pred[pred < k]
            if pred.size == 0:
                raise ValueError("sidewatch: no valid class ids in predictions")
            if pseudo_count < 0:
                raise ValueError("sidewatch: pseudo_count must be >= 0")
            freqs = np.bincount(pred, minlength=k).astype(np.float64) + pseudo_count
        self._set_reference(freqs)
        self._calibrate()
        self.reset()
        return self

    def _categories(self, values: Any) -> tuple[np.ndarray, np.ndarray]:
        arr = _one_dimensional(values)
        k = self._freqs.size
        if arr.dtype.kind in "iu":
            ok = (arr >= 0) & (arr < k)
        elif arr.dtype.kind in "fb":
            arr = arr.astype(np.float64)
            with np.errstate(invalid="ignore"):
                ok = np.isfinite(arr) & (arr >= 0) & (arr < k) & (arr == np.floor(arr))
        else:
            raise TypeError(f"sidewatch: class ids must be numbers, not {arr.dtype}")
        positions = np.flatnonzero(ok)
        return arr[positions].astype(np.int64), positions

    def calibration_dict(self) -> dict[str, Any]:
        """Parameters, reference frequencies and threshold, JSON-serialisable."""
        return self._calibration_common()

    @classmethod
    def from_calibration(cls, d: dict[str, Any]) -> ClassMixDrift:
        cls._check_calibration(d, cls.kind)
        det = cls(window=d["window"], ert=d["ert"], threshold=d["threshold"] if d.get("threshold_given") else None,
                  n_streams=d["n_streams"], seed=d["seed"])
        det._set_reference(np.asarray(d["frequencies"], dtype=np.float64), normalise=False)
        det.threshold_ = float(d["threshold"])
        det.simulation_ = dict(d.get("simulation", {}))
        det.reset()
        return det


class ScalarWindowDrift(_WindowChiSquare):
    """Drift of a scalar summary of the predictions (top-1 confidence, entropy) over the last
    ``window`` values, against a reference sample of the scalar.

    The scalar is binned at ``n_bins`` reference quantiles (tied quantiles merge bins) and the bin
    counts in the window are tested as in :class:`ClassMixDrift`; the threshold is calibrated by
    bootstrap from the reference sample. The reference sample should be much larger than
    ``window * n_bins``: the bin frequencies are estimated from it, and their error adds to the
    statistic on fresh no-drift traffic (shortening the run length somewhat).

    Parameters are those of :class:`ClassMixDrift`, plus ``n_bins``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = ScalarWindowDrift(window=100, ert=300).fit(rng.beta(8, 2, size=5000))   # top-1 confidence
    >>> det.update(rng.beta(8, 2, size=150)).drift_detected
    False
    >>> det.update(rng.beta(4, 2, size=200)).drift_detected     # the model grows less sure
    True
    >>> det.reset().n, det.n_detections
    (0, 0)
    """

    kind = "scalar_window"

    def __init__(
        self,
        window: int = 200,
        ert: float = 500.0,
        n_bins: int = 10,
        threshold: float | None = None,
        n_streams: int = 1000,
        seed: int = 0,
    ):
        self.n_bins = int(n_bins)
        if self.n_bins < 2:
            raise ValueError("sidewatch: n_bins must be at least 2")
        self.edges_: np.ndarray | None = None
        super().__init__(window, ert, threshold, n_streams, seed)

    def fit(self, reference: Any) -> ScalarWindowDrift:
        """Bin edges and frequencies from the reference sample, then calibrate the threshold.
        Non-finite reference values are dropped."""
        ref = np.asarray(reference, dtype=np.float64).reshape(-1)
        ref = ref[np.isfinite(ref)]
        if ref.size < 2 * self.n_bins:
            raise ValueError(f"sidewatch: need at least {2 * self.n_bins} finite reference values")
        # Edges are reference values themselves (inverted_cdf), so every bin [e_i, e_i+1) holds at
        # least the value e_i; only the bin below the first edge can be empty (when the first edge
        # is the minimum), and then that edge goes.
        levels = np.arange(1, self.n_bins) / self.n_bins
        edges = np.unique(np.quantile(ref, levels, method="inverted_cdf"))
        if edges.size and not np.any(ref < edges[0]):
            edges = edges[1:]
        if edges.size == 0:
            raise ValueError("sidewatch: the reference sample is constant; nothing to bin")
        counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1)
        self.edges_ = edges
        self._set_reference(counts.astype(np.float64))
        self._calibrate()
        self.reset()
        return self

    def _categories(self, values: Any) -> tuple[np.ndarray, np.ndarray]:
        arr = _one_dimensional(values, np.float64)
        positions = np.flatnonzero(np.isfinite(arr))
        return np.searchsorted(self.edges_, arr[positions], side="right").astype(np.int64), positions

    def calibration_dict(self) -> dict[str, Any]:
        """Parameters, bin edges, reference frequencies and threshold, JSON-serialisable."""
        d = self._calibration_common()
        d["n_bins"] = self.n_bins
        d["edges"] = [float(e) for e in self.edges_]
        return d

    @classmethod
    def from_calibration(cls, d: dict[str, Any]) -> ScalarWindowDrift:
        cls._check_calibration(d, cls.kind)
        det = cls(window=d["window"], ert=d["ert"], n_bins=d["n_bins"],
                  threshold=d["threshold"] if d.get("threshold_given") else None,
                  n_streams=d["n_streams"], seed=d["seed"])
        det.edges_ = np.asarray(d["edges"], dtype=np.float64)
        det._set_reference(np.asarray(d["frequencies"], dtype=np.float64), normalise=False)
        if det.edges_.size + 1 != det._freqs.size:
            raise ValueError("sidewatch: calibration has mismatched edges and frequencies")
        det.threshold_ = float(d["threshold"])
        det.simulation_ = dict(d.get("simulation", {}))
        det.reset()
        return det
