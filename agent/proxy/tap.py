"""The tap: copies of inference calls, handed from the hot path to the detectors.

The hot path calls :meth:`Tap.offer`, which never waits: when the bounded queue is full the
copy is dropped and counted. A single consumer thread decodes the tensors and hands a
:class:`TappedInference` to every registered sink (the detectors of later issues).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from agent.metrics import BoundedLabel, ProxyMetrics
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


_STOP = object()


class Tap:
    def __init__(self, metrics: ProxyMetrics, queue_size: int, model_label: BoundedLabel) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._metrics = metrics
        self._model_label = model_label
        self._sinks: list[tuple[str, Sink]] = []
        self._thread: threading.Thread | None = None
        metrics.tap_queue_capacity.set(queue_size)
        metrics.tap_queue_depth.set_function(self._queue.qsize)

    def add_sink(self, name: str, sink: Callable[[TappedInference], None]) -> None:
        self._sinks.append((name, sink))

    def offer(self, record: TapRecord) -> bool:
        """Enqueue a copy without waiting; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._metrics.tap_dropped.inc()
            return False
        self._metrics.tap_enqueued.inc()
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sidewatch-tap", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Let the consumer finish what is queued (up to ``timeout``), then stop it."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            log.warning("sidewatch: tap queue still full at shutdown; %d copies not processed", self._queue.qsize())
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self._thread = None

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is _STOP:
                return
            inference = self.decode(record)
            if inference is not None:
                self._deliver(inference)

    def decode(self, record: TapRecord) -> TappedInference | None:
        """Parse and decode one copy; a failure is counted, never raised."""
        model = self._model_label(record.model)
        part = "request"
        try:
            request = oip_pb2.ModelInferRequest.FromString(record.request)
            inputs = codec.decode_request(request)
            response = None
            outputs: dict[str, np.ndarray] = {}
            if record.response is not None:
                part = "response"
                response = oip_pb2.ModelInferResponse.FromString(record.response)
                outputs = codec.decode_response(response)
        except Exception as err:  # noqa: BLE001 - any malformed copy is counted and skipped
            self._metrics.decode_errors.labels(model, record.version, part).inc()
            log.debug("sidewatch: cannot decode tapped %s of model %r: %s", part, record.model, err)
            return None
        self._metrics.tap_processed.labels(model, record.version).inc()
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
