"""Tests for the protocol definition (agent/protocol/oip_pb2, paths) and the tensor codec."""

from __future__ import annotations

import math
import struct
import time

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import serialize_byte_tensor

from agent.protocol import codec, oip_pb2, paths
from agent.protocol.codec import CodecError

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
ALL = NUMERIC + ["BF16", "BYTES"]


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """A small array for a datatype, with values that exercise its range."""
    count = math.prod(shape)
    if datatype == "BYTES":
        items = [b"", b"a", "h\u00e9".encode(), b"\x00\xff", b"x" * 300, b"z"]
        return np.array((items * count)[:count], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return (np.arange(count) % 2 == 0).reshape(shape)
    if datatype == "BF16":
        # Rounded to bf16-representable values, so the round trip is exact.
        values = np.array(([1.0, -2.5, 0.0, 3.0e38, -1.0e-30, 65280.0] * count)[:count], dtype=np.float32)
        return values.astype(ml_dtypes.bfloat16).astype(np.float32).reshape(shape)
    dtype = codec.dtype_of(datatype)
    if dtype.kind == "f":
        values = [1.5, -0.0, np.inf, -np.inf, 1e-3, 42.0]
        return np.array((values * count)[:count], dtype=dtype).reshape(shape)
    info = np.iinfo(dtype)
    values = [info.min, info.max, 0, 1, info.max // 3, info.min // 2]
    return np.array((values * count)[:count], dtype=dtype).reshape(shape)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    if expected.dtype == object:
        assert actual.dtype == object
        assert actual.tolist() == expected.tolist()
    else:
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)


def roundtrip_request(request: oip_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    return codec.decode_request(oip_pb2.ModelInferRequest.FromString(request.SerializeToString()))


def raw_request(datatype: str, shape: list[int], raw: bytes, name: str = "x") -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


# --- protocol definition ----------------------------------------------------------------------


def _compare_messages(ours, theirs, where: str) -> None:
    our_fields = {f.number: f for f in ours.fields}
    their_fields = {f.number: f for f in theirs.fields}
    assert set(our_fields) == set(their_fields), where
    for number, ours_f in our_fields.items():
        theirs_f = their_fields[number]
        assert (ours_f.name, ours_f.type, ours_f.is_repeated) == (theirs_f.name, theirs_f.type, theirs_f.is_repeated), (
            f"{where}.{ours_f.name}"
        )
        if ours_f.message_type is not None:
            _compare_messages(ours_f.message_type, theirs_f.message_type, f"{where}.{ours_f.name}")


def test_every_message_matches_triton_field_for_field():
    for name, ours in oip_pb2.DESCRIPTOR.message_types_by_name.items():
        _compare_messages(ours, triton_pb2.DESCRIPTOR.message_types_by_name[name], name)


def test_methods_and_paths_match_triton():
    ours = oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert theirs.full_name == paths.SERVICE
    for method in ours.methods:
        real = theirs.methods_by_name[method.name]
        assert method.input_type.name == real.input_type.name
        assert method.output_type.name == real.output_type.name
        assert (method.client_streaming, method.server_streaming) == (real.client_streaming, real.server_streaming)
    # The extensions sidewatch relays as unary must be unary methods of Triton's service.
    for path in paths.EXTENSION_UNARY_METHODS:
        real = theirs.methods_by_name[path.rsplit("/", 1)[1]]
        assert not real.client_streaming and not real.server_streaming
    expected = {f"/{theirs.full_name}/{m.name}" for m in ours.methods} | paths.EXTENSION_UNARY_METHODS
    assert paths.ALL_METHODS == expected
    streams = {f"/{theirs.full_name}/{m.name}" for m in ours.methods if m.client_streaming}
    assert paths.STREAM_METHODS == streams
    assert paths.UNARY_METHODS == expected - streams
    assert paths.INFER_METHODS == {paths.MODEL_INFER, paths.MODEL_STREAM_INFER}
    for method in ours.methods:
        path = f"/{theirs.full_name}/{method.name}"
        fields = {f.number: f.name for f in method.input_type.fields}
        assert (path in paths.MODEL_SCOPED_METHODS) == (fields.get(1, "").endswith("name") and 2 in fields)
    assert paths.MODEL_INFER == "/inference.GRPCInferenceService/ModelInfer"


def test_stream_response_wraps_an_infer_response():
    response = oip_pb2.ModelStreamInferResponse(error_message="")
    codec.add_output(response.infer_response, "y", np.array([1, 2], dtype=np.int32))
    theirs = triton_pb2.ModelStreamInferResponse.FromString(response.SerializeToString())
    assert list(theirs.infer_response.outputs[0].shape) == [2]
    assert theirs.infer_response.raw_output_contents[0] == struct.pack("<2i", 1, 2)


# --- datatype mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", NUMERIC)
def test_datatype_of_inverts_dtype_of(datatype):
    assert codec.datatype_of(codec.dtype_of(datatype)) == datatype
    assert codec.datatype_of(np.zeros(1, dtype=codec.dtype_of(datatype))) == datatype


def test_datatype_mapping_special_cases():
    assert codec.dtype_of("BF16") == np.float32
    assert codec.dtype_of("BYTES") == np.dtype(object)
    assert codec.datatype_of(np.array(["a"])) == "BYTES"
    assert codec.datatype_of(np.array([b"a"])) == "BYTES"
    assert codec.datatype_of(np.zeros(1, dtype=ml_dtypes.bfloat16)) == "BF16"
    assert codec.DATATYPES == set(ALL)
    with pytest.raises(CodecError):
        codec.dtype_of("FP8")
    with pytest.raises(CodecError):
        codec.datatype_of(np.zeros(1, dtype=np.complex64))
    assert issubclass(CodecError, ValueError)


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", ALL)
@pytest.mark.parametrize("shape", [(2, 3), (0,), (), (1, 0, 4)], ids=str)
def test_request_roundtrip(datatype, raw, shape):
    array = sample(datatype, shape)
    request = oip_pb2.ModelInferRequest()
    tensor = codec.add_input(request, "in", array, datatype=datatype, raw=raw)
    assert tensor.datatype == datatype
    assert list(tensor.shape) == list(shape)
    assert len(request.raw_input_contents) == (1 if raw else 0)
    assert_same(roundtrip_request(request)["in"], array)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", ALL)
def test_response_roundtrip(datatype, raw):
    array = sample(datatype)
    response = oip_pb2.ModelInferResponse()
    codec.add_output(response, "out", array, datatype=datatype, raw=raw)
    decoded = codec.decode_response(oip_pb2.ModelInferResponse.FromString(response.SerializeToString()))
    assert_same(decoded["out"], array)


def test_several_tensors_keep_order_and_positions():
    request = oip_pb2.ModelInferRequest()
    arrays = {"b": sample("INT64"), "a": sample("BYTES", (3,)), "c": sample("FP16", (1, 2))}
    for name, array in arrays.items():
        codec.add_input(request, name, array)
    decoded = roundtrip_request(request)
    assert list(decoded) == ["b", "a", "c"]
    for name, array in arrays.items():
        assert_same(decoded[name], array)


def test_raw_bytes_are_little_endian_and_bool_is_one_byte():
    request = oip_pb2.ModelInferRequest()
    codec.add_input(request, "i", np.array([1, -2], dtype=">i4"))  # big-endian input on purpose
    codec.add_input(request, "b", np.array([True, False, True]))
    codec.add_input(request, "s", np.array(["ab", ""], dtype=object))
    assert request.raw_input_contents[0] == b"\x01\x00\x00\x00\xfe\xff\xff\xff"
    assert request.raw_input_contents[1] == b"\x01\x00\x01"
    assert request.raw_input_contents[2] == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


def test_raw_decoding_is_zero_copy():
    request = raw_request("FP32", [2, 2], np.arange(4, dtype="<f4").tobytes())
    array = codec.decode_request(request)["x"]
    assert not array.flags.owndata
    assert not array.flags.writeable
    np.testing.assert_array_equal(array, [[0, 1], [2, 3]])


def test_raw_bool_bytes_other_than_0_and_1_read_as_true():
    array = codec.decode_request(raw_request("BOOL", [4], b"\x00\x01\x02\xff"))["x"]
    assert array.dtype == np.bool_
    assert array.tolist() == [False, True, True, True]


def test_noncontiguous_and_fortran_arrays_encode_in_row_major_order():
    base = np.arange(12, dtype=np.int16).reshape(3, 4)
    for array in (base.T, base[:, ::2], np.asfortranarray(base)):
        request = oip_pb2.ModelInferRequest()
        codec.add_input(request, "x", array)
        assert_same(roundtrip_request(request)["x"], np.ascontiguousarray(array))


def test_str_elements_encode_as_utf8():
    request = oip_pb2.ModelInferRequest()
    codec.add_input(request, "x", np.array(["h\u00e9", "z"]))
    assert roundtrip_request(request)["x"].tolist() == ["h\u00e9".encode(), b"z"]


def test_int_arrays_convert_to_a_wider_or_fitting_datatype():
    request = oip_pb2.ModelInferRequest()
    codec.add_input(request, "a", np.array([1, 200], dtype=np.int64), datatype="UINT8")
    codec.add_input(request, "b", np.array([1, 2], dtype=np.int8), datatype="INT64")
    codec.add_input(request, "c", np.array([1, 2], dtype=np.int32), datatype="FP64")
    decoded = roundtrip_request(request)
    assert_same(decoded["a"], np.array([1, 200], dtype=np.uint8))
    assert_same(decoded["b"], np.array([1, 2], dtype=np.int64))
    assert_same(decoded["c"], np.array([1.0, 2.0]))


# --- FP16 / BF16 ------------------------------------------------------------------------------


def test_bf16_decodes_to_float32_exactly():
    bits = np.array([0x3F80, 0xC020, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x7F7F], dtype="<u2")
    array = codec.decode_request(raw_request("BF16", [8], bits.tobytes()))["x"]
    assert array.dtype == np.float32
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(array.view(np.uint32), expected.view(np.uint32))
    assert array[0] == 1.0 and array[1] == -2.5 and np.isinf(array[4])


def bf16_bits(values, datatype_input=np.float32) -> list[int]:
    request = oip_pb2.ModelInferRequest()
    codec.add_input(request, "x", np.array(values, dtype=datatype_input), datatype="BF16")
    return np.frombuffer(request.raw_input_contents[0], dtype="<u2").tolist()


def test_bf16_encoding_rounds_to_nearest_even():
    one = 1.0
    ulp = 2.0**-7  # spacing of bfloat16 just above 1.0
    assert bf16_bits([one + ulp / 2]) == [0x3F80]  # tie, 1.0 is even: down
    assert bf16_bits([one + 3 * ulp / 2]) == [0x3F82]  # tie, 1+ulp is odd: up
    assert bf16_bits([one + ulp / 2 + 2.0**-20]) == [0x3F81]  # above the tie: up
    assert bf16_bits([-(one + ulp / 2)]) == [0xBF80]
    assert bf16_bits([np.finfo(np.float32).max]) == [0x7F80]  # rounds up to inf
    assert bf16_bits([np.inf, -np.inf]) == [0x7F80, 0xFF80]


def test_bf16_encoding_keeps_nan_a_nan():
    # A NaN whose payload is only in the low 16 bits would truncate to inf.
    low_payload_nan = np.array([0x7F800001, 0xFF800001], dtype=np.uint32).view(np.float32)
    bits = bf16_bits(low_payload_nan)
    decoded = (np.array(bits, dtype=np.uint32) << 16).view(np.float32)
    assert np.isnan(decoded).all()
    assert np.signbit(decoded).tolist() == [False, True]


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float32, st.integers(0, 64), elements=st.floats(width=32, allow_nan=False)))
def test_bf16_encoding_agrees_with_ml_dtypes(values):
    expected = values.astype(ml_dtypes.bfloat16).view(np.uint16).tolist()
    assert bf16_bits(values) == expected


