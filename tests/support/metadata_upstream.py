"""A real gRPC server answering ModelMetadata, in the test process (grpc's sync server on loopback).

``MetadataUpstream({"model": ModelMetadataResponse})`` answers ModelMetadata of the models it knows (NOT_FOUND
for the others); ``fail`` makes every call fail with that status code, ``sleep`` answers late. ``asked`` lists
the (name, version) of every call that reached it.
"""

from __future__ import annotations

import time
from concurrent import futures

import grpc

from agent.protocol import oip_pb2, paths


def metadata(name: str, inputs=(), outputs=()) -> oip_pb2.ModelMetadataResponse:
    """A ModelMetadataResponse from ``(name, datatype, shape)`` tuples."""
    def tensors(specs):
        return [oip_pb2.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in specs]
    return oip_pb2.ModelMetadataResponse(name=name, inputs=tensors(inputs), outputs=tensors(outputs))


class MetadataUpstream:
    def __init__(self, models: dict[str, oip_pb2.ModelMetadataResponse], fail: grpc.StatusCode | None = None,
                 sleep: float = 0.0) -> None:
        self.models = models
        self.fail = fail
        self.sleep = sleep
        self.asked: list[tuple[str, str]] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers([self])
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "MetadataUpstream":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(0)

    def _answer(self, request: oip_pb2.ModelMetadataRequest, context: grpc.ServicerContext):
        self.asked.append((request.name, request.version))
        deadline = time.monotonic() + self.sleep
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.01)
        if self.fail is not None:
            context.abort(self.fail, "metadata is down")
        if request.name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name}")
        return self.models[request.name]

    def service(self, details: grpc.HandlerCallDetails):
        if details.method != paths.MODEL_METADATA:
            return None
        return grpc.unary_unary_rpc_method_handler(
            self._answer, request_deserializer=oip_pb2.ModelMetadataRequest.FromString,
            response_serializer=oip_pb2.ModelMetadataResponse.SerializeToString)
