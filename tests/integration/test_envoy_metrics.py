"""Per-model call metrics on the Envoy data plane (Lua peek + gRPC access log + grpc_stats) against the
Python data plane's: the same traffic through both sidecars, to the bundled model server, gives the same
series of sidewatch_requests_total, sidewatch_upstream_errors_total, sidewatch_stream_messages_total and
the latency histogram's counts, label for label."""

from __future__ import annotations

import re
import threading
import time

import grpc
import numpy as np
import pytest

from agent.protocol import codec, oip_pb2, paths
from tests.support.harness import http_get, metric_value, start_sidecar

MODEL = "mnist_cnn"
COMPARED = ("sidewatch_requests_total", "sidewatch_upstream_errors_total", "sidewatch_stream_messages_total",
            "sidewatch_request_duration_seconds_count")


def _infer(model: str, version: str = "", image: np.ndarray | None = None) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name=model, model_version=version)
    codec.add_input(request, "input", image if image is not None else np.zeros((1, 1, 28, 28), np.float32))
    return request


def _traffic(port: int) -> None:
    """Known and unknown models, NOT_FOUND and INVALID_ARGUMENT, metadata and readiness, a stream, a body
    that is no protobuf, an unknown method."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary(paths.MODEL_INFER)
        for version in ("", "1", "2", "1"):
            infer(_infer(MODEL, version).SerializeToString(), timeout=10)
        for request, code in ((_infer("no_such_model"), grpc.StatusCode.NOT_FOUND),
                              (_infer(MODEL, "1", np.zeros((1, 3), np.float32)), grpc.StatusCode.INVALID_ARGUMENT),
                              (_infer("naïve-模型"), grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.RpcError) as raised:
                infer(request.SerializeToString(), timeout=10)
            assert raised.value.code() is code
        with pytest.raises(grpc.RpcError):  # garbage: not a protobuf; the call is counted with model ""
            infer(b"\xff\xfe\xfd garbage", timeout=10)
        channel.unary_unary(paths.MODEL_READY)(oip_pb2.ModelReadyRequest(name=MODEL, version="2")
                                               .SerializeToString(), timeout=10)
        channel.unary_unary(paths.MODEL_METADATA)(oip_pb2.ModelMetadataRequest(name=MODEL)
                                                  .SerializeToString(), timeout=10)
        channel.unary_unary(paths.SERVER_READY)(b"", timeout=10)
        stream = channel.stream_stream(paths.MODEL_STREAM_INFER)
        requests = [_infer(MODEL, "2").SerializeToString(), _infer(MODEL, "2").SerializeToString(),
                    _infer("no_such_model").SerializeToString()]
        assert len(list(stream(iter(requests), timeout=10))) == 3
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")(b"", timeout=10)
        assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED


def _series(metrics_text: str) -> dict[str, float]:
    """The compared samples, by name and labels (zero samples left out: declared, never touched)."""
    found = {}
    for line in metrics_text.splitlines():
        name = re.match(r"[a-z_]+", line)
        if name and name.group(0) in COMPARED:
            head, _, value = line.rpartition(" ")
            if float(value):
                found[head] = float(value)
    return found


@pytest.fixture(scope="module")
def planes(model_server, tmp_path_factory):
    directory = tmp_path_factory.mktemp("planes")
    python = start_sidecar(directory, model_server)
    envoy = start_sidecar(directory, model_server, "--data-plane", "envoy")
    yield python, envoy
    envoy[0].stop()
    python[0].stop()


def _settled(metrics_port: int, expected_calls: float, timeout: float = 10.0) -> dict[str, float]:
    """The series once ``expected_calls`` calls are counted (the access log arrives in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        try:
            counted = metric_value(text, "sidewatch_requests_total")
        except KeyError:
            counted = 0
        if counted >= expected_calls or time.monotonic() > deadline:
            return _series(text)
        time.sleep(0.1)


def test_envoy_series_match_the_python_planes(planes):
    (_, python_port, python_metrics), (_, envoy_port, envoy_metrics) = planes
    _traffic(python_port)
    _traffic(envoy_port)
    python = _settled(python_metrics, 14)
    envoy = _settled(envoy_metrics, 14)
    assert envoy == python
    # The figures themselves, not only their agreement.
    ok = f'sidewatch_requests_total{{code="OK",method="ModelInfer",model="{MODEL}",version="1"}}'
    assert python[ok] == 2
    # Names the upstream refuses never take a label of their own (BoundedModels): no_such_model, naïve-模型.
    assert python['sidewatch_requests_total{code="NOT_FOUND",method="ModelInfer",model="_other",version="_other"}'] == 2
    assert not any('model="no_such_model"' in series or "naïve" in series for series in python)
    assert python['sidewatch_requests_total{code="UNIMPLEMENTED",method="other",model="",version=""}'] == 1
    assert python['sidewatch_requests_total{code="UNKNOWN",method="ModelInfer",model="",version=""}'] == 1  # garbage
    assert python['sidewatch_stream_messages_total{direction="request",method="ModelStreamInfer"}'] == 3
    assert python[f'sidewatch_requests_total{{code="OK",method="ModelStreamInfer",model="{MODEL}",version="2"}}'] == 1


def test_calls_in_flight_and_access_log_counters(planes, model_server):
    _, (_, envoy_port, envoy_metrics) = planes
    gauge = "sidewatch_requests_in_flight"
    # A stream held open is in flight until it ends; its first answer arrives while the request body is
    # still open, so the Lua peek did not buffer the body.
    release = threading.Event()

    def held():
        yield _infer(MODEL).SerializeToString()
        release.wait(10)

    with grpc.insecure_channel(f"127.0.0.1:{envoy_port}") as channel:
        responses = channel.stream_stream(paths.MODEL_STREAM_INFER)(held(), timeout=20)
        next(responses)
        deadline = time.monotonic() + 5
        while metric_value(http_get(f"http://127.0.0.1:{envoy_metrics}/metrics"), gauge) < 1:
            assert time.monotonic() < deadline, "sidewatch: the held stream never showed as in flight"
            time.sleep(0.1)
        release.set()
        list(responses)
    deadline = time.monotonic() + 5
    while metric_value(http_get(f"http://127.0.0.1:{envoy_metrics}/metrics"), gauge) > 0:
        assert time.monotonic() < deadline, "sidewatch: the ended stream still shows as in flight"
        time.sleep(0.1)
    text = http_get(f"http://127.0.0.1:{envoy_metrics}/metrics")
    assert metric_value(text, "sidewatch_envoy_access_logs_written_total") >= 1
    assert metric_value(text, "sidewatch_envoy_access_logs_dropped_total") == 0