def test_bf16_accepts_ml_dtypes_arrays_bit_for_bit():
    values = np.array([1.0, -3.5, 1e-3], dtype=np.float32).astype(ml_dtypes.bfloat16)
    assert bf16_bits(values, datatype_input=ml_dtypes.bfloat16) == values.view(np.uint16).tolist()


def test_fp16_and_bf16_are_read_from_fp32_contents():
    request = oip_pb2.ModelInferRequest()
    request.inputs.add(name="h", datatype="FP16", shape=[3]).contents.fp32_contents.extend([1.0, 1e6, 0.1])
    request.inputs.add(name="b", datatype="BF16", shape=[2]).contents.fp32_contents.extend([1.0 + 2.0**-8, 0.1])
    decoded = codec.decode_request(request)
    assert decoded["h"].dtype == np.float16
    assert decoded["h"].tolist() == [1.0, np.inf, np.float16(0.1)]  # IEEE cast: overflow is inf
    assert decoded["b"].dtype == np.float32
    # Rounded to what a bfloat16 can hold.
    assert decoded["b"].tolist() == [1.0, float(np.float32(0.1).astype(ml_dtypes.bfloat16))]


def test_fp16_and_bf16_typed_encoding_uses_fp32_contents():
    request = oip_pb2.ModelInferRequest()
    codec.add_input(request, "h", np.array([0.5, -2.0], dtype=np.float16), raw=False)
    codec.add_input(request, "b", np.array([0.5, 3.0], dtype=np.float32), datatype="BF16", raw=False)
    assert list(request.inputs[0].contents.fp32_contents) == [0.5, -2.0]
    assert list(request.inputs[1].contents.fp32_contents) == [0.5, 3.0]


