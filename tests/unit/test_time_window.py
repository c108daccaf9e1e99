"""Drift over a window in time: values leave the window by age, whatever the traffic rate."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.dataplane.tap import TappedInference
from agent.demo.data import REFERENCE, load_images
from agent.detect.drift.fleet import reference_bins
from agent.detect.drift.watch import DriftWatch
from agent.detect.drift.window import TimeWindowPSI
from agent.detect.registry import DetectorRegistry
from agent.metrics import BoundedModels, DriftMetrics
from agent.modelserver.repository import BUNDLED_REPOSITORY
from tests.support.reference_math import psi


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_values_leave_the_window_by_age():
    rng = np.random.default_rng(3)
    bins = reference_bins(rng.normal(size=10_000))
    clock = Clock()
    window = TimeWindowPSI(bins["edges"], bins["ratios"], seconds=60, clock=clock)
    shifted = rng.normal(loc=1.0, size=3000)
    window.update(shifted)
    counts = np.bincount(np.searchsorted(bins["edges"], shifted, side="right"), minlength=len(bins["ratios"]))
    assert np.isclose(window.psi, psi(counts, bins["ratios"]))
    assert window.result.drift
    clock.now += 30
    window.update(rng.normal(size=3000))  # reference-like traffic joins the shifted traffic
    assert window.n == 6000
    clock.now += 31  # the shifted values are now more than 60 s old
    assert window.n == 3000
    assert not window.result.drift and window.psi < 0.05
    clock.now += 61
    assert window.n == 0 and np.isnan(window.psi)


def test_state_round_trip_keeps_the_window():
    bins = reference_bins(np.arange(1000, dtype=float))
    clock = Clock()
    first = TimeWindowPSI(bins["edges"], bins["ratios"], seconds=10, clock=clock)
    first.update(np.arange(0, 500, dtype=float))
    clock.now += 5
    first.update(np.arange(500, 600, dtype=float))
    second = TimeWindowPSI(bins["edges"], bins["ratios"], seconds=10, clock=clock).load_state_dict(first.state_dict())
    assert second.n == first.n == 600 and second.psi == first.psi
    clock.now += 6  # the first batch ages out of both
    assert second.n == first.n == 100


def test_drift_watch_exports_the_time_window_psi():
    registry = DetectorRegistry(BUNDLED_REPOSITORY, "cpu")
    config = load_config(overrides={"detection.model_repository": str(BUNDLED_REPOSITORY),
                                    "drift.window_seconds": 300})
    metrics = CollectorRegistry()
    watch = DriftWatch(registry, config.drift, DriftMetrics(metrics), BoundedModels(8))
    images = load_images(REFERENCE)[0][:64]
    probabilities = registry.get("mnist_cnn", "1").detector.score(images).probabilities
    watch(TappedInference("mnist_cnn", "1", {"input": images}, {"probabilities": probabilities}, None, None, 0, 0))
    watch.models[("mnist_cnn", "1")].export()
    labels = {"model": "mnist_cnn", "version": "1", "detector": "psi_time_window", "feature": "confidence"}
    assert metrics.get_sample_value("sidewatch_drift_threshold", labels) == 0.2
    assert metrics.get_sample_value("sidewatch_drift_statistic", labels) >= 0
