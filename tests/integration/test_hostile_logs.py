"""Probes of the log (issue 14, defect 10), on a real ``sidewatch serve`` with the admin API, on both data
planes: whatever careless or hostile clients do, every line the sidecar writes is one JSON object, no
longer than its bound (``log_max_line_bytes``), and the ordinary events are not logged as errors:

- admin clients that go away in the middle of a request or of a response, many at once (the stdlib HTTP
  server printed a traceback for each, straight to stderr and sometimes into the middle of a JSON line);
- unary calls and ModelStreamInfer streams cancelled by their client (held by the upstream, flooded with
  answers, or at once);
- calls still in flight when the shutdown grace runs out after SIGTERM (cut: ordinary, not an error);
- a request path, an ``x-request-id`` and a model name far longer than the bound.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import threading

import grpc
import pytest

from tests.support.alert_harness import admin_config, write_config, write_token
from tests.support.harness import start_sidecar
from tests.support.hostile_traffic import model_name_field
from tests.support.polling import wait_for
from tests.support.upstream import MODEL_INFER, MODEL_STREAM_INFER, RecordingUpstream

pytestmark = pytest.mark.hostile

ADMIN_CLIENTS = 8  # threads
CONNECTIONS_PER_CLIENT = 12
CANCELLED_CALLS = 4  # of each kind: unary and stream
CUT_AT_SHUTDOWN = 4  # of each kind
MAX_LINE_BYTES = 4096  # log_max_line_bytes (the default is 16 KiB)
LONG = 60_000  # characters: far over the bound


@pytest.fixture(scope="module")
def upstream():
    with RecordingUpstream(response=b"inferred") as server:
        yield server


def _abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the server's next read or write on it fails."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _careless_admin_client(port: int, token: str, errors: list) -> None:
    """Connections that go away mid-request (half a head, half a body) and mid-response (a full request,
    then gone before the answer is read)."""
    heads = [
        b"GET /status HTTP/1.1\r\nHost: x\r\nAuthor",
        f"POST /alertmanager HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n{{".encode(),
        f"GET /status HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode(),
        f"GET /status HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode() * 50,
    ]
    try:
        for number in range(CONNECTIONS_PER_CLIENT):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(heads[number % len(heads)])
            if number % 3 == 0:
                sock.close()  # a FIN: the server writes its answer to a socket nobody reads
            else:
                _abort(sock)
    except OSError as err:
        errors.append(err)


def _careless_scraper(port: int, errors: list) -> None:
    """Scrapes of /metrics that go away before the answer is read."""
    try:
        for _ in range(CONNECTIONS_PER_CLIENT):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            _abort(sock)
    except OSError as err:
        errors.append(err)


def _long_path_request(port: int) -> None:
    """An unauthenticated request whose path is far longer than a log line may be (the refusal logs it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET /{'p' * LONG} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 ")


def _infer_request(model: bytes) -> bytes:
    """A ModelInferRequest with only its model_name (field 1), of any length."""
    return model_name_field(model)


def _start_calls(channel: grpc.Channel, count: int, sleep: str) -> list:
    """``count`` unary ModelInfer calls and ``count`` ModelStreamInfer streams that the upstream holds for
    ``sleep`` seconds; returns the calls (futures and stream iterators)."""
    infer = channel.unary_unary(MODEL_INFER)
    stream = channel.stream_stream(MODEL_STREAM_INFER)
    metadata = (("x-test-sleep", sleep),)
    calls = [infer.future(_infer_request(b"slow"), metadata=metadata, timeout=30) for _ in range(count)]
    calls += [stream(iter([_infer_request(b"slow")]), metadata=metadata, timeout=30) for _ in range(count)]
    return calls


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line]


def _not_json_objects(lines: list[str]) -> list[str]:
    bad = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(entry, dict):
            bad.append(line)
    return bad