# --- wire compatibility with tritonclient ---------------------------------------------------------


def triton_array(datatype: str) -> np.ndarray:
    array = sample(datatype)
    if datatype == "BF16":
        return array.astype(ml_dtypes.bfloat16)
    return array


def triton_request(inputs: list[tgrpc.InferInput]) -> triton_pb2.ModelInferRequest:
    # Builds the message as tritonclient's InferenceServerClient.infer does (its private helpers:
    # the public API only sends requests over a channel).
    request = triton_pb2.ModelInferRequest(model_name="m", model_version="1", id="r1")
    for infer_input in inputs:
        request.inputs.extend([infer_input._get_tensor()])
        request.raw_input_contents.extend([infer_input._get_content()])
    request.outputs.add(name="out")
    request.parameters["priority"].uint64_param = 3
    return request


@pytest.mark.parametrize("datatype", ALL)
def test_tritonclient_request_decodes(datatype):
    array = triton_array(datatype)
    infer_input = tgrpc.InferInput("in", list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    data = triton_request([infer_input]).SerializeToString()

    ours = oip_pb2.ModelInferRequest.FromString(data)
    assert (ours.model_name, ours.model_version, ours.id) == ("m", "1", "r1")
    assert ours.parameters["priority"].uint64_param == 3
    expected = array.astype(np.float32) if datatype == "BF16" else array
    assert_same(codec.decode_request(ours)["in"], expected)


def test_our_request_is_byte_identical_to_tritonclients():
    arrays = {dt: triton_array(dt) for dt in ALL}
    inputs = []
    ours = oip_pb2.ModelInferRequest(model_name="m", model_version="1", id="r1")
    for datatype, array in arrays.items():
        infer_input = tgrpc.InferInput(datatype, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
        codec.add_input(ours, datatype, array)
    ours.outputs.add(name="out")
    ours.parameters["priority"].uint64_param = 3
    assert ours.SerializeToString(deterministic=True) == triton_request(inputs).SerializeToString(deterministic=True)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", ALL)
def test_our_response_reads_in_tritonclient(datatype, raw):
    array = sample(datatype)
    response = oip_pb2.ModelInferResponse(model_name="m", id="r1")
    codec.add_output(response, "other", np.zeros(2, dtype=np.int8), raw=raw)
    codec.add_output(response, "out", array, datatype=datatype, raw=raw)
    theirs = triton_pb2.ModelInferResponse.FromString(response.SerializeToString())
    result = tgrpc.InferResult(theirs)
    if raw:
        got = result.as_numpy("out")
        if datatype == "BF16":
            got = got.astype(np.float32)
        assert_same(got, array)
    else:
        # tritonclient's as_numpy reads typed contents only for BYTES, so check the fields it parsed
        # (FP16 and BF16 travel in fp32_contents).
        tensor = result.get_output("out")
        assert tensor.datatype == datatype and list(tensor.shape) == list(array.shape)
        field = getattr(tensor.contents, codec._TYPED_FIELD[datatype])
        assert list(field) == array.ravel().tolist()


def test_tritonclient_built_response_decodes():
    response = triton_pb2.ModelInferResponse(model_name="m")
    for datatype in ALL:
        array = triton_array(datatype)
        response.outputs.add(name=datatype, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            response.raw_output_contents.append(serialize_byte_tensor(array).item())
        else:
            response.raw_output_contents.append(array.tobytes())
    decoded = codec.decode_response(oip_pb2.ModelInferResponse.FromString(response.SerializeToString()))
    for datatype in ALL:
        expected = sample(datatype)
        assert_same(decoded[datatype], expected)


# --- malformed tensors --------------------------------------------------------------------------


def expect_error(request: oip_pb2.ModelInferRequest, *fragments: str) -> str:
    with pytest.raises(CodecError) as caught:
        codec.decode_request(request)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("datatype", [dt for dt in ALL if dt != "BYTES"])
def test_raw_byte_count_must_match_shape(datatype):
    size = 2 if datatype == "BF16" else codec.dtype_of(datatype).itemsize
    expect_error(raw_request(datatype, [2, 3], b"\x00" * (6 * size - 1)), "input 'x'", "needs", str(6 * size))
    expect_error(raw_request(datatype, [2, 3], b"\x00" * (6 * size + size)), "input 'x'")
    expect_error(raw_request(datatype, [7], b"\x00" * (6 * size)), "input 'x'")


def test_unknown_datatype():
    expect_error(raw_request("FLOAT32", [1], b"\x00" * 4), "input 'x'", "FLOAT32")
    expect_error(raw_request("fp32", [1], b"\x00" * 4), "fp32")


def test_negative_dimension():
    expect_error(raw_request("FP32", [-1, 2], b"\x00" * 8), "input 'x'", "negative")
    # Two negatives multiply to a positive count that would match the bytes.
    expect_error(raw_request("FP32", [-1, -2], b"\x00" * 8), "negative")


def test_too_many_dimensions():
    expect_error(raw_request("FP32", [1] * 65, b"\x00" * 4), "input 'x'", "dimensions")


@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "BOOL"])
def test_huge_shape_is_rejected_without_allocating(datatype):
    start = time.perf_counter()
    expect_error(raw_request(datatype, [2**62, 2**62], b"\x00" * 8), "input 'x'")
    typed = oip_pb2.ModelInferRequest()
    typed.inputs.add(name="t", datatype=datatype, shape=[2**40, 2**40, 2**40])
    expect_error(typed, "input 't'")
    assert time.perf_counter() - start < 1.0


def test_empty_tensor_with_unrepresentable_shape():
    expect_error(raw_request("FP32", [0, 2**62, 2**62], b""), "input 'x'", "not representable")


def test_raw_entries_must_be_one_per_input():
    request = raw_request("FP32", [1], b"\x00" * 4)
    request.inputs.add(name="y", datatype="FP32", shape=[1])
    expect_error(request, "1 raw_input_contents entries for 2 inputs")
    request.raw_input_contents.extend([b"\x00" * 4, b"\x00" * 4])
    expect_error(request, "3 raw_input_contents entries for 2 inputs")


def test_raw_and_typed_together_is_an_error():
    request = raw_request("FP32", [1], b"\x00" * 4)
    request.inputs[0].contents.fp32_contents.append(1.0)
    expect_error(request, "input 'x'", "typed contents")


def test_raw_output_count_mismatch_names_outputs():
    response = oip_pb2.ModelInferResponse()
    response.outputs.add(name="a", datatype="FP32", shape=[1])
    response.raw_output_contents.extend([b"\x00" * 4, b"\x00" * 4])
    with pytest.raises(CodecError, match="raw_output_contents entries for 1 outputs"):
        codec.decode_response(response)


def test_shared_memory_inputs_are_reported_not_misread():
    request = oip_pb2.ModelInferRequest()
    shm = request.inputs.add(name="s", datatype="FP32", shape=[4])
    shm.parameters["shared_memory_region"].string_param = "region0"
    request.inputs.add(name="r", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\x00" * 4)
    expect_error(request, "shared memory", "'s'")
    typed = oip_pb2.ModelInferRequest()
    typed.inputs.add().CopyFrom(shm)
    expect_error(typed, "input 's'", "region0")


def test_duplicate_tensor_names():
    request = raw_request("INT8", [1], b"\x01")
    request.inputs.add(name="x", datatype="INT8", shape=[1])
    request.raw_input_contents.append(b"\x02")
    expect_error(request, "input 'x'", "more than once")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"\x09\x00\x00\x00abcd", "declares 9 bytes, only 4 remain"),  # length runs past the end
        (b"\x01\x00\x00\x00a\x02\x00\x00", "truncated length prefix"),  # second prefix cut short
        (b"\x01\x00\x00\x00a\x00\x00\x00\x00zz", "left over"),  # trailing bytes
        (b"\x00\x00\x00", "at least 8"),  # too short for two prefixes
        (b"\xff\xff\xff\xff" + b"\x00" * 8, "declares 4294967295 bytes"),
    ],
)
def test_malformed_raw_bytes(raw, fragment):
    expect_error(raw_request("BYTES", [2], raw), "input 'x'", fragment)


