"""``sidewatch model-server``: an Open Inference Protocol server backed by ONNX Runtime.

It exists for the demo and the tests (it is not meant to replace Triton): ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer and ModelStreamInfer over a
model repository. Unknown models get NOT_FOUND; inputs that do not fit the model get
INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc import aio

from agent import __version__
from agent.eventloop import run_event_loop
from agent.modelserver.repository import BUNDLED_REPOSITORY, LoadedModel, ModelNotFound, ModelRepository
from agent.protocol import codec, oip_pb2, paths

log = logging.getLogger(__name__)

SERVER_NAME = "sidewatch-model-server"


class InferError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ModelServer:
    """The protocol's handlers over a :class:`ModelRepository`."""

    def __init__(self, repository: ModelRepository, workers: int = 2) -> None:
        self.repository = repository
        # ONNX Runtime releases the GIL; running it off the event loop keeps health checks answering.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sidewatch-ort")

    # --- the inference itself, shared by the unary and streaming handlers -----------------------

    def _model(self, name: str, version: str) -> LoadedModel:
        try:
            return self.repository.get(name, version)
        except ModelNotFound as err:
            raise InferError(grpc.StatusCode.NOT_FOUND, str(err)) from err

    def _feeds(self, model: LoadedModel, request: oip_pb2.ModelInferRequest) -> dict:
        try:
            arrays = codec.decode_request(request)
        except codec.CodecError as err:
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        declared = {tensor.name: tensor.datatype for tensor in request.inputs}
        expected = {spec.name for spec in model.inputs}
        unexpected = sorted(set(arrays) - expected)
        if unexpected:
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"model '{model.name}' has no input named {', '.join(unexpected)}")
        for spec in model.inputs:
            if spec.name not in arrays:
                raise InferError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{spec.name}' is missing")
            if declared[spec.name] != spec.datatype:
                raise InferError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"input '{spec.name}' has datatype {declared[spec.name]}, model expects {spec.datatype}")
            shape = tuple(arrays[spec.name].shape)
            if not spec.accepts_shape(shape):
                raise InferError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"input '{spec.name}' has shape {list(shape)}, model expects {list(spec.shape)}")
        return arrays

    def _output_names(self, model: LoadedModel, request: oip_pb2.ModelInferRequest) -> list[str]:
        known = [spec.name for spec in model.outputs]
        if not request.outputs:
            return known
        names = [output.name for output in request.outputs]
        for name in names:
            if name not in known:
                raise InferError(grpc.StatusCode.INVALID_ARGUMENT, f"model '{model.name}' has no output named '{name}'")
        return names

    async def infer(self, request: oip_pb2.ModelInferRequest) -> oip_pb2.ModelInferResponse:
        model = self._model(request.model_name, request.model_version)
        feeds = self._feeds(model, request)
        output_names = self._output_names(model, request)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, model.run, feeds, output_names)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime's own errors become INVALID_ARGUMENT/INTERNAL
            raise InferError(grpc.StatusCode.INTERNAL, f"model '{model.name}' failed: {err}") from err
        response = oip_pb2.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for name, array in zip(output_names, results):
            codec.add_output(response, name, array)
        return response

    # --- gRPC handlers ---------------------------------------------------------------------------

    async def server_live(self, request, context) -> oip_pb2.ServerLiveResponse:
        return oip_pb2.ServerLiveResponse(live=True)

    async def server_ready(self, request, context) -> oip_pb2.ServerReadyResponse:
        return oip_pb2.ServerReadyResponse(ready=True)

    async def model_ready(self, request, context) -> oip_pb2.ModelReadyResponse:
        try:
            self.repository.get(request.name, request.version)
        except ModelNotFound:
            return oip_pb2.ModelReadyResponse(ready=False)
        return oip_pb2.ModelReadyResponse(ready=True)

    async def server_metadata(self, request, context) -> oip_pb2.ServerMetadataResponse:
        return oip_pb2.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def model_metadata(self, request, context) -> oip_pb2.ModelMetadataResponse:
        try:
            model = self.repository.get(request.name, request.version)
        except ModelNotFound as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))

        def tensors(specs):
            return [oip_pb2.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape))
                    for s in specs]

        return oip_pb2.ModelMetadataResponse(
            name=model.name,
            versions=self.repository.versions(model.name),
            platform="onnxruntime_onnx",
            inputs=tensors(model.inputs),
            outputs=tensors(model.outputs),
        )

    async def model_infer(self, request, context) -> oip_pb2.ModelInferResponse:
        try:
            return await self.infer(request)
        except InferError as err:
            await context.abort(err.code, err.message)

    async def model_stream_infer(self, request_iterator, context):
        # Errors on a stream go into the response's error_message, as Triton does, and the stream goes on.
        async for request in request_iterator:
            try:
                yield oip_pb2.ModelStreamInferResponse(infer_response=await self.infer(request))
            except InferError as err:
                yield oip_pb2.ModelStreamInferResponse(error_message=err.message)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def unary(fn, request_type, response_type):
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=request_type.FromString, response_serializer=response_type.SerializeToString)

        handlers = {
            "ServerLive": unary(self.server_live, oip_pb2.ServerLiveRequest, oip_pb2.ServerLiveResponse),
            "ServerReady": unary(self.server_ready, oip_pb2.ServerReadyRequest, oip_pb2.ServerReadyResponse),
            "ModelReady": unary(self.model_ready, oip_pb2.ModelReadyRequest, oip_pb2.ModelReadyResponse),
            "ServerMetadata": unary(self.server_metadata, oip_pb2.ServerMetadataRequest, oip_pb2.ServerMetadataResponse),
            "ModelMetadata": unary(self.model_metadata, oip_pb2.ModelMetadataRequest, oip_pb2.ModelMetadataResponse),
            "ModelInfer": unary(self.model_infer, oip_pb2.ModelInferRequest, oip_pb2.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.model_stream_infer,
                request_deserializer=oip_pb2.ModelInferRequest.FromString,
                response_serializer=oip_pb2.ModelStreamInferResponse.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(paths.SERVICE, handlers)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


async def serve_models(repository_dir: Path | None, listen: str, device: str = "auto",
                       max_message_bytes: int = 64 * 1024 * 1024, ready: asyncio.Event | None = None) -> None:
    repository = ModelRepository(repository_dir or BUNDLED_REPOSITORY, device)
    model_server = ModelServer(repository)
    server = aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ])
    server.add_generic_rpc_handlers([model_server.generic_handler()])
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"sidewatch: cannot listen on {listen}")
    await server.start()
    log.info("sidewatch: model server on %s serving %s", listen, ", ".join(repository.names()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    await server.stop(5.0)
    model_server.close()


def run_model_server(repository_dir: Path | None, listen: str, device: str = "auto") -> None:
    run_event_loop(serve_models(repository_dir, listen, device))
