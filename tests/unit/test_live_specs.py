"""Kinds of a live baseline's tensors from the upstream's ModelMetadata (a real gRPC server in this process,
asked through the sidecar's own client, agent/dataplane/metadata.py), the fallback to the traffic's tensors,
and the bound on a live version's detectors and series (agent/detect/drift/live_detectors.py)."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.dataplane.metadata import UpstreamMetadata
from agent.dataplane.tap import TappedInference
from agent.detect.drift.baseline import LiveDrift
from agent.detect.drift.watch import DriftWatch
from agent.metrics import BoundedModels, DriftMetrics
from tests.support.drift_watch import tapped
from tests.support.metadata_upstream import MetadataUpstream, metadata

MODEL, VERSION = "tokens", "1"
# The model takes token ids of any length: one request shows eight, but they are not eight numeric columns.
DECLARED = metadata(MODEL, inputs=[("token_ids", "INT64", [-1, -1])], outputs=[("probabilities", "FP32", [-1, 3])])
RNG = np.random.default_rng(0)


def _inference(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], model: str = MODEL,
               version: str = VERSION) -> TappedInference:
    return tapped(model, inputs, outputs, version, version)


def _token_copy() -> TappedInference:
    probabilities = RNG.dirichlet([1, 1, 1], size=1).astype(np.float32)
    return _inference({"token_ids": RNG.integers(0, 30_000, size=(1, 8)), "extra": RNG.normal(size=(1, 2))},
                      {"probabilities": probabilities})


def _watch(address: str | None, timeout: float = 2.0):
    config = load_config(overrides={"drift.baseline.rows": 50, "drift.baseline.metadata_timeout_seconds": timeout})
    registry = CollectorRegistry()
    lookup = None if address is None else UpstreamMetadata(config, timeout, address=address)
    watch = DriftWatch(None, config.drift, DriftMetrics(registry), BoundedModels(8), metadata=lookup)
    return watch, registry, lookup


def _specs_counted(registry, **labels) -> float | None:
    return registry.get_sample_value("sidewatch_drift_specs_total", {"model": MODEL, "version": VERSION, **labels})


def _feed_until_chosen(watch, registry, seconds: float = 10.0) -> float:
    """Feed copies until the version's kinds are chosen; returns the longest time one call took (the tap
    thread's: it never waits for the upstream)."""
    slowest = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        watch(_token_copy())
        slowest = max(slowest, time.perf_counter() - started)
        live = watch.live.get((MODEL, VERSION))
        if live is not None and live.specs is not None:
            return slowest
        time.sleep(0.005)
    raise AssertionError("the kinds were never chosen")


def _kinds(watch) -> dict[str, str]:
    return {spec.name: spec.kind for spec in watch.live[(MODEL, VERSION)].specs}


def test_kinds_come_from_the_models_metadata_not_from_one_request():
    # From the traffic alone: eight integer columns, numeric, and an "extra" tensor the model does not declare.
    alone, alone_registry, _ = _watch(None)
    _feed_until_chosen(alone, alone_registry)
    assert _kinds(alone) == {"token_ids": "numeric", "extra": "numeric", "probabilities": "classifier"}
    assert _specs_counted(alone_registry, source="traffic", reason="no_lookup") == 1

    with MetadataUpstream({MODEL: DECLARED}) as upstream:
        watch, registry, lookup = _watch(upstream.address)
        try:
            _feed_until_chosen(watch, registry)
            # Dynamic width: token ids need the model's tokenizer, so they are not watched; "extra" is not the
            # model's; the probabilities are.
            assert _kinds(watch) == {"token_ids": "ignore", "probabilities": "classifier"}
            assert upstream.asked == [(MODEL, VERSION)]
            assert _specs_counted(registry, source="metadata", reason="answered") == 1
            assert _specs_counted(registry, source="traffic", reason="no_lookup") is None
            live = watch.live[(MODEL, VERSION)]
            for _ in range(60):                        # the baseline is learned on the metadata's kinds
                watch(_token_copy())
            assert live.state == "watching" and set(live.moments) == {"outputs"}
            assert {d.name for d in live.tests.detectors} >= {"probabilities.class_mix"}
        finally:
            watch.close()
            lookup.close()


@pytest.mark.parametrize("fail, sleep, reason", [
    (grpc.StatusCode.UNAVAILABLE, 0.0, "UNAVAILABLE"),        # the call fails
    (None, 3.0, "DEADLINE_EXCEEDED"),                         # the upstream answers after the deadline
])
def test_without_an_answer_the_kinds_come_from_the_traffic_counted_and_logged_once(fail, sleep, reason, caplog):
    with MetadataUpstream({MODEL: DECLARED}, fail=fail, sleep=sleep) as upstream:
        watch, registry, lookup = _watch(upstream.address, timeout=0.5)
        try:
            with caplog.at_level(logging.INFO, logger="agent.detect.drift.baseline"):
                slowest = _feed_until_chosen(watch, registry)
                for _ in range(20):
                    watch(_token_copy())
            assert slowest < 0.25, slowest         # the tap thread never waited for the upstream's deadline
            assert _kinds(watch) == {"token_ids": "numeric", "extra": "numeric", "probabilities": "classifier"}
            assert _specs_counted(registry, source="traffic", reason="unavailable") == 1
            assert _specs_counted(registry, source="metadata", reason="answered") is None
            assert registry.get_sample_value("sidewatch_drift_skipped_total", {
                "model": MODEL, "version": VERSION, "reason": "awaiting_metadata"}) >= 1
            warnings = [r.getMessage() for r in caplog.records if "not its ModelMetadata" in r.getMessage()]
            assert len(warnings) == 1 and reason in warnings[0], warnings
        finally:
            watch.close()
            lookup.close()


