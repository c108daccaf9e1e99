"""The grpc.aio relay: forward every gRPC call to the upstream as bytes.

Methods of the Open Inference Protocol that are known to be unary are relayed with unary
calls; everything else (ModelStreamInfer, other services, methods we have never heard of) is
relayed as a bidirectional stream, which carries any call shape on the wire. Messages are never
deserialized here: the only look inside is :func:`peek_model` on inference requests, for labels.

Everything else reaches the relay through its policy (agent/dataplane/policy.py), before and after
the upstream call: route pins (which parse a pinned model's ModelInfer requests to rewrite
``model_version``, or send its calls to a fallback upstream), query detection per client (a refused
client gets PERMISSION_DENIED), inline adversarial verdicts (flag and enforce modes), the tap and the
call log. With nothing pinned and no inline detector, the before
step costs a call and two attribute reads.

Flow control passes through a stream: the relay reads a client's next message only once the upstream has
taken the last one, and the upstream's next response only once the client has taken the last one; what
either side may send ahead is one HTTP/2 window (``stream_window_bytes``, upstream.py). The tap's copies
of a stream's requests wait for their responses within their own bounds (pending.py): a client that never
reads holds the sidecar to those, whatever it sends.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc import aio

from agent.dataplane.pending import PendingRequests
from agent.dataplane.policy import Policy
from agent.dataplane.stream_status import FirstStatus
from agent.dataplane.tap import TapRecord
from agent.metrics import ProxyMetrics
from agent.protocol import paths
from agent.protocol.peek import peek_model

# Metadata that belongs to the hop, not to the call: gRPC sets these itself on the next hop.
_HOP_HEADERS = frozenset({"user-agent", "content-type", "te", "host", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"})

_UNARY_METHODS = frozenset(paths.UNARY_METHODS)
_METHOD_LABELS = {path: path.rsplit("/", 1)[-1] for path in paths.ALL_METHODS}
OTHER_METHOD = "other"


def forwardable_metadata(metadata) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata minus the hop-by-hop headers that gRPC sets itself."""
    if not metadata:
        return ()
    return tuple((key, value) for key, value in metadata if key not in _HOP_HEADERS and not key.startswith(":"))


