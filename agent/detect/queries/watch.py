"""Black-box query detection on the request path: the data plane's :class:`~agent.dataplane.policy.QueryChecks`.

For each ModelInfer request of a model in flag or enforce mode (``detection.queries.mode``,
``models.<name>.query_mode``) the data plane hands over the client's identity and the request's bytes, before
the upstream call (the grpc.aio relay's policy; under Envoy, the verdict server that flag and enforce use).
:meth:`QueryWatch.check` decodes the request, fingerprints each row of its largest numeric input
(fingerprint.py), and puts the rows in the client's history for that model (clients.py):

- a client flagged (enough near-duplicates among its recent rows) is counted
  (``sidewatch_query_flags_total{model}``), logged (at most once a minute per model: agent.logs.ThrottledLog),
  and in enforce mode refused for ``block_seconds``: this request and every later one of that client to that
  model, without being fingerprinted. The refusal is PERMISSION_DENIED, not INVALID_ARGUMENT as an adversarial
  input's: the input itself may be fine, it is the client that is refused, and a retry of the same call will
  not succeed either until the block ends;
- a request that cannot be decoded, or has no numeric input, goes on unchecked (counted): the model server
  judges it.

Client identities are unbounded: they key the bounded table and appear in the flag's log line, never in a
metric label. An identity longer than ``MAX_IDENTITY_BYTES`` is kept as a hash of it.

The data planes call :meth:`check` on their event loop; a lock still guards the table (the Envoy plane's
servers and the relay could share one watch from different threads one day).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from agent.config import QueryDetection
from agent.detect.queries.clients import ClientTable, Limits
from agent.detect.queries.fingerprint import Fingerprinter
from agent.logs import ThrottledLog
from agent.metrics import OTHER, BoundedModels, QueryMetrics
from agent.protocol import codec, oip_pb2
from agent.protocol.peek import peek_model

log = logging.getLogger(__name__)

MAX_IDENTITY_BYTES = 128
# The tensor datatypes that are fingerprinted: numbers (bool, signed and unsigned integers, floats).
NUMERIC_KINDS = frozenset("biuf")


def bound_identity(client: str) -> str:
    """``client`` as kept: itself, or ``sha256:`` and a hash of it when longer than ``MAX_IDENTITY_BYTES``.

    >>> bound_identity("10.0.0.7")
    '10.0.0.7'
    >>> bound_identity("x" * 1000)[:7], len(bound_identity("x" * 1000))
    ('sha256:', 39)
    """
    if len(client) <= MAX_IDENTITY_BYTES // 4:  # at most 4 bytes a character: short enough whatever it holds
        return client
    raw = client.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_IDENTITY_BYTES:
        return client
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:32]


class _Series:
    """One model label's counters, looked up once (labels() costs more than inc())."""

    __slots__ = ("rows", "repeats", "near_duplicates", "flags", "refused")

    def __init__(self, metrics: QueryMetrics, label: str) -> None:
        self.rows = metrics.rows.labels(label)
        self.repeats = metrics.repeats.labels(label)
        self.near_duplicates = metrics.near_duplicates.labels(label)
        self.flags = metrics.flags.labels(label)
        self.refused = metrics.refused.labels(label)


class Skipped(Exception):
    """Why a request is not fingerprinted (a metric's reason label)."""


