"""Drift and the flagged-share alarm through a real sidecar in front of the real model server: benign
traffic from the reference's source keeps every flag down; brightened images raise the drift flag and
adversarial examples the flagged-share flag, each under the default false-alarm budget (1/30d), with
short looks so that the test takes seconds. (The drift tap sink on its own: tests/unit/test_drift_watch.py.)"""

from __future__ import annotations

import time

import numpy as np
import yaml

from agent.demo.data import BENIGN_STREAM, load_adversarial, load_images
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol.client import InferenceClient
from tests.support.harness import http_get, metric_value, start_model_server, start_sidecar
from tests.support.pacing import send_paced

MODEL = "mnist_cnn"
RATE = 60.0  # iterations per second, one request to each version in each
DETECTORS = ("inputs_mean", "inputs_shape", "confidence", "entropy", "class_mix", "score")


def _drifted(images: np.ndarray) -> np.ndarray:
    """Brighter, thicker strokes: a drift a camera or a preprocessing change could cause."""
    return np.clip(images * 1.6 + 0.25, 0.0, 1.0).astype(np.float32)


def _send(client, v1: np.ndarray, v2: np.ndarray, seconds: float, until=None) -> None:
    """One request to version 1 and one to version 2 every 1/RATE s, for ``seconds`` or until ``until()``."""
    def send(i: int) -> None:
        client.infer(MODEL, {"input": v1[i % len(v1):i % len(v1) + 1]}, version="1")
        client.infer(MODEL, {"input": v2[i % len(v2):i % len(v2) + 1]}, version="2")

    send_paced(send, RATE, seconds, until)


def test_benign_traffic_stays_quiet_and_drift_and_attacks_raise_their_flags(tmp_path):
    config = tmp_path / "sidewatch.yaml"
    config.write_text(yaml.safe_dump({
        "drift": {"look_interval_seconds": 3, "slot_seconds": 0.25, "export_interval_seconds": 0.5,
                  "cluster_rows": 15, "min_clusters": 10},
        "detection": {"rate_alarm": {"look_interval_seconds": 2, "slot_seconds": 0.2, "cluster_rows": 10,
                                     "min_clusters": 10}}}))
    model_server, model_port = start_model_server(tmp_path)
    sidecar, port, metrics_port = start_sidecar(tmp_path, model_port, "--model-repository", str(BUNDLED_REPOSITORY),
                                                config=config)
    client = InferenceClient(f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    benign = load_images(BENIGN_STREAM)[0]
    adversarial = load_adversarial()[0]
    try:
        _send(client, benign, benign[::-1], seconds=10)
        text = http_get(url)
        assert metric_value(text, "sidewatch_drift_looks_total", model=MODEL, version="1", result="tested") >= 2
        for detector in DETECTORS:
            assert metric_value(text, "sidewatch_drift_detected", model=MODEL, version="1", detector=detector,
                                feature="all") == 0, detector
        assert metric_value(text, "sidewatch_adversarial_rate_detected", model=MODEL, version="2") == 0
        evidence = metric_value(text, "sidewatch_drift_statistic", model=MODEL, version="1", detector="inputs_mean",
                                feature="all")
        assert 0 < evidence < metric_value(text, "sidewatch_drift_threshold", model=MODEL, version="1",
                                           detector="inputs_mean", feature="all")
        assert metric_value(text, "sidewatch_drift_false_alarm_budget_seconds", model=MODEL, version="1") == 2592000

        def both_flags_up() -> bool:
            text = http_get(url)
            return metric_value(text, "sidewatch_drift_detected", model=MODEL, version="1", detector="inputs_mean",
                                feature="all") == 1 and \
                metric_value(text, "sidewatch_adversarial_rate_detected", model=MODEL, version="2") == 1

        started = time.monotonic()
        _send(client, _drifted(benign), adversarial, seconds=30, until=both_flags_up)
        assert both_flags_up(), f"not both flags within {time.monotonic() - started:.0f} s"
        text = http_get(url)
        assert metric_value(text, "sidewatch_drift_alarms_total", model=MODEL, version="1", detector="inputs_mean") == 1
        assert metric_value(text, "sidewatch_drift_effect", model=MODEL, version="1", detector="inputs_mean",
                            feature="all") >= 0.3
        assert metric_value(text, "sidewatch_drift_last_alarm_timestamp_seconds", model=MODEL, version="1") > 0
        assert metric_value(text, "sidewatch_adversarial_rate_alarms_total", model=MODEL, version="2") == 1
        assert metric_value(text, "sidewatch_adversarial_rate_statistic", model=MODEL, version="2") > \
            metric_value(text, "sidewatch_adversarial_rate_threshold", model=MODEL, version="2")
        assert metric_value(text, "sidewatch_anomalies_total", model=MODEL, version="1") > 100
    finally:
        client.close()
        sidecar.stop()
        model_server.stop()
