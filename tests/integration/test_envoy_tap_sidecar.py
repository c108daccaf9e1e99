"""The tap under Envoy, whole: the bundled model server, a real Envoy started by `sidewatch serve --data-plane
envoy` with the bundled model's detectors in shadow mode, copies of the calls through Envoy's ext_proc filter
(observability mode) to the detectors, and the sampling that holds the sidecar to its CPU budget."""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from agent.metrics import TAP_DROP_REASONS
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol import oip_pb2, paths
from agent.protocol.client import InferenceClient
from tests.support.harness import free_port, http_get, metric_value, start_sidecar

MODEL = "mnist_cnn"


def envoy_sidecar(tmp_path: Path, model_port: int, tap: dict, envoy: dict | None = None):
    config = tmp_path / f"sidewatch-{len(list(tmp_path.iterdir()))}.yml"
    config.write_text(yaml.safe_dump({"tap": tap, **({"envoy": envoy} if envoy else {})}))
    return start_sidecar(tmp_path, model_port, "--data-plane", "envoy", "--model-repository",
                         str(BUNDLED_REPOSITORY), config=config)


def metrics(port: int) -> str:
    return http_get(f"http://127.0.0.1:{port}/metrics")


def wait_for(condition, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def images(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, model_server):
    """Envoy with every call copied (a budget it cannot reach, and no CPU kept idle for the calls, which
    on a loaded machine would sample): (process, port, metrics port). At most 8 copies open at once: more
    calls than that are copied only if each copy's stream ends with its call."""
    process, port, metrics_port = envoy_sidecar(tmp_path_factory.mktemp("envoy-tap"), model_server,
                                                {"cpu_budget_cores": 64.0, "reserve_cores": None, "max_streams": 8})
    yield process, port, metrics_port
    process.stop()


def test_the_detectors_see_every_model_infer_call_through_envoy(sidecar):
    process, port, metrics_port = sidecar
    before = metrics(metrics_port)
    client = InferenceClient(f"127.0.0.1:{port}")
    try:
        for image in images(40):
            assert client.infer(MODEL, {"input": image[None]}, version="1")[0]
    finally:
        client.close()

    def seen():
        text = metrics(metrics_port)
        return text if metric_value(text, "sidewatch_adversarial_inputs_total", model=MODEL, version="1") - \
            _value(before, "sidewatch_adversarial_inputs_total", model=MODEL, version="1") >= 40 else None

    text = wait_for(seen)
    assert metric_value(text, "sidewatch_tap_copies_received_total") - \
        _value(before, "sidewatch_tap_copies_received_total") == 40
    assert metric_value(text, "sidewatch_tap_processed_total", model=MODEL, version="1") - \
        _value(before, "sidewatch_tap_processed_total", model=MODEL, version="1") == 40
    assert metric_value(text, "sidewatch_tap_copies_dropped_total") == 0
    assert metric_value(text, "sidewatch_tap_sampled_ratio") == 1.0
    assert process.popen.poll() is None


def test_each_message_of_a_stream_is_a_copy(sidecar):
    _, port, metrics_port = sidecar
    before = metrics(metrics_port)
    requests = [InferenceClient.request(MODEL, {"input": image[None]}, version="2") for image in images(12)]
    # Cut into HTTP/2 frames however the client likes: each request is about 3 KB.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(paths.MODEL_STREAM_INFER, request_serializer=oip_pb2.ModelInferRequest.SerializeToString,
                                     response_deserializer=oip_pb2.ModelStreamInferResponse.FromString)
        replies = list(call(iter(requests), timeout=30))
    assert len(replies) == 12 and all(reply.HasField("infer_response") for reply in replies)
    text = wait_for(lambda: (lambda t: t if _value(t, "sidewatch_tap_processed_total", model=MODEL, version="2")
                             - _value(before, "sidewatch_tap_processed_total", model=MODEL, version="2") >= 12
                             else None)(metrics(metrics_port)))
    assert metric_value(text, "sidewatch_tap_copies_received_total") - \
        _value(before, "sidewatch_tap_copies_received_total") == 12


