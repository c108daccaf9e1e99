"""Drift detection in the sidecar: the tap sink on its own, on a simulated clock (looks, the held flag,
the metrics, state across a restart, bad input, outdated artifacts). (Through real gRPC:
tests/integration/test_drift_watch_sidecar.py.)"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.app import check_config
from agent.config import load_config
from agent.dataplane.tap import TappedInference
from agent.demo.data import REFERENCE, load_images
from agent.detect.drift.watch import DriftWatch
from agent.detect.registry import DetectorRegistry
from agent.metrics import BoundedModels, DriftMetrics
from agent.modelserver.repository import BUNDLED_REPOSITORY

MODEL = "mnist_cnn"
LABELS = {"model": MODEL, "version": "1"}
START = 1_800_000_000.0  # a simulated unix time, on a look boundary


class Clock:
    """A simulated wall clock: the watch reads it for arrival times and looks."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def registry():
    return DetectorRegistry(BUNDLED_REPOSITORY, "cpu")


@pytest.fixture(scope="module")
def traffic(registry):
    """Reference images with the model's real outputs, as the tap would hand them over; and the same
    images brightened."""
    images = load_images(REFERENCE)[0][:1200]
    drifted = np.clip(images * 1.6 + 0.25, 0.0, 1.0).astype(np.float32)
    detector = registry.get(MODEL, "1").detector
    return images, detector.score(images).probabilities, drifted, detector.score(drifted).probabilities


def _watch(registry, clock, tmp_path=None, **overrides):
    settings = {"detection.model_repository": str(BUNDLED_REPOSITORY), **overrides}
    if tmp_path is not None:
        settings["drift.checkpoint_dir"] = str(tmp_path)
    metrics = CollectorRegistry()
    watch = DriftWatch(registry, load_config(overrides=settings).drift, DriftMetrics(metrics), BoundedModels(8),
                       clock=clock)
    return watch, metrics


def _feed(watch, clock, images, probabilities, rate=20.0, seconds=None):
    """One request per 1/rate seconds of simulated time, the tap's tick after each."""
    n = len(images) if seconds is None else int(rate * seconds)
    for i in range(n):
        clock.now += 1.0 / rate
        j = i % len(images)
        watch(TappedInference(MODEL, "1", {"input": images[j:j + 1]}, {"probabilities": probabilities[j:j + 1]},
                              None, None, 0.0, 0.0))
        watch.tick()


def _value(metrics, name, **labels):
    return metrics.get_sample_value(name, {**LABELS, **labels})


