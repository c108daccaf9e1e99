"""What the sidecar propagates, checked at a real upstream that records what reaches it: what only the python
data plane does (its message size limit, its metrics, its drain, tritonclient through it). Deadlines,
cancellation, status codes and trailers, health and an upstream that is down are checked on both data planes
in test_dataplane_conformance.py."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from tests.support.harness import http_get, metric_value, start_sidecar
from tests.support.upstream import ECHO_STREAM, ECHO_UNARY, MODEL_INFER, RecordingUpstream


def _canned_response() -> bytes:
    import numpy as np

    from agent.protocol import codec, oip_pb2

    response = oip_pb2.ModelInferResponse(model_name="echo", model_version="1")
    codec.add_output(response, "out", np.array([[0.5, 0.5]], np.float32))
    return response.SerializeToString()


@pytest.fixture(scope="module")
def upstream():
    with RecordingUpstream(response=_canned_response()) as server:
        yield server


@pytest.fixture(scope="module")
def sidecar(upstream, tmp_path_factory):
    process, port, metrics_port = start_sidecar(tmp_path_factory.mktemp("sidecar"), upstream.port)
    yield port, metrics_port
    process.stop()


@pytest.fixture
def channel(sidecar):
    with grpc.insecure_channel(f"127.0.0.1:{sidecar[0]}") as channel:
        yield channel


def test_unknown_unary_method_passes_through_with_metadata_both_ways(channel, upstream):
    call = channel.unary_unary(ECHO_UNARY)
    reply, outcome = call.with_call(b"hello", metadata=(("x-caller", "alice"), ("x-trace-bin", b"\xff\x00")))
    assert reply == b"olleh"
    seen = upstream.last(ECHO_UNARY)
    assert seen.metadata["x-caller"] == "alice"
    assert seen.metadata["x-trace-bin"] == b"\xff\x00"
    assert ("x-upstream-header", "initial") in outcome.initial_metadata()
    trailing = dict(outcome.trailing_metadata())
    assert trailing["x-upstream-trailer"] == "trailing"
    assert trailing["x-upstream-bin"] == b"\x00\x01\x02"


def test_unknown_streaming_method_passes_through(channel, upstream):
    call = channel.stream_stream(ECHO_STREAM)
    replies = list(call(iter([b"one", b"two", b"three"]), metadata=(("x-caller", "bob"),)))
    assert replies == [b"eno", b"owt", b"eerht"]
    assert upstream.last(ECHO_STREAM).metadata["x-caller"] == "bob"


def test_upstream_errors_are_counted(channel, sidecar):
    with pytest.raises(grpc.RpcError):
        channel.unary_unary(MODEL_INFER)(b"", metadata=(("x-test-fail", "INTERNAL:boom"),))
    metrics = http_get(f"http://127.0.0.1:{sidecar[1]}/metrics")
    assert metric_value(metrics, "sidewatch_upstream_errors_total", method="ModelInfer", code="INTERNAL") >= 1
    assert metric_value(metrics, "sidewatch_requests_total", method="ModelInfer", code="INTERNAL") >= 1


def test_message_size_limit(upstream, tmp_path):
    process, port, _ = start_sidecar(tmp_path, upstream.port, "--max-message-bytes", "65536")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary(ECHO_UNARY)
            assert echo(b"a" * 60000) == b"a" * 60000
            with pytest.raises(grpc.RpcError) as raised:
                echo(b"a" * 70000)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        process.stop()


def test_graceful_shutdown_drains_in_flight_calls(upstream, tmp_path):
    process, port, _ = start_sidecar(tmp_path, upstream.port)
    results = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        def slow_call():
            try:
                results["reply"] = channel.unary_unary(ECHO_UNARY)(b"drain", metadata=(("x-test-sleep", "1.5"),))
            except grpc.RpcError as err:
                results["error"] = err
        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.5)
        process.signal(signal.SIGTERM)
        caller.join(10)
        assert results.get("reply") == b"niard", results.get("error")
        assert process.popen.wait(10) == 0
    process.stop()


# --- the same, from tritonclient's gRPC client -----------------------------------------------------

@pytest.fixture(scope="module")
def triton_client(sidecar):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{sidecar[0]}")
    yield client
    client.close()


def _triton_input():
    import numpy as np
    import tritonclient.grpc as triton

    tensor = triton.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    return [tensor]


def test_tritonclient_headers_arrive_upstream(triton_client, upstream):
    result = triton_client.infer("echo", _triton_input(), headers={"x-caller": "triton", "x-tenant": "blue"})
    assert result.as_numpy("out").tolist() == [[0.5, 0.5]]
    seen = upstream.last(MODEL_INFER)
    assert (seen.metadata["x-caller"], seen.metadata["x-tenant"]) == ("triton", "blue")


def test_tritonclient_deadline_expiring_upstream(triton_client, upstream):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as raised:
        triton_client.infer("echo", _triton_input(), headers={"x-test-sleep": "3"}, client_timeout=0.5)
    assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    seen = upstream.last(MODEL_INFER)
    assert seen.time_remaining is not None and seen.time_remaining <= 0.51  # grpc-timeout rounds up
    assert seen.cancelled.wait(2.0)
