"""Probes of a slow reader on ModelStreamInfer (issue 14, defect 2), on both data planes: four streams of
100 messages of 200 KB (a batch of 64 MNIST images each) from a client that never reads a response.

- In front of a model server busy with other work (it reads nothing of the stream for now), the client's
  sends stop where they stop against the model server directly, give or take the sidecar's own HTTP/2
  windows (``stream_window_bytes``): flow control passes through, and the sidecar holds little. (Before the
  fix, gRPC's own windows, 4 MiB a stream at least, let the client push 21 to 26 more messages a stream into
  the grpc.aio relay than the model server takes, and up to 52 with a model server whose window moves.)
- In front of a model server that takes every request and answers none (one that queues them), every
  message goes through, as it does directly, and the copies that the sidecar keeps to pair requests with
  their responses stay within ``tap.max_pending_stream_bytes`` a stream; the copies past it are dropped and
  counted (``reason="unpaired"``), and the calls end as they would have. (Before the fix, the grpc.aio relay
  kept up to 256 copies a stream, whatever their size: the whole 20 MB of each stream here, 98 to 122 MiB
  more resident memory; Envoy's tap dropped the whole stream's copies once it held 8 MiB.)

Memory is the resident memory of the sidecar's processes (sidewatch and its Envoy), read from /proc.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from agent.config import load_config
from agent.protocol import paths
from agent.protocol.client import InferenceClient
from tests.support.harness import http_get, metric_value, start_sidecar
from tests.support.process_tree import tree_rss_bytes
from tests.support.upstream import RecordingUpstream

pytestmark = pytest.mark.hostile

DATA_PLANES = ["python", "envoy"]
STREAMS, MESSAGES = 4, 100
MESSAGE = InferenceClient.request("mnist_cnn", {"input": np.zeros((64, 1, 28, 28), np.float32)}).SerializeToString()
# The model server's HTTP/2 window is pinned at the least that gRPC's own sizing gives a stream (4 MiB), so that
# it is the same for the direct run and the sidecar's (left to its bandwidth estimates, it moves between runs).
UPSTREAM_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4 << 20)]
BUSY = (("x-test-sleep", "60"),)  # reads nothing of the stream for a minute (or until the call ends)
QUEUES = (("x-test-hold", "1"),)  # reads every request, answers none until the client closes its side
DEFAULTS = load_config()
WINDOW = DEFAULTS.stream_window_bytes
PENDING = DEFAULTS.tap.max_pending_stream_bytes
# What the allocator keeps of memory freed on the way (gRPC's, Python's and Envoy's copies of the messages
# relayed and tapped): measured 10 to 25 MiB here.
ALLOCATOR_SLACK = 32 << 20


@pytest.fixture(scope="module")
def upstream():
    with RecordingUpstream(options=UPSTREAM_OPTIONS) as server:
        yield server


def _settled(read, quiet_seconds: float = 0.75, timeout: float = 20.0):
    """``read()`` once it has not changed for ``quiet_seconds``."""
    last, since = read(), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_seconds:
            break
    return last


class NeverReads:
    """STREAMS ModelStreamInfer calls from a client that never reads a response. Each stream offers MESSAGES
    messages, then keeps its side open until :meth:`close_sides`; ``taken[i]``: how many of stream i's
    messages gRPC has taken (written, or accepted by the flow-control windows)."""

    def __init__(self, port: int, metadata) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.taken = [0] * STREAMS
        self._close = threading.Event()
        stream = self.channel.stream_stream(paths.MODEL_STREAM_INFER)
        self.calls = [stream(self._requests(index), metadata=metadata) for index in range(STREAMS)]

    def _requests(self, index: int):
        for number in range(MESSAGES):
            self.taken[index] = number  # asked for the next one: gRPC has taken every one before it
            yield MESSAGE
        self.taken[index] = MESSAGES
        self._close.wait(30)

    def stopped(self) -> list[int]:
        """``taken`` once the sends have stopped (flow control) or every message has gone."""
        return list(_settled(lambda: tuple(self.taken)))

    def close_sides(self) -> None:
        self._close.set()

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()
        self.close_sides()
        self.channel.close()


def _sidecar(tmp_path, upstream: RecordingUpstream, data_plane: str):
    process, port, metrics_port = start_sidecar(tmp_path, upstream.port, "--data-plane", data_plane)
    # A first stream warms up what every stream uses (the channel, the tap, Envoy's connections).
    assert _one_message(port) == MESSAGE[::-1]
    return process, port, metrics_port


def _one_message(port: int) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        replies = list(channel.stream_stream(paths.MODEL_STREAM_INFER)(iter([MESSAGE]), timeout=10))
    assert len(replies) == 1
    return replies[0]


def _memory_bound() -> int:
    """What STREAMS streams may hold in the sidecar: each the copies waiting for their responses, a stream
    window on each of the sidecar's sides (and one more in Envoy's per-connection buffers) and the messages
    being relayed; and what the allocator keeps."""
    return STREAMS * (PENDING + 3 * WINDOW + 2 * len(MESSAGE)) + ALLOCATOR_SLACK


@pytest.mark.parametrize("data_plane", DATA_PLANES)
def test_a_client_that_never_reads_is_stopped_where_the_model_server_stops_it(tmp_path, upstream, data_plane):
    direct = NeverReads(upstream.port, BUSY)
    try:
        stopped_direct = direct.stopped()
    finally:
        direct.cancel()
    assert max(stopped_direct) < MESSAGES  # the model server's flow control stops a client that never reads
    process, port, _ = _sidecar(tmp_path, upstream, data_plane)
    try:
        before = tree_rss_bytes(process.popen.pid)
        through = NeverReads(port, BUSY)
        try:
            stopped_through = through.stopped()
            grown = tree_rss_bytes(process.popen.pid) - before
        finally:
            through.cancel()
        # Ahead of the model server, the sidecar takes a stream window on its side toward the client (under
        # Envoy, up to two more in its per-connection buffers) and the messages it is relaying. gRPC's own
        # window, sized from its bandwidth estimates, would be 4 MiB at least.
        lead = (3 * WINDOW + 2 * len(MESSAGE)) // len(MESSAGE)
        figures = (f"{data_plane}: messages taken a stream direct {stopped_direct}, through the sidecar "
                   f"{stopped_through}; sidecar RSS +{grown / 2**20:.1f} MiB")
        print(figures)
        assert max(stopped_through) <= min(stopped_direct) + lead, figures
        assert grown < _memory_bound(), figures
        assert _one_message(port) == MESSAGE[::-1]  # and it still serves
    finally:
        process.stop()


@pytest.mark.parametrize("data_plane", DATA_PLANES)
def test_the_copies_waiting_for_responses_are_bounded_in_bytes_not_the_calls(tmp_path, upstream, data_plane):
    process, port, metrics_port = _sidecar(tmp_path, upstream, data_plane)
    try:
        before = tree_rss_bytes(process.popen.pid)
        through = NeverReads(port, QUEUES)
        try:
            taken = through.stopped()
            grown = tree_rss_bytes(process.popen.pid) - before
            through.close_sides()
            outcomes = [(list(call), call.code()) for call in through.calls]
        finally:
            through.cancel()

        def unpaired() -> float:
            return metric_value(http_get(f"http://127.0.0.1:{metrics_port}/metrics"),
                                "sidewatch_tap_copies_dropped_total", reason="unpaired")

        dropped = _settled(unpaired, quiet_seconds=0.5, timeout=5)
        figures = (f"{data_plane}: messages taken a stream {taken}; sidecar RSS +{grown / 2**20:.1f} MiB; "
                   f"copies dropped (unpaired) {dropped:.0f}")
        print(figures)
        assert taken == [MESSAGES] * STREAMS, figures  # the tap slows no call
        assert outcomes == [([], grpc.StatusCode.OK)] * STREAMS, figures  # nor fails one
        assert grown < _memory_bound(), figures
        kept_a_stream = PENDING // len(MESSAGE)
        assert dropped >= STREAMS * (MESSAGES - kept_a_stream), figures
    finally:
        process.stop()