def test_a_message_over_the_tap_bound_is_dropped_from_the_tap_and_the_call_still_answered(tmp_path, model_server):
    # An MNIST request is about 3.2 KB: over a 1 KB bound.
    process, port, metrics_port = envoy_sidecar(tmp_path, model_server, {"max_message_bytes": 1024,
                                                                         "cpu_budget_cores": 64.0,
                                                                         "reserve_cores": None})
    try:
        client = InferenceClient(f"127.0.0.1:{port}")
        for image in images(5):
            assert client.infer(MODEL, {"input": image[None]}, version="1")[0]
        client.close()
        text = wait_for(lambda: (lambda t: t if _value(t, "sidewatch_tap_copies_dropped_total", reason="too_large")
                                 >= 5 else None)(metrics(metrics_port)))
        assert metric_value(text, "sidewatch_tap_copies_received_total") == 0
        assert _value(text, "sidewatch_tap_processed_total") == 0
    finally:
        process.stop()


def test_a_tiny_cpu_budget_samples_the_copies_and_the_calls_keep_their_latency(tmp_path, model_server):
    process, port, metrics_port = envoy_sidecar(tmp_path, model_server, {"cpu_budget_cores": 0.02,
                                                                         "sampling_interval_seconds": 0.5})
    try:
        client = InferenceClient(f"127.0.0.1:{port}")
        batch = images(50)
        durations = []
        started = time.monotonic()
        while time.monotonic() - started < 8:
            for image in batch:
                t0 = time.perf_counter()
                client.infer(MODEL, {"input": image[None]}, version="1")
                durations.append(time.perf_counter() - t0)
        client.close()
        text = metrics(metrics_port)
        ratio = metric_value(text, "sidewatch_tap_sampled_ratio")
        calls = len(durations)
        received = metric_value(text, "sidewatch_tap_copies_received_total")
        assert ratio < 0.5, ratio
        assert received < 0.8 * calls, (received, calls)
        assert received > 0  # the detectors still see some traffic
        # Sampling never makes a call wait: the calls stay fast (the model itself takes about 1-2 ms).
        assert statistics.median(durations) < 0.02
    finally:
        process.stop()


def test_the_tap_takes_only_the_cpu_the_calls_leave(tmp_path, model_server):
    """A budget the tap never reaches, but more CPU kept idle for the calls than this machine has: the idle
    CPU around the sidecar (spare_cpu.py, read from /proc/stat) always falls short, so the share copied
    falls to the floor and the calls go on."""
    process, port, metrics_port = envoy_sidecar(tmp_path, model_server, {
        "cpu_budget_cores": 64.0, "reserve_cores": 256.0, "sampling_interval_seconds": 0.5})
    try:
        client = InferenceClient(f"127.0.0.1:{port}")
        batch = images(20)
        answered = 0
        started = time.monotonic()
        while time.monotonic() - started < 5:
            for image in batch:
                answered += bool(client.infer(MODEL, {"input": image[None]}, version="1")[0])
        client.close()
        text = metrics(metrics_port)
        assert metric_value(text, "sidewatch_tap_sampled_ratio") == 0.01
        assert metric_value(text, "sidewatch_tap_cpu_budget_cores") == 0.0
        received = metric_value(text, "sidewatch_tap_copies_received_total")
        assert answered >= 100 and received < 0.5 * answered, (received, answered)
    finally:
        process.stop()


def _value(text: str, name: str, **labels: str) -> float:
    try:
        return metric_value(text, name, **labels)
    except KeyError:
        return 0.0


def envoy_stat(admin_port: int, name: str) -> int:
    stats = json.loads(http_get(f"http://127.0.0.1:{admin_port}/stats?format=json&filter=^{name.replace('.', '[.]')}$"))
    return sum(int(stat.get("value", 0)) for stat in stats["stats"])


def refused(admin_port: int) -> int:
    """Streams to the tap refused by Envoy's circuit breaker on the tap cluster."""
    return sum(envoy_stat(admin_port, f"cluster.sidewatch_tap.upstream_rq_{kind}_overflow") for kind in ("active", "pending"))


def copies(before: str, after: str) -> tuple[float, dict[str, float]]:
    """The copies received, and those dropped by reason, between two scrapes."""
    received = _value(after, "sidewatch_tap_copies_received_total") - _value(before, "sidewatch_tap_copies_received_total")
    dropped = {reason: _value(after, "sidewatch_tap_copies_dropped_total", reason=reason)
               - _value(before, "sidewatch_tap_copies_dropped_total", reason=reason) for reason in TAP_DROP_REASONS}
    return received, dropped


