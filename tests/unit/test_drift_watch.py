"""Drift detection in the sidecar: the tap sink on its own (state, bad input), then through real gRPC."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.dataplane.tap import TappedInference
from agent.demo.data import REFERENCE, load_images
from agent.detect.drift.watch import DriftWatch
from agent.detect.registry import DetectorRegistry
from agent.metrics import BoundedModels, DriftMetrics
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol.client import InferenceClient
from tests.support.harness import http_get, metric_value, start_model_server, start_sidecar

MODEL = "mnist_cnn"


@pytest.fixture(scope="module")
def registry():
    return DetectorRegistry(BUNDLED_REPOSITORY, "cpu")


@pytest.fixture(scope="module")
def traffic(registry):
    """Reference-like images with the model's real outputs, as the tap would hand them over."""
    images = load_images(REFERENCE)[0][:400]
    probabilities = registry.get(MODEL, "1").detector.score(images).probabilities
    return images, probabilities


def _watch(registry, tmp_path=None) -> tuple[DriftWatch, CollectorRegistry]:
    overrides = {"detection.model_repository": str(BUNDLED_REPOSITORY)}
    if tmp_path is not None:
        overrides["drift.checkpoint_dir"] = str(tmp_path)
    metrics_registry = CollectorRegistry()
    watch = DriftWatch(registry, load_config(overrides=overrides), DriftMetrics(metrics_registry), BoundedModels(8))
    return watch, metrics_registry


def _feed(watch, images, probabilities, start, stop):
    for i in range(start, stop):
        watch(TappedInference(MODEL, "1", {"input": images[i:i + 1]}, {"probabilities": probabilities[i:i + 1]},
                              None, None, 0.0, 0.0))


def _results(watch) -> dict:
    watch.tick()  # feed the rows still gathered for the next micro-batch
    return {name: detector.result.as_dict() for name, (_, detector) in watch.models[(MODEL, "1")].detectors.items()}


def test_checkpoint_and_restore_continue_like_an_uninterrupted_run(registry, traffic, tmp_path):
    images, probabilities = traffic
    uninterrupted, _ = _watch(registry)
    _feed(uninterrupted, images, probabilities, 0, 300)

    # The restart falls on a micro-batch boundary (64 rows), so both runs update their detectors
    # with the same batches and even the per-call alarm flags must agree.
    first, _ = _watch(registry, tmp_path)
    _feed(first, images, probabilities, 0, 192)
    first.close()  # shutdown: state written
    assert (tmp_path / "drift-mnist_cnn-1.json").exists()
    second, _ = _watch(registry, tmp_path)  # restart: state read back
    _feed(second, images, probabilities, 192, 300)
    assert json.dumps(_results(second), sort_keys=True) == json.dumps(_results(uninterrupted), sort_keys=True)


def test_non_finite_inputs_are_counted_and_skipped(registry, traffic):
    images, probabilities = traffic
    watch, metrics = _watch(registry)
    bad = images[:3].copy()
    bad[0, 0, 5, 5] = np.nan
    bad[1, 0, 0, 0] = np.inf
    watch(TappedInference(MODEL, "1", {"input": bad}, {"probabilities": probabilities[:3]}, None, None, 0.0, 0.0))
    watch.tick()
    labels = {"model": MODEL, "version": "1"}
    assert metrics.get_sample_value("sidewatch_drift_skipped_total", {**labels, "reason": "non_finite"}) == 2
    assert metrics.get_sample_value("sidewatch_drift_samples_total", labels) == 1


def _drifted(images: np.ndarray) -> np.ndarray:
    """Brighter, thicker strokes: a drift a camera or a preprocessing change could cause."""
    return np.clip(images * 1.6 + 0.25, 0.0, 1.0).astype(np.float32)


def test_sidecar_exports_drift_and_detects_a_drifted_stream(tmp_path):
    model_server, model_port = start_model_server(tmp_path)
    sidecar, port, metrics_port = start_sidecar(tmp_path, model_port, "--model-repository", str(BUNDLED_REPOSITORY))
    client = InferenceClient(f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        reference = load_images(REFERENCE)[0]
        for i in range(150):
            client.infer(MODEL, {"input": reference[4000 + i:4001 + i]}, version="1")
        time.sleep(1.5)
        text = http_get(url)
        threshold = metric_value(text, "sidewatch_drift_threshold", model=MODEL, version="1", detector="inputs_mmd",
                                 feature="all")
        assert threshold > 0
        assert metric_value(text, "sidewatch_drift_samples_total", model=MODEL, version="1") == 150
        drifted = _drifted(reference[4150:4450])
        for i in range(len(drifted)):
            client.infer(MODEL, {"input": drifted[i:i + 1]}, version="1")
        deadline = time.monotonic() + 10
        while True:
            text = http_get(url)
            drifting = [d for d in ("inputs_cvm", "inputs_mmd")
                        if metric_value(text, "sidewatch_drift_detected", model=MODEL, version="1", detector=d,
                                        feature="all") == 1]
            if len(drifting) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert drifting == ["inputs_cvm", "inputs_mmd"]
        assert metric_value(text, "sidewatch_drift_alarms_total", model=MODEL, version="1", detector="inputs_mmd") >= 1
        statistic = metric_value(text, "sidewatch_drift_statistic", model=MODEL, version="1", detector="inputs_mmd",
                                 feature="all")
        assert statistic > threshold
        assert metric_value(text, "sidewatch_anomalies_total", model=MODEL, version="1") > 100
    finally:
        client.close()
        sidecar.stop()
        model_server.stop()