def test_benign_traffic_stays_quiet_and_a_drift_raises_a_flag_that_holds(registry, traffic):
    images, probabilities, drifted, drifted_p = traffic
    clock = Clock()
    watch, metrics = _watch(registry, clock)
    _feed(watch, clock, images, probabilities, seconds=300)        # 5 minutes of benign traffic at 20/s
    assert _value(metrics, "sidewatch_drift_looks_total", result="tested") >= 3
    for detector in ("inputs_mean", "inputs_shape", "confidence", "entropy", "class_mix", "score"):
        assert _value(metrics, "sidewatch_drift_detected", detector=detector, feature="all") == 0
    assert _value(metrics, "sidewatch_drift_last_alarm_timestamp_seconds") is None
    evidence = _value(metrics, "sidewatch_drift_statistic", detector="inputs_mean", feature="all")
    threshold = _value(metrics, "sidewatch_drift_threshold", detector="inputs_mean", feature="all")
    assert 0 < evidence < threshold
    assert _value(metrics, "sidewatch_drift_false_alarm_budget_seconds") == 30 * 86400
    assert _value(metrics, "sidewatch_drift_min_effect") == 0.3
    assert 0 < _value(metrics, "sidewatch_drift_alpha") < 1e-6

    _feed(watch, clock, drifted, drifted_p, seconds=120)            # brightened images for 2 minutes
    assert _value(metrics, "sidewatch_drift_detected", detector="inputs_mean", feature="all") == 1
    assert _value(metrics, "sidewatch_drift_alarms_total", detector="inputs_mean") == 1
    assert _value(metrics, "sidewatch_drift_effect", detector="inputs_mean", feature="all") >= 0.3
    assert _value(metrics, "sidewatch_drift_statistic", detector="inputs_mean", feature="all") > \
        _value(metrics, "sidewatch_drift_threshold", detector="inputs_mean", feature="all")
    assert START + 300 < _value(metrics, "sidewatch_drift_last_alarm_timestamp_seconds") <= clock.now
    # Attribution: the per-feature series of the top features say which block means moved.
    flagged = [s.labels["feature"] for family in metrics.collect() if family.name == "sidewatch_drift_detected"
               for s in family.samples if s.labels["detector"] == "inputs_mean" and s.value == 1]
    assert "all" in flagged and len(flagged) >= 2

    # Back to benign: the flag holds for the looks it takes to clear, then drops; one alarm in all.
    _feed(watch, clock, images, probabilities, seconds=61)
    assert _value(metrics, "sidewatch_drift_detected", detector="inputs_mean", feature="all") == 1
    _feed(watch, clock, images, probabilities, seconds=300)
    assert _value(metrics, "sidewatch_drift_detected", detector="inputs_mean", feature="all") == 0
    assert _value(metrics, "sidewatch_drift_alarms_total", detector="inputs_mean") == 1

    # An operator's reset during a drift drops the flag; the next rise is counted as a second alarm.
    _feed(watch, clock, drifted, drifted_p, seconds=120)
    assert _value(metrics, "sidewatch_drift_alarms_total", detector="inputs_mean") == 2
    assert watch.reset_baseline(MODEL, "1")
    watch.tick()
    assert _value(metrics, "sidewatch_drift_detected", detector="inputs_mean", feature="all") == 0
    _feed(watch, clock, drifted, drifted_p, seconds=120)
    assert _value(metrics, "sidewatch_drift_detected", detector="inputs_mean", feature="all") == 1
    assert _value(metrics, "sidewatch_drift_alarms_total", detector="inputs_mean") == 3


def test_checkpoint_and_restore_continue_like_an_uninterrupted_run(registry, traffic, tmp_path):
    images, probabilities, _, _ = traffic
    uninterrupted_clock = Clock()
    uninterrupted, _ = _watch(registry, uninterrupted_clock)
    _feed(uninterrupted, uninterrupted_clock, images, probabilities, seconds=150)

    clock = Clock()
    first, _ = _watch(registry, clock, tmp_path)
    _feed(first, clock, images, probabilities, seconds=90)
    first.close()  # shutdown: state written
    assert (tmp_path / "drift-mnist_cnn-1.json").exists()
    second, _ = _watch(registry, clock, tmp_path)  # restart: state read back
    assert second.models[(MODEL, "1")].tests.clock.last_index == first.models[(MODEL, "1")].tests.clock.last_index
    images_left = np.roll(images, -90 * 20, axis=0)
    p_left = np.roll(probabilities, -90 * 20, axis=0)
    _feed(second, clock, images_left, p_left, seconds=60)

    def state(watch):
        tests = watch.models[(MODEL, "1")].tests
        return {part: result.as_dict() for part, result in tests.last_tested.items()}, tests.tests["inputs"].n_looks

    assert json.dumps(state(second)[0]["inputs"], sort_keys=True) == \
        json.dumps(state(uninterrupted)[0]["inputs"], sort_keys=True)
    assert state(second)[1] == state(uninterrupted)[1]  # the restart added no look


