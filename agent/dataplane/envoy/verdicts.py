"""Inline verdicts under Envoy: flag and enforce modes, and query detection, for the models configured for them
only.

Envoy picks a call's route, and with it the filters that run, from its headers; the model name is in the
body. The Lua filter (model_peek.lua, with :class:`InlineRouting`) therefore holds each ModelInfer call
until its body is complete (bounded by the route's ``request_body_buffer_limit``: ``max_message_bytes``),
reads the model name, and for a model in flag or enforce mode adds the ``x-sidewatch-inline`` header and
has Envoy pick the route again. The routes that match that header enable a second ext_proc filter, in
blocking mode, whose server is :class:`VerdictProcessor` on loopback; every other call, ModelInfer of a
shadow model included, never reaches it (the filter is in the chain, inert on the plain ModelInfer routes
and absent from all others).

The verdict server gets the buffered request body (one gRPC message) and asks the policy's inline
detector (``Policy.verdicts``, the same fused ONNX detector as the grpc.aio relay) for the verdict:

- enforce: it waits for the verdict; an adversarial input is answered at once with INVALID_ARGUMENT,
  the same message and trailers as the grpc.aio relay, and never reaches the model server;
- flag: the call goes on at once and the input is scored while the model server works (as the grpc.aio
  relay does); the verdict is awaited at the response trailers;
- both: the trailers get ``sidewatch-adversarial-score`` and ``sidewatch-adversarial`` (or
  ``sidewatch-adversarial-error`` when the input could not be scored: the detector's own NoVerdict).

Query detection (``detection.queries``, ``models.<name>.query_mode`` not off) takes the same route: the Lua
filter routes the model's ModelInfer calls here too, and leaves the client's identity in dynamic metadata
(``sidewatch`` namespace, key ``client`` or ``client_hex``), which the filter forwards. Every such request is
handed to the policy's query detector (``Policy.queries``) before anything else; a client it refuses (enforce
mode) is answered at once with PERMISSION_DENIED, as on the grpc.aio relay, and the call never reaches the model
server. A request without an identity (which the Lua filter always sets) is not checked, and logged.

Failures fail open, as a failing detector does on the grpc.aio relay ("a broken detector cannot take the
service down"): the verdict server down, refusing a stream (more than ``detection.max_inline_calls``
calls waiting for a verdict) or slower than ``VERDICT_TIMEOUT``, and the call goes on without a verdict
(``failure_mode_allow``), counted by Envoy (``sidewatch_verdicts.*`` stats). An answer that ends
trailers-only (an upstream error) carries no verdict here, unlike the grpc.aio relay's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2
from grpc import aio

from agent.config import ServeConfig
from agent.dataplane.envoy.bootstrap import EXT_PROC, EXT_PROC_PER_ROUTE, FILTER_CONFIG, http2_cluster, upstream_route
from agent.dataplane.envoy.frames import HEADER_BYTES
from agent.dataplane.envoy.loopback import ext_proc_server
from agent.dataplane.envoy.lua import METADATA_NAMESPACE, InlineRouting
from agent.dataplane.policy import InlineVerdicts, QueryChecks
from agent.logs import ThrottledLog
from agent.protocol import paths
from agent.protocol.peek import peek_model

log = logging.getLogger(__name__)

FILTER = "sidewatch.verdicts"
CLUSTER = "sidewatch_verdicts"
HEADER = "x-sidewatch-inline"
# Envoy's wait for each answer of the verdict server (the enforce verdict, the flag verdict at the
# trailers); past it the call goes on without a verdict. Far above a verdict's few milliseconds.
VERDICT_TIMEOUT = "5s"
GRPC_INVALID_ARGUMENT = 3
GRPC_PERMISSION_DENIED = 7


def inline_routing(config: ServeConfig, detector: bool) -> InlineRouting | None:
    """The Lua filter's routing for ``config``'s modes: a model is routed here when it is in flag or enforce
    mode and there is an inline ``detector``, or when its query detection is on (mode "queries" for the Lua
    filter, whose header says only that the call is inline). None when no model is: then nothing of this module
    is in Envoy's config."""
    adversarial, queries = config.adversarial_modes(), config.query_modes()
    default_adversarial, default_queries = config.detection.adversarial_mode, config.detection.queries.mode

    def inline(adversarial_mode: str, query_mode: str) -> str:
        if detector and adversarial_mode != "shadow":
            return adversarial_mode
        return "queries" if query_mode != "off" else "shadow"

    default = inline(default_adversarial, default_queries)
    modes = {name: inline(adversarial.get(name, default_adversarial), queries.get(name, default_queries))
             for name in {**adversarial, **queries}}
    if default == "shadow" and all(mode == "shadow" for mode in modes.values()):
        return None
    watched = default_queries != "off" or any(mode != "off" for mode in queries.values())
    settings = config.detection.queries
    return InlineRouting(default, modes, HEADER, settings.identity if watched else "", settings.identity_key)


