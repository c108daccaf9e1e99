"""The data plane's contract, run against both data planes (``data_plane: python``, the grpc.aio relay, and
``data_plane: envoy``): what reaches the upstream and what comes back, checked at a real upstream that
records what it saw (tests/support/upstream.py). The tests that only one data plane can pass say so and why.

One sidecar per data plane serves most tests (module scope); the drain and upstream-down tests start their
own. TLS is in test_tls.py, parametrized the same way; tests of Envoy's supervision (restart, logs,
connection limit) are at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.harness import free_port, http_get, metric_value, sidewatch, start_sidecar, wait_for_port
from tests.support.process_tree import envoy_child, tree_rss_bytes
from tests.support.upstream import ECHO_STREAM, ECHO_UNARY, MODEL_INFER, MODEL_STREAM_INFER, RecordingUpstream

DATA_PLANES = ["python", "envoy"]


@pytest.fixture(scope="module")
def upstream():
    with RecordingUpstream(response=b"inferred") as server:
        yield server


@pytest.fixture(scope="module", params=DATA_PLANES)
def data_plane(request):
    return request.param


@pytest.fixture(scope="module")
def sidecar(upstream, data_plane, tmp_path_factory):
    process, port, metrics_port = start_sidecar(tmp_path_factory.mktemp(f"sidecar-{data_plane}"), upstream.port,
                                                "--data-plane", data_plane)
    yield process, port, metrics_port
    process.stop()


@pytest.fixture
def channel(sidecar):
    with grpc.insecure_channel(f"127.0.0.1:{sidecar[1]}") as channel:
        yield channel


def test_unary_call_carries_metadata_both_ways(channel, upstream):
    reply, outcome = channel.unary_unary(ECHO_UNARY).with_call(
        b"hello", metadata=(("x-caller", "alice"), ("x-trace-bin", b"\xff\x00")))
    assert reply == b"olleh"
    seen = upstream.last(ECHO_UNARY)
    assert (seen.metadata["x-caller"], seen.metadata["x-trace-bin"]) == ("alice", b"\xff\x00")
    assert ("x-upstream-header", "initial") in outcome.initial_metadata()
    trailing = dict(outcome.trailing_metadata())
    assert (trailing["x-upstream-trailer"], trailing["x-upstream-bin"]) == ("trailing", b"\x00\x01\x02")


def test_model_stream_infer_is_bidirectional(channel, upstream):
    """Each reply comes back before the next request is sent: the stream is carried message by message,
    not buffered until the client half-closes."""
    requests: list[bytes] = []
    more = threading.Condition()

    def feed():
        for i in range(3):
            with more:
                more.wait_for(lambda i=i: len(requests) > i, timeout=5)
                if len(requests) <= i:
                    return
                yield requests[i]

    requests.append(b"one")
    replies = channel.stream_stream(MODEL_STREAM_INFER)(feed(), metadata=(("x-caller", "bob"),), timeout=10)
    got = []
    for reply, following in zip(replies, [b"two", b"three", None]):
        got.append(reply)
        if following is not None:
            with more:
                requests.append(following)
                more.notify_all()
    assert got == [b"eno", b"owt", b"eerht"]
    assert upstream.last(MODEL_STREAM_INFER).metadata["x-caller"] == "bob"


def test_deadline_reaches_upstream(channel, upstream):
    channel.unary_unary(ECHO_UNARY)(b"x", timeout=5.0)
    remaining = upstream.last(ECHO_UNARY).time_remaining
    assert remaining is not None and 4.0 < remaining <= 5.1  # grpc-timeout rounds up
    channel.unary_unary(ECHO_UNARY)(b"x")
    remaining = upstream.last(ECHO_UNARY).time_remaining
    assert remaining is None or remaining > 1e6  # no deadline: None or practically infinite


def test_deadline_expiring_is_deadline_exceeded_and_cancels_upstream(channel, upstream):
    with pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(MODEL_INFER)(b"", timeout=0.3, metadata=(("x-test-sleep", "3"),))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert upstream.last(MODEL_INFER).cancelled.wait(2.0)


def test_cancellation_reaches_upstream(channel, upstream):
    future = channel.unary_unary(ECHO_UNARY).future(b"x", metadata=(("x-test-sleep", "5"),))
    time.sleep(0.3)
    future.cancel()
    assert upstream.last(ECHO_UNARY).cancelled.wait(2.0)
    stream = channel.stream_stream(MODEL_STREAM_INFER)(iter([b"a"]), metadata=(("x-test-sleep", "5"),))
    time.sleep(0.3)
    stream.cancel()
    assert upstream.last(MODEL_STREAM_INFER).cancelled.wait(2.0)


def test_upstream_status_message_and_trailers_come_back(channel):
    with pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(MODEL_INFER)(b"", metadata=(("x-test-fail", "PERMISSION_DENIED:no entry for you"),))
    error = raised.value
    assert (error.code(), error.details()) == (grpc.StatusCode.PERMISSION_DENIED, "no entry for you")
    assert dict(error.trailing_metadata())["x-upstream-trailer"] == "trailing"
    with pytest.raises(grpc.RpcError) as raised:
        list(channel.stream_stream(ECHO_STREAM)(iter([b"a"]), metadata=(("x-test-fail", "RESOURCE_EXHAUSTED:slow"),)))
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "slow")


def test_unknown_method_is_the_upstreams_unimplemented(channel):
    with pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary("/no.Such/Method")(b"x", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_message_over_the_upstreams_limit_is_its_resource_exhausted(channel):
    """A 5 MiB message passes the sidecar (its limit, max_message_bytes, is 64 MiB by default) and the
    upstream (gRPC's default 4 MiB) refuses it: the upstream's own code reaches the client. The sidecar's
    own limit is tested on the python data plane in test_passthrough.py; Envoy has no per-message limit
    (README, "The Envoy data plane")."""
    with pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(ECHO_UNARY)(b"a" * (5 << 20), timeout=10)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert channel.unary_unary(ECHO_UNARY)(b"a" * (1 << 20), timeout=10) == b"a" * (1 << 20)


def test_health_service_answers_for_the_sidecar_and_the_upstream(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    # The recording upstream has no ServerReady, so the inference service is not ready.
    reply = stub.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def _flood(port: int, seconds: float, measure=lambda: 0) -> int:
    """Open a ModelStreamInfer whose upstream sends 256 KiB messages without end, never read one; returns
    ``measure()`` taken at the end, while the stream is still open."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        replies = channel.stream_stream(MODEL_STREAM_INFER)(iter([b"go"]), metadata=(("x-test-flood", str(256 << 10)),))
        time.sleep(seconds)
        measured = measure()
        replies.cancel()
    return measured


def test_a_stream_reader_that_never_reads_is_bounded_by_flow_control(sidecar, upstream):
    """The upstream stops after a bounded number of messages, as it does when called directly: the sidecar
    queues nothing without bound (HTTP/2 windows), and its memory (with Envoy's) barely moves."""
    _flood(upstream.port, 2.0)
    direct = upstream.last(MODEL_STREAM_INFER).sent
    before = tree_rss_bytes(sidecar[0].popen.pid)
    during = _flood(sidecar[1], 3.0, lambda: tree_rss_bytes(sidecar[0].popen.pid))
    through = upstream.last(MODEL_STREAM_INFER).sent
    grown = during - before
    # 256 KiB messages: direct, a few windows' worth; through the sidecar, a few more (its own windows).
    assert through <= direct + 64, (direct, through)
    assert grown < 64 << 20, grown
    print(f"never-read stream: {direct} messages sent direct, {through} through the sidecar; "
          f"sidecar tree RSS grew {grown / 2**20:.1f} MiB")


def test_by_default_envoy_carries_the_calls_where_its_binary_is_installed(upstream, tmp_path):
    """``data_plane: auto``, the default, with the envoy extra installed (as in the test environment): Envoy
    answers on the listener; a max_message_bytes of the config's own keeps the grpc.aio relay, which
    enforces it."""
    chosen = subprocess.run(sidewatch("serve", "--check-config"), capture_output=True, text=True, timeout=60)
    assert "the envoy data plane would carry the calls (envoy binary" in chosen.stderr, chosen.stderr
    process, port, metrics_port = start_sidecar(tmp_path, upstream.port, "--data-plane", "auto")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary(ECHO_UNARY)(b"auto", timeout=10) == b"otua"
        assert metric_value(http_get(f"http://127.0.0.1:{metrics_port}/metrics"), "sidewatch_envoy_ready") == 1
        assert _envoy_pid(process.popen.pid)
    finally:
        process.stop()
    process, port, metrics_port = start_sidecar(tmp_path, upstream.port, "--data-plane", "auto",
                                                "--max-message-bytes", "65536")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary(ECHO_UNARY)(b"relay", timeout=10) == b"yaler"
        assert "sidewatch_envoy_ready" not in http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        with pytest.raises(LookupError):
            _envoy_pid(process.popen.pid)
    finally:
        process.stop()


def test_upstream_down_gives_unavailable(data_plane, tmp_path):
    process, port, _ = start_sidecar(tmp_path, free_port(), "--data-plane", data_plane)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(ECHO_UNARY)(b"x", timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        process.stop()


def test_sigterm_drains_calls_in_flight_and_refuses_new_ones(upstream, data_plane, tmp_path):
    process, port, _ = start_sidecar(tmp_path, upstream.port, "--data-plane", data_plane)
    results = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        def slow_call():
            try:
                results["reply"] = channel.unary_unary(ECHO_UNARY)(b"drain", metadata=(("x-test-sleep", "2"),))
            except grpc.RpcError as err:
                results["error"] = err
        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.5)
        process.signal(signal.SIGTERM)
        time.sleep(0.5)
        # A new connection during the drain gets no call through (its own subchannel: gRPC would otherwise
        # share the open connection). On an open connection Envoy still serves the first new call after
        # the drain began (envoyproxy/envoy#14350: its GOAWAY follows that call), the grpc.aio relay none.
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as late:
            with pytest.raises(grpc.RpcError) as refused:
                late.unary_unary(ECHO_UNARY)(b"late", timeout=1)
            assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        caller.join(10)
        assert results.get("reply") == b"niard", results.get("error")
        assert process.popen.wait(10) == 0
    process.stop()


# --- Envoy's supervision (the envoy data plane only) -------------------------------------------------


def _envoy_pid(sidewatch_pid: int) -> int:
    pid = envoy_child(sidewatch_pid)
    if pid is None:
        raise LookupError("sidewatch runs no envoy")
    return pid


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_envoy_killed_comes_back_counted_and_its_logs_are_json(upstream, tmp_path):
    config = tmp_path / "sidewatch.yaml"
    config.write_text(json.dumps({"envoy": {"log_level": "info"}}))
    process, port, metrics_port = start_sidecar(tmp_path, upstream.port, "--data-plane", "envoy", config=config)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary(ECHO_UNARY)(b"before", timeout=5) == b"erofeb"
        assert metric_value(http_get(metrics_url), "sidewatch_envoy_ready") == 1
        assert metric_value(http_get(metrics_url), "sidewatch_envoy_restarts_total") == 0
        killed = _envoy_pid(process.popen.pid)
        os.kill(killed, signal.SIGKILL)
        assert _wait(lambda: metric_value(http_get(metrics_url), "sidewatch_envoy_restarts_total") == 1)
        assert _wait(lambda: metric_value(http_get(metrics_url), "sidewatch_envoy_ready") == 1)
        assert _envoy_pid(process.popen.pid) != killed

        def answers() -> bool:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    return channel.unary_unary(ECHO_UNARY)(b"after", timeout=2) == b"retfa"
            except grpc.RpcError:
                return False
        assert _wait(answers)
    finally:
        process.stop()
    records = [json.loads(line) for line in process.log().splitlines() if line.strip()]  # every line is JSON
    messages = [record.get("message", "") for record in records]
    assert any(m.startswith("envoy: ") for m in messages), messages[:20]
    assert any("envoy exited" in m for m in messages)


def test_a_killed_sidewatch_takes_its_envoy_with_it(upstream, tmp_path):
    """kill -9 of sidewatch (or the OOM killer) must not leave Envoy behind holding the listener's port."""
    process, port, _ = start_sidecar(tmp_path, upstream.port, "--data-plane", "envoy")
    try:
        envoy = _envoy_pid(process.popen.pid)
        process.popen.kill()
        process.popen.wait()
        assert _wait(lambda: not os.path.exists(f"/proc/{envoy}") or
                     open(f"/proc/{envoy}/stat").read().split()[2] == "Z", timeout=5), "envoy outlived sidewatch"
        with socket.socket() as probe:   # the port is free again for the next sidewatch
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
    finally:
        process.stop()


def test_ctrl_c_to_the_process_group_drains_envoy_through_sidewatch(upstream, tmp_path):
    """A terminal's Ctrl-C is SIGINT to the whole foreground process group. It must reach sidewatch alone (Envoy
    runs in a session of its own), which drains Envoy as on SIGTERM: the call in flight finishes."""
    port, metrics_port = free_port(), free_port()
    with open(tmp_path / "sidecar.log", "wb") as log:
        popen = subprocess.Popen(sidewatch("serve", "--listen", f"127.0.0.1:{port}", "--upstream",
                                           f"127.0.0.1:{upstream.port}", "--metrics-listen",
                                           f"127.0.0.1:{metrics_port}", "--data-plane", "envoy"),
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, 30, popen)
        results = {}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            def slow_call():
                try:
                    results["reply"] = channel.unary_unary(ECHO_UNARY)(b"ctrl-c", timeout=15,
                                                                       metadata=(("x-test-sleep", "2"),))
                except grpc.RpcError as err:
                    results["error"] = err
            caller = threading.Thread(target=slow_call)
            caller.start()
            time.sleep(0.5)
            os.killpg(popen.pid, signal.SIGINT)
            caller.join(15)
        assert results.get("reply") == b"c-lrtc", results.get("error")
        assert popen.wait(20) == 0
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


@pytest.mark.parametrize("data_plane,limit", [("python", {"max_connections": 2}), ("envoy", {"max_connections": 2}),
                                              ("envoy", {"envoy": {"max_connections": 2}})])
def test_connections_beyond_max_connections_are_refused(upstream, tmp_path, data_plane, limit):
    config = tmp_path / "sidewatch.yaml"
    config.write_text(json.dumps(limit))
    process, port, _ = start_sidecar(tmp_path, upstream.port, "--data-plane", data_plane, config=config)
    try:
        # Each channel its own connection (gRPC would otherwise share one among channels to one address).
        own = [("grpc.use_local_subchannel_pool", 1)]
        held = [grpc.insecure_channel(f"127.0.0.1:{port}", options=own) for _ in range(2)]
        for channel in held:
            assert channel.unary_unary(ECHO_UNARY)(b"in", timeout=5) == b"ni"
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=own) as third:
            with pytest.raises(grpc.RpcError) as raised:
                third.unary_unary(ECHO_UNARY)(b"x", timeout=2)
            assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        held.pop().close()
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=own) as third:
            assert _wait(lambda: _echo_ok(third), timeout=10)
        for channel in held:
            channel.close()
    finally:
        process.stop()


def _echo_ok(channel: grpc.Channel) -> bool:
    try:
        return channel.unary_unary(ECHO_UNARY)(b"ok", timeout=1) == b"ko"
    except grpc.RpcError:
        return False
