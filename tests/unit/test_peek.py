"""Reading the model name and version from request bytes without a parse."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.metrics import MAX_LABEL_BYTES
from agent.protocol import oip_pb2
from agent.protocol.peek import peek_model


def test_reads_name_and_version_of_each_model_scoped_request():
    for message in (oip_pb2.ModelInferRequest(model_name="mnist_cnn", model_version="2", id="abc"),
                    oip_pb2.ModelMetadataRequest(name="mnist_cnn", version="2"),
                    oip_pb2.ModelReadyRequest(name="mnist_cnn", version="2")):
        assert peek_model(message.SerializeToString()) == ("mnist_cnn", "2")


def test_missing_version_and_empty_message():
    assert peek_model(oip_pb2.ModelInferRequest(model_name="m", id="x").SerializeToString()) == ("m", "")
    assert peek_model(b"") == ("", "")


def test_long_names_and_versions_are_cut_to_the_label_bound_before_decoding():
    request = oip_pb2.ModelInferRequest(model_name="é" * 1_000_000, model_version="1" * 500)
    assert peek_model(request.SerializeToString()) == ("é" * (MAX_LABEL_BYTES // 2), "1" * MAX_LABEL_BYTES)


@given(st.text(max_size=MAX_LABEL_BYTES // 4), st.text(max_size=10), st.text(max_size=10))
def test_agrees_with_a_full_parse(name, version, request_id):
    request = oip_pb2.ModelInferRequest(model_name=name, model_version=version, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    assert peek_model(request.SerializeToString()) == (name, version)


@given(st.binary(max_size=200))
def test_garbage_never_raises(data):
    name, version = peek_model(data)
    assert isinstance(name, str) and isinstance(version, str)
