"""The bundled model server on its own: metadata, raw and typed contents, and its errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from agent.demo.data import load_images
from agent.protocol import codec, oip_pb2, paths
from agent.protocol.client import InferenceClient


@pytest.fixture(scope="module")
def channel(model_server):
    with grpc.insecure_channel(f"127.0.0.1:{model_server}") as channel:
        yield channel


def _infer(channel, request: oip_pb2.ModelInferRequest) -> oip_pb2.ModelInferResponse:
    call = channel.unary_unary(paths.MODEL_INFER, request_serializer=oip_pb2.ModelInferRequest.SerializeToString,
                               response_deserializer=oip_pb2.ModelInferResponse.FromString)
    return call(request, timeout=10)


def test_bundled_model_classifies_digits(model_server):
    images, labels = load_images()
    client = InferenceClient(f"127.0.0.1:{model_server}")
    outputs, response, _ = client.infer("mnist_cnn", {"input": images[:200]}, version="1")
    client.close()
    accuracy = np.mean(outputs["probabilities"].argmax(axis=1) == labels[:200])
    assert accuracy >= 0.97
    assert response.model_version == "1"


def test_latest_version_is_used_when_none_is_given(channel):
    request = InferenceClient.request("mnist_cnn", {"input": np.zeros((1, 1, 28, 28), np.float32)})
    assert _infer(channel, request).model_version == "2"


def test_typed_contents_give_the_same_answer_as_raw(channel):
    batch = load_images()[0][:3]
    raw = InferenceClient.request("mnist_cnn", {"input": batch}, version="1")
    typed = oip_pb2.ModelInferRequest(model_name="mnist_cnn", model_version="1")
    codec.add_input(typed, "input", batch, raw=False)
    assert not typed.raw_input_contents
    a = codec.decode_response(_infer(channel, raw))["probabilities"]
    b = codec.decode_response(_infer(channel, typed))["probabilities"]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("inputs, version, code, words", [
    ({"input": np.zeros((1, 1, 28, 28), np.float32)}, "7", grpc.StatusCode.NOT_FOUND, "no version '7'"),
    ({"input": np.zeros((1, 1, 28, 28), np.float64)}, "1", grpc.StatusCode.INVALID_ARGUMENT, "datatype FP64"),
    ({"input": np.zeros((1, 28, 28), np.float32)}, "1", grpc.StatusCode.INVALID_ARGUMENT, "shape [1, 28, 28]"),
    ({"pixels": np.zeros((1, 1, 28, 28), np.float32)}, "1", grpc.StatusCode.INVALID_ARGUMENT, "no input named pixels"),
    ({}, "1", grpc.StatusCode.INVALID_ARGUMENT, "'input' is missing"),
])
def test_bad_requests_get_clear_errors(channel, inputs, version, code, words):
    with pytest.raises(grpc.RpcError) as raised:
        _infer(channel, InferenceClient.request("mnist_cnn", inputs, version=version))
    assert raised.value.code() == code
    assert words in raw_details(raised.value)


def test_byte_length_mismatch_is_invalid_argument(channel):
    request = oip_pb2.ModelInferRequest(model_name="mnist_cnn", model_version="1")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(b"\x00" * 100)
    with pytest.raises(grpc.RpcError) as raised:
        _infer(channel, request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def raw_details(error: grpc.RpcError) -> str:
    return error.details() or ""
