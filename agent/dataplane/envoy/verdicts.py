"""Inline verdicts under Envoy: flag and enforce modes, for the models configured for them only.

Envoy picks a call's route, and with it the filters that run, from its headers; the model name is in the
body. The Lua filter (model_peek.lua, with :class:`InlineRouting`) therefore holds each ModelInfer call
until its body is complete (bounded by the route's ``request_body_buffer_limit``: ``max_message_bytes``),
reads the model name, and for a model in flag or enforce mode adds the ``x-sidewatch-inline`` header and
has Envoy pick the route again. The routes that match that header enable a second ext_proc filter, in
blocking mode, whose server is :class:`VerdictProcessor` on loopback; every other call, ModelInfer of a
shadow model included, never reaches it (the filter is in the chain, inert on the plain ModelInfer routes
and absent from all others).

The verdict server asks the policy's inline detector (``Policy.verdicts``, the same fused ONNX detector as
the grpc.aio relay) for the verdict on the request (one gRPC message):

- enforce: the verdict filter sends the buffered request body and waits for the verdict; an adversarial
  input is answered at once with INVALID_ARGUMENT, the same message and trailers as the grpc.aio relay, and
  never reaches the model server;
- flag: nothing waits before the upstream. A second ext_proc filter in observability mode
  (``COPY_FILTER``) copies the request body to the server without waiting for it, and the input is scored
  while the model server works (as the grpc.aio relay does); the verdict filter runs at the response
  trailers only, and the server answers them with the verdict of the copy that has the same call key
  (Envoy's ``connection.id`` and ``request.id`` attributes, sent with both: :class:`PendingVerdicts`). A
  flag call thus pays one exchange with the server, at its end, instead of one before the upstream and
  one at the end (the enforce path's);
- both: the trailers get ``sidewatch-adversarial-score`` and ``sidewatch-adversarial`` (or
  ``sidewatch-adversarial-error`` when the input could not be scored: the detector's own NoVerdict).

Failures fail open, as a failing detector does on the grpc.aio relay ("a broken detector cannot take the
service down"): the verdict server down, refusing a stream (more than ``detection.max_inline_calls``
calls waiting for a verdict) or slower than ``VERDICT_TIMEOUT``, and the call goes on without a verdict
(``failure_mode_allow``), counted by Envoy (``sidewatch_verdicts.*`` stats). An answer that ends
trailers-only (an upstream error) carries no verdict here, unlike the grpc.aio relay's. A flag call whose
copy did not reach the server within ``COPY_WAIT_SECONDS`` of its trailers (refused by the server's
stream bound, or malformed) gets no verdict either; a client that reuses its own ``x-request-id`` on one
connection can only mix up the verdicts of its own flag calls.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2
from grpc import aio

from agent.config import ServeConfig
from agent.dataplane.envoy.bootstrap import http2_cluster, upstream_route
from agent.dataplane.envoy.frames import Frames
from agent.dataplane.envoy.loopback import ext_proc_server
from agent.dataplane.envoy.lua import InlineRouting
from agent.dataplane.policy import InlineVerdicts, Verdict
from agent.protocol import paths
from agent.protocol.peek import peek_model

log = logging.getLogger(__name__)

FILTER = "sidewatch.verdicts"
# Flag mode's copies of the request body, sent without waiting (module docstring).
COPY_FILTER = "sidewatch.verdict_copies"
CLUSTER = "sidewatch_verdicts"
# Envoy's attributes that key a flag call's copy to its trailers.
CALL_KEY_ATTRIBUTES = ["connection.id", "request.id"]
# How long the trailers of a flag call wait for its copy to arrive (the copy leaves Envoy before the
# request reaches the model server, so it is normally there long before).
COPY_WAIT_SECONDS = 1.0
# Verdicts of flag copies whose trailers never come (the call failed trailers-only, or was cancelled) are
# forgotten after this long.
PENDING_SECONDS = 30.0
HEADER = "x-sidewatch-inline"
EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
EXT_PROC_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
# Envoy's wait for each answer of the verdict server (the enforce verdict, the flag verdict at the
# trailers); past it the call goes on without a verdict. Far above a verdict's few milliseconds.
VERDICT_TIMEOUT = "5s"
GRPC_INVALID_ARGUMENT = 3
FRAME_HEADER_BYTES = 5


def inline_routing(config: ServeConfig, detector: bool) -> InlineRouting | None:
    """The Lua filter's routing for ``config``'s modes; None when no model can be in flag or enforce mode
    (no inline ``detector``, or every mode is shadow): then nothing of this module is in Envoy's config."""
    modes = config.adversarial_modes()
    if not detector or (config.detection.adversarial_mode == "shadow"
                            and all(mode == "shadow" for mode in modes.values())):
        return None
    return InlineRouting(config.detection.adversarial_mode, modes, HEADER)