class Forwarder(grpc.GenericRpcHandler):
    """A generic handler that relays each call to one upstream channel."""

    def __init__(self, channel: aio.Channel, metrics: ProxyMetrics, policy: Policy | None = None,
                 max_pending_stream_requests: int = 256, max_pending_stream_bytes: int = 4 << 20) -> None:
        self._channel = channel
        self._metrics = metrics
        # Routing, inline verdicts, the tap and the call log: the before and after steps of each call.
        self._policy = policy or Policy()
        # Stubs on fallback upstreams' channels, by (channel, method).
        self._fallback_unary: dict[tuple[aio.Channel, str], aio.UnaryUnaryMultiCallable] = {}
        self._fallback_stream: dict[tuple[aio.Channel, str], aio.StreamStreamMultiCallable] = {}
        # Per stream, the requests' copies waiting for their responses (tap.max_pending_stream_*).
        self._max_pending = max_pending_stream_requests
        self._max_pending_bytes = max_pending_stream_bytes
        # The tasks running the handlers of calls in flight, for the shutdown to wait for (handlers_ended).
        self._running: set[asyncio.Task] = set()
        self._unary_stubs: dict[str, aio.UnaryUnaryMultiCallable] = {}
        self._known_handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in _UNARY_METHODS:
            self._unary_stubs[method] = channel.unary_unary(method)
            self._known_handlers[method] = grpc.unary_unary_rpc_method_handler(self._unary_relay(method))
        for method in paths.STREAM_METHODS:
            self._known_handlers[method] = grpc.stream_stream_rpc_method_handler(self._stream_relay(method))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = self._known_handlers.get(method)
        if handler is None:
            # Not cached: method names come from clients and are unbounded.
            handler = grpc.stream_stream_rpc_method_handler(self._stream_relay(method))
        return handler

    # --- unary -----------------------------------------------------------------------------

    def _unary_relay(self, method: str):
        stub = self._unary_stubs[method]
        method_label = _METHOD_LABELS[method]
        carries_model = method in paths.MODEL_SCOPED_METHODS
        admits = method in paths.ADMITTING_METHODS
        taps_inference = method == paths.MODEL_INFER
        metrics = self._metrics
        policy = self._policy

        async def relay(request: bytes, context: aio.ServicerContext) -> bytes:
            received_at = time.time()
            started = time.perf_counter()
            upstream = stub
            verdict = None
            if carries_model:
                model, version = peek_model(request)
                before = policy.before(model, version, request, taps_inference, context)
                if before is not None:
                    request, version, verdict = before.request, before.version, before.verdict
                    if before.upstream is not None:
                        upstream = self._fallback_unary_stub(before.upstream, method)
            else:
                model, version, before = "", "", None
            metrics.in_flight.inc()
            self._running.add(asyncio.current_task())
            code = grpc.StatusCode.OK
            upstream_code = None  # the upstream's own error, counted once the labels are resolved
            try:
                if before is not None and before.refusal is not None:
                    # The client is refused (query detection, enforce mode): it is not this input that is bad.
                    code = grpc.StatusCode.PERMISSION_DENIED
                    await context.abort(code, before.refusal)
                if before is not None and before.enforce:
                    judged = await verdict
                    rejection = judged.rejection()
                    if rejection is not None:
                        code = grpc.StatusCode.INVALID_ARGUMENT
                        await context.abort(code, rejection, judged.metadata())
                call = upstream(
                    request,
                    metadata=forwardable_metadata(context.invocation_metadata()),
                    timeout=context.time_remaining(),
                )
                try:
                    response = await call
                except aio.AioRpcError as err:
                    code = upstream_code = err.code()
                    await _send_initial_metadata(context, err.initial_metadata())
                    await context.abort(code, err.details() or "",
                                        forwardable_metadata(err.trailing_metadata()) + await _verdict_metadata(verdict))
                await _send_initial_metadata(context, await call.initial_metadata())
                context.set_trailing_metadata(
                    forwardable_metadata(await call.trailing_metadata()) + await _verdict_metadata(verdict))
                if taps_inference and policy.keeps_copies:
                    policy.completed(TapRecord(method_label, model, version, request, response, received_at,
                                               time.perf_counter() - started))
                return response
            except asyncio.CancelledError:
                code = _cancelled_code(context)
                raise
            finally:
                metrics.in_flight.dec()
                self._running.discard(asyncio.current_task())
                # Labels resolved after the answer: an unknown model takes a label of its own only once the
                # upstream answered it OK (agent.metrics.BoundedModels).
                series = metrics.call_series(model, version, method_label, admits and code is grpc.StatusCode.OK)
                if code is grpc.StatusCode.OK:
                    series.ok.inc()
                else:
                    metrics.requests.labels(*series.labels, code.name).inc()
                if upstream_code is not None:
                    metrics.upstream_errors.labels(*series.labels, upstream_code.name).inc()
                duration = time.perf_counter() - started
                series.latency.observe(duration)
                policy.finished(context, series.labels, code, duration)

        return relay

    async def handlers_ended(self, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, for the handlers of the calls still in flight to end: once the
        server stopped, those its grace cut end at their next await. Then one turn of the loop more, for
        grpc's own task around each handler to see it end: a task of grpc's still pending when the event
        loop closes is cancelled there, and grpc logs that as an error with a traceback."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)
        await asyncio.sleep(0)

    def _fallback_unary_stub(self, channel: aio.Channel, method: str) -> aio.UnaryUnaryMultiCallable:
        stub = self._fallback_unary.get((channel, method))
        if stub is None:
            stub = self._fallback_unary[(channel, method)] = channel.unary_unary(method)
        return stub

    def _fallback_stream_stub(self, channel: aio.Channel, method: str) -> aio.StreamStreamMultiCallable:
        stub = self._fallback_stream.get((channel, method))
        if stub is None:
            stub = self._fallback_stream[(channel, method)] = channel.stream_stream(method)
        return stub

    # --- streaming ---------------------------------------------------------------------------

    def _stream_relay(self, method: str):
        stub = self._channel.stream_stream(method)
        method_label = _METHOD_LABELS.get(method, OTHER_METHOD)
        taps_inference = method == paths.MODEL_STREAM_INFER
        metrics = self._metrics
        requests_relayed = metrics.stream_messages.labels(method_label, "request")
        responses_relayed = metrics.stream_messages.labels(method_label, "response")
        policy = self._policy
        unpaired = metrics.tap_copies_dropped.labels("unpaired")

        async def relay(request_iterator, context: aio.ServicerContext):
            started = time.perf_counter()
            # Streamed responses are paired with requests in order; the first request names the model.
            pending = PendingRequests(self._max_pending, self._max_pending_bytes, unpaired)
            first_model = ["", ""]
            upstream = stub
            keeps_copies = taps_inference and policy.keeps_copies
            if taps_inference and policy.steers_streams:
                # A stream goes to one upstream: the one its first message's model is pinned to, if any.
                # That message is read before the upstream call starts.
                request_iterator, fallback = await self._stream_fallback(request_iterator)
                if fallback is not None:
                    upstream = self._fallback_stream_stub(fallback, method)

            # Why the stream's client was refused (query detection, enforce mode): the refused message and the
            # rest of the stream never go upstream; the answers to the messages before it do come back, and then
            # the stream ends with PERMISSION_DENIED.
            refused: list[str] = []

            async def upstream_requests():
                async for message in request_iterator:
                    requests_relayed.inc()
                    if taps_inference:
                        refusal = policy.stream_refusal(message, context)
                        if refusal is not None:
                            refused.append(refusal)
                            return
                        message = policy.stream_request(message)
                        if not first_model[0]:
                            first_model[0], first_model[1] = peek_model(message)
                        if keeps_copies:
                            pending.request(message, time.time(), time.perf_counter())
                    yield message

            metrics.in_flight.inc()
            self._running.add(asyncio.current_task())
            code = grpc.StatusCode.OK
            try:
                call = upstream(
                    upstream_requests(),
                    metadata=forwardable_metadata(context.invocation_metadata()),
                    timeout=context.time_remaining(),
                )
                status = FirstStatus(call)
                headers_sent = False
                try:
                    await _send_initial_metadata(context, await call.initial_metadata())
                    headers_sent = True
                    async for response in call:
                        responses_relayed.inc()
                        paired = pending.response() if keeps_copies else None
                        if paired is not None:
                            request, arrived, request_started = paired
                            model, version = peek_model(request)
                            policy.completed(TapRecord(method_label, model, version, request, response, arrived,
                                                       time.perf_counter() - request_started))
                        yield response
                    trailing = await call.trailing_metadata()
                except aio.AioRpcError as err:
                    if refused:
                        # The upstream's end of a stream cut short by the refusal: the refusal is the answer.
                        code = grpc.StatusCode.PERMISSION_DENIED
                        await context.abort(code, refused[0])
                    code, details, trailers = status.of(err)
                    metrics.upstream_errors.labels(
                        *metrics.bounded(first_model[0], first_model[1]), method_label, code.name).inc()
                    if not headers_sent:
                        await _send_initial_metadata(context, err.initial_metadata())
                    await context.abort(code, details, forwardable_metadata(trailers))
                if refused:
                    code = grpc.StatusCode.PERMISSION_DENIED
                    await context.abort(code, refused[0])
                context.set_trailing_metadata(forwardable_metadata(trailing))
            except asyncio.CancelledError:
                code = _cancelled_code(context)
                raise
            finally:
                metrics.in_flight.dec()
                self._running.discard(asyncio.current_task())
                # Looked up, never admitted: a stream ends OK whatever its messages named (their errors travel
                # in its responses), so only a unary answer admits an unknown model (BoundedModels).
                labels = (*metrics.bounded(first_model[0], first_model[1]), method_label)
                metrics.requests.labels(*labels, code.name).inc()
                duration = time.perf_counter() - started
                metrics.latency.labels(*labels).observe(duration)
                policy.finished(context, labels, code, duration)

        return relay

    async def _stream_fallback(self, request_iterator):
        """(the requests with the first one put back, the fallback upstream's channel or None)."""
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            return requests, None
        return _prepend(first, requests), self._policy.stream_upstream(first)


async def _prepend(first: bytes, rest):
    yield first
    async for message in rest:
        yield message


async def _verdict_metadata(verdict) -> tuple:
    """The inline verdict as trailing metadata (flag and enforce modes); () when there is none."""
    if verdict is None:
        return ()
    return (await verdict).metadata()


# A caller's own timer ends its call at its deadline and tells the sidecar with a cancel, which arrives while
# the sidecar's copy of that deadline (the grpc-timeout header, counted from its arrival) is a little ahead.
DEADLINE_MARGIN_SECONDS = 0.25


def _cancelled_code(context: aio.ServicerContext) -> grpc.StatusCode:
    """The status a cancelled call ended with for its caller: DEADLINE_EXCEEDED when its deadline has
    passed or was about to (DEADLINE_MARGIN_SECONDS: gRPC cancels the handler then too, and so does the
    caller's own timer), else CANCELLED (the caller gave up)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_MARGIN_SECONDS:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


async def _send_initial_metadata(context: aio.ServicerContext, metadata) -> None:
    if metadata:
        await context.send_initial_metadata(forwardable_metadata(metadata))
