"""Structured logs from a real sidecar: JSON lines, request ids on lines about calls, never a payload."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from agent.protocol.client import InferenceClient
from tests.support.harness import start_model_server, start_sidecar

# A tensor whose values would be easy to spot in a log, as numbers or as raw bytes.
MARKER = np.full((1, 1, 28, 28), 0.123456789, dtype=np.float32)


def _json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.fixture
def sidecar(tmp_path):
    server, model_port = start_model_server(tmp_path)
    try:
        process, port, _ = start_sidecar(tmp_path, model_port, "--log-format", "json", "--log-requests")
        yield process, port
        process.stop()
    finally:
        server.stop()


def test_calls_are_logged_as_json_with_their_request_id_and_no_payload(sidecar):
    process, port = sidecar
    client = InferenceClient(f"127.0.0.1:{port}")
    client.wait_ready()
    client.infer("mnist_cnn", {"input": MARKER}, metadata=(("x-request-id", "req-ok-42"),))
    with pytest.raises(grpc.RpcError) as failed:
        client.infer("no_such_model", {"input": MARKER}, metadata=(("x-request-id", "req-missing-7"),))
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    client.infer("mnist_cnn", {"input": MARKER})  # no id from the caller: one is made up
    client.close()
    process.stop()  # flushes and ends the log

    text = process.log()
    lines = _json_lines(text)
    # Every line the sidecar wrote is a JSON object (nothing else on stderr).
    assert lines and len(lines) == len([line for line in text.splitlines() if line.strip()])
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    by_id = {line.get("request_id"): line for line in lines if "request_id" in line}
    ok = by_id["req-ok-42"]
    assert (ok["level"], ok["model"], ok["method"], ok["code"]) == ("info", "mnist_cnn", "ModelInfer", "OK")
    assert ok["duration_seconds"] > 0
    missing = by_id["req-missing-7"]
    assert (missing["level"], missing["code"]) == ("warning", "NOT_FOUND")
    made_up = [line for line in lines
               if line.get("method") == "ModelInfer" and line["request_id"] not in ("req-ok-42", "req-missing-7")]
    assert made_up and len(made_up[0]["request_id"]) == 16
    # The payload appears nowhere: not as numbers, not as raw bytes, not as their hex.
    raw = MARKER.tobytes()
    assert "0.1234" not in text and raw[:8].hex() not in text and repr(raw[:8])[2:-1] not in text


def test_failed_calls_are_logged_without_log_requests_but_thinned_out(tmp_path):
    server, model_port = start_model_server(tmp_path)
    try:
        process, port, _ = start_sidecar(tmp_path, model_port, "--log-format", "json")
    except RuntimeError:
        server.stop()
        raise
    try:
        client = InferenceClient(f"127.0.0.1:{port}")
        client.wait_ready()
        for _ in range(20):
            client.infer("mnist_cnn", {"input": MARKER})
        for i in range(20):
            with pytest.raises(grpc.RpcError):
                client.infer("no_such_model", {"input": MARKER}, metadata=(("x-request-id", f"bad-{i}"),))
        client.close()
    finally:
        process.stop()
        server.stop()
    calls = [line for line in _json_lines(process.log()) if line.get("method") == "ModelInfer"]
    # Successes are not logged; 20 identical failures make one line within the minute.
    assert [line["code"] for line in calls] == ["NOT_FOUND"]
    assert calls[0]["request_id"] == "bad-0"
