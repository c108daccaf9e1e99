"""tritonclient -> sidewatch -> MLServer (with mlserver-sklearn), MLServer in its own virtual environment; on both
data planes (the grpc.aio relay and Envoy)."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.support.harness import start_sidecar
from tests.support.sklearn_models import mlserver_python, start_mlserver

MODEL = "iris"
STREAM_MODEL = "doubler"

# A custom MLServer runtime that streams: MLServer answers ModelStreamInfer only for models with predict_stream.
_STREAMING_RUNTIME = """
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceResponse


class Doubler(MLModel):
    async def load(self):
        return True

    async def predict(self, payload):
        return self._double(payload)

    async def predict_stream(self, payloads):
        async for payload in payloads:
            yield self._double(payload)

    def _double(self, payload):
        values = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output("doubled", values * 2)])
"""

_TRAIN = """
import joblib, sys
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
x, y = load_iris(return_X_y=True)
joblib.dump(LogisticRegression(max_iter=500).fit(x, y), sys.argv[1])
"""


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory):
    python = mlserver_python()
    root = tmp_path_factory.mktemp("mlserver")
    model_dir = root / "models" / MODEL
    model_dir.mkdir(parents=True)
    import subprocess
    subprocess.run([str(python), "-c", _TRAIN, str(model_dir / "model.joblib")], check=True)
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"},
    }))
    stream_dir = root / "models" / STREAM_MODEL
    stream_dir.mkdir()
    (stream_dir / "doubler.py").write_text(_STREAMING_RUNTIME)
    (stream_dir / "model-settings.json").write_text(json.dumps({"name": STREAM_MODEL,
                                                                 "implementation": "doubler.Doubler"}))
    server = start_mlserver(root, [MODEL, STREAM_MODEL])
    yield server.grpc_port
    server.stop()


@pytest.fixture(scope="module", params=["python", "envoy"])
def clients(request, mlserver, tmp_path_factory):
    sidecar, port, _ = start_sidecar(tmp_path_factory.mktemp(f"sidecar-{request.param}"), mlserver,
                                     "--data-plane", request.param)
    through = triton.InferenceServerClient(f"127.0.0.1:{port}")
    direct = triton.InferenceServerClient(f"127.0.0.1:{mlserver}")
    yield through, direct, port
    through.close()
    direct.close()
    sidecar.stop()


def _inputs() -> list[triton.InferInput]:
    features = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]], dtype=np.float64)
    tensor = triton.InferInput("input-0", list(features.shape), "FP64")
    tensor.set_data_from_numpy(features)
    return [tensor]


def test_server_live_ready_and_model_ready(clients):
    through, _, _ = clients
    assert through.is_server_live()
    assert through.is_server_ready()
    assert through.is_model_ready(MODEL)


def test_server_and_model_metadata_match_direct(clients):
    through, direct, _ = clients
    assert through.get_server_metadata(as_json=True) == direct.get_server_metadata(as_json=True)
    assert through.get_model_metadata(MODEL, as_json=True) == direct.get_model_metadata(MODEL, as_json=True)


def test_model_infer_equals_direct(clients):
    through, direct, _ = clients
    a = through.infer(MODEL, _inputs(), request_id="mls-1")
    b = direct.infer(MODEL, _inputs(), request_id="mls-1")
    np.testing.assert_array_equal(a.as_numpy("predict"), b.as_numpy("predict"))
    assert a.as_numpy("predict").ravel().tolist() == [0, 2, 1]
    assert a.get_response().id == "mls-1"


def test_model_stream_infer_passes_through_byte_for_byte(clients, mlserver):
    # MLServer streams bare ModelInferResponse messages (Triton wraps them in ModelStreamInferResponse),
    # so tritonclient cannot read this stream; a byte-level client compares the two paths instead.
    from agent.protocol.client import InferenceClient

    requests = [InferenceClient.request(STREAM_MODEL, {"x": np.array([float(i), 1.5])}).SerializeToString()
                for i in range(3)]
    answers = []
    for port in (clients[2], mlserver):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
            answers.append(list(call(iter(requests), timeout=20)))
    assert len(answers[0]) == 3
    assert answers[0] == answers[1]
    from agent.protocol import codec, oip_pb2
    doubled = [codec.decode_response(oip_pb2.ModelInferResponse.FromString(a))["doubled"].ravel().tolist()
               for a in answers[0]]
    assert doubled == [[0.0, 3.0], [2.0, 3.0], [4.0, 3.0]]


def test_unknown_model_error_is_unchanged(clients):
    messages = []
    for client in clients[:2]:
        with pytest.raises(InferenceServerException) as raised:
            client.infer("no_such_model", _inputs())
        messages.append((raised.value.status(), raised.value.message()))
    assert messages[0] == messages[1]
    assert messages[0][0] == "StatusCode.NOT_FOUND"


def test_extension_method_passes_through(clients):
    # RepositoryIndex is a Triton/MLServer extension that sidewatch has no messages for: relayed as bytes.
    through, direct, _ = clients
    index = through.get_model_repository_index(as_json=True)
    assert index == direct.get_model_repository_index(as_json=True)
    assert {model["name"] for model in index["models"]} == {MODEL, STREAM_MODEL}
