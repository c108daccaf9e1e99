"""One gRPC call's whole answer (status, details, response bytes, trailers), so that a call through the
sidecar can be compared with the same call made to the model server directly."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from agent.protocol import paths


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    response: bytes | None
    trailers: dict

    @classmethod
    def of(cls, channel: grpc.Channel, request: bytes, method: str = paths.MODEL_INFER) -> "Answer":
        try:
            response, call = channel.unary_unary(method).with_call(request, timeout=10)
            return cls(grpc.StatusCode.OK, "", response, dict(call.trailing_metadata()))
        except grpc.RpcError as err:
            return cls(err.code(), err.details(), None, dict(err.trailing_metadata() or ()))
