"""Version pins under Envoy: ModelInfer / ModelStreamInfer requests get ``model_version`` rewritten by sidewatch.

Envoy cannot re-encode a protobuf field itself (a Lua filter could append the field to a whole buffered
body, but not to a stream's messages, whose frames are cut across body chunks). So a second ext_proc
filter (``sidewatch.pin_rewrite``), not in observability mode, sends the request body of a version-pinned
model's inference calls to :class:`PinRewriter` in FULL_DUPLEX_STREAMED mode: sidewatch reassembles the
gRPC frames, rewrites each message as the grpc.aio relay does (:meth:`RouteTable.rewrite_request`, which
parses and re-serializes the message: the version is decided per message, by its own model), frames it
again with its new length and streams it back; Envoy sends that upstream in place of the original bytes.

The filter is in the chain, and every route but those of version-pinned models turns it off (pins.py):
calls of other models never reach it. What a pinned call pays: its request body goes through sidewatch's
process (a loopback gRPC hop and a parse per message). Responses are not sent (SKIP / NONE).

Bounds: a message over ``max_message_bytes`` is refused at its frame header (the call fails with Envoy's
error, as the relay refuses it with RESOURCE_EXHAUSTED), and the number of calls being rewritten at once is
the gRPC server's ``maximum_concurrent_rpcs``. A compressed message cannot be rewritten without the call's
grpc-encoding: it goes on unchanged. With ``failure_mode_allow: false`` a call that cannot be rewritten
(sidewatch's processor gone) fails rather than reach the version it is pinned away from.
"""

from __future__ import annotations

import logging
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc import aio

from agent.dataplane.envoy.bootstrap import EXT_PROC, EXT_PROC_PER_ROUTE, http2_cluster
from agent.dataplane.envoy.frames import HEADER_BYTES
from agent.dataplane.envoy.loopback import ext_proc_server
from agent.dataplane.routes import RouteTable

log = logging.getLogger(__name__)

FILTER = "sidewatch.pin_rewrite"
CLUSTER = "sidewatch_pin_rewrite"
# Body pieces sent back to Envoy are at most this long (ext_proc's advice for FULL_DUPLEX_STREAMED).
MAX_CHUNK_BYTES = 64 << 10
# Pinned calls rewritten at once; Envoy fails a call beyond it (failure_mode_allow: false), so it is well
# above the calls a sidecar has in flight. Each holds at most one message (max_message_bytes).
MAX_STREAMS = 1024


def pin_rewrite_filter() -> dict[str, Any]:
    """The ext_proc filter that rewrites pinned requests; every route but a version pin's turns it off
    (``disable_on_route``)."""
    return {"name": FILTER, "typed_config": {
        "@type": EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}},
        # A pinned call must not reach the version it is pinned away from: no rewrite, no call.
        "failure_mode_allow": False,
        # Only the request body travels; FULL_DUPLEX_STREAMED needs the request trailers sent too (gRPC
        # clients send none, so in practice the body's end_of_stream ends it).
        "processing_mode": {"request_header_mode": "SKIP", "response_header_mode": "SKIP",
                            "request_body_mode": "FULL_DUPLEX_STREAMED", "response_body_mode": "NONE",
                            "request_trailer_mode": "SEND", "response_trailer_mode": "SKIP"},
        # The default 200 ms would fail calls while sidewatch's process is busy (a GC pause, a burst).
        "message_timeout": "5s",
        "stat_prefix": "sidewatch_pin_rewrite",
    }}


def disable_on_route() -> dict[str, Any]:
    """The typed_per_filter_config entry that turns the rewrite off on a route.

    Not the other way round (off in the chain, on per route, as the tap does): Envoy decides which filters
    a call runs from the route it had when the call began, before the Lua filter routes it by its model;
    ext_proc reads its own per-route ``disabled`` from the route it has when its turn comes."""
    return {FILTER: {"@type": EXT_PROC_PER_ROUTE, "disabled": True}}


def pin_rewrite_cluster(port: int) -> dict[str, Any]:
    return http2_cluster(CLUSTER, "127.0.0.1", port, connect_timeout="1s")


class Reframer:
    """One call's request body, chunk by chunk: whole frames out, each message rewritten (module docstring)."""

    __slots__ = ("routes", "max_message_bytes", "_buffer", "_passing")

    def __init__(self, routes: RouteTable, max_message_bytes: int) -> None:
        self.routes = routes
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        # Bytes of a compressed frame still to pass through unchanged.
        self._passing = 0

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send upstream for ``chunk``; raises ValueError for a message over the bound."""
        out = bytearray()
        buffer = self._buffer
        buffer += chunk
        while buffer:
            if self._passing:
                taken = min(self._passing, len(buffer))
                out += buffer[:taken]
                del buffer[:taken]
                self._passing -= taken
                continue
            if len(buffer) < HEADER_BYTES:
                break
            length = int.from_bytes(buffer[1:HEADER_BYTES], "big")
            if buffer[0] & 1:  # compressed: cannot be read, passes unchanged
                self._passing = HEADER_BYTES + length
                continue
            if length > self.max_message_bytes:
                raise ValueError(f"sidewatch: a pinned request of {length} bytes is over max_message_bytes "
                                 f"({self.max_message_bytes})")
            if len(buffer) < HEADER_BYTES + length:
                break
            message = self.routes.rewrite_request(bytes(buffer[HEADER_BYTES:HEADER_BYTES + length]))
            out += b"\x00" + len(message).to_bytes(4, "big") + message
            del buffer[:HEADER_BYTES + length]
        return bytes(out)


def _body(data: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    mutation = pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=data, end_of_stream=end_of_stream))
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation)))


class PinRewriter(external_processor_pb2_grpc.ExternalProcessorServicer):
    """The ExternalProcessor service of ``sidewatch.pin_rewrite``: one stream per pinned call."""

    def __init__(self, routes: RouteTable, max_message_bytes: int) -> None:
        self.routes = routes
        self.max_message_bytes = max_message_bytes

    async def Process(self, request_iterator, context: aio.ServicerContext):  # noqa: N802 - gRPC's name
        reframer = Reframer(self.routes, self.max_message_bytes)
        async for message in request_iterator:
            kind = message.WhichOneof("request")
            if kind == "request_body":
                body = message.request_body
                try:
                    data = reframer.feed(body.body)
                except ValueError as err:
                    log.warning("%s", err)
                    return  # Envoy fails the call (failure_mode_allow: false)
                if not data and not body.end_of_stream:
                    continue  # a frame not yet whole: nothing to send yet
                for start in range(0, max(len(data), 1), MAX_CHUNK_BYTES):
                    last = start + MAX_CHUNK_BYTES >= len(data)
                    yield _body(data[start:start + MAX_CHUNK_BYTES], body.end_of_stream and last)
                if body.end_of_stream:
                    return  # nothing more comes for this call: free its stream
            elif kind == "request_trailers":
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                return


def start_server(rewriter: PinRewriter, max_streams: int) -> tuple[aio.Server, int]:
    """The pin rewriter's server on a loopback port, at most ``max_streams`` calls rewritten at once."""
    return ext_proc_server(rewriter, max_streams, 8 << 20, "the pin rewriter's ext_proc server")
