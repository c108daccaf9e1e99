"""The tap: copies of inference calls, handed from the hot path to the detectors.

The hot path calls :meth:`Tap.offer`, which never waits: when the bounded queue is full (in copies,
or in the bytes they hold: a copy of a 5 MiB call holds 5 MiB until the detectors are done with it) the
copy is dropped and counted. A single consumer thread decodes the tensors and hands a
:class:`TappedInference` to every registered sink (the detectors of later issues).

The queue is a deque that the consumer drains in batches every few milliseconds, rather than a
queue.Queue whose every put wakes the consumer: a wake-up per call costs the event loop a GIL
hand-over per call, which measured as a quarter of the proxy's throughput.

A sink that raises is counted and logged (once a minute at most); the others still get the copy. A
sink that hangs would stop every detector, so a watchdog thread gives up on a sink call that runs past
``sink_timeout_seconds``: it counts it, skips that sink until the call returns, and starts a new
consumer thread for the others. Python cannot stop the stuck thread; it exits when its call returns.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from agent.logs import ThrottledLog
from agent.metrics import ProxyMetrics
from agent.protocol import codec, oip_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TapRecord:
    """What the hot path hands over: raw bytes and timings, nothing parsed beyond the model name."""

    method: str
    model: str
    version: str
    request: bytes
    response: bytes | None
    # Seconds since the epoch when the call arrived, and its duration through the sidecar.
    received_at: float
    duration_seconds: float


@dataclass(slots=True)
class TappedInference:
    """A decoded copy of one inference: what the detectors consume."""

    model: str
    version: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    request: oip_pb2.ModelInferRequest
    response: oip_pb2.ModelInferResponse | None
    received_at: float
    duration_seconds: float
    parameters: dict = field(default_factory=dict)


class Sink(Protocol):
    def __call__(self, inference: TappedInference) -> None: ...


def _parse_response(record: TapRecord) -> oip_pb2.ModelInferResponse | None:
    """The inference response of a record; None for a streamed error (Triton reports those in-band)."""
    if record.method != "ModelStreamInfer":
        return oip_pb2.ModelInferResponse.FromString(record.response)
    streamed = oip_pb2.ModelStreamInferResponse.FromString(record.response)
    if streamed.error_message or not streamed.HasField("infer_response"):
        return None
    return streamed.infer_response


class Tap:
    def __init__(self, metrics: ProxyMetrics, queue_size: int, poll_seconds: float = 0.005,
                 sink_timeout_seconds: float | None = 10.0, max_queue_bytes: int = 64 << 20) -> None:
        # Only the event loop appends and only the consumer pops, so the length check in offer is exact.
        self._queue: collections.deque[TapRecord] = collections.deque()
        self._capacity = queue_size
        # The bytes queued are those offered less those taken; each count has one writer (the event loop, the
        # consumer), so neither needs a lock, and the difference is never less than what the queue holds.
        self._max_bytes = max_queue_bytes
        self._bytes_offered = 0
        self._bytes_taken = 0
        self._poll_seconds = poll_seconds
        self._metrics = metrics
        self._sinks: list[tuple[str, Sink]] = []
        self._tickers: list = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._log = ThrottledLog(log)
        self._sink_timeout = sink_timeout_seconds
        self._watchdog: threading.Thread | None = None
        # The sink call a consumer is in: (sink, monotonic start, the consumer's generation); None between calls.
        self._busy: tuple[str, float, int] | None = None
        self._busy_lock = threading.Lock()
        # Bumped when the watchdog gives up on a consumer stuck in a sink; an older consumer then stops.
        self._generation = 0
        # Sinks stuck in a call that overran the timeout: they get nothing until that call returns.
        self._suspended: set[str] = set()
        metrics.tap_queue_capacity.set(queue_size)
        metrics.tap_queue_depth.set_function(self._queue.__len__)

    def add_sink(self, name: str, sink: Callable[[TappedInference], None]) -> None:
        """A consumer of decoded copies; one with a ``tick()`` method is also called between copies
        and on every idle poll (to close micro-batches that waited long enough)."""
        self._sinks.append((name, sink))
        tick = getattr(sink, "tick", None)
        if tick is not None:
            self._tickers.append((name, tick))

    def offer(self, record: TapRecord) -> bool:
        """Enqueue a copy without waiting; False (and counted) when the queue is full."""
        size = _record_bytes(record)
        if len(self._queue) >= self._capacity:
            self._metrics.tap_dropped.inc()
            self._log.warning("dropped", "sidewatch: tap queue full (%d copies): copies dropped, the calls themselves "
                              "are forwarded; the detectors are behind", self._capacity)
            return False
        if self._bytes_offered - self._bytes_taken + size > self._max_bytes:
            self._metrics.tap_dropped.inc()
            self._log.warning("dropped-bytes", "sidewatch: tap queue full (%d bytes, tap.max_queue_bytes): copies "
                              "dropped, the calls themselves are forwarded", self._max_bytes)
            return False
        self._queue.append(record)
        self._bytes_offered += size
        self._metrics.tap_enqueued.inc()
        return True

    @property
    def queued_bytes(self) -> int:
        return self._bytes_offered - self._bytes_taken

    def load(self) -> float:
        """How full the queue is, 0 to 1 (sampling under Envoy halves the copies past one half)."""
        return len(self._queue) / self._capacity

    def start(self) -> None:
        self._stopping.clear()
        self._thread = self._start_consumer()
        if self._sink_timeout is not None:
            self._watchdog = threading.Thread(target=self._watch, name="sidewatch-tap-watchdog", daemon=True)
            self._watchdog.start()

    def _start_consumer(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(self._generation,), name="sidewatch-tap", daemon=True)
        thread.start()
        return thread

    def stop(self, timeout: float = 5.0) -> set[str]:
        """Let the consumer finish what is queued (up to ``timeout``), then stop it. Returns the sinks
        still inside a call (hung, or given up on): the caller must not call them again."""
        if self._thread is None:
            return set()
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join()  # first: it replaces self._thread
            self._watchdog = None
        self._thread.join(timeout)
        with self._busy_lock:
            stuck = set(self._suspended)
            if self._thread.is_alive():
                log.warning("sidewatch: tap consumer still busy at shutdown; %d copies not processed", len(self._queue))
                if self._busy is not None:
                    stuck.add(self._busy[0])
        self._thread = None
        return stuck

    def _run(self, generation: int) -> None:
        queued = self._queue
        while True:
            if not queued:
                if not self._tick(generation) or self._stopping.is_set():
                    return
                self._stopping.wait(self._poll_seconds)
                continue
            for _ in range(len(queued)):
                record = queued.popleft()
                self._bytes_taken += _record_bytes(record)
                inference = self.decode(record)
                if inference is not None and not self._deliver(inference, generation):
                    return
            if not self._tick(generation):
                return

    def _tick(self, generation: int) -> bool:
        for name, tick in self._tickers:
            if not self._call(name, tick, (), generation):
                return False
        return True

    def _call(self, name: str, function: Callable, args: tuple, generation: int) -> bool:
        """One call into a sink, isolated: an exception is counted and logged. False when the watchdog
        replaced this consumer while the call ran: the caller must stop and leave the queue to the new one."""
        if name in self._suspended:
            return True
        with self._busy_lock:
            self._busy = (name, time.monotonic(), generation)
        try:
            function(*args)
        except Exception:  # noqa: BLE001 - a failing detector must not stop the others
            self._metrics.sink_errors.labels(name).inc()
            self._log.error(name, "sidewatch: tap sink %s failed", name, exc_info=True)
        with self._busy_lock:
            replaced = generation != self._generation
            if replaced:
                self._suspended.discard(name)
            else:
                self._busy = None
        if replaced:
            log.warning("sidewatch: tap sink %s returned from the call that overran its timeout; it gets copies again",
                        name)
        return not replaced

    def _watch(self) -> None:
        """Give up on a sink call that overran the timeout: skip that sink, start a new consumer."""
        while not self._stopping.wait(min(1.0, self._sink_timeout / 4)):
            with self._busy_lock:
                busy = self._busy
                if busy is None or time.monotonic() - busy[1] < self._sink_timeout:
                    continue
                name = busy[0]
                self._suspended.add(name)
                self._generation += 1
                self._busy = None
            self._metrics.sink_timeouts.labels(name).inc()
            self._log.error(("timeout", name), "sidewatch: tap sink %s has not returned for %.1f s "
                            "(tap.sink_timeout_seconds): it gets no copies until it does; the other sinks go on",
                            name, time.monotonic() - busy[1])
            self._thread = self._start_consumer()

    def decode(self, record: TapRecord) -> TappedInference | None:
        """Parse and decode one copy; a failure is counted, never raised."""
        # A unary call is copied only once the upstream answered it OK: its model may take labels
        # (BoundedModels). A streamed copy's response may be an in-band error: only one that parses as an
        # inference response admits its model.
        bounded = self._metrics.bounded
        unary_answer = record.response is not None and record.method != "ModelStreamInfer"
        labels = bounded.admit(record.model, record.version) if unary_answer else bounded(record.model, record.version)
        part = "request"
        try:
            request = oip_pb2.ModelInferRequest.FromString(record.request)
            inputs = codec.decode_request(request)
            response = None
            outputs: dict[str, np.ndarray] = {}
            if record.response is not None:
                part = "response"
                response = _parse_response(record)
                if response is not None:
                    if not unary_answer:
                        labels = bounded.admit(record.model, record.version)
                    outputs = codec.decode_response(response)
        except Exception as err:  # noqa: BLE001 - any malformed copy is counted and skipped
            self._metrics.decode_errors.labels(*labels, part).inc()
            log.debug("sidewatch: cannot decode tapped %s of model %r: %s", part, record.model, err)
            return None
        self._metrics.tap_processed.labels(*labels).inc()
        return TappedInference(
            model=record.model,
            version=record.version,
            inputs=inputs,
            outputs=outputs,
            request=request,
            response=response,
            received_at=record.received_at,
            duration_seconds=record.duration_seconds,
        )

    def _deliver(self, inference: TappedInference, generation: int) -> bool:
        for name, sink in self._sinks:
            if not self._call(name, sink, (inference,), generation):
                return False
        return True


def _record_bytes(record: TapRecord) -> int:
    return len(record.request) + (len(record.response) if record.response is not None else 0)
