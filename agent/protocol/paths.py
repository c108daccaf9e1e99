"""gRPC method paths of the Open Inference Protocol.

Our generated messages live in protobuf package ``sidewatch.oip`` (to coexist with tritonclient
and MLServer, which own ``inference``), so the paths cannot come from the descriptors: they are
written out here exactly as clients and servers put them on the wire.
"""

from __future__ import annotations

SERVICE = "inference.GRPCInferenceService"

SERVER_LIVE = f"/{SERVICE}/ServerLive"
SERVER_READY = f"/{SERVICE}/ServerReady"
MODEL_READY = f"/{SERVICE}/ModelReady"
SERVER_METADATA = f"/{SERVICE}/ServerMetadata"
MODEL_METADATA = f"/{SERVICE}/ModelMetadata"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
# Triton's bidirectional streaming variant of ModelInfer.
MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"

# Unary extensions of Triton and MLServer that sidewatch has no messages for; it relays them as bytes.
# Knowing that they are unary matters: relayed as streams, an early upstream error can reach the
# client as INTERNAL because of a grpc.aio bug (grpc/grpc#36066), and unary relays are cheaper.
EXTENSION_UNARY_METHODS: frozenset[str] = frozenset(f"/{SERVICE}/{name}" for name in (
    "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
    "TraceSetting", "LogSettings",
))

# Called with one request and answered with one response.
UNARY_METHODS: frozenset[str] = frozenset(
    {SERVER_LIVE, SERVER_READY, MODEL_READY, SERVER_METADATA, MODEL_METADATA, MODEL_INFER}
) | EXTENSION_UNARY_METHODS

# Bidirectional streams.
STREAM_METHODS: frozenset[str] = frozenset({MODEL_STREAM_INFER})

# Every method the sidecar knows by name.
ALL_METHODS: frozenset[str] = UNARY_METHODS | STREAM_METHODS

# Methods whose request names a model in fields 1 (name) and 2 (version): ModelReadyRequest,
# ModelMetadataRequest and ModelInferRequest (which streams also carry).
MODEL_SCOPED_METHODS: frozenset[str] = frozenset({MODEL_READY, MODEL_METADATA, MODEL_INFER, MODEL_STREAM_INFER})

# Methods whose requests are ModelInferRequest, i.e. the ones that carry tensors.
INFER_METHODS: frozenset[str] = frozenset({MODEL_INFER, MODEL_STREAM_INFER})
# Methods whose OK answer shows that the upstream serves the model named: it may then take a model label
# of its own (agent.metrics.BoundedModels). Not ModelReady: it answers OK ("not ready") for any name; nor
# ModelStreamInfer: a stream ends OK whatever its messages named, their errors travel in its responses.
ADMITTING_METHODS: frozenset[str] = frozenset({MODEL_METADATA, MODEL_INFER})