def test_metadata_that_names_none_of_the_traffics_tensors_is_unusable():
    other = metadata(MODEL, inputs=[("ids", "INT64", [-1, -1])], outputs=[("scores", "FP32", [-1, 3])])
    with MetadataUpstream({MODEL: other}) as upstream:
        watch, registry, lookup = _watch(upstream.address)
        try:
            _feed_until_chosen(watch, registry)
            assert _kinds(watch) == {"token_ids": "numeric", "extra": "numeric", "probabilities": "classifier"}
            assert _specs_counted(registry, source="traffic", reason="unusable") == 1
        finally:
            watch.close()
            lookup.close()


# --- the bound on detectors ------------------------------------------------------------------------------

GAUGES = ("sidewatch_drift_statistic", "sidewatch_drift_threshold", "sidewatch_drift_p_value",
          "sidewatch_drift_effect", "sidewatch_drift_detected")
WIDE_MODEL = "wide"


def _wide_copy(rng, n: int, shift: float = 0.0) -> TappedInference:
    """A model of many tensors: 3 categorical tensors of 16 columns, 10 numeric tensors of 2 columns, a
    classifier output."""
    inputs = {f"cats{j}": rng.integers(0, 4, size=(n, 16)) + int(shift) for j in range(3)}
    inputs.update({f"n{j}": (rng.normal(size=(n, 2)) + shift).astype(np.float32) for j in range(10)})
    return _inference(inputs, {"probabilities": rng.dirichlet([1, 1, 1], size=n).astype(np.float32)},
                      model=WIDE_MODEL)


def _wide_live(max_detectors: int):
    config = load_config(overrides={
        "drift.baseline.rows": 400, "drift.look_interval_seconds": 1, "drift.slot_seconds": 0.25,
        "drift.cluster_rows": 5, "drift.min_clusters": 20, "drift.top_k_features": 3,
        "drift.max_detectors_per_version": max_detectors, "drift.export_interval_seconds": 0.01})
    registry = CollectorRegistry()
    clock = [1_800_000_000.0]
    live = LiveDrift(WIDE_MODEL, VERSION, DriftMetrics(registry), (WIDE_MODEL, VERSION), config.drift,
                     overrides={f"cats{j}": {"kind": "categorical"} for j in range(3)}, clock=lambda: clock[0])
    rng = np.random.default_rng(1)
    for _ in range(40):                              # 400 rows: the baseline
        clock[0] += 0.25
        live.observe(_wide_copy(rng, 10))
    assert live.state == "watching"
    for _ in range(160):                             # then a shift in every tensor, looked at and exported
        clock[0] += 0.25
        live.observe(_wide_copy(rng, 10, shift=1.0))
        live.flush()
        if live.look():
            live.export()
    return live, registry, config.drift


def _series(registry) -> dict[str, list[dict]]:
    return {family.name: [s.labels for s in family.samples if s.labels.get("model") == WIDE_MODEL]
            for family in registry.collect() if family.name in GAUGES}


@pytest.mark.parametrize("max_detectors", [32, 8])
def test_the_detectors_and_series_of_a_live_version_are_bounded_whatever_its_tensors(max_detectors):
    unbounded, _, _ = _wide_live(1024)
    natural = {d.name for d in unbounded.tests.detectors}
    assert len(natural) > 32, len(natural)            # one per categorical column and per numeric rate

    live, registry, settings = _wide_live(max_detectors)
    detectors = {d.name for d in live.tests.detectors}
    assert len(detectors) <= max_detectors, sorted(detectors)
    assert {"inputs_mean", "inputs_shape"} <= detectors
    assert "cats2.categories" in detectors            # the widest tensors merged first (the last on a tie)
    series = _series(registry)
    assert any(s["feature"] != "all" for s in series["sidewatch_drift_statistic"]), "nothing was tested"
    for name, labels in series.items():
        assert {s["detector"] for s in labels} <= detectors, name
        assert len(labels) <= max_detectors * (settings.top_k_features + 1), (name, len(labels))
    alarms = {s.labels["detector"] for family in registry.collect() if family.name == "sidewatch_drift_alarms"
              for s in family.samples}
    assert alarms <= detectors
    assert any(live.tests.flags.values())             # merged detectors still flag the shift
