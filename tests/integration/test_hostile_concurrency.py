"""Probes of callers that open more calls than a sidecar should carry (issue 14: "open streams, connections"
have a bound), on both data planes:

- ``max_concurrent_calls``: with that many slow calls in flight, one more is refused at once, never queued
  (the python plane: RESOURCE_EXHAUSTED; Envoy: UNAVAILABLE, its circuit breaker on the model server), and
  calls go through again once they end;
- ``max_streams_per_connection``: one client connection carries at most that many calls at a time (HTTP/2's
  SETTINGS_MAX_CONCURRENT_STREAMS); a gRPC client holds the others until one ends.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from tests.support.harness import start_sidecar
from tests.support.upstream import ECHO_UNARY, RecordingUpstream

pytestmark = pytest.mark.hostile

LIMIT = 4
SLOW_SECONDS = 1.5
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)
REFUSED = {"python": grpc.StatusCode.RESOURCE_EXHAUSTED, "envoy": grpc.StatusCode.UNAVAILABLE}


@pytest.fixture(scope="module")
def upstream():
    with RecordingUpstream(response=b"inferred") as server:
        yield server


def _sidecar(tmp_path, upstream_port: int, data_plane: str, **limits):
    config = tmp_path / "sidewatch.json"
    config.write_text(json.dumps({"data_plane": data_plane, **limits}))
    return start_sidecar(tmp_path, upstream_port, config=config)


def _slow_calls(port: int, count: int, per_connection: bool) -> list:
    """``count`` calls that each wait SLOW_SECONDS at the upstream, at once; (code, seconds) of each."""
    results: list = []

    def call(index: int, channel: grpc.Channel) -> None:
        started = time.monotonic()
        try:
            channel.unary_unary(ECHO_UNARY)(b"slow", metadata=(("x-test-sleep", str(SLOW_SECONDS)),), timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        results.append((code, time.monotonic() - started))

    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=[OWN_CONNECTION])
                for _ in range(count if per_connection else 1)]
    try:
        threads = [threading.Thread(target=call, args=(index, channels[index % len(channels)]))
                   for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for channel in channels:
            channel.close()
    return results


@pytest.mark.parametrize("data_plane", ["python", "envoy"])
def test_calls_beyond_max_concurrent_calls_are_refused_at_once(upstream, tmp_path, data_plane):
    process, port, _ = _sidecar(tmp_path, upstream.port, data_plane, max_concurrent_calls=LIMIT)
    with process:
        results = _slow_calls(port, 2 * LIMIT, per_connection=True)
        codes = [code for code, _ in results]
        assert codes.count(grpc.StatusCode.OK) == LIMIT, results
        assert codes.count(REFUSED[data_plane]) == LIMIT, results
        assert all(seconds < SLOW_SECONDS / 2 for code, seconds in results if code != grpc.StatusCode.OK), results
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary(ECHO_UNARY)(b"after", timeout=10) == b"retfa"


@pytest.mark.parametrize("data_plane", ["python", "envoy"])
def test_one_connection_carries_at_most_max_streams_per_connection_calls_at_a_time(upstream, tmp_path, data_plane):
    process, port, _ = _sidecar(tmp_path, upstream.port, data_plane, max_streams_per_connection=2)
    with process:
        results = _slow_calls(port, 4, per_connection=False)
    assert [code for code, _ in results] == [grpc.StatusCode.OK] * 4, results
    # Two at a time: the last two waited for the first two.
    assert sorted(seconds for _, seconds in results)[-1] > 2 * SLOW_SECONDS * 0.9, results
