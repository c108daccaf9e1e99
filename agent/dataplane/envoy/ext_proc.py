"""The tap under Envoy: copies of inference calls from Envoy's ext_proc filter, in observability mode.

Envoy's ``envoy.filters.http.ext_proc`` filter, with ``observability_mode: true``, sends sidewatch's
ExternalProcessor service a copy of what passes through a call (request headers, request and response
bodies streamed chunk by chunk, response trailers) and never waits for an answer: the call goes on at
Envoy's speed whatever sidewatch does with the copy, and sidewatch answers nothing.

The filter is in the chain but disabled (``disabled: true``); only the routes of ModelInfer and
ModelStreamInfer enable it, and only for the share of calls their ``runtime_fraction`` picks (runtime key
``sidewatch.tap.percent``, a whole percentage that sampling.py moves through Envoy's admin API: a
runtime value set there is read as a percentage out of 100, so 1% is the finest step).
Calls that are not picked fall through to the plain upstream route and cost the filter nothing.

:class:`TapProcessor` reassembles the gRPC messages of each copied call (frames.py) and hands the tap the
same :class:`TapRecord` as the grpc.aio relay: for ModelInfer once the trailers say OK, for
ModelStreamInfer one per response message, paired in order with the requests. Everything a client sizes
is bounded: the message size, the bytes held per call and in all (a call over a bound is dropped from the
tap and counted by reason), the streamed requests waiting for a response, in number and in bytes (a copy
over a bound is dropped, not the call: pending.py, as the grpc.aio relay keeps them), and the number of open
streams (``tap.max_streams``: Envoy's circuit breaker on the tap cluster refuses streams beyond it, and
the copies refused are counted from Envoy's stats, envoy_stats.py).

Envoy closes a copy's stream ``deferred_close_timeout`` after its call ends, whether sidewatch has read it
or not. A stream that ends before sidewatch has read the end of its call (the trailers, or the headers of
a trailers-only answer) lost its copy: counted as ``reason="closed"`` (one per ModelInfer; one per streamed
request left without its response), and kept as a running total (``closed``) that the sampler adds to
the copies lost (sampling.py). Calls the client cancels before their answer end the same way and are
counted with them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc import aio

from agent.config import ServeConfig
from agent.dataplane.envoy.bootstrap import EXT_PROC, EXT_PROC_PER_ROUTE, FILTER_CONFIG, http2_cluster, upstream_route
from agent.dataplane.envoy.frames import Frames
from agent.dataplane.envoy.loopback import ext_proc_server
from agent.dataplane.pending import Counter, PendingRequests
from agent.dataplane.policy import Policy
from agent.dataplane.tap import TapRecord
from agent.metrics import TAP_DROP_REASONS, ProxyMetrics
from agent.protocol import paths
from agent.protocol.peek import peek_model

log = logging.getLogger(__name__)

FILTER = "envoy.filters.http.ext_proc"
CLUSTER = "sidewatch_tap"
RUNTIME_KEY = "sidewatch.tap.percent"
# The methods whose calls are copied, with the method label of their TapRecords.
TAPPED = {paths.MODEL_INFER: "ModelInfer", paths.MODEL_STREAM_INFER: "ModelStreamInfer"}


# --- Envoy's side: the filter, its cluster and the sampled routes -----------------------------------

def ext_proc_filter() -> dict[str, Any]:
    """The ext_proc HTTP filter, disabled unless a route enables it (module docstring)."""
    return {"name": FILTER, "disabled": True, "typed_config": {
        "@type": EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}},
        # Envoy sends and never waits: the tap cannot slow a call, and a dead sidewatch fails nothing.
        "observability_mode": True,
        "failure_mode_allow": True,
        # Envoy closes a copy's stream this long after its call ends, read or not: a copy sidewatch has not
        # read by then is lost (counted, reason="closed"). Longer would lose fewer copies when sidewatch
        # falls behind, but hold more streams open for the same calls/s, each holding its copy's bytes.
        "deferred_close_timeout": "1s",
        # No request trailers (gRPC clients send none). The response headers are sent: an error answered
        # trailers-only ends there (its status is in the headers), so that its stream ends at once and is
        # not taken for a lost copy.
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                            "request_body_mode": "STREAMED", "response_body_mode": "STREAMED",
                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SEND"},
        "stat_prefix": "sidewatch_tap",
    }}


def ext_proc_cluster(port: int, max_streams: int) -> dict[str, Any]:
    """The cluster of the tap's ExternalProcessor server. Its circuit breaker is the bound on the copies'
    streams open at once (``tap.max_streams``): Envoy refuses a stream beyond it (counted as streams_failed,
    the call goes on), rather than holding up to its default of 1,024 streams that sidewatch, behind,
    would have to read."""
    return http2_cluster(CLUSTER, "127.0.0.1", port, connect_timeout="1s", max_requests=max_streams)


def sampled_routes(upstream_cluster: str) -> list[dict[str, Any]]:
    """Routes of the tapped methods that enable the filter for the sampled share of calls; matched before
    the others, and the calls they do not pick fall through to the plain upstream route."""
    enable = {FILTER: {"@type": FILTER_CONFIG, "config": {"@type": EXT_PROC_PER_ROUTE, "overrides": {}}}}
    fraction = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": RUNTIME_KEY}
    routes = []
    for path in TAPPED:
        route = upstream_route({"path": path, "runtime_fraction": fraction}, upstream_cluster)
        route["typed_per_filter_config"] = enable
        routes.append(route)
    return routes


# --- sidewatch's side: the copies ------------------------------------------------------------------

class Holdings:
    """Bytes held by every call being reassembled, against one bound for them all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0