@pytest.mark.parametrize("data_plane", ["python", "envoy"])
def test_careless_clients_and_a_cut_shutdown_leave_only_bounded_json_lines(upstream, data_plane, tmp_path):
    token, token_file = write_token(tmp_path)
    admin, admin_port = admin_config(tmp_path, token_file)
    config = write_config(tmp_path, {"admin": admin, "shutdown_grace_seconds": 0.5, "log_requests": True,
                                       "log_max_line_bytes": MAX_LINE_BYTES})
    process, port, metrics_port = start_sidecar(tmp_path, upstream.port, "--data-plane", data_plane,
                                                "--log-format", "json", config=config)
    try:
        process.wait_listening(admin_port)
        # Admin clients that go away mid-request and mid-response, in parallel (and scrapers of /metrics that
        # go away before the answer); one with a very long path.
        errors: list[OSError] = []
        clients = [threading.Thread(target=_careless_admin_client, args=(admin_port, token, errors))
                   for _ in range(ADMIN_CLIENTS)]
        clients += [threading.Thread(target=_careless_scraper, args=(metrics_port, errors)) for _ in range(2)]
        for client in clients:
            client.start()
        _long_path_request(admin_port)
        for client in clients:
            client.join(30)
        assert errors == []

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            # Very long request id and model name (the upstream answers them OK; log_requests logs them).
            infer = channel.unary_unary(MODEL_INFER)
            assert infer(_infer_request(b"m" * LONG), metadata=(("x-request-id", "r" * 7000),), timeout=10) \
                == b"inferred"

            # Calls cancelled by their clients while the upstream holds them.
            seen = len(upstream.seen)
            calls = _start_calls(channel, CANCELLED_CALLS, "5")
            wait_for(lambda: len(upstream.seen) >= seen + 2 * CANCELLED_CALLS, "the calls to reach the upstream")
            for call in calls:
                call.cancel()
            wait_for(lambda: all(s.cancelled.is_set() for s in upstream.seen[seen:]), "the upstream to see the cancels")
            # Streams cancelled while the upstream floods them with answers, and calls cancelled at once.
            chat = channel.stream_stream(MODEL_STREAM_INFER)
            for _ in range(CANCELLED_CALLS):
                flooded = chat(iter([_infer_request(b"flood")]), metadata=(("x-test-flood", "65536"),), timeout=30)
                next(flooded)
                flooded.cancel()
                infer.future(_infer_request(b"at-once"), metadata=(("x-test-sleep", "1"),), timeout=30).cancel()
                chat(iter([_infer_request(b"at-once")]), metadata=(("x-test-sleep", "1"),), timeout=30).cancel()

            # Calls still in flight when the shutdown grace (0.5 s) runs out.
            seen = len(upstream.seen)
            calls = _start_calls(channel, CUT_AT_SHUTDOWN, "20")
            wait_for(lambda: len(upstream.seen) >= seen + 2 * CUT_AT_SHUTDOWN, "the calls to reach the upstream")
            process.signal(signal.SIGTERM)
            assert process.popen.wait(20) == 0
            for call in calls:
                with pytest.raises(grpc.RpcError):
                    call.result() if isinstance(call, grpc.Future) else list(call)
    finally:
        process.stop()

    lines = _lines(process.log())
    not_json = _not_json_objects(lines)
    assert not not_json, f"{len(not_json)} of {len(lines)} lines are not JSON objects, e.g.:\n" + "\n".join(
        line[:300] for line in not_json[:10])
    entries = [json.loads(line) for line in lines]
    error_lines = [entry for entry in entries if entry["level"] in ("error", "critical")]
    assert not error_lines, f"{len(error_lines)} error lines for ordinary events: {json.dumps(error_lines[:3])[:2000]}"
    longest = max(len(line.encode()) + 1 for line in lines)  # with its newline
    assert longest <= MAX_LINE_BYTES
    # The refusal of the long path was logged, cut and marked as cut, still valid JSON.
    (refused,) = [entry for entry in entries if "refused GET /ppp" in entry["message"]]
    assert refused["cut"] == ["message"] and refused["message"].endswith("[cut]")
    if data_plane == "python":  # the call log (Envoy's plane has none)
        assert any(entry.get("request_id") == "r" * 128 for entry in entries)
    assert any("stopped" in entry["message"] for entry in entries)