def infer_for(port: int, seconds: float, in_flight: int) -> int:
    """ModelInfer calls, ``in_flight`` at a time, for ``seconds``; the number of calls answered (all must be)."""
    requests = [InferenceClient.request(MODEL, {"input": image[None]}, version="1").SerializeToString()
                for image in images(20)]
    end = time.monotonic() + seconds
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary(paths.MODEL_INFER)

        def calls(worker: int) -> int:
            done = 0
            while time.monotonic() < end:
                assert infer(requests[(worker + done) % len(requests)], timeout=30)
                done += 1
            return done

        with ThreadPoolExecutor(in_flight) as pool:
            return sum(pool.map(calls, range(in_flight)))


def test_a_copy_envoy_cannot_send_is_counted_as_a_drop(tmp_path, model_server):
    """One copy open at a time and 8 calls in flight: Envoy's circuit breaker on the tap cluster (max_requests,
    from tap.max_streams) refuses the other ext_proc streams, lets the calls go on and counts the streams as
    failed; each copy refused shows as a drop with reason envoy. Every call is accounted for: received, or
    dropped (envoy; closed, a stream Envoy closed deferred_close_timeout after its call before sidewatch had
    read it, which a loaded machine makes likelier)."""
    admin = free_port()
    process, port, metrics_port = envoy_sidecar(tmp_path, model_server, {"cpu_budget_cores": None, "max_streams": 1},
                                                {"admin_port": admin})
    try:
        before = metrics(metrics_port)
        refused_before = refused(admin)
        batch = images(20)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.unary_unary(paths.MODEL_INFER)
            requests = [InferenceClient.request(MODEL, {"input": image[None]}, version="1").SerializeToString()
                        for image in batch]
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(lambda r: infer(r, timeout=30), requests * 10))
        assert len(replies) == 200

        def counted():
            received, dropped = copies(before, metrics(metrics_port))
            return (received, dropped) if received + sum(dropped.values()) >= 200 else None

        received, dropped = wait_for(counted)
        assert received + sum(dropped.values()) == 200, (received, dropped)
        assert received > 0 and dropped["envoy"] > 0, (received, dropped)
        # Refused by Envoy's circuit breaker (streams open, or waiting while the connection to sidewatch opens),
        # not by sidewatch's server.
        assert refused(admin) - refused_before == dropped["envoy"]
    finally:
        process.stop()


def test_copies_envoy_started_but_sidewatch_could_not_finish_are_counted(tmp_path, model_server):
    """sidewatch stopped (SIGSTOP) for 1.5 s while 4 calls at a time go through Envoy, with 4 copies open at
    most and every call copied (no sampling: nothing is left unsampled): Envoy holds 4 copies' streams open,
    refuses the others (reason envoy) and closes the 4 deferred_close_timeout (1 s) after their calls end,
    before sidewatch, stopped, has read them (reason closed). Every call is accounted for: a copy received,
    or dropped for a reason."""
    admin = free_port()
    process, port, metrics_port = envoy_sidecar(tmp_path, model_server, {"cpu_budget_cores": None, "max_streams": 4},
                                                {"admin_port": admin})
    try:
        assert infer_for(port, 0.2, 1)  # warm
        time.sleep(1.5)  # the warm-up's copies are all in
        before = metrics(metrics_port)
        with ThreadPoolExecutor(1) as pool:
            calls = pool.submit(infer_for, port, 2.1, 4)
            time.sleep(0.3)
            os.kill(process.popen.pid, signal.SIGSTOP)
            try:
                time.sleep(1.5)
            finally:
                os.kill(process.popen.pid, signal.SIGCONT)
            calls = calls.result()

        def counted():
            received, dropped = copies(before, metrics(metrics_port))
            return (received, dropped) if received + sum(dropped.values()) >= calls else None

        received, dropped = wait_for(counted)
        assert received + sum(dropped.values()) == calls, (calls, received, dropped)
        assert dropped["closed"] > 0 and dropped["envoy"] > 0, (calls, received, dropped)
        assert envoy_stat(admin, "http.ingress.ext_proc.sidewatch_tap.streams_started") > 0
    finally:
        os.kill(process.popen.pid, signal.SIGCONT)
        process.stop()