class CallCopy:
    """The copy of one call, as its pieces arrive (module docstring)."""

    def __init__(self, method: str, config: ServeConfig, holdings: Holdings, unpaired: Counter) -> None:
        tap = config.tap
        self.method = method
        self.streaming = method == "ModelStreamInfer"
        self.requests = Frames(tap.max_message_bytes, tap.max_call_buffer_bytes)
        self.responses = Frames(tap.max_message_bytes, tap.max_call_buffer_bytes)
        # Requests waiting for their response (a ModelInfer's one request, until its trailers).
        self.pending = (PendingRequests(tap.max_pending_stream_requests, tap.max_pending_stream_bytes, unpaired)
                        if self.streaming else PendingRequests(1, tap.max_message_bytes, unpaired))
        self.response: bytes | None = None
        self.received_at = time.time()
        self.started = time.perf_counter()
        self.max_call_bytes = tap.max_call_buffer_bytes
        self.holdings = holdings
        self.held = 0
        self.dropped: str | None = None
        self.messages = 0  # request messages read

    def hold(self) -> bool:
        """Recount the bytes this call holds; False (and dropped) when a bound is passed."""
        reassembling = self.requests.buffered + self.responses.buffered + len(self.response or b"")
        held = reassembling + self.pending.bytes
        self.holdings.held += held - self.held
        self.held = held
        # A stream's copies waiting for their responses have bounds of their own, past which one copy is
        # dropped (PendingRequests), not the whole stream's; they count toward the bound of all calls.
        call_bytes = reassembling if self.streaming else held
        if call_bytes > self.max_call_bytes or self.holdings.held > self.holdings.limit:
            self.drop("buffer")
            return False
        return True

    def drop(self, reason: str) -> None:
        if self.dropped is None:
            self.dropped = reason
        self.pending.clear()
        self.response = None
        self.release()

    def release(self) -> None:
        self.holdings.held -= self.held
        self.held = 0


def _header(headers, name: str) -> str | None:
    for header in headers.headers:
        if header.key == name:
            return header.raw_value.decode("latin-1") if header.raw_value else header.value
    return None


class TapProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):
    """The ExternalProcessor service: one stream per copied call; hands the policy a TapRecord per copy."""

    def __init__(self, config: ServeConfig, metrics: ProxyMetrics, policy: Policy) -> None:
        self.config = config
        self.metrics = metrics
        self.policy = policy
        self.holdings = Holdings(config.tap.max_buffered_bytes)
        self._dropped = {reason: metrics.tap_copies_dropped.labels(reason) for reason in TAP_DROP_REASONS}
        # Copies lost to a stream that ended before its call did (reason "closed"), a running total.
        self.closed = 0

    async def Process(self, request_iterator, context: aio.ServicerContext) -> None:  # noqa: N802 - gRPC's name
        call: CallCopy | None = None
        ended = False  # the end of the call was read (or the stream carries no copy)
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    method = TAPPED.get(_header(message.request_headers.headers, ":path") or "")
                    if method is None:
                        ended = True
                        return  # not an inference call: nothing to copy (a route sent it by mistake)
                    call = CallCopy(method, self.config, self.holdings, self._dropped["unpaired"])
                elif kind == "response_trailers" or (kind == "response_headers"
                                                     and message.response_headers.end_of_stream):
                    # The call is over (trailers-only: an error, its status in the headers). End the copy's
                    # stream now rather than when Envoy closes it (deferred_close_timeout later), so that it
                    # stops counting against max_streams.
                    if call is not None and call.dropped is None:
                        fields = (message.response_trailers.trailers if kind == "response_trailers"
                                  else message.response_headers.headers)
                        self._trailers(call, _header(fields, "grpc-status"))
                    ended = True
                    return
                elif call is None or call.dropped is not None:
                    continue
                elif kind == "request_body":
                    self._requests(call, message.request_body.body)
                elif kind == "response_body":
                    self._responses(call, message.response_body.body)
        finally:
            if not ended:
                self._closed(call)
            if call is not None:
                call.release()

    def _closed(self, call: CallCopy | None) -> None:
        """The stream ended (Envoy closed or reset it, or the server stopped) before the end of its call:
        its copies are lost. A ModelInfer loses one; a ModelStreamInfer, each request read without its
        response (one if none was read); a stream read up to nothing, one (every stream is a call's copy)."""
        if call is None:
            lost = 1
        elif call.dropped is not None:
            return  # lost already, and counted under its own reason
        elif call.streaming:
            lost = len(call.pending) if call.messages else 1
        else:
            lost = 1
        if lost:
            self.closed += lost
            self._dropped["closed"].inc(lost)
            log.debug("sidewatch: tap: %d copies lost, their stream closed before the call ended", lost)

    def _requests(self, call: CallCopy, chunk: bytes) -> None:
        now, started = time.time(), time.perf_counter()
        for message in call.requests.feed(chunk):
            call.messages += 1
            call.pending.request(message, now, started)  # False: no room, its copy dropped and counted
        self._check(call, call.requests)

    def _responses(self, call: CallCopy, chunk: bytes) -> None:
        for message in call.responses.feed(chunk):
            if call.streaming:
                paired = call.pending.response()  # None: its request's copy was dropped
                if paired is not None:
                    request, arrived, started = paired
                    self._complete(call, request, message, arrived, time.perf_counter() - started)
            elif call.pending:
                call.response = message
        self._check(call, call.responses)

    def _check(self, call: CallCopy, frames: Frames) -> None:
        if frames.error is not None:
            call.drop(frames.error)
        elif call.hold():
            return
        self._dropped[call.dropped].inc()
        log.debug("sidewatch: tap: a %s call dropped from the tap (%s)", call.method, call.dropped)

    def _trailers(self, call: CallCopy, status: str | None) -> None:
        # ModelInfer: one copy, once the call has ended OK (as the relay: only answered inferences).
        if not call.streaming and status == "0" and call.response is not None and call.pending:
            request, _, _ = call.pending.response()
            self._complete(call, request, call.response, call.received_at, time.perf_counter() - call.started)
        call.pending.clear()
        call.response = None
        call.hold()

    def _complete(self, call: CallCopy, request: bytes, response: bytes, received_at: float,
                  duration: float) -> None:
        model, version = peek_model(request)
        self.metrics.tap_copies_received.inc()
        self.policy.completed(TapRecord(call.method, model, version, request, response, received_at, duration))


def start_server(processor: TapProcessor, max_streams: int) -> tuple[aio.Server, int]:
    """The ExternalProcessor server on a loopback port. Envoy's circuit breaker holds the streams open to
    ``max_streams`` (ext_proc_cluster); the server's own bound is twice that, so that Envoy's is the one that
    refuses (a stream Envoy has closed still counts here until its handler has unwound) while a client
    other than Envoy is bounded too (Envoy counts a refused stream as an ext_proc error and lets the call
    go on)."""
    return ext_proc_server(processor, 2 * max_streams, 8 << 20, "the tap's ext_proc server")

