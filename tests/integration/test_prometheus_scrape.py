"""A real Prometheus server (Debian's package) scrapes the sidecar and sees its request counters."""

from __future__ import annotations

import time

import numpy as np

from agent.demo.data import load_images
from agent.protocol.client import InferenceClient
from tests.support.harness import prometheus_query, start_model_server, start_prometheus, start_sidecar


def test_prometheus_scrapes_request_counters(tmp_path):
    model_server, model_port = start_model_server(tmp_path)
    sidecar, port, metrics_port = start_sidecar(tmp_path, model_port)
    prometheus, prometheus_port = start_prometheus(tmp_path / "prom", [f"127.0.0.1:{metrics_port}"])
    try:
        client = InferenceClient(f"127.0.0.1:{port}")
        images = load_images()[0]
        for index in range(20):
            outputs, _, _ = client.infer("mnist_cnn", {"input": images[index:index + 1]}, version="1", timeout=5)
            assert outputs["probabilities"].shape == (1, 10)
        client.close()
        query = 'sum(sidewatch_requests_total{model="mnist_cnn",version="1",method="ModelInfer",code="OK"})'
        deadline = time.monotonic() + 30
        value = 0.0
        while time.monotonic() < deadline:
            result = prometheus_query(prometheus_port, query)
            value = float(result[0]["value"][1]) if result else 0.0
            if value >= 20:
                break
            time.sleep(0.5)
        assert value == 20
        up = prometheus_query(prometheus_port, 'up{job="sidewatch"}')
        assert [float(series["value"][1]) for series in up] == [1.0]
        histogram = prometheus_query(prometheus_port, 'sum(sidewatch_request_duration_seconds_count{method="ModelInfer"})')
        assert float(histogram[0]["value"][1]) == 20
        tapped = prometheus_query(prometheus_port, "sum(sidewatch_tap_processed_total)")
        assert np.isclose(float(tapped[0]["value"][1]), 20)
    finally:
        prometheus.stop()
        sidecar.stop()
        model_server.stop()