# --- Envoy's side: the filter, its cluster and the routes ------------------------------------------

def verdict_filter() -> dict[str, Any]:
    """The blocking ext_proc filter: the request body (buffered whole) and the response trailers."""
    return {"name": FILTER, "disabled": True, "typed_config": {
        "@type": EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}},
        "failure_mode_allow": True,  # fail open (module docstring)
        "message_timeout": VERDICT_TIMEOUT,
        # One message each way per call and one back at the end: no headers (the route already says it
        # is ModelInfer), the body whole, the trailers to add the verdict to.
        "processing_mode": {"request_header_mode": "SKIP", "response_header_mode": "SKIP",
                            "request_body_mode": "BUFFERED", "response_body_mode": "NONE",
                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SEND"},
        "stat_prefix": "sidewatch_verdicts",
        # The Lua filter's dynamic metadata (the model, and for query detection the client's identity).
        "metadata_options": {"forwarding_namespaces": {"untyped": [METADATA_NAMESPACE]}},
    }}


def verdict_cluster(port: int) -> dict[str, Any]:
    return http2_cluster(CLUSTER, "127.0.0.1", port, connect_timeout="1s")


def _per_route(enabled: bool) -> dict[str, Any]:
    # Enabled in the chain for every ModelInfer route (the chain is built from the route Envoy picks
    # before the Lua filter has read the body), and told per route whether to process.
    config = {"@type": EXT_PROC_PER_ROUTE, "overrides": {}} if enabled else {"@type": EXT_PROC_PER_ROUTE,
                                                                              "disabled": True}
    return {"@type": FILTER_CONFIG, "config": config}


def inline_routes(routes: list[dict[str, Any]], upstream_cluster: str, max_message_bytes: int) -> list[dict[str, Any]]:
    """``routes`` (the tap's sampled routes, matched first) with the verdict routes: each ModelInfer route
    gets a twin matching ``HEADER``, before it, that enables the verdict filter; every ModelInfer route
    holds at most ``max_message_bytes`` (and its frame header) of request body."""
    limit = max_message_bytes + HEADER_BYTES
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
                 "typed_per_filter_config": {**route.get("typed_per_filter_config", {}), FILTER: _per_route(False)}}
        twin = {**plain, "match": {**route["match"], "headers": [{"name": HEADER, "present_match": True}]},
                "typed_per_filter_config": {**plain["typed_per_filter_config"], FILTER: _per_route(True)},
                # The header is the Lua filter's note to Envoy's router, not the model server's business.
                "request_headers_to_remove": [HEADER]}
        result += [twin, plain]
    return result


# --- sidewatch's side: the verdicts ----------------------------------------------------------------

def _header_mutation(metadata) -> base_pb2.HeaderValueOption:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()))
            for key, value in metadata]


def _message(body: bytes) -> bytes:
    """The ModelInferRequest inside a unary call's body (one gRPC frame). A compressed or malformed frame
    is handed on as it is: the detector finds it undecodable, a verdict like any other (fail open)."""
    if len(body) >= HEADER_BYTES and body[0] == 0:
        return body[HEADER_BYTES:HEADER_BYTES + int.from_bytes(body[1:5], "big")]
    return body


