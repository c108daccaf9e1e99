"""Probes of hostile model names (issue 14, defects 1 and 3), through a real ``sidewatch serve`` in front of
the bundled model server, on both data planes:

- defect 1: a 1 MB model name must not become a 1 MB label (``/metrics``) nor 1 MB words in log lines;
- defect 3: junk model names (random text, random bytes), which the model server refuses, must not take
  the model labels: the real model's traffic keeps its own series.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid

import grpc
import numpy as np
import pytest

from agent.dataplane.envoy.lua import MAX_LABEL_BYTES  # both planes bound (agent.metrics)
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol import paths
from agent.protocol.client import InferenceClient
from tests.support.harness import http_get, start_sidecar
from tests.support.hostile_traffic import model_name_field

pytestmark = pytest.mark.hostile

MODEL = "mnist_cnn"
LABEL = re.compile(r'model="((?:[^"\\]|\\.)*)"')


def _sidecar(tmp_path, model_server: int, data_plane: str):
    return start_sidecar(tmp_path, model_server, "--data-plane", data_plane, "--model-repository",
                         str(BUNDLED_REPOSITORY))


def _request(name: bytes) -> bytes:
    """A ModelInferRequest for one image whose model_name is ``name``, any bytes (protobuf would refuse to
    write invalid UTF-8 itself): field 1 first, as encoders write it, then the rest."""
    rest = InferenceClient.request("", {"input": np.zeros((1, 1, 28, 28), np.float32)}).SerializeToString()
    return model_name_field(name) + rest


def _call(port: int, name: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary(paths.MODEL_INFER)
        try:
            infer(_request(name), timeout=30)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def _metrics(metrics_port: int) -> str:
    return http_get(f"http://127.0.0.1:{metrics_port}/metrics")


def _requests(text: str, model: str) -> float:
    """sidewatch_requests_total of ``model``, every version, method and code."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("sidewatch_requests_total{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _settled(metrics_port: int, enough, timeout: float = 5.0) -> str:
    """/metrics once ``enough(text)`` holds, or after ``timeout`` (Envoy's calls arrive in its access log)."""
    deadline = time.monotonic() + timeout
    while True:
        text = _metrics(metrics_port)
        if enough(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


@pytest.mark.parametrize("data_plane", ["python", "envoy"])
def test_a_1mb_model_name_is_not_a_1mb_label_nor_1mb_of_logs(tmp_path, model_server, data_plane):
    process, port, metrics_port = _sidecar(tmp_path, model_server, data_plane)
    try:
        before = _metrics(metrics_port)
        log_before = process.log_path.stat().st_size
        for name in (b"a" * 2**20, b"b" * 2**20):
            assert _call(port, name) != grpc.StatusCode.OK  # NOT_FOUND, or RESOURCE_EXHAUSTED: the name in its trailers
        text = _settled(metrics_port, lambda text: _requests(text, "_other") >= 2)
        time.sleep(0.5)
        log_growth = process.log_path.stat().st_size - log_before
        sizes = f"/metrics {len(before)} -> {len(text)} bytes, log +{log_growth} bytes"
        print(f"{data_plane}: {sizes}")
        assert len(text) < 100_000, sizes
        assert log_growth < 64 * 1024, sizes
        assert all(len(label.encode()) <= MAX_LABEL_BYTES for label in LABEL.findall(text)), sizes
        assert _requests(text, "_other") >= 2, sizes  # counted, under no label of their own
        assert InferenceClient(f"127.0.0.1:{port}").infer(MODEL, {"input": np.zeros((1, 1, 28, 28), np.float32)})
    finally:
        process.stop()


@pytest.mark.parametrize("data_plane", ["python", "envoy"])
def test_junk_model_names_never_take_the_real_models_labels(tmp_path, model_server, data_plane):
    process, port, metrics_port = _sidecar(tmp_path, model_server, data_plane)  # fresh: every slot free
    try:
        junk = [f"junk-{uuid.uuid4().hex}".encode() for _ in range(99)] + [os.urandom(48)]
        for name in junk:
            assert _call(port, name) != grpc.StatusCode.OK  # NOT_FOUND; random bytes: UNKNOWN (unparsable)
        client = InferenceClient(f"127.0.0.1:{port}")
        for image in np.random.default_rng(0).random((5, 1, 1, 28, 28), dtype=np.float32):
            assert client.infer(MODEL, {"input": image})[0]
        client.close()
        text = _settled(metrics_port, lambda text: _requests(text, MODEL) >= 5 and _requests(text, "_other") >= 100)
        labels = set(LABEL.findall(text))
        figures = f"{MODEL}: {_requests(text, MODEL)}, _other: {_requests(text, '_other')}, labels {sorted(labels)[:5]}"
        print(f"{data_plane}: {figures}")
        assert _requests(text, MODEL) == 5, figures
        assert _requests(text, "_other") == 100, figures  # the junk calls, each counted
        assert labels <= {MODEL, "", "_other"}, figures
    finally:
        process.stop()


@pytest.mark.parametrize("data_plane", ["python", "envoy"])
def test_the_label_length_is_the_configured_one_on_both_planes(tmp_path, model_server, data_plane):
    """``metrics.max_label_bytes``: a model the config names, 40 bytes long, is counted under its first 16."""
    name = "m" * 40
    config = tmp_path / "sidewatch.json"
    config.write_text(json.dumps({"data_plane": data_plane, "metrics": {"max_label_bytes": 16}, "models": {name: {}}}))
    process, port, metrics_port = start_sidecar(tmp_path, model_server, config=config)
    try:
        for _ in range(3):
            _call(port, name.encode())  # NOT_FOUND: the model server has no such model
        text = _settled(metrics_port, lambda text: _requests(text, name[:16]) >= 3)
        assert _requests(text, name[:16]) >= 3, text[-2000:]
        assert all(len(label.encode()) <= 16 for label in LABEL.findall(text)), LABEL.findall(text)
    finally:
        process.stop()