# --- Envoy's side: the filter, its cluster and the routes ------------------------------------------

def verdict_filters() -> list[dict[str, Any]]:
    """Flag mode's copy filter, then the blocking ext_proc filter (module docstring); both disabled unless a
    route enables them."""
    copies = {"name": COPY_FILTER, "disabled": True, "typed_config": {
        "@type": EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}},
        "observability_mode": True,  # Envoy sends and never waits
        "failure_mode_allow": True,
        "deferred_close_timeout": "1s",
        "request_attributes": CALL_KEY_ATTRIBUTES,
        "processing_mode": {"request_header_mode": "SKIP", "response_header_mode": "SKIP",
                            "request_body_mode": "STREAMED", "response_body_mode": "NONE",
                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
        "stat_prefix": "sidewatch_verdict_copies",
    }}
    blocking = {"name": FILTER, "disabled": True, "typed_config": {
        "@type": EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}},
        "failure_mode_allow": True,  # fail open (module docstring)
        "message_timeout": VERDICT_TIMEOUT,
        # Enforce: one message each way per call and one back at the end: no headers (the route already
        # says it is ModelInfer), the body whole, the trailers to add the verdict to. Flag routes override
        # it to the trailers alone (_per_route).
        "processing_mode": {"request_header_mode": "SKIP", "response_header_mode": "SKIP",
                            "request_body_mode": "BUFFERED", "response_body_mode": "NONE",
                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SEND"},
        "response_attributes": CALL_KEY_ATTRIBUTES,
        "stat_prefix": "sidewatch_verdicts",
    }}
    return [copies, blocking]


def verdict_cluster(port: int) -> dict[str, Any]:
    return http2_cluster(CLUSTER, "127.0.0.1", port, connect_timeout="1s")


# Flag mode's verdict filter: the response trailers alone (the request goes on without waiting).
TRAILERS_ONLY = {"request_header_mode": "SKIP", "response_header_mode": "SKIP", "request_body_mode": "NONE",
                 "response_body_mode": "NONE", "request_trailer_mode": "SKIP", "response_trailer_mode": "SEND"}


def _per_route(mode: str | None) -> dict[str, Any]:
    """The verdict filter's and the copy filter's settings on a ModelInfer route for ``mode`` (flag,
    enforce, or None: neither runs). Both are in the chain for every ModelInfer route (the chain is built
    from the route Envoy picks before the Lua filter has read the body), and told per route what to do."""
    disabled = {"@type": FILTER_CONFIG, "config": {"@type": EXT_PROC_PER_ROUTE, "disabled": True}}
    enabled = {"@type": FILTER_CONFIG, "config": {"@type": EXT_PROC_PER_ROUTE, "overrides": {}}}
    if mode == "enforce":
        return {FILTER: enabled, COPY_FILTER: disabled}
    if mode == "flag":
        return {FILTER: {"@type": FILTER_CONFIG, "config": {"@type": EXT_PROC_PER_ROUTE, "overrides": {
                    "processing_mode": TRAILERS_ONLY}}},
                COPY_FILTER: enabled}
    return {FILTER: disabled, COPY_FILTER: disabled}


