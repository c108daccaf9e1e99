"""ModelMetadata of a model version, asked of the upstream for the drift watch (never on a request's path).

The call is blocking, on a channel of its own with the upstream's address and TLS settings, so that the
caller (a worker thread of the drift watch) can wait for it without an event loop. Its answer comes from
the upstream: it is bounded in size (``MAX_METADATA_BYTES``) and in time (the deadline); what it says
is bounded further where it is read (agent/detect/drift/specs.py).
"""

from __future__ import annotations

import grpc

from agent import tls
from agent.config import ServeConfig
from agent.protocol import oip_pb2, paths

# A model's metadata is names, datatypes and shapes: a few kilobytes even with hundreds of tensors.
MAX_METADATA_BYTES = 1024 * 1024


class MetadataUnavailable(RuntimeError):
    """The upstream gave no metadata (an error status, the deadline passed, an answer too large)."""


class UpstreamMetadata:
    """``metadata(model, version)``: the upstream's ModelMetadataResponse; raises MetadataUnavailable."""

    def __init__(self, config: ServeConfig, timeout_seconds: float, address: str | None = None) -> None:
        self._timeout = timeout_seconds
        address = address or config.upstream.address
        options = [("grpc.max_receive_message_length", MAX_METADATA_BYTES)]
        upstream_tls = config.upstream.tls
        if upstream_tls is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            if upstream_tls.server_name:
                options.append(("grpc.ssl_target_name_override", upstream_tls.server_name))
            self._channel = grpc.secure_channel(address, tls.channel_credentials(upstream_tls), options=options)
        self._call = self._channel.unary_unary(
            paths.MODEL_METADATA,
            request_serializer=oip_pb2.ModelMetadataRequest.SerializeToString,
            response_deserializer=oip_pb2.ModelMetadataResponse.FromString,
        )

    def __call__(self, model: str, version: str) -> oip_pb2.ModelMetadataResponse:
        try:
            return self._call(oip_pb2.ModelMetadataRequest(name=model, version=version), timeout=self._timeout)
        except grpc.RpcError as err:
            code = err.code().name if callable(getattr(err, "code", None)) else "UNKNOWN"
            details = err.details() if callable(getattr(err, "details", None)) else ""
            raise MetadataUnavailable(f"sidewatch: ModelMetadata of {model[:64]} version {version[:64]}: "
                                      f"{code}: {(details or '')[:200]}") from None

    def close(self) -> None:
        self._channel.close()