def test_typed_count_must_match_shape_and_names_the_field():
    request = oip_pb2.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP32", shape=[2]).contents.fp32_contents.append(1.0)
    expect_error(request, "input 'x'", "needs 2 values in contents.fp32_contents, got 1")
    wrong_field = oip_pb2.ModelInferRequest()
    wrong_field.inputs.add(name="x", datatype="FP32", shape=[2]).contents.int_contents.extend([1, 2])
    expect_error(wrong_field, "data found in int_contents")


@pytest.mark.parametrize(("datatype", "field", "value"), [
    ("INT8", "int_contents", 128), ("INT8", "int_contents", -129), ("INT16", "int_contents", 40000),
    ("UINT8", "uint_contents", 256), ("UINT16", "uint_contents", 70000),
])
def test_typed_values_out_of_range(datatype, field, value):
    request = oip_pb2.ModelInferRequest()
    getattr(request.inputs.add(name="x", datatype=datatype, shape=[2]).contents, field).extend([0, value])
    expect_error(request, "input 'x'", f"range of {datatype}")


def test_decode_tensor_reports_outputs_as_outputs():
    tensor = oip_pb2.ModelInferResponse.InferOutputTensor(name="y", datatype="INT32", shape=[1])
    with pytest.raises(CodecError, match="output 'y'"):
        codec.decode_tensor(tensor, b"\x00")
    assert codec.decode_tensor(tensor, b"\x07\x00\x00\x00").tolist() == [7]