def inline_routes(routes: list[dict[str, Any]], upstream_cluster: str, max_message_bytes: int) -> list[dict[str, Any]]:
    """``routes`` (the tap's sampled routes, matched first) with the verdict routes: each ModelInfer route
    gets two twins before it, matching ``HEADER`` set to ``enforce`` and to ``flag``, that enable the verdict
    filters for that mode; every ModelInfer route holds at most ``max_message_bytes`` (and its frame
    header) of request body."""
    limit = max_message_bytes + FRAME_HEADER_BYTES
    model_infer = [route for route in routes if route["match"].get("path") == paths.MODEL_INFER]
    if not model_infer:
        model_infer = [upstream_route({"path": paths.MODEL_INFER}, upstream_cluster)]
        routes = [*model_infer, *routes]
    else:
        # The tap's sampled route(s) pick a share of calls; the rest of ModelInfer needs its own route here.
        routes = [*routes, upstream_route({"path": paths.MODEL_INFER}, upstream_cluster)]
        model_infer.append(routes[-1])
    result = []
    for route in routes:
        if route["match"].get("path") != paths.MODEL_INFER:
            result.append(route)
            continue
        plain = {**route, "request_body_buffer_limit": limit,
                 "typed_per_filter_config": {**route.get("typed_per_filter_config", {}), **_per_route(None)}}
        for mode in ("enforce", "flag"):
            header = {"name": HEADER, "string_match": {"exact": mode}}
            result.append({**plain, "match": {**route["match"], "headers": [header]},
                           "typed_per_filter_config": {**plain["typed_per_filter_config"], **_per_route(mode)},
                           # The header is the Lua filter's note to Envoy's router, not the model server's.
                           "request_headers_to_remove": [HEADER]})
        result.append(plain)
    return result


# --- sidewatch's side: the verdicts ----------------------------------------------------------------

def _header_mutation(metadata) -> base_pb2.HeaderValueOption:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()))
            for key, value in metadata]


def _message(body: bytes) -> bytes:
    """The ModelInferRequest inside a unary call's body (one gRPC frame). A compressed or malformed frame
    is handed on as it is: the detector finds it undecodable, a verdict like any other (fail open)."""
    if len(body) >= FRAME_HEADER_BYTES and body[0] == 0:
        return body[FRAME_HEADER_BYTES:FRAME_HEADER_BYTES + int.from_bytes(body[1:5], "big")]
    return body


CONTINUE_BODY = ext_proc_pb2.ProcessingResponse(request_body=ext_proc_pb2.BodyResponse())
CONTINUE_TRAILERS = ext_proc_pb2.ProcessingResponse(response_trailers=ext_proc_pb2.TrailersResponse())


def call_key(message: ext_proc_pb2.ProcessingRequest) -> tuple[str, ...] | None:
    """The call a message of the copy filter or the verdict filter belongs to: Envoy's connection id and
    request id, from the attributes it sends with each filter's first message; None without them."""
    for values in message.attributes.values():
        fields = values.fields
        if all(name in fields for name in CALL_KEY_ATTRIBUTES):
            return tuple(_text(fields[name]) for name in CALL_KEY_ATTRIBUTES)
    return None


def _text(value) -> str:
    # connection.id is a number (a Struct holds it as a double), request.id a string.
    return str(int(value.number_value)) if value.WhichOneof("kind") == "number_value" else value.string_value


