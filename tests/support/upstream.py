"""A real gRPC server that records what reaches it, for tests of what the sidecar propagates.

It runs in the test process (grpc's own sync server on loopback) so the test can read what it saw:
metadata, deadlines, cancellations. The client steers it with request metadata:
``x-test-sleep`` (seconds to wait before answering; a stream reads nothing meanwhile, as a busy model
server) and ``x-test-fail`` (``CODE:message``); on a stream, ``x-test-flood`` (bytes) sends messages of that
size for as long as the client lets it (flow control), counted in ``Seen.sent``, and ``x-test-hold`` reads
every request and answers none of them (a model server that queues them), counted in ``Seen.received``,
until the client closes its side. ``options`` are the server's gRPC options (its HTTP/2 window, say).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

ECHO_UNARY = "/sidewatch.test.Echo/Reverse"
ECHO_STREAM = "/sidewatch.test.Echo/Chat"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


@dataclass
class Seen:
    method: str
    metadata: dict
    time_remaining: float | None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    received: int = 0


class RecordingUpstream:
    def __init__(self, credentials: grpc.ServerCredentials | None = None, response: bytes = b"",
                 options: list[tuple[str, int]] | None = None) -> None:
        self.seen: list[Seen] = []
        self.response = response
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
        self._server.add_generic_rpc_handlers([self])
        address = "127.0.0.1:0"
        self.port = (self._server.add_secure_port(address, credentials) if credentials
                     else self._server.add_insecure_port(address))

    def __enter__(self) -> "RecordingUpstream":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(0)

    def last(self, method: str) -> Seen:
        for seen in reversed(self.seen):
            if seen.method == method:
                return seen
        raise LookupError(f"{method} never reached the upstream")

    def _record(self, method: str, context: grpc.ServicerContext) -> Seen:
        seen = Seen(method, dict(context.invocation_metadata()), context.time_remaining())
        context.add_callback(lambda: None if seen.finished.is_set() else seen.cancelled.set())
        self.seen.append(seen)
        return seen

    def _behave(self, seen: Seen, context: grpc.ServicerContext) -> None:
        context.send_initial_metadata((("x-upstream-header", "initial"),))
        sleep = float(seen.metadata.get("x-test-sleep", 0))
        deadline = time.monotonic() + sleep
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.01)
        fail = seen.metadata.get("x-test-fail")
        context.set_trailing_metadata((("x-upstream-trailer", "trailing"), ("x-upstream-bin", b"\x00\x01\x02")))
        if fail:
            code, _, message = fail.partition(":")
            context.abort(grpc.StatusCode[code], message)

    def service(self, details: grpc.HandlerCallDetails):
        method = details.method
        if method in (MODEL_INFER, ECHO_UNARY):
            def unary(request: bytes, context):
                seen = self._record(method, context)
                self._behave(seen, context)
                seen.finished.set()
                return self.response if method == MODEL_INFER else request[::-1]
            return grpc.unary_unary_rpc_method_handler(unary)
        if method in (ECHO_STREAM, MODEL_STREAM_INFER):
            def stream(requests, context):
                seen = self._record(method, context)
                self._behave(seen, context)
                flood = int(seen.metadata.get("x-test-flood", 0))
                while flood and context.is_active():
                    yield b"f" * flood  # blocks here while the reader's windows are full
                    seen.sent += 1
                if seen.metadata.get("x-test-hold"):
                    for _ in requests:
                        seen.received += 1
                for request in requests:
                    yield request[::-1]
                seen.finished.set()
            return grpc.stream_stream_rpc_method_handler(stream)
        return None
