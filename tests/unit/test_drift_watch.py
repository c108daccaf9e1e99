"""Drift detection in the sidecar: the tap sink on its own (state, bad input). (Through real gRPC:
tests/integration/test_drift_watch_sidecar.py.)"""

from __future__ import annotations

import json

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
    watch = DriftWatch(registry, load_config(overrides=overrides).drift, DriftMetrics(metrics_registry), BoundedModels(8))
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