class PendingVerdicts:
    """Flag calls' verdicts, scored from their copies, until their trailers take them; keyed by
    :func:`call_key`, whichever side comes first making the entry. At most ``limit`` entries (the oldest
    forgotten first), none older than ``PENDING_SECONDS``: a client sizes this."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: collections.OrderedDict[tuple, tuple[asyncio.Future, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> asyncio.Future:
        entry = self._entries.get(key)
        if entry is not None:
            return entry[0]
        now = time.monotonic()
        while self._entries and (len(self._entries) >= self.limit
                                 or next(iter(self._entries.values()))[1] < now - PENDING_SECONDS):
            self._entries.popitem(last=False)
        future = asyncio.get_running_loop().create_future()
        self._entries[key] = (future, now)
        return future

    def pop(self, key: tuple) -> None:
        self._entries.pop(key, None)


class VerdictProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):
    """The ExternalProcessor service of the verdict filter: one stream per ModelInfer call of a model in
    flag or enforce mode (module docstring)."""

    def __init__(self, verdicts: InlineVerdicts, max_calls: int = 64, max_message_bytes: int = 64 << 20) -> None:
        self.verdicts = verdicts
        self.max_message_bytes = max_message_bytes
        self.pending = PendingVerdicts(max_calls)

    async def Process(self, request_iterator, context: aio.ServicerContext):  # noqa: N802 - gRPC's name
        verdict: asyncio.Future | None = None
        async for message in request_iterator:
            kind = message.WhichOneof("request")
            if message.observability_mode:
                await self._copy(message, request_iterator)  # a flag call's copy: nothing is answered
                return
            if kind == "response_trailers" and verdict is None:
                yield await self._flag_trailers(message)
                return
            if kind == "request_body":
                request = _message(message.request_body.body)
                model, version = peek_model(request)
                mode = self.verdicts.mode(model)
                if mode == "shadow":
                    yield CONTINUE_BODY  # routed here by a name the Lua filter cut short: nothing to add
                    return
                # Scored beside the upstream call (flag), or before it (enforce).
                verdict = asyncio.ensure_future(self.verdicts.score_request(model, version, request))
                if mode == "enforce":
                    judged = await verdict
                    rejection = judged.rejection()
                    if rejection is not None:
                        yield ext_proc_pb2.ProcessingResponse(immediate_response=ext_proc_pb2.ImmediateResponse(
                            status=http_status_pb2.HttpStatus(code=http_status_pb2.OK),
                            grpc_status=ext_proc_pb2.GrpcStatus(status=GRPC_INVALID_ARGUMENT),
                            body=rejection.encode(),
                            headers=ext_proc_pb2.HeaderMutation(set_headers=_header_mutation(judged.metadata())),
                            details="sidewatch_adversarial_rejected"))
                        return
                yield CONTINUE_BODY
            elif kind == "response_trailers":
                if verdict is None:
                    yield CONTINUE_TRAILERS
                else:
                    judged = await verdict
                    yield ext_proc_pb2.ProcessingResponse(response_trailers=ext_proc_pb2.TrailersResponse(
                        header_mutation=ext_proc_pb2.HeaderMutation(
                            set_headers=_header_mutation(judged.metadata()))))
                return


    async def _copy(self, first: ext_proc_pb2.ProcessingRequest, rest) -> None:
        """A flag call's request body, copied: scored once whole, the verdict left for its trailers (None
        when there is none to give: a body that is not one whole message, or a model not in flag mode)."""
        key = call_key(first)
        if key is None:
            return  # its trailers have no key either: they go on without a verdict
        pending = self.pending.get(key)
        frames = Frames(self.max_message_bytes, self.max_message_bytes + FRAME_HEADER_BYTES)
        whole: list[bytes] = []
        message = first
        while message is not None:
            if message.WhichOneof("request") == "request_body":
                whole = frames.feed(message.request_body.body)
                if whole or frames.error is not None or message.request_body.end_of_stream:
                    break
            message = await anext(rest, None)
        model, version = peek_model(whole[0]) if whole else ("", "")
        if pending.done():
            return
        if not whole or self.verdicts.mode(model) != "flag":
            pending.set_result(None)
            return
        scored = asyncio.ensure_future(self.verdicts.score_request(model, version, whole[0]))
        scored.add_done_callback(lambda done: pending.done() or pending.set_result(done.result()))

    async def _flag_trailers(self, message: ext_proc_pb2.ProcessingRequest) -> ext_proc_pb2.ProcessingResponse:
        """A flag call's trailers: the verdict its copy is getting, added to them (module docstring)."""
        key = call_key(message)
        if key is None:
            return CONTINUE_TRAILERS
        try:
            judged: Verdict | None = await asyncio.wait_for(asyncio.shield(self.pending.get(key)), COPY_WAIT_SECONDS)
        except asyncio.TimeoutError:
            log.debug("sidewatch: no copy of flag call %s reached the verdict server", key)
            judged = None
        finally:
            self.pending.pop(key)
        if judged is None:
            return CONTINUE_TRAILERS
        return ext_proc_pb2.ProcessingResponse(response_trailers=ext_proc_pb2.TrailersResponse(
            header_mutation=ext_proc_pb2.HeaderMutation(set_headers=_header_mutation(judged.metadata()))))


def start_server(processor: VerdictProcessor, max_calls: int, max_message_bytes: int) -> tuple[aio.Server, int]:
    """The verdict server on a loopback port, at most ``max_calls`` calls waiting for a verdict at once
    (a flag call has two streams, its copy's and its trailers'; a stream beyond the bound is refused, and
    Envoy lets the call go on without a verdict), each body at most ``max_message_bytes`` (Envoy's buffer
    limit is the same, plus the frame and ext_proc's own fields)."""
    return ext_proc_server(processor, 2 * max_calls, max_message_bytes + 4096, "the verdict server")
