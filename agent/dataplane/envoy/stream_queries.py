"""Query detection on ModelStreamInfer under Envoy: every message of a stream is a query, checked as the
verdict server checks a ModelInfer call (verdicts.py).

Envoy picks a stream's route from its headers, and each message names its own model; the verdict route,
which needs the whole body, cannot take a stream. So while any model's queries are watched, a third
ext_proc filter (``sidewatch.stream_queries``) is enabled on the ModelStreamInfer routes, for every stream
whatever its model, in STREAMED mode: Envoy sends each request body chunk to :class:`StreamQueryChecker` on
loopback and waits for its answer before the chunk goes upstream. sidewatch reassembles the frames
(frames.py) and hands each whole message of a watched model to the policy's query detector, with the
client's identity from the Lua filter's dynamic metadata (as for the verdict server).

A refused client (enforce mode) is answered with PERMISSION_DENIED at the chunk that completes the refused
message: the model server has at most the chunks before it, never the whole message, and nothing after it.
Answers to the stream's earlier messages still on their way back are lost with the stream (the grpc.aio
relay delivers them, then ends the stream with PERMISSION_DENIED); when the upstream's response has begun
(its headers went back with the first answer), Envoy can no longer send a status and resets the stream
instead (the client sees the stream fail with another code). A stream a blocked client opens is refused at
its first message, with PERMISSION_DENIED.

What it costs: each chunk of every ModelStreamInfer stream makes a loopback round trip to sidewatch (a
parse of the frame header, and the fingerprint of each watched message) before Envoy forwards it.
Responses are not sent (NONE). Bounds: ``max_message_bytes`` per message (a larger one, or a compressed
one, ends the checks of that stream: it goes on unchecked, and that is logged), at most
``max_concurrent_calls`` streams checked at once (the calls Envoy lets in at once: a stream is one of them);
like every detector, failures fail open (``failure_mode_allow``): a stream with sidewatch's process gone
goes on unchecked.
"""

from __future__ import annotations

import logging
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc import aio

from agent.dataplane.envoy.bootstrap import EXT_PROC, EXT_PROC_PER_ROUTE, FILTER_CONFIG, http2_cluster, upstream_route
from agent.dataplane.envoy.frames import HEADER_BYTES, Frames
from agent.dataplane.envoy.loopback import ext_proc_server
from agent.dataplane.envoy.lua import METADATA_NAMESPACE
from agent.dataplane.envoy.verdicts import GRPC_PERMISSION_DENIED, client_identity, refusal_response
from agent.dataplane.policy import QueryChecks
from agent.logs import ThrottledLog
from agent.protocol import paths
from agent.protocol.peek import peek_model

log = logging.getLogger(__name__)

FILTER = "sidewatch.stream_queries"
CLUSTER = "sidewatch_stream_queries"
CONTINUE = pb.ProcessingResponse(request_body=pb.BodyResponse())


def stream_queries_filter() -> dict[str, Any]:
    """The ext_proc filter, off in the chain; the ModelStreamInfer routes turn it on (:func:`stream_routes`)."""
    return {"name": FILTER, "disabled": True, "typed_config": {
        "@type": EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}},
        "failure_mode_allow": True,  # fail open (module docstring)
        "processing_mode": {"request_header_mode": "SKIP", "response_header_mode": "SKIP",
                            "request_body_mode": "STREAMED", "response_body_mode": "NONE",
                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
        # Each chunk waits for its answer; the default 200 ms would let chunks through unchecked while
        # sidewatch's process is busy (a GC pause, a burst).
        "message_timeout": "5s",
        "stat_prefix": "sidewatch_stream_queries",
        # The Lua filter's dynamic metadata: the client's identity.
        "metadata_options": {"forwarding_namespaces": {"untyped": [METADATA_NAMESPACE]}},
    }}


def stream_queries_cluster(port: int) -> dict[str, Any]:
    return http2_cluster(CLUSTER, "127.0.0.1", port, connect_timeout="1s")


def stream_routes(routes: list[dict[str, Any]], upstream_cluster: str) -> list[dict[str, Any]]:
    """``routes`` with the filter turned on for every ModelStreamInfer route, a plain one added if none takes
    every stream (the tap's sampled route takes only a share)."""
    enable = {FILTER: {"@type": FILTER_CONFIG, "config": {"@type": EXT_PROC_PER_ROUTE, "overrides": {}}}}
    if not any(route["match"] == {"path": paths.MODEL_STREAM_INFER} for route in routes):
        routes = [*routes, upstream_route({"path": paths.MODEL_STREAM_INFER}, upstream_cluster)]
    return [{**route, "typed_per_filter_config": {**route.get("typed_per_filter_config", {}), **enable}}
            if route["match"].get("path") == paths.MODEL_STREAM_INFER else route for route in routes]


class StreamQueryChecker(external_processor_pb2_grpc.ExternalProcessorServicer):
    """The ExternalProcessor service of ``sidewatch.stream_queries``: one stream per ModelStreamInfer call."""

    def __init__(self, queries: QueryChecks, max_message_bytes: int) -> None:
        self.queries = queries
        self.max_message_bytes = max_message_bytes
        self._log = ThrottledLog(log)

    def _refusal(self, messages: list[bytes], client: str | None) -> str | None:
        queries = self.queries
        for message in messages:
            model = peek_model(message)[0]
            if not queries.watches(model):
                continue
            if client is None:
                self._log.warning("no_identity", "sidewatch: a stream reached the query checks without its client's "
                                  "identity: its queries were not checked")
                return None
            refusal = queries.check(model, client, message)
            if refusal is not None:
                return refusal
        return None

    async def Process(self, request_iterator, context: aio.ServicerContext):  # noqa: N802 - gRPC's name
        frames = Frames(self.max_message_bytes, self.max_message_bytes + HEADER_BYTES)
        client: str | None = None
        async for message in request_iterator:
            if message.WhichOneof("request") != "request_body":
                continue
            if client is None:
                client = client_identity(message)
            body = message.request_body
            if frames.error is None:
                refusal = self._refusal(frames.feed(body.body), client)
                if refusal is not None:
                    yield refusal_response(GRPC_PERMISSION_DENIED, refusal, (), "sidewatch_query_refused")
                    return
                if frames.error is not None:
                    self._log.warning(frames.error, "sidewatch: a ModelStreamInfer stream's queries are no longer "
                                      "checked: its message could not be read (%s)", frames.error)
            yield CONTINUE
            if body.end_of_stream:
                return


def start_server(checker: StreamQueryChecker, max_streams: int) -> tuple[aio.Server, int]:
    """The checker's server on a loopback port, at most ``max_streams`` streams at once, each holding at most
    one message."""
    return ext_proc_server(checker, max_streams, checker.max_message_bytes + 4096, "the stream query checker")