# --- encoding errors ----------------------------------------------------------------------------


def test_encoding_refuses_to_mix_raw_and_typed():
    request = oip_pb2.ModelInferRequest()
    codec.add_input(request, "a", np.zeros(1, dtype=np.float32))
    with pytest.raises(CodecError, match="typed tensor"):
        codec.add_input(request, "b", np.zeros(1, dtype=np.float32), raw=False)
    typed = oip_pb2.ModelInferResponse()
    codec.add_output(typed, "a", np.zeros(1, dtype=np.float32), raw=False)
    with pytest.raises(CodecError, match="raw tensor"):
        codec.add_output(typed, "b", np.zeros(1, dtype=np.float32))
    assert len(request.inputs) == 1 and len(typed.outputs) == 1  # nothing half-added


@pytest.mark.parametrize(("array", "datatype", "fragment"), [
    (np.array([300]), "INT8", "do not fit"),
    (np.array([-1]), "UINT64", "do not fit"),
    (np.array([np.iinfo(np.uint64).max], dtype=np.uint64), "INT64", "do not fit"),
    (np.array([1.5]), "INT32", "integer array"),
    (np.array([1]), "BOOL", "bool array"),
    (np.array([1]), "BYTES", "bytes or str"),
    (np.array([1, "a"], dtype=object), "BYTES", "got int"),
    (np.array(["a"]), "FP32", "numeric"),
    (np.array([1.0]), "FP8", "unknown datatype"),
])
def test_encoding_errors(array, datatype, fragment):
    request = oip_pb2.ModelInferRequest()
    with pytest.raises(CodecError, match=fragment):
        codec.add_input(request, "x", array, datatype=datatype)
    assert len(request.inputs) == 0 and len(request.raw_input_contents) == 0