def test_a_flag_held_across_a_restart_is_not_counted_as_a_new_alarm(registry, traffic, tmp_path):
    images, probabilities, drifted, drifted_p = traffic
    clock = Clock()
    first, first_metrics = _watch(registry, clock, tmp_path)
    _feed(first, clock, images, probabilities, seconds=120)
    _feed(first, clock, drifted, drifted_p, seconds=120)
    assert _value(first_metrics, "sidewatch_drift_alarms_total", detector="inputs_mean") == 1
    first.close()
    second, metrics = _watch(registry, clock, tmp_path)  # restart: the flag is still up, restored
    _feed(second, clock, drifted, drifted_p, seconds=30)
    assert _value(metrics, "sidewatch_drift_detected", detector="inputs_mean", feature="all") == 1
    assert _value(metrics, "sidewatch_drift_alarms_total", detector="inputs_mean") == 0


def test_a_restart_with_other_settings_or_an_older_state_starts_afresh(registry, traffic, tmp_path, caplog):
    images, probabilities, _, _ = traffic
    clock = Clock()
    first, _ = _watch(registry, clock, tmp_path)
    _feed(first, clock, images, probabilities, seconds=70)
    first.close()
    other, _ = _watch(registry, clock, tmp_path, **{"drift.min_effect": 0.5})  # another min_effect
    assert other.models[(MODEL, "1")].tests.tests["inputs"].n == 0
    path = tmp_path / "drift-mnist_cnn-1.json"
    old = json.loads(path.read_text())
    path.write_text(json.dumps({"model_sha256": old["model_sha256"], "detectors": {}}))  # what 0.x wrote
    with caplog.at_level(logging.WARNING):
        again, _ = _watch(registry, clock, tmp_path)
    assert again.models[(MODEL, "1")].tests.tests["inputs"].n == 0
    assert "from an older sidewatch" in caplog.text


def _outdated_repository(tmp_path):
    """The bundled repository, version 1's artifact with the drift section sidewatch 0.x wrote."""
    repository = tmp_path / "models"
    shutil.copytree(BUNDLED_REPOSITORY / MODEL, repository / MODEL)
    artifact_path = repository / MODEL / "1" / "sidewatch-calibration.json"
    artifact = json.loads(artifact_path.read_text())
    artifact["drift"] = {"ert": 500.0, "window": 100, "region_names": artifact["drift"]["region_names"],
                         "detectors": {"inputs_mmd": {"class": "OnlineMMD", "source": "regions", "calibration": {}}},
                         "anomaly": artifact["drift"]["anomaly"], "fleet_bins": artifact["drift"]["fleet_bins"]}
    artifact_path.write_text(json.dumps(artifact))
    return repository


def test_an_artifact_from_before_the_budget_is_not_watched_and_says_how_to_recalibrate(tmp_path, caplog):
    repository = _outdated_repository(tmp_path)
    with caplog.at_level(logging.WARNING):
        watch = DriftWatch(DetectorRegistry(repository, "cpu"), load_config().drift, DriftMetrics(CollectorRegistry()),
                           BoundedModels(8))
    assert (MODEL, "1") not in watch.models and (MODEL, "2") in watch.models
    assert "rerun `sidewatch calibrate" in caplog.text and "false_alarm_budget" in caplog.text
    # `serve --check-config` says so before the start, and the configuration is still valid.
    warnings = check_config(load_config(overrides={"detection.model_repository": str(repository)}))
    assert len(warnings) == 1 and warnings[0].startswith("mnist_cnn version 1: drift will not be watched")
    assert check_config(load_config(overrides={"detection.model_repository": str(BUNDLED_REPOSITORY)})) == []


def test_non_finite_inputs_are_counted_and_skipped(registry, traffic):
    images, probabilities, _, _ = traffic
    clock = Clock()
    watch, metrics = _watch(registry, clock)
    bad = images[:3].copy()
    bad[0, 0, 5, 5] = np.nan
    bad[1, 0, 0, 0] = np.inf
    watch(TappedInference(MODEL, "1", {"input": bad}, {"probabilities": probabilities[:3]}, None, None, 0.0, 0.0))
    watch.tick()
    assert _value(metrics, "sidewatch_drift_skipped_total", reason="non_finite") == 2
    assert _value(metrics, "sidewatch_drift_samples_total") == 1
