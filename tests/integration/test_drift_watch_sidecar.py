"""Drift detection through a real sidecar in front of the real model server: the metrics it exports, and a
drifted stream that it catches. (The drift tap sink on its own: tests/unit/test_drift_watch.py.)"""

from __future__ import annotations

import time

import numpy as np

from agent.demo.data import REFERENCE, load_images
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol.client import InferenceClient
from tests.support.harness import http_get, metric_value, start_model_server, start_sidecar

MODEL = "mnist_cnn"


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
