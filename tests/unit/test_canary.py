"""Canary against stable in the drift watch (no model repository, a simulated clock): two versions of a
regressor serve side by side; a canary that answers as the stable version does stays quiet, one whose
predictions diverge is flagged on ``canary.*`` under its own version, and the comparison ends (its series
removed) when the stable version stops serving. (Through MLServer: tests/integration/test_canary_mlserver.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.dataplane.tap import TappedInference
from agent.detect.drift.watch import DriftWatch
from agent.metrics import BoundedModels, DriftMetrics
from agent.protocol import codec, oip_pb2
from tests.support import scenarios
from tests.support.drift_watch import Clock, tapped

MODEL = "diabetes"
START = 1_800_000_000.0
WEIGHTS = np.random.default_rng(0).normal(size=10)
# A canary that shipped with its features in the wrong order: same inputs, other predictions.
SWAPPED = WEIGHTS[::-1].copy()


def _inference(features: np.ndarray, version: str, weights: np.ndarray) -> TappedInference:
    """A copy as the tap hands it over; the request names the version (a client or router splitting traffic)."""
    return tapped(MODEL, {"features": features.astype(np.float32)},
                  {"value": (features @ weights).astype(np.float32)[:, None]}, version, version)


def _watch(clock, **overrides):
    settings = {"drift.baseline.enabled": True, **overrides}
    registry = CollectorRegistry()
    return DriftWatch(None, load_config(overrides=settings).drift, DriftMetrics(registry), BoundedModels(8),
                      clock=clock), registry


def _serve(watch, clock, rows, seconds, versions, rate=40.0, seed=0):
    """``rate`` requests a second for ``seconds``, each sent to a version drawn by ``versions``' weights:
    ``{version: (share, model weights)}``."""
    rng = np.random.default_rng(seed)
    names = list(versions)
    shares = np.array([versions[v][0] for v in names])
    for i in range(int(seconds * rate)):
        clock.now += 1.0 / rate
        version = names[rng.choice(len(names), p=shares / shares.sum())]
        j = int(rng.integers(len(rows)))
        watch(_inference(rows[j:j + 1], version, versions[version][1]))
        if i % 20 == 19:              # the tap thread's tick: twice a simulated second
            watch.tick()


def _canary_flags(registry, version: str) -> dict[str, float]:
    return {s.labels["detector"]: s.value for family in registry.collect() if family.name == "sidewatch_drift_detected"
            for s in family.samples if s.labels["feature"] == "all" and s.labels["version"] == version
            and s.labels["detector"].startswith("canary.")}


def _state(registry, version: str) -> str | None:
    for family in registry.collect():
        if family.name == "sidewatch_drift_canary_state":
            for s in family.samples:
                if s.labels["version"] == version and s.value == 1.0:
                    return s.labels["state"]
    return None


@pytest.fixture(scope="module")
def rows():
    return scenarios.resample(scenarios.reference("diabetes"), 4000, seed=1)["features"]


def test_a_canary_that_answers_like_the_stable_version_stays_quiet(rows):
    clock = Clock()
    watch, registry = _watch(clock)
    _serve(watch, clock, rows, 600, {"1": (0.7, WEIGHTS), "2": (0.3, WEIGHTS)})
    comparison = watch.canaries.comparisons[MODEL]
    assert (comparison.stable, comparison.version) == ("1", "2")
    assert _state(registry, "2") == "watching"
    flags = _canary_flags(registry, "2")
    assert {"canary.inputs_mean", "canary.value.value"} <= set(flags), flags
    assert not any(flags.values()), flags
    looks = [test.n_tested for test in comparison.tests.tests.values()]
    assert min(looks) >= 10, looks          # tested, not merely waiting for rows


def test_a_canary_whose_predictions_diverge_is_flagged_on_its_outputs_not_its_inputs(rows):
    clock = Clock()
    watch, registry = _watch(clock)
    _serve(watch, clock, rows, 400, {"1": (0.8, WEIGHTS), "2": (0.2, SWAPPED)})
    flags = _canary_flags(registry, "2")
    diverged = {name for name, up in flags.items() if up}
    assert "canary.value.value" in diverged, flags
    assert not {name for name in diverged if name.startswith(("canary.inputs", "canary.features"))}, flags
    assert registry.get_sample_value("sidewatch_drift_alarms_total",
                                     {"model": MODEL, "version": "2", "detector": "canary.value.value"}) == 1.0
    # The stable version's own baseline is not disturbed by its canary.
    assert registry.get_sample_value("sidewatch_drift_detected", {
        "model": MODEL, "version": "1", "detector": "inputs_mean", "feature": "all"}) in (None, 0.0)


def test_the_comparison_ends_when_the_stable_version_stops_serving(rows):
    clock = Clock()
    watch, registry = _watch(clock, **{"drift.canary.active_seconds": 30})
    _serve(watch, clock, rows, 400, {"1": (0.8, WEIGHTS), "2": (0.2, SWAPPED)})
    assert any(_canary_flags(registry, "2").values())
    _serve(watch, clock, rows, 60, {"2": (1.0, SWAPPED)})      # promoted (or the stable one rolled away)
    assert MODEL not in watch.canaries.comparisons
    assert _canary_flags(registry, "2") == {} and _state(registry, "2") is None


def test_versions_pair_newest_against_oldest_and_comparisons_are_bounded(rows):
    clock = Clock()
    watch, registry = _watch(clock, **{"drift.canary.max_comparisons": 1})
    _serve(watch, clock, rows, 5, {"9": (0.5, WEIGHTS), "10": (0.3, WEIGHTS), "canary": (0.2, WEIGHTS)})
    comparison = watch.canaries.comparisons[MODEL]
    assert (comparison.stable, comparison.version) == ("9", "canary")   # numbers by value, names after
    for i in range(3):
        request = oip_pb2.ModelInferRequest(model_name=f"other{i}", model_version="1")
        codec.add_input(request, "features", rows[:1].astype(np.float32))
        for version in ("1", "2"):
            response = oip_pb2.ModelInferResponse(model_name=f"other{i}", model_version=version)
            codec.add_output(response, "value", np.zeros((1, 1), np.float32))
            watch(TappedInference(f"other{i}", version, codec.decode_request(request),
                                  codec.decode_response(response), request, response, 0.0, 0.0))
    watch.tick()
    assert set(watch.canaries.comparisons) == {MODEL}