def client_identity(message: ext_proc_pb2.ProcessingRequest) -> str | None:
    """The client's identity the Lua filter left in dynamic metadata (hex-encoded when it is not printable
    ASCII, as the model name is); None without one."""
    fields = message.metadata_context.filter_metadata[METADATA_NAMESPACE].fields
    if "client" in fields:
        return fields["client"].string_value
    if "client_hex" in fields:
        try:
            return bytes.fromhex(fields["client_hex"].string_value).decode("utf-8", "replace")
        except ValueError:
            return None
    return None


def refusal_response(code: int, message: str, metadata, details: str) -> ext_proc_pb2.ProcessingResponse:
    """The call answered at once with gRPC status ``code`` and ``message``, never reaching the model server."""
    return ext_proc_pb2.ProcessingResponse(immediate_response=ext_proc_pb2.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=http_status_pb2.OK),
        grpc_status=ext_proc_pb2.GrpcStatus(status=code),
        body=message.encode(),
        headers=ext_proc_pb2.HeaderMutation(set_headers=_header_mutation(metadata)),
        details=details))


CONTINUE_BODY = ext_proc_pb2.ProcessingResponse(request_body=ext_proc_pb2.BodyResponse())
CONTINUE_TRAILERS = ext_proc_pb2.ProcessingResponse(response_trailers=ext_proc_pb2.TrailersResponse())


class VerdictProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):
    """The ExternalProcessor service of the verdict filter: one stream per ModelInfer call of a model in
    flag or enforce mode, or whose queries are watched (module docstring)."""

    def __init__(self, verdicts: InlineVerdicts | None, queries: QueryChecks | None = None) -> None:
        self.verdicts = verdicts
        self.queries = queries
        self._log = ThrottledLog(log)

    def _refused(self, model: str, request: bytes, message: ext_proc_pb2.ProcessingRequest) -> str | None:
        """Why the query detector refuses the call's client, or None."""
        queries = self.queries
        if queries is None or not queries.watches(model):
            return None
        client = client_identity(message)
        if client is None:
            self._log.warning("no_identity", "sidewatch: a call reached the verdict server without its client's "
                              "identity: its query was not checked")
            return None
        return queries.check(model, client, request)

    async def Process(self, request_iterator, context: aio.ServicerContext):  # noqa: N802 - gRPC's name
        verdict: asyncio.Future | None = None
        async for message in request_iterator:
            kind = message.WhichOneof("request")
            if kind == "request_body":
                request = _message(message.request_body.body)
                model, version = peek_model(request)
                refusal = self._refused(model, request, message)
                if refusal is not None:
                    yield refusal_response(GRPC_PERMISSION_DENIED, refusal, (), "sidewatch_query_refused")
                    return
                mode = self.verdicts.mode(model) if self.verdicts is not None else "shadow"
                if mode == "shadow":
                    # Watched for its queries only, or routed here by a name the Lua filter cut short.
                    yield CONTINUE_BODY
                    return
                # Scored beside the upstream call (flag), or before it (enforce).
                verdict = asyncio.ensure_future(self.verdicts.score_request(model, version, request))
                if mode == "enforce":
                    judged = await verdict
                    rejection = judged.rejection()
                    if rejection is not None:
                        yield refusal_response(GRPC_INVALID_ARGUMENT, rejection, judged.metadata(),
                                       "sidewatch_adversarial_rejected")
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


def start_server(processor: VerdictProcessor, max_calls: int, max_message_bytes: int) -> tuple[aio.Server, int]:
    """The verdict server on a loopback port, at most ``max_calls`` calls waiting for a verdict at once
    (a stream beyond it is refused, and Envoy lets the call go on without a verdict), each body at most
    ``max_message_bytes`` (Envoy's buffer limit is the same, plus the frame and ext_proc's own fields)."""
    return ext_proc_server(processor, max_calls, max_message_bytes + 4096, "the verdict server")
