"""Fleet-wide drift: per-feature counts in bins cut at the reference deciles, as Prometheus counters.

Counters merge across replicas by summing, so Prometheus can compute the population stability index
(PSI) of the whole fleet, which no single replica sees: with p_i the fleet's share of values in bin
i over a time range and q_i the reference's share, PSI = sum_i (p_i - q_i) ln(p_i / q_i). The
recording rules in deploy/prometheus/ do exactly that from ``sidewatch_drift_bin_total`` and
``sidewatch_drift_bin_reference_ratio``.

Bins are cut at the reference deciles with duplicates removed (a feature that is often exactly 0
has fewer bins), so each reference share is measured, not assumed to be 0.1.
"""

from __future__ import annotations

import numpy as np

from agent.metrics import DriftMetrics

DECILES = np.linspace(0.1, 0.9, 9)


def reference_bins(values: np.ndarray) -> dict:
    """Inner bin edges at the reference deciles, and the reference's share in each bin."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    edges = np.unique(np.quantile(values, DECILES))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return {"edges": [float(e) for e in edges], "ratios": [float(c) for c in counts / max(len(values), 1)]}


class FleetBins:
    """Counts each configured feature's values into its reference bins."""

    def __init__(self, spec: dict[str, dict], metrics: DriftMetrics, model: str, version: str) -> None:
        self._edges = {feature: np.asarray(bins["edges"], dtype=np.float64) for feature, bins in spec.items()}
        self._counters = {}
        for feature, bins in spec.items():
            # Every bin exists from the start, at 0: a bin that never fills must still be in the PSI.
            self._counters[feature] = [metrics.bins.labels(model, version, feature, str(i))
                                       for i in range(len(bins["ratios"]))]
            for i, ratio in enumerate(bins["ratios"]):
                metrics.bin_reference.labels(model, version, feature, str(i)).set(ratio)

    @property
    def features(self) -> list[str]:
        return list(self._edges)

    def observe(self, feature: str, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        counts = np.bincount(np.searchsorted(self._edges[feature], values, side="right"),
                             minlength=len(self._counters[feature]))
        for counter, count in zip(self._counters[feature], counts.tolist()):
            if count:
                counter.inc(count)