# --- fuzzing ----------------------------------------------------------------------------------

datatypes = st.sampled_from(ALL) | st.sampled_from(["", "FP8", "fp32", "BYTE", "INT128"])
dims = st.integers(-3, 5) | st.integers(-(2**63), 2**63 - 1)
shapes = st.lists(dims, max_size=4) | st.lists(st.integers(0, 1), min_size=30, max_size=70)
typed_contents = st.fixed_dictionaries({}, optional={
    "bool_contents": st.lists(st.booleans(), max_size=8),
    "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8),
    "int64_contents": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8),
    "uint_contents": st.lists(st.integers(0, 2**32 - 1), max_size=8),
    "uint64_contents": st.lists(st.integers(0, 2**64 - 1), max_size=8),
    "fp32_contents": st.lists(st.floats(width=32), max_size=8),
    "fp64_contents": st.lists(st.floats(), max_size=8),
    "bytes_contents": st.lists(st.binary(max_size=8), max_size=8),
})


@st.composite
def fuzzed_requests(draw) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest()
    n_inputs = draw(st.integers(0, 3))
    use_raw = draw(st.booleans())
    for index in range(n_inputs):
        tensor = request.inputs.add(name=draw(st.sampled_from(["a", "b", f"t{index}"])),
                                    datatype=draw(datatypes), shape=draw(shapes))
        if not use_raw or draw(st.integers(0, 9)) == 0:
            for field, values in draw(typed_contents).items():
                getattr(tensor.contents, field).extend(values)
        if draw(st.integers(0, 19)) == 0:
            tensor.parameters["shared_memory_region"].string_param = "r"
    if use_raw:
        n_raw = n_inputs if draw(st.integers(0, 9)) else draw(st.integers(0, 4))
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=64), min_size=n_raw, max_size=n_raw)))
    return request


