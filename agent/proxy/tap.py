"""The tap: copies of inference calls, handed from the hot path to the detectors.

The hot path calls :meth:`Tap.offer`, which never waits: when the bounded queue is full the
copy is dropped and counted. A single consumer thread decodes the tensors and hands a
:class:`TappedInference` to every registered sink (the detectors of later issues).

The queue is a deque that the consumer drains in batches every few milliseconds, rather than a
queue.Queue whose every put wakes the consumer: a wake-up per call costs the event loop a GIL
hand-over per call, which measured as a quarter of the proxy's throughput.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

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
    def __init__(self, metrics: ProxyMetrics, queue_size: int, poll_seconds: float = 0.005) -> None:
        # Only the event loop appends and only the consumer pops, so the length check in offer is exact.
        self._queue: collections.deque[TapRecord] = collections.deque()
        self._capacity = queue_size
        self._poll_seconds = poll_seconds
        self._metrics = metrics
        self._sinks: list[tuple[str, Sink]] = []
        self._tickers: list = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
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
        if len(self._queue) >= self._capacity:
            self._metrics.tap_dropped.inc()
            return False
        self._queue.append(record)
        self._metrics.tap_enqueued.inc()
        return True

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="sidewatch-tap", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Let the consumer finish what is queued (up to ``timeout``), then stop it."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("sidewatch: tap consumer still busy at shutdown; %d copies not processed", len(self._queue))
        self._thread = None

    def _run(self) -> None:
        queued = self._queue
        while True:
            if not queued:
                self._tick()
                if self._stopping.is_set():
                    return
                self._stopping.wait(self._poll_seconds)
                continue
            for _ in range(len(queued)):
                inference = self.decode(queued.popleft())
                if inference is not None:
                    self._deliver(inference)
            self._tick()

    def _tick(self) -> None:
        for name, tick in self._tickers:
            try:
                tick()
            except Exception:  # noqa: BLE001 - same isolation as the sinks
                self._metrics.sink_errors.labels(name).inc()
                log.exception("sidewatch: tap sink %s failed", name)

    def decode(self, record: TapRecord) -> TappedInference | None:
        """Parse and decode one copy; a failure is counted, never raised."""
        labels = self._metrics.bounded(record.model, record.version)
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

    def _deliver(self, inference: TappedInference) -> None:
        for name, sink in self._sinks:
            try:
                sink(inference)
            except Exception:  # noqa: BLE001 - a failing detector must not stop the others
                self._metrics.sink_errors.labels(name).inc()
                log.exception("sidewatch: tap sink %s failed", name)
