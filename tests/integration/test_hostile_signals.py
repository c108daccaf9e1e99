"""Probes of careless signals (issue 14, defect 5): SIGHUP, whose default action kills a process at once,
drains ``sidewatch serve`` exactly as SIGTERM does, on both data planes; a SIGHUP that reaches Envoy
(sidewatch's child, in its process group: a terminal's hangup reaches both) changes nothing; and every
other signal whose default action would end the process (SIGUSR1, SIGUSR2, SIGALRM, ...) is logged and
ignored while calls go on."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
import pytest

from tests.support.harness import http_get, metric_value, start_sidecar
from tests.support.process_tree import envoy_child
from tests.support.upstream import ECHO_UNARY, RecordingUpstream

pytestmark = pytest.mark.hostile

IN_FLIGHT = 8


@pytest.fixture(scope="module")
def upstream():
    with RecordingUpstream(response=b"inferred") as server:
        yield server


def _json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            lines.append(entry)
    return lines


@pytest.mark.parametrize("data_plane", ["python", "envoy"])
def test_sighup_drains_calls_in_flight_and_exits_0(upstream, data_plane, tmp_path):
    process, port, metrics_port = start_sidecar(tmp_path, upstream.port, "--data-plane", data_plane)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(ECHO_UNARY)
            if data_plane == "envoy":
                # A hangup of the terminal reaches the whole process group, Envoy too: Envoy eats SIGHUP.
                envoy = envoy_child(process.popen.pid)
                assert envoy is not None
                os.kill(envoy, signal.SIGHUP)
                time.sleep(0.5)
                assert call(b"after-hup", timeout=5) == b"puh-retfa"
                assert envoy_child(process.popen.pid) == envoy
                metrics = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
                assert metric_value(metrics, "sidewatch_envoy_restarts_total") == 0
            replies, errors = [], []

            def slow_call(number: int) -> None:
                try:
                    replies.append(call(f"slow-{number}".encode(), metadata=(("x-test-sleep", "2"),), timeout=20))
                except grpc.RpcError as err:
                    errors.append(err.code())

            callers = [threading.Thread(target=slow_call, args=(number,)) for number in range(IN_FLIGHT)]
            for caller in callers:
                caller.start()
            time.sleep(0.7)  # every call has reached the upstream and sleeps there
            process.signal(signal.SIGHUP)
            for caller in callers:
                caller.join(20)
        assert errors == []
        assert sorted(replies) == sorted(f"slow-{number}"[::-1].encode() for number in range(IN_FLIGHT))
        assert process.popen.wait(15) == 0
    finally:
        process.stop()
    lines = _json_lines(process.log())
    said = [line for line in lines if line.get("logger") == "agent.app" and "SIGHUP" in line.get("message", "")]
    assert said and "shutting down" in said[0]["message"], process.log()[-3000:]
    if data_plane == "envoy":
        assert any("eating SIGHUP" in line.get("message", "") for line in lines)


def test_other_signals_that_would_end_the_process_are_logged_and_ignored(upstream, tmp_path):
    from agent.app import IGNORED_SIGNALS

    process, port, _ = start_sidecar(tmp_path, upstream.port, "--data-plane", "python")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(ECHO_UNARY)
            for sig in IGNORED_SIGNALS:
                process.signal(sig)
                time.sleep(0.2)
                assert process.popen.poll() is None, f"{sig.name} ended the sidecar: {process.log()[-2000:]}"
                assert call(sig.name.encode(), timeout=5) == sig.name[::-1].encode()
    finally:
        assert process.stop() == 0
    ignored = [line["message"] for line in _json_lines(process.log()) if "received and ignored" in
               line.get("message", "")]
    assert [message.split()[1] for message in ignored] == [sig.name for sig in IGNORED_SIGNALS]
