"""Shadow-mode micro-batching on its own: batches close at a row count or an age; big requests go alone."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.dataplane.tap import TappedInference
from agent.demo.data import load_images
from agent.detect.adversarial.watch import AdversarialWatch
from agent.detect.registry import DetectorRegistry
from agent.metrics import BoundedModels, DetectionMetrics
from agent.modelserver.repository import BUNDLED_REPOSITORY

LABELS = {"model": "mnist_cnn", "version": "1", "detector": "feature_squeezing"}


def _watch(registry, max_batch=4, max_wait=0.05):
    config = load_config(overrides={"detection.model_repository": str(BUNDLED_REPOSITORY),
                                    "detection.max_batch_size": max_batch, "detection.max_wait_seconds": max_wait})
    return AdversarialWatch(DetectorRegistry(BUNDLED_REPOSITORY, "cpu"), config.detection, DetectionMetrics(registry),
                            BoundedModels(8))


def _tapped(rows: np.ndarray, version="1") -> TappedInference:
    return TappedInference("mnist_cnn", version, {"input": rows}, {}, None, None, 0.0, 0.0)


def _batches(registry) -> tuple[float, float]:
    """(number of detector calls, rows scored) from the batch-size histogram."""
    return (registry.get_sample_value("sidewatch_detector_batch_size_count", LABELS) or 0.0,
            registry.get_sample_value("sidewatch_detector_batch_size_sum", LABELS) or 0.0)


def test_batches_close_at_the_row_limit_and_at_their_age():
    registry = CollectorRegistry()
    watch = _watch(registry)
    images = load_images()[0]
    for index in range(10):
        watch(_tapped(images[index:index + 1]))
    assert _batches(registry) == (2, 8)  # two full batches of 4; 2 rows still waiting
    watch.tick()
    assert _batches(registry) == (2, 8)  # too young to close
    time.sleep(0.06)
    watch.tick()
    assert _batches(registry) == (3, 10)
    watch.close()


def test_a_request_with_many_rows_is_a_batch_of_its_own():
    registry = CollectorRegistry()
    watch = _watch(registry)
    images = load_images()[0]
    watch(_tapped(images[:1]))
    watch(_tapped(images[1:7]))  # 6 rows >= 4: scored alone, at once
    assert _batches(registry) == (1, 6)
    watch.flush()
    assert _batches(registry) == (2, 7)
    watch.close()


def test_micro_batched_scores_equal_one_by_one_scores():
    images = load_images()[0][:12]
    registry = CollectorRegistry()
    watch = _watch(registry, max_batch=64)
    detector = watch.registry.get("mnist_cnn", "1").detector
    one_by_one = np.concatenate([detector.score(images[i:i + 1]).scores for i in range(12)])
    batched = detector.score(images).scores
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)
    for index in range(12):
        watch(_tapped(images[index:index + 1]))
    watch.flush()
    total = registry.get_sample_value("sidewatch_adversarial_score_sum", {"model": "mnist_cnn", "version": "1"})
    assert np.isclose(total, one_by_one.sum(), rtol=1e-4)
    watch.close()
