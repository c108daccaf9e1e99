"""Upstream faults: the model server killed and restarted under steady load, and a model server that
answers slowly. The sidecar never crashes, calls fail fast with UNAVAILABLE instead of hanging, service
resumes once the model server is back, and slow answers end at the callers' deadlines without piling up.

Bounds here are generous (behaviour, not speed); bench/faults.py measures the recovery time.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol import codec, oip_pb2, paths
from tests.support.harness import Process, free_port, http_get, metric_value, sidewatch, start_sidecar
from tests.support.upstream import MODEL_INFER, RecordingUpstream

MODEL = "mnist_cnn"
DEADLINE = 10.0      # every call's deadline: a call that hangs would end with DEADLINE_EXCEEDED
FAIL_FAST = 3.0      # a call the sidecar cannot forward must end well before its deadline


def _request(rows: int = 1) -> bytes:
    request = oip_pb2.ModelInferRequest(model_name=MODEL, model_version="1")
    codec.add_input(request, "input", np.random.default_rng(rows).random((rows, 1, 28, 28), dtype=np.float32))
    return request.SerializeToString()


@dataclass
class Outcome:
    started: float
    ended: float
    code: grpc.StatusCode


class Load:
    """Client threads calling ModelInfer through the sidecar back to back, each outcome recorded."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.infer = self.channel.unary_unary(MODEL_INFER)
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        request = _request()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.infer(request, timeout=DEADLINE)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            self.outcomes.append(Outcome(started, time.monotonic(), code))
            if code is not grpc.StatusCode.OK:
                time.sleep(0.005)   # failures come back at once: do not spin

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(DEADLINE + 5)
        self.channel.close()

    def since(self, moment: float) -> list[Outcome]:
        return [outcome for outcome in list(self.outcomes) if outcome.started >= moment]

    def first_ok_after(self, moment: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = [o.ended for o in self.since(moment) if o.code is grpc.StatusCode.OK]
            if ok:
                return min(ok)
            time.sleep(0.01)
        raise AssertionError(f"no successful call within {timeout} s of the model server's return")


class OpenStream:
    """A ModelStreamInfer call kept open: a request goes in whenever the test sends one."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue = queue.Queue()
        self.call = channel.stream_stream(paths.MODEL_STREAM_INFER)(iter(self._requests.get, None), timeout=DEADLINE)
        self.ended: float | None = None

    def roundtrip(self, request: bytes) -> bytes:
        self._requests.put(request)
        return next(self.call)

    def wait_end(self) -> grpc.StatusCode:
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as err:
            self.ended = time.monotonic()
            return err.code()
        self.ended = time.monotonic()
        return grpc.StatusCode.OK


def _start_model_server(tmp_path, port: int, run: int) -> tuple[Process, float]:
    """The bundled model server on ``port``; returns it and when its port opened."""
    process = Process(sidewatch("model-server", "--listen", f"127.0.0.1:{port}", "--device", "cpu"),
                      tmp_path / f"model-server-{run}.log")
    process.wait_listening(port, timeout=60)
    return process, time.monotonic()


def _health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.mark.parametrize("data_plane", ["python", "envoy"])
def test_model_server_killed_and_restarted_under_load(tmp_path, data_plane):
    upstream_port = free_port()
    model_server, _ = _start_model_server(tmp_path, upstream_port, 0)
    sidecar = None
    try:
        sidecar, port, metrics_port = start_sidecar(tmp_path, upstream_port, "--model-repository",
                                                    str(BUNDLED_REPOSITORY), "--data-plane", data_plane)
        with Load(port) as load, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            load.first_ok_after(0.0, timeout=30)
            for cycle in range(2):
                # In flight at the kill: an open stream that has already had an answer, and a large batch.
                stream = OpenStream(channel)
                assert oip_pb2.ModelStreamInferResponse.FromString(stream.roundtrip(_request())).infer_response.outputs
                big = channel.unary_unary(MODEL_INFER).future(_request(rows=2000), timeout=DEADLINE)
                time.sleep(0.05)

                model_server.popen.kill()
                model_server.popen.wait()
                killed = time.monotonic()
                # Envoy resets a stream whose upstream went away after answering (RST_STREAM, which gRPC
                # reads as INTERNAL); the grpc.aio relay ends it with UNAVAILABLE (README, "The Envoy data plane").
                broken = grpc.StatusCode.INTERNAL if data_plane == "envoy" else grpc.StatusCode.UNAVAILABLE
                assert stream.wait_end() is broken
                assert stream.ended - killed < FAIL_FAST
                try:
                    big.result()
                except grpc.RpcError as err:
                    assert err.code() is grpc.StatusCode.UNAVAILABLE, err
                time.sleep(2.0)   # the model server stays down for two seconds of steady load

                during = load.since(killed + 0.5)
                assert during and {o.code for o in during} == {grpc.StatusCode.UNAVAILABLE}
                assert sidecar.popen.poll() is None
                assert _health(port, "") == health_pb2.HealthCheckResponse.SERVING           # liveness
                model_server.stop()

                model_server, back = _start_model_server(tmp_path, upstream_port, cycle + 1)
                resumed = load.first_ok_after(back, timeout=5.0)
                time.sleep(0.5)
                after = load.since(resumed + 0.1)
                assert after and {o.code for o in after} == {grpc.StatusCode.OK}
                # Nothing hung: every call of the run came back well before its deadline.
                assert max(o.ended - o.started for o in load.since(0.0)) < FAIL_FAST
                assert sidecar.popen.poll() is None

        # Through Envoy a stream the upstream had answered ends INTERNAL (Envoy resets it; README.md), and the
        # calls reach the metrics through the access log, in batches (every 0.5 s): poll.
        stream_codes = ("UNAVAILABLE", "INTERNAL") if data_plane == "envoy" else ("UNAVAILABLE",)
        deadline = time.monotonic() + 5
        while True:
            metrics = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
            streams = sum(_sample(metrics, "sidewatch_upstream_errors_total", method="ModelStreamInfer", code=code)
                          for code in stream_codes)
            if streams == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert _sample(metrics, "sidewatch_upstream_errors_total", method="ModelInfer", code="UNAVAILABLE") > 0
        assert streams == 2, [line for line in metrics.splitlines() if "ModelStreamInfer" in line and "code" in line]
        # Envoy's in-flight count is polled from its stats once a second.
        deadline = time.monotonic() + 5
        while metric_value(http_get(f"http://127.0.0.1:{metrics_port}/metrics"), "sidewatch_requests_in_flight") != 0:
            assert time.monotonic() < deadline, "calls still in flight"
            time.sleep(0.1)
        assert "Traceback" not in sidecar.log()
    finally:
        if sidecar is not None:
            sidecar.stop()
        model_server.stop()


def test_slow_model_server_calls_end_at_their_deadlines_and_do_not_pile_up(tmp_path):
    with RecordingUpstream() as upstream:
        sidecar, port, metrics_port = start_sidecar(tmp_path, upstream.port)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                infer = channel.unary_unary(MODEL_INFER)
                for wave in range(3):
                    # Twelve callers with a 0.5 s deadline against a model server that takes 30 s.
                    futures = [infer.future(b"", timeout=0.5, metadata=(("x-test-sleep", "30"),)) for _ in range(12)]
                    codes = collections.Counter(future.exception().code() for future in futures)
                    assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED: 12}
                    # The sidecar passed each deadline on: the upstream saw every call cancelled.
                    slow = [seen for seen in upstream.seen if seen.method == MODEL_INFER][-12:]
                    assert len(slow) == 12 and all(seen.cancelled.wait(5) for seen in slow)
                    # The relay's own call to the upstream and the caller's call end on their own timers, at the
                    # same moment: a handler may still be ending when the upstream has seen its cancel.
                    deadline = time.monotonic() + 2
                    while metric_value(metrics := http_get(f"http://127.0.0.1:{metrics_port}/metrics"),
                                       "sidewatch_requests_in_flight") != 0:
                        assert time.monotonic() < deadline, "calls still in flight"
                        time.sleep(0.05)
                    assert metric_value(metrics, "sidewatch_requests_total", code="DEADLINE_EXCEEDED") == 12 * (wave + 1)
                # A caller that gives up is counted as such, not as a deadline.
                cancelled = infer.future(b"", timeout=30, metadata=(("x-test-sleep", "30"),))
                time.sleep(0.3)
                cancelled.cancel()
                assert upstream.seen[-1].cancelled.wait(5)
                metrics = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
                assert metric_value(metrics, "sidewatch_requests_total", code="CANCELLED") == 1
                # A quick call still goes straight through.
                assert infer(b"", timeout=5) == b""
            assert sidecar.popen.poll() is None
        finally:
            sidecar.stop()


def test_calls_before_the_model_server_ever_started_fail_fast_and_then_succeed(tmp_path):
    """A sidecar started before its model server (a pod whose containers start in any order)."""
    upstream_port = free_port()
    sidecar, port, _ = start_sidecar(tmp_path, upstream_port)
    model_server = None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.unary_unary(MODEL_INFER)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                infer(_request(), timeout=DEADLINE)
            assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < FAIL_FAST
            model_server, back = _start_model_server(tmp_path, upstream_port, 0)
            while True:
                try:
                    infer(_request(), timeout=DEADLINE)
                    break
                except grpc.RpcError as err:
                    assert err.code() is grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() - back < 5.0, "the sidecar did not reconnect"
                    time.sleep(0.01)
    finally:
        sidecar.stop()
        if model_server is not None:
            model_server.stop()


def test_upstream_ending_a_stream_mid_request_keeps_its_own_status(tmp_path):
    """An upstream that ends a bidirectional call while requests are still being relayed to it: grpc.aio
    can report that as INTERNAL "Internal error from Core" (grpc/grpc#36066); callers get the upstream's
    own status, details and trailers every time."""
    from tests.support.upstream import ECHO_STREAM

    with RecordingUpstream() as upstream:
        sidecar, port, metrics_port = start_sidecar(tmp_path, upstream.port)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                chat = channel.stream_stream(ECHO_STREAM)
                outcomes = collections.Counter()
                for _ in range(100):
                    with pytest.raises(grpc.RpcError) as raised:
                        list(chat(iter([b"x" * 1000] * 20), timeout=DEADLINE,
                                  metadata=(("x-test-fail", "RESOURCE_EXHAUSTED:slow down"),)))
                    error = raised.value
                    outcomes[(error.code(), error.details(), dict(error.trailing_metadata()).get("x-upstream-trailer"))] += 1
            assert outcomes == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", "trailing"): 100}
            metrics = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert metric_value(metrics, "sidewatch_upstream_errors_total", code="RESOURCE_EXHAUSTED") == 100
        finally:
            sidecar.stop()


def _sample(metrics: str, name: str, **labels: str) -> float:
    """metric_value, or 0 when there is no such sample."""
    try:
        return metric_value(metrics, name, **labels)
    except KeyError:
        return 0.0
