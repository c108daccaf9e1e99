"""Hypothesis strategies for bad inference traffic, shared by the tap and sidecar fuzz tests.

Two kinds of input, both aimed at the bundled ``mnist_cnn`` (so that they reach the calibrated detectors):

* structured: well-formed protobuf whose tensors are wrong in every way the codec and the detectors care
  about: datatype, rank, dimensions (zero, huge, negative), byte counts, tensor names, NaN and Inf, raw or
  typed contents, and outputs whose rows or classes disagree with the inputs;
* mutated: a valid serialized request or response with bytes flipped, cut, inserted or repeated, which
  reaches the protobuf parser and every field boundary of the wire format.

The codec's own fuzzing (random tensors and random bytes against decode) is in test_codec.py.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from agent.demo.data import load_images
from agent.protocol import codec, oip_pb2

MODEL = "mnist_cnn"
DATATYPES = ["FP32", "FP64", "FP16", "BF16", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES"]
SPECIAL_VALUES = [0.0, 0.5, 1.0, -1.0, 1e30, -1e30, np.nan, np.inf, -np.inf]

_DIGITS = load_images()[0][:8]


def valid_request(rows: int = 1) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name=MODEL, model_version="1", id="fuzz")
    codec.add_input(request, "input", _DIGITS[:rows])
    return request


def valid_response(rows: int = 1) -> oip_pb2.ModelInferResponse:
    response = oip_pb2.ModelInferResponse(model_name=MODEL, model_version="1", id="fuzz")
    probabilities = np.full((rows, 10), 0.02, np.float32)
    probabilities[:, 3] = 0.82
    codec.add_output(response, "probabilities", probabilities)
    return response


@st.composite
def shapes(draw) -> list[int]:
    return draw(st.one_of(
        st.builds(lambda n: [n, 1, 28, 28], st.integers(0, 4)),              # the model's own shape
        st.lists(st.integers(0, 30), max_size=5),                            # any small shape
        st.lists(st.sampled_from([0, 1, 28, -1, 2**31, 2**62]), min_size=1, max_size=4),   # edge dimensions
    ))


@st.composite
def tensors(draw, message, name_choices, add) -> None:
    """One tensor added to ``message`` whose declared datatype and shape may disagree with its data."""
    name = draw(st.sampled_from(name_choices))
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(shapes())
    data_shape = shape if draw(st.integers(0, 3)) else draw(shapes())        # mostly consistent, sometimes not
    count = int(np.prod([max(d, 0) for d in data_shape])) if data_shape else 1
    target = message.inputs if add == "input" else message.outputs
    raw_field = message.raw_input_contents if add == "input" else message.raw_output_contents
    tensor = target.add(name=name, datatype=datatype, shape=shape)
    if count > 20_000 or any(d < 0 or d > 10_000 for d in data_shape):
        raw_field.append(draw(st.binary(max_size=64)))      # declared big or negative: a few bytes of data
        return
    if datatype == "BYTES":
        array = np.array([b"x" * draw(st.integers(0, 3))] * count, dtype=object).reshape(data_shape)
    else:
        value = draw(st.sampled_from(SPECIAL_VALUES))
        dtype = np.float32 if datatype == "BF16" else codec.dtype_of(datatype)
        with np.errstate(invalid="ignore", over="ignore"):
            array = np.full(data_shape, value).astype(dtype)
    # The tensor's data, encoded as the codec would for its datatype, raw (mostly) or typed.
    scratch = oip_pb2.ModelInferResponse()
    raw = draw(st.integers(0, 5)) > 0
    codec.add_output(scratch, "t", array, datatype=datatype, raw=raw)
    if raw:
        raw_field.append(scratch.raw_output_contents[0])
    else:
        tensor.contents.CopyFrom(scratch.outputs[0].contents)


@st.composite
def structured_requests(draw) -> bytes:
    request = oip_pb2.ModelInferRequest(model_name=draw(st.sampled_from([MODEL] * 8 + ["", "other"])),
                                        model_version=draw(st.sampled_from(["1", "1", "2", "", "9"])))
    for _ in range(draw(st.integers(0, 2))):
        draw(tensors(request, ["input", "input", "pixels"], "input"))
    return request.SerializeToString()


@st.composite
def structured_responses(draw) -> bytes:
    response = oip_pb2.ModelInferResponse(model_name=MODEL, model_version="1")
    for _ in range(draw(st.integers(0, 2))):
        draw(tensors(response, ["probabilities", "probabilities", "logits"], "output"))
    return response.SerializeToString()


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """``valid`` with up to four byte-level mutations."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "repeat", "truncate"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[position] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x1A, 0x22, 0x3A]))
        elif kind == "cut":
            del data[position:position + draw(st.integers(1, 16))]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "repeat":
            data[position:position] = data[position:position + draw(st.integers(1, 32))]
        elif kind == "truncate":
            del data[position:]
    return bytes(data)


def requests() -> st.SearchStrategy[bytes]:
    """Bad ModelInfer requests of both kinds."""
    return st.one_of(structured_requests(), mutated(valid_request(2).SerializeToString()))


def responses() -> st.SearchStrategy[bytes]:
    """Responses for tapped copies: valid, structured-bad or mutated."""
    return st.one_of(st.just(valid_response(1).SerializeToString()), structured_responses(),
                     mutated(valid_response(2).SerializeToString()))