class QueryWatch:
    """Per-client query detection (module docstring). ``modes`` and ``steps``: the models whose mode and
    quantisation step are their own. ``clock`` and ``seed`` are for tests."""

    def __init__(self, settings: QueryDetection, metrics: QueryMetrics, bounded: BoundedModels,
                 modes: Mapping[str, str] | None = None, steps: Mapping[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None) -> None:
        self.settings = settings
        self._modes = dict(modes or {})
        self._steps = dict(steps or {})
        self._metrics = metrics
        self._bounded = bounded
        self._clock = clock
        self._fingerprinter = Fingerprinter(settings.window, settings.hashes, seed)
        self.clients = ClientTable(
            Limits(settings.fingerprints_per_client, settings.hashes, settings.match_threshold, settings.history,
                   settings.near_duplicates_to_flag),
            settings.max_clients, settings.client_idle_seconds, clock)
        self._evicted = 0
        self._lock = threading.Lock()
        self._log = ThrottledLog(log)
        # Per model label (bounded: metrics.max_models and "_other"). Every watched model the config names has its
        # series from the start (the alert's increase() needs a first sample); other names get theirs at their
        # first request.
        self._series: dict[str, _Series] = {}
        for name, mode in self._modes.items():
            if mode != "off":
                self._counters(self._label(name))

    def mode(self, model: str) -> str:
        """``off``, ``flag`` or ``enforce``: the model's own mode, else ``detection.queries.mode``."""
        return self._modes.get(model, self.settings.mode)

    def watches(self, model: str) -> bool:
        """Whether the data plane should hand over this model's requests (its mode is not off)."""
        return self.mode(model) != "off"

    def _label(self, model: str, version: str = "") -> str:
        """The model's label: its own when the sidecar knows it, or knows the version asked for (admitted once
        the upstream answered it), else "_other". Inline, before the upstream answered: looked up, never
        admitted (BoundedModels)."""
        label = self._bounded(model, "")[0]
        return self._bounded(model, version)[0] if label == OTHER and version else label

    def _counters(self, label: str) -> _Series:
        series = self._series.get(label)
        if series is None:
            series = self._series[label] = _Series(self._metrics, label)
        return series

    def check(self, model: str, client: str, request: bytes) -> str | None:
        """Take one ModelInfer request (serialized) of ``client``: None, it goes on; else why it is refused
        (enforce mode, a flagged client). Never raises for a bad request."""
        mode = self.mode(model)
        if mode == "off":
            return None
        started = time.perf_counter()
        try:
            return self._check(model, mode, bound_identity(client), request)
        finally:
            self._metrics.duration.observe(time.perf_counter() - started)

    def _check(self, model: str, mode: str, client: str, request: bytes) -> str | None:
        label = self._label(model, peek_model(request)[1])
        counters = self._counters(label)
        with self._lock:
            history = self.clients.get((client, model))
            self._count_clients()
            if history.blocked_until > history.last_seen:
                counters.refused.inc()
                return self._refusal(history.blocked_until - history.last_seen)
        try:
            rows = self._rows(label, request)
        except Skipped as reason:
            self._metrics.skipped.labels(label, str(reason)).inc()
            return None
        step = self._steps.get(model, self.settings.quantization_step)
        fingerprints = zip(self._fingerprinter.rows(rows, step), [hash(row.tobytes()) for row in rows])
        repeats = near_duplicates = 0
        flagged = False
        with self._lock:
            for fingerprint, digest in fingerprints:
                seen = history.observe(fingerprint, digest)
                repeats += seen.repeat
                near_duplicates += seen.near_duplicate
                flagged |= seen.flagged
            if flagged and mode == "enforce":
                history.blocked_until = history.last_seen + self.settings.block_seconds
        counters.rows.inc(len(rows))
        if repeats:
            counters.repeats.inc(repeats)
        if near_duplicates:
            counters.near_duplicates.inc(near_duplicates)
        if not flagged:
            return None
        counters.flags.inc()
        settings = self.settings
        self._log.warning(("queries", label),
                          "sidewatch: client %s flagged on model %s: %d of its last %d rows were near-duplicates of "
                          "its earlier ones, as a black-box attack's are (%s)", client, label,
                          settings.near_duplicates_to_flag, settings.history,
                          f"refused for {settings.block_seconds:g} s" if mode == "enforce" else "flag mode: not refused")
        if mode != "enforce":
            return None
        counters.refused.inc()
        return self._refusal(settings.block_seconds)

    def _count_clients(self) -> None:
        metrics = self._metrics
        metrics.clients.set(len(self.clients))
        if self.clients.evicted != self._evicted:
            metrics.evicted.inc(self.clients.evicted - self._evicted)
            self._evicted = self.clients.evicted

    @staticmethod
    def _refusal(seconds: float) -> str:
        return (f"sidewatch: client refused for {seconds:.0f} s: its recent queries are near-duplicates of each "
                f"other, as a black-box attack's are")

    def _rows(self, label: str, request: bytes) -> np.ndarray:
        """The rows of the request's largest numeric input, at most ``max_rows_per_request`` of them."""
        try:
            inputs = codec.decode_request(oip_pb2.ModelInferRequest.FromString(request))
        except Exception as err:  # noqa: BLE001 - a malformed request is the model server's to refuse
            raise Skipped("undecodable") from err
        numeric = [tensor for tensor in inputs.values() if tensor.dtype.kind in NUMERIC_KINDS and tensor.size]
        if not numeric:
            raise Skipped("no_numeric_input")
        tensor = max(numeric, key=lambda array: array.size)
        rows = tensor.reshape(len(tensor), -1) if tensor.ndim >= 2 else tensor.reshape(1, -1)
        limit = self.settings.max_rows_per_request
        if len(rows) > limit:
            self._metrics.skipped.labels(label, "rows_over_limit").inc(len(rows) - limit)
            rows = rows[:limit]
        return rows
