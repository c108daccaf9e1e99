"""Reference computations the tests check sidewatch against: written plainly, from scratch, and kept
out of the runtime package because nothing in it uses them. (Benchmarks put the repository root on
sys.path and may import them as ``tests.support.reference_math``.)

``reference_score``  feature squeezing without fusing: numpy squeezers and one plain model call per copy
``mmd2_unbiased``    the unbiased MMD^2 of two samples, from scratch (the online MMD's running sums, checked)
``psi``              the PSI of bin counts against reference shares, floored as the fleet recording rule does
``BinnedDistance``   per-feature PSI and Jensen-Shannon divergence of a sliding window against reference bins

BinnedDistance
--------------
Per feature, ``bins`` bins with edges at the reference's quantiles (outer bins open to -inf and
+inf; bins right-closed; a bin between two equal edges, from an atom in the reference, is empty
and left out), the reference's bin proportions ``p`` and the window's ``q``, counted
incrementally. ``PSI = sum (q - p) ln(q / p)`` with ``pseudo_count`` added to every count (a bin
the window misses would make PSI infinite); ``JS`` is the Jensen-Shannon divergence in bits
(between 0 and 1) of the raw proportions. The common rule of thumb reads PSI < 0.1 as no change,
0.1 to 0.25 as a moderate one and above 0.25 as a large one; the default alert is PSI > 0.2. Mind
the sample size: without drift PSI is about ``(bins - 1)(1/W + 1/N)`` on average (a chi-square
with ``bins - 1`` degrees of freedom over ``W``), 0.09 for 10 bins and W = 100, so a window of
100 crosses 0.2 by chance alone about 2% of the time; hence the default window of 500. There is
no ERT here: the sidecar's alarms come from the CVM detector, its dashboards' PSI from the fleet
bins and the time window.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from agent.detect.adversarial.squeeze import Squeezer, parse_squeezers
from agent.detect.drift.mmd import gaussian_kernel
from agent.detect.drift.result import DriftResult
from agent.detect.drift.univariate import (
    CALIBRATION_KIND,
    FORMAT_VERSION,
    STATE_KIND,
    _as_reference,
    _check_rows,
    _feature_keys,
    _fingerprint,
    _searchsorted_features,
)
from agent.detect.features import softmax


def reference_score(session, batch: np.ndarray, squeezers: str | Iterable[str | Squeezer], output_kind: str,
                    input_name: str, output_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same detection without fusing: numpy squeezers and one plain model call per copy.

    ``session`` is an onnxruntime session of the served model. Returns (probabilities, scores,
    distances). This is the definition that the fused graph is tested against.
    """
    squeezers = parse_squeezers(squeezers)
    x = np.asarray(batch, dtype=np.float32)

    def run(inputs: np.ndarray) -> np.ndarray:
        out = session.run([output_name], {input_name: inputs})[0].reshape(len(inputs), -1)
        return softmax(np.asarray(out, dtype=np.float32)) if output_kind == "logits" else out

    probabilities = run(x)
    distances = np.stack([np.abs(run(squeezer(x)) - probabilities).sum(axis=1) for squeezer in squeezers], axis=1)
    return probabilities, distances.max(axis=1), distances


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """Unbiased MMD^2 between samples ``x`` [m, d] and ``y`` [n, d] (m, n >= 2), from scratch: O((m+n)^2)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("sidewatch: mmd2_unbiased needs at least 2 points in each sample")
    kxx = gaussian_kernel(x, x, sigma)
    kyy = gaussian_kernel(y, y, sigma)
    kxy = gaussian_kernel(x, y, sigma)
    # Off-diagonal sums: the diagonal k(x, x) = 1 terms are what bias the plug-in (V-statistic) form.
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def psi(counts: np.ndarray, reference_ratios: np.ndarray, floor: float = 1e-4) -> float:
    """PSI of observed bin counts against reference shares; shares are floored as the recording rule does."""
    p = np.clip(np.asarray(counts, dtype=np.float64) / max(np.sum(counts), 1), floor, None)
    q = np.clip(np.asarray(reference_ratios, dtype=np.float64), floor, None)
    return float(np.sum((p - q) * np.log(p / q)))


class BinnedDistance:
    """PSI and Jensen-Shannon divergence per feature, window vs reference bins (for dashboards).

    Parameters
    ----------
    window
        W, the number of most recent rows binned.
    bins
        Bins per feature, edges at the reference's quantiles ``1/bins, ..., (bins-1)/bins``.
    psi_threshold
        Alert when PSI exceeds it (0.2 by the rule of thumb; see the module docstring on W).
    pseudo_count
        Added to every bin count in PSI (0 gives the raw PSI, infinite for an empty bin).

    ``result.statistic`` is PSI, ``result.p_value`` None, ``result.drift`` PSI > psi_threshold on a
    full window. ``psi``, ``js`` and ``proportions`` (the window's) are attributes too.
    """

    kind = "binned_distance"

    def __init__(self, window: int = 500, bins: int = 10, psi_threshold: float = 0.2,
                 pseudo_count: float = 0.5) -> None:
        self.window = int(window)
        self.bins = int(bins)
        self.psi_threshold = float(psi_threshold)
        self.pseudo_count = float(pseudo_count)
        if self.window < 1 or self.bins < 2 or self.pseudo_count < 0:
            raise ValueError("sidewatch: BinnedDistance needs window >= 1, bins >= 2 and pseudo_count >= 0")
        self.edges_: np.ndarray | None = None

    def fit(self, reference: Any) -> BinnedDistance:
        """Bin edges at the reference's quantiles (numpy's default, linear) and its bin counts."""
        ref = _as_reference(reference)
        edges = np.quantile(ref, np.arange(1, self.bins) / self.bins, axis=0).T  # [d, bins - 1]
        self._set_bins(np.ascontiguousarray(edges), None, ref.shape[0])
        self.reference_counts_ = np.bincount(self._flat_bins(self._bin(ref)), minlength=self.n_features * self.bins
                                             ).reshape(self.n_features, self.bins)
        self.reset()
        return self

    def _set_bins(self, edges: np.ndarray, counts: np.ndarray | None, n_reference: int) -> None:
        self.edges_ = edges
        self.n_features = edges.shape[0]
        self.n_reference = int(n_reference)
        self._keys = _feature_keys(edges)
        lower = np.concatenate([np.full((self.n_features, 1), -np.inf), edges], axis=1)
        upper = np.concatenate([edges, np.full((self.n_features, 1), np.inf)], axis=1)
        self._live = lower < upper  # (lower, upper] holds values; not so between two equal edges
        if counts is not None:
            self.reference_counts_ = counts

    def _bin(self, rows: np.ndarray) -> np.ndarray:
        # side="left": the first edge >= value, so bin i is (edge[i-1], edge[i]], right-closed
        return _searchsorted_features(self._keys, self.edges_, rows, "left")

    def _flat_bins(self, b: np.ndarray) -> np.ndarray:
        return (b + np.arange(self.n_features) * self.bins).ravel()

    def _check_fitted(self) -> None:
        if self.edges_ is None:
            raise RuntimeError("sidewatch: BinnedDistance is not fitted: call fit() or from_calibration()")

    def reset(self) -> BinnedDistance:
        """Forget the stream; keep the bins."""
        self._check_fitted()
        self._bins = np.zeros((0, self.n_features), dtype=np.int64)  # the window's bins, oldest first
        self._counts = np.zeros((self.n_features, self.bins), dtype=np.int64)
        self.n = 0
        self.skipped = 0
        return self

    def update(self, x: Any) -> BinnedDistance:
        """Feed rows ``[n, d]`` (or one row ``[d]``); rows with NaN/Inf are skipped and counted."""
        self._check_fitted()
        rows = _check_rows(x, self.n_features)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            self.skipped += int((~finite).sum())
            rows = rows[finite]
        if rows.shape[0] == 0:
            return self
        before = self._bins.shape[0]
        seq = np.concatenate([self._bins, self._bin(rows)])
        cut = max(0, seq.shape[0] - self.window)  # seq[cut:] is the window after this batch
        size = self.n_features * self.bins
        # Count the new rows that stay, uncount the old rows that leave (new rows that come and go
        # within this batch are never counted).
        self._counts += (np.bincount(self._flat_bins(seq[max(before, cut):]), minlength=size)
                         - np.bincount(self._flat_bins(seq[:min(before, cut)]), minlength=size)
                         ).reshape(self._counts.shape)
        self._bins = seq[cut:]
        self.n += rows.shape[0]
        return self

    @property
    def proportions(self) -> np.ndarray:
        """The window's bin proportions [d, bins] (NaN before any row)."""
        self._check_fitted()
        m = self._bins.shape[0]
        return self._counts / m if m else np.full(self._counts.shape, np.nan)

    @property
    def psi(self) -> np.ndarray:
        """Population stability index per feature, pseudo-counts on the live bins."""
        self._check_fitted()
        m = self._bins.shape[0]
        if m == 0:
            return np.full(self.n_features, np.nan)
        a = self.pseudo_count
        live = self._live.sum(axis=1, keepdims=True)
        p = (self.reference_counts_ + a) / (self.n_reference + a * live)
        q = (self._counts + a) / (m + a * live)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(self._live, (q - p) * (np.log(q) - np.log(p)), 0.0)
        return terms.sum(axis=1)

    @property
    def js(self) -> np.ndarray:
        """Jensen-Shannon divergence per feature, in bits (0 to 1), of the raw proportions."""
        self._check_fitted()
        m = self._bins.shape[0]
        if m == 0:
            return np.full(self.n_features, np.nan)
        p = self.reference_counts_ / self.n_reference
        q = self._counts / m
        mid = (p + q) / 2

        def kl(a: np.ndarray) -> np.ndarray:
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(a > 0, a * np.log2(a / mid), 0.0).sum(axis=1)

        return 0.5 * kl(p) + 0.5 * kl(q)

    @property
    def result(self) -> DriftResult:
        psi = self.psi
        drift = (psi > self.psi_threshold) & (self._bins.shape[0] == self.window)
        return DriftResult(statistic=psi, threshold=np.full(self.n_features, self.psi_threshold),
                           p_value=None, drift=drift)

    @property
    def drift_detected(self) -> bool:
        return bool(self.result.drift.any())

    def state_dict(self) -> dict[str, Any]:
        """The window's bins (oldest first) and counters, JSON-serialisable."""
        self._check_fitted()
        return {"kind": STATE_KIND, "detector": self.kind, "format_version": FORMAT_VERSION,
                "calibration_sha256": self._bins_sha256(), "window_bins": self._bins.tolist(),
                "n": self.n, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> BinnedDistance:
        self._check_fitted()
        if state.get("kind") != STATE_KIND or state.get("detector") != self.kind:
            raise ValueError(f"sidewatch: not a {self.kind} state")
        if state.get("calibration_sha256") != self._bins_sha256():
            raise ValueError("sidewatch: this state was taken under other bins")
        b = np.asarray(state["window_bins"], dtype=np.int64).reshape(-1, self.n_features)
        if b.shape[0] > self.window or b.min(initial=0) < 0 or b.max(initial=0) >= self.bins:
            raise ValueError("sidewatch: window_bins do not fit this detector")
        self.reset()
        self._bins = b
        self._counts = np.bincount(self._flat_bins(b), minlength=self.n_features * self.bins
                                   ).reshape(self.n_features, self.bins)
        self.n = int(state["n"])
        self.skipped = int(state["skipped"])
        return self

    def _bins_sha256(self) -> str:
        return _fingerprint({"edges": self.edges_.tolist(), "counts": self.reference_counts_.tolist(),
                             "window": self.window})

    def calibration_dict(self) -> dict[str, Any]:
        """Bin edges and reference counts, JSON-serialisable (floats exact)."""
        self._check_fitted()
        return {"kind": CALIBRATION_KIND, "detector": self.kind, "format_version": FORMAT_VERSION,
                "window": self.window, "bins": self.bins, "psi_threshold": self.psi_threshold,
                "pseudo_count": self.pseudo_count, "n_reference": self.n_reference,
                "edges": self.edges_.tolist(), "reference_counts": self.reference_counts_.tolist()}

    @classmethod
    def from_calibration(cls, d: dict[str, Any]) -> BinnedDistance:
        if d.get("kind") != CALIBRATION_KIND or d.get("detector") != cls.kind:
            raise ValueError(f"sidewatch: not a {cls.kind} calibration")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sidewatch: {cls.kind} calibration format_version {d.get('format_version')!r} "
                             f"is not {FORMAT_VERSION}")
        det = cls(window=d["window"], bins=d["bins"], psi_threshold=d["psi_threshold"],
                  pseudo_count=d["pseudo_count"])
        edges = np.asarray(d["edges"], dtype=np.float64)
        counts = np.asarray(d["reference_counts"], dtype=np.int64)
        if edges.ndim != 2 or edges.shape[1] != det.bins - 1 or counts.shape != (edges.shape[0], det.bins):
            raise ValueError("sidewatch: edges must be [d, bins - 1] and reference_counts [d, bins]")
        det._set_bins(edges, counts, d["n_reference"])
        det.reset()
        return det
