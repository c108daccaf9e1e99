"""A small synchronous Open Inference Protocol client, used by the demo and the benchmarks."""

from __future__ import annotations

import grpc
import numpy as np

from agent.protocol import codec, oip_pb2, paths


class InferenceClient:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self.channel = (grpc.secure_channel(address, credentials, options=options) if credentials
                        else grpc.insecure_channel(address, options=options))
        self._infer = self.channel.unary_unary(
            paths.MODEL_INFER,
            request_serializer=oip_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=oip_pb2.ModelInferResponse.FromString,
        )
        self._ready = self.channel.unary_unary(
            paths.SERVER_READY,
            request_serializer=oip_pb2.ServerReadyRequest.SerializeToString,
            response_deserializer=oip_pb2.ServerReadyResponse.FromString,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        self._ready(oip_pb2.ServerReadyRequest(), timeout=timeout, wait_for_ready=True)

    @staticmethod
    def request(model: str, inputs: dict[str, np.ndarray], version: str = "") -> oip_pb2.ModelInferRequest:
        request = oip_pb2.ModelInferRequest(model_name=model, model_version=version)
        for name, array in inputs.items():
            codec.add_input(request, name, array)
        return request

    def infer(self, model: str, inputs: dict[str, np.ndarray], version: str = "", timeout: float | None = None,
              metadata=None) -> tuple[dict[str, np.ndarray], oip_pb2.ModelInferResponse, tuple]:
        """Outputs as arrays, the response, and the trailing metadata."""
        response, call = self._infer.with_call(self.request(model, inputs, version), timeout=timeout, metadata=metadata)
        return codec.decode_response(response), response, call.trailing_metadata()

    def close(self) -> None:
        self.channel.close()