def check_decoded(tensors, decoded: dict[str, np.ndarray]) -> None:
    by_name = {t.name: t for t in tensors}
    assert len(decoded) == len(tensors)
    for name, array in decoded.items():
        tensor = by_name[name]
        assert array.shape == tuple(tensor.shape)
        assert array.dtype == codec.dtype_of(tensor.datatype)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzzed_requests())
def test_fuzzed_requests_decode_or_raise_codec_error(request):
    try:
        decoded = codec.decode_request(request)
    except CodecError:
        return
    check_decoded(request.inputs, decoded)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_decode_or_raise_codec_error(data):
    for message_type, decode, tensors in (
        (oip_pb2.ModelInferRequest, codec.decode_request, "inputs"),
        (oip_pb2.ModelInferResponse, codec.decode_response, "outputs"),
    ):
        try:
            message = message_type.FromString(data)
        except DecodeError:
            continue
        try:
            decoded = decode(message)
        except CodecError:
            continue
        check_decoded(getattr(message, tensors), decoded)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(ALL), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), st.booleans(),
       st.data())
def test_random_arrays_roundtrip(datatype, shape, raw, data):
    if datatype == "BYTES":
        array = np.empty(shape, dtype=object)
        array.ravel()[:] = data.draw(st.lists(st.binary(max_size=10), min_size=array.size, max_size=array.size))
    elif datatype == "BF16":
        array = data.draw(hnp.arrays(ml_dtypes.bfloat16, shape, elements=st.floats(width=32).map(
            lambda v: np.float32(v).astype(ml_dtypes.bfloat16)))).astype(np.float32)
    else:
        array = data.draw(hnp.arrays(codec.dtype_of(datatype), shape))
    response = oip_pb2.ModelInferResponse()
    codec.add_output(response, "y", array, datatype=datatype, raw=raw)
    decoded = codec.decode_response(oip_pb2.ModelInferResponse.FromString(response.SerializeToString()))["y"]
    assert decoded.shape == array.shape and decoded.dtype == array.dtype
    if datatype == "BYTES":
        assert decoded.tolist() == array.tolist()
    elif array.dtype.kind == "f":
        # Compare bits, so that signed zeros and NaN payloads count. Typed values pass through
        # Python floats, which may quiet a signaling NaN: there only NaN-ness must survive.
        bits = f"u{array.itemsize}"
        nan = np.isnan(array)
        assert np.array_equal(np.isnan(decoded), nan)
        if raw:
            np.testing.assert_array_equal(decoded.view(bits), array.view(bits))
        else:
            np.testing.assert_array_equal(decoded[~nan].view(bits), array[~nan].view(bits))
    else:
        np.testing.assert_array_equal(decoded, array)
