"""Tensor codec for the Open Inference Protocol: protobuf tensors <-> numpy arrays.

Decoding runs on a copy of live traffic, so it is strict and cheap:

* Every problem with a tensor (unknown datatype, negative or too many dimensions, a byte or value
  count that disagrees with the shape, a malformed BYTES length prefix, raw contents that are not
  one entry per tensor, data held in shared memory) raises ``CodecError`` naming the tensor. Nothing
  else escapes, and no array is returned that differs from what the sender meant.
* The declared shape is never used to allocate: the element count is compared (in Python integers,
  so it cannot overflow) with the bytes or values actually present first, so a shape such as
  ``[2**62, 2**62]`` costs nothing.
* Raw tensors are wrapped with ``np.frombuffer`` without copying; the arrays returned for them are
  therefore read-only views of the message's bytes. BYTES, BF16 and typed contents are copied.

Datatype mapping (``dtype_of``): BOOL -> bool, INTn/UINTn/FP16/FP32/FP64 -> the numpy type of the
same width, BYTES -> object arrays of ``bytes``, BF16 -> float32 (below). Raw data is little-endian
on the wire whatever the host; BOOL is one byte per element, where any non-zero byte reads as True;
a raw BYTES tensor is, per element, a 4-byte little-endian length followed by that many bytes.

FP16 and BF16 decisions:

* numpy has no bfloat16, so BF16 decodes to float32, exactly: a bfloat16 is the top half of a
  float32. Encoding to BF16 rounds float values to nearest-even (NaN stays NaN, with its sign);
  float64 input is rounded to float32 first. Arrays of ``ml_dtypes.bfloat16`` (what tritonclient
  uses) are also accepted and sent bit for bit.
  A decoded BF16 tensor comes back as float32, so re-encoding it needs ``datatype="BF16"``.
* The typed ``contents`` have no field for 16-bit floats. FP16 and BF16 tensors are read from
  ``fp32_contents`` (as some clients send them) and rounded to the tensor's type: FP16 with numpy's
  IEEE cast (out-of-range values become +/-inf), BF16 to nearest-even as above. Encoding with
  ``raw=False`` writes them to ``fp32_contents``, which is exact. The protocol text says these two
  types should travel raw, and strict servers (Triton) reject them in typed form, so ``raw=True``
  is the default.

Typed integers are range-checked against the tensor's datatype (an INT8 tensor whose
``int_contents`` holds 300 is an error, not a wrapped value). Typed floats pass through Python
floats, which may quiet a signaling NaN; raw floats keep every bit.

Shared-memory tensors (Triton's ``shared_memory_region`` parameter) carry no data in the message
and are reported as ``CodecError`` rather than being matched with someone else's raw entry.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from agent.protocol import oip_pb2

__all__ = [
    "DATATYPES",
    "CodecError",
    "add_input",
    "add_output",
    "datatype_of",
    "decode_request",
    "decode_response",
    "decode_tensor",
    "dtype_of",
]


class CodecError(ValueError):
    """A tensor cannot be decoded or encoded; the message names the tensor."""


# Datatypes with a fixed element size, and the little-endian numpy dtype of their raw bytes.
_FIXED: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

DATATYPES: frozenset[str] = frozenset(_FIXED) | {"BF16", "BYTES"}

# The InferTensorContents field that carries each datatype in typed form.
_TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP16": "fp32_contents",
    "BF16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# The numpy dtype of each typed field's protobuf scalar type.
_FIELD_DTYPE: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}

# Datatypes narrower than their typed field, whose values need a range check.
_NARROW_INTS = frozenset({"INT8", "INT16", "UINT8", "UINT16"})

# numpy 1.x allows 32 dimensions and numpy 2 allows 64; no model needs more than the smaller.
MAX_NDIM = 32

_SHM_PARAMETER = "shared_memory_region"
_U32 = struct.Struct("<I")
_BF16_BYTES = 2


# ---------------------------------------------------------------------------------------------
# Datatype mapping


def dtype_of(datatype: str) -> np.dtype:
    """The numpy dtype that decoding produces for a protocol datatype."""
    if datatype == "BYTES":
        return np.dtype(object)
    if datatype == "BF16":
        return np.dtype(np.float32)
    try:
        return _FIXED[datatype]
    except KeyError:
        raise CodecError(f"unknown datatype {datatype!r}") from None


def datatype_of(value: np.ndarray | np.dtype | type) -> str:
    """The protocol datatype for a numpy array or dtype (float32 is FP32, never BF16)."""
    dt = value.dtype if isinstance(value, np.ndarray) else np.dtype(value)
    if _is_ml_bfloat16(dt):
        return "BF16"
    if dt.kind in "OSU":
        return "BYTES"
    for name, fixed in _FIXED.items():
        if dt.kind == fixed.kind and dt.itemsize == fixed.itemsize:
            return name
    raise CodecError(f"numpy dtype {dt} has no Open Inference Protocol datatype")


def _is_ml_bfloat16(dt: np.dtype) -> bool:
    # ml_dtypes registers bfloat16 as a 2-byte custom type; recognising it by name avoids
    # depending on the package.
    return dt.name == "bfloat16" and dt.itemsize == _BF16_BYTES


# ---------------------------------------------------------------------------------------------
# BF16


def _bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32; exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float values to bfloat16 bit patterns (uint16), to nearest, ties to even."""
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, as intended
        f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit, then truncating, rounds to nearest-even. It can
    # carry into the exponent (correctly: the largest values round to inf), and only NaN bit
    # patterns can wrap around 2**32; those are replaced below.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    # Keep NaN a NaN: truncating a NaN whose payload sits in the low bits would give inf.
    nan_bits = (bits >> 16) | np.uint32(0x0040)
    return np.where(np.isnan(f32), nan_bits, rounded).astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_request(request: oip_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    """Decode every input of a request, keyed by name, in the request's order."""
    return _decode_all(request.inputs, request.raw_input_contents, "input")


def decode_response(response: oip_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decode every output of a response, keyed by name, in the response's order."""
    return _decode_all(response.outputs, response.raw_output_contents, "output")


def decode_tensor(
    tensor: oip_pb2.ModelInferRequest.InferInputTensor | oip_pb2.ModelInferResponse.InferOutputTensor,
    raw: bytes | None = None,
) -> np.ndarray:
    """Decode one tensor: from ``raw`` (its raw_*_contents entry) if given, else from its contents.

    For callers that want a single tensor without decoding the rest of the message.
    """
    kind = "input" if tensor.DESCRIPTOR.name == "InferInputTensor" else "output"
    return _decode_one(f"{kind} {tensor.name!r}", tensor, raw)


def _decode_all(tensors: Sequence, raw_contents: Sequence[bytes], kind: str) -> dict[str, np.ndarray]:
    n_raw = len(raw_contents)
    if n_raw and n_raw != len(tensors):
        detail = ""
        shm = [t.name for t in tensors if _SHM_PARAMETER in t.parameters]
        if shm:
            detail = f"; {kind}s {shm} are in shared memory, which this codec cannot read"
        raise CodecError(
            f"{n_raw} raw_{kind}_contents entries for {len(tensors)} {kind}s: raw contents must "
            f"hold exactly one entry per {kind}, in order{detail}"
        )
    decoded: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(tensors):
        label = f"{kind} {tensor.name!r}"
        if tensor.name in decoded:
            raise CodecError(f"{label} appears more than once")
        decoded[tensor.name] = _decode_one(label, tensor, raw_contents[index] if n_raw else None)
    return decoded


def _decode_one(label: str, tensor, raw: bytes | None) -> np.ndarray:
    datatype = tensor.datatype
    if datatype not in DATATYPES:
        raise CodecError(f"{label}: unknown datatype {datatype!r}")
    if tensor.parameters and _SHM_PARAMETER in tensor.parameters:
        region = tensor.parameters[_SHM_PARAMETER].string_param
        raise CodecError(f"{label}: data is in shared memory region {region!r}, not in the message")
    shape = _checked_shape(label, tensor.shape)
    count = math.prod(shape)
    if raw is not None:
        if tensor.HasField("contents") and tensor.contents.ByteSize():
            raise CodecError(f"{label}: has typed contents although the message uses raw contents")
        flat = _decode_raw(label, datatype, shape, count, raw)
    else:
        flat = _decode_typed(label, datatype, shape, count, tensor.contents)
    try:
        return flat.reshape(shape)
    except ValueError as exc:  # e.g. [0, 2**40, 2**40]: no elements, but numpy refuses the shape
        raise CodecError(f"{label}: shape {list(shape)} is not representable: {exc}") from None


def _checked_shape(label: str, dims: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(dims)
    if len(shape) > MAX_NDIM:
        raise CodecError(f"{label}: {len(shape)} dimensions, at most {MAX_NDIM} are supported")
    for dim in shape:
        if dim < 0:
            raise CodecError(f"{label}: shape {list(shape)} has a negative dimension")
    return shape


def _decode_raw(label: str, datatype: str, shape: tuple[int, ...], count: int, raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return _split_bytes(label, count, raw)
    itemsize = _BF16_BYTES if datatype == "BF16" else _FIXED[datatype].itemsize
    expected = count * itemsize
    if len(raw) != expected:
        raise CodecError(
            f"{label}: {datatype} shape {list(shape)} needs {expected} raw bytes, got {len(raw)}"
        )
    if datatype == "BF16":
        return _bf16_to_float32(np.frombuffer(raw, dtype="<u2"))
    if datatype == "BOOL":
        as_bytes = np.frombuffer(raw, dtype=np.uint8)
        # A bool array over bytes other than 0 and 1 would hold values numpy does not expect;
        # normalise (with a copy) only in that rare case.
        if as_bytes.size and as_bytes.max() > 1:
            return as_bytes != 0
        return as_bytes.view(np.bool_)
    return np.frombuffer(raw, dtype=_FIXED[datatype])


def _split_bytes(label: str, count: int, raw: bytes) -> np.ndarray:
    size = len(raw)
    # Every element needs its 4-byte prefix; checking this first bounds the work by the data.
    if count * _U32.size > size:
        raise CodecError(
            f"{label}: {count} BYTES elements need at least {count * _U32.size} raw bytes, got {size}"
        )
    items: list[bytes] = []
    pos = 0
    for index in range(count):
        if size - pos < _U32.size:
            raise CodecError(f"{label}: BYTES element {index} has a truncated length prefix")
        (length,) = _U32.unpack_from(raw, pos)
        pos += _U32.size
        if length > size - pos:
            raise CodecError(
                f"{label}: BYTES element {index} declares {length} bytes, only {size - pos} remain"
            )
        items.append(bytes(raw[pos:pos + length]))
        pos += length
    if pos != size:
        raise CodecError(f"{label}: {size - pos} raw bytes left over after {count} BYTES elements")
    return _object_array(items)


def _object_array(items: list[bytes]) -> np.ndarray:
    # Filling an empty object array keeps numpy from treating the elements as sequences.
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _decode_typed(label: str, datatype: str, shape: tuple[int, ...], count: int, contents) -> np.ndarray:
    field = _TYPED_FIELD[datatype]
    values = getattr(contents, field)
    if len(values) != count:
        others = [f.name for f, _ in contents.ListFields() if f.name != field]
        hint = f" (data found in {', '.join(others)})" if others else ""
        raise CodecError(
            f"{label}: {datatype} shape {list(shape)} needs {count} values in contents.{field}, "
            f"got {len(values)}{hint}"
        )
    if datatype == "BYTES":
        return _object_array(list(values))
    flat = np.fromiter(values, dtype=_FIELD_DTYPE[field], count=count)
    if datatype in _NARROW_INTS:
        target = _FIXED[datatype]
        limits = np.iinfo(target)
        if flat.size and (flat.min() < limits.min or flat.max() > limits.max):
            raise CodecError(f"{label}: contents.{field} holds values outside the range of {datatype}")
        return flat.astype(target)
    if datatype == "FP16":
        with np.errstate(over="ignore"):
            return flat.astype(np.float16)
    if datatype == "BF16":
        return _bf16_to_float32(_float32_to_bf16(flat))
    return flat


# ---------------------------------------------------------------------------------------------
# Encoding


def add_input(
    request: oip_pb2.ModelInferRequest,
    name: str,
    array: np.ndarray,
    datatype: str | None = None,
    raw: bool = True,
) -> oip_pb2.ModelInferRequest.InferInputTensor:
    """Append an input tensor (and, when ``raw``, its raw_input_contents entry) to a request.

    ``datatype`` defaults to ``datatype_of(array)``; when given, the array is converted to it
    (integers only if every value fits; floats round). All tensors of one message must be either
    raw or typed, so mixing is an error.
    """
    return _add_tensor(f"input {name!r}", request.inputs, request.raw_input_contents, "raw_input_contents",
                       name, array, datatype, raw)


def add_output(
    response: oip_pb2.ModelInferResponse,
    name: str,
    array: np.ndarray,
    datatype: str | None = None,
    raw: bool = True,
) -> oip_pb2.ModelInferResponse.InferOutputTensor:
    """Append an output tensor (and, when ``raw``, its raw_output_contents entry) to a response.

    Same rules as ``add_input``.
    """
    return _add_tensor(f"output {name!r}", response.outputs, response.raw_output_contents, "raw_output_contents",
                       name, array, datatype, raw)


def _add_tensor(label: str, tensors, raw_contents, raw_field: str, name: str, array: np.ndarray,
                datatype: str | None, raw: bool):
    """What add_input and add_output share: requests and responses lay tensors out the same way."""
    _check_layout(label, len(tensors), len(raw_contents), raw, raw_field)
    array = np.asarray(array)
    datatype, wire = _to_wire(label, array, datatype)
    payload = _raw_payload(datatype, wire) if raw else None
    tensor = tensors.add(name=name, datatype=datatype, shape=array.shape)
    if payload is None:
        _fill_contents(tensor.contents, datatype, wire)
    else:
        raw_contents.append(payload)
    return tensor


def _check_layout(label: str, n_tensors: int, n_raw: int, raw: bool, field: str) -> None:
    # Raw entries are matched to tensors by position, so one message is all raw or all typed.
    if raw and n_raw != n_tensors:
        raise CodecError(f"{label}: cannot add a raw tensor to a message whose tensors are typed")
    if not raw and n_raw:
        raise CodecError(f"{label}: cannot add a typed tensor to a message that uses {field}")


def _to_wire(label: str, array: np.ndarray, datatype: str | None) -> tuple[str, np.ndarray | list[bytes]]:
    """Check ``array`` against ``datatype`` and return the elements as they go on the wire:
    a flat list of bytes for BYTES, uint16 bit patterns for BF16, else an array of the datatype."""
    if datatype is None:
        datatype = datatype_of(array)
    elif datatype not in DATATYPES:
        raise CodecError(f"{label}: unknown datatype {datatype!r}")
    kind = array.dtype.kind

    if datatype == "BYTES":
        if kind not in "OSU":
            raise CodecError(f"{label}: BYTES needs an array of bytes or str, got {array.dtype}")
        return datatype, [_element_bytes(label, item) for item in array.ravel()]
    if datatype == "BF16":
        if _is_ml_bfloat16(array.dtype):
            return datatype, np.ascontiguousarray(array).view(np.uint16)
        if kind not in "iuf":
            raise CodecError(f"{label}: BF16 needs a numeric array, got {array.dtype}")
        return datatype, _float32_to_bf16(array)
    target = _FIXED[datatype]
    if datatype == "BOOL":
        if kind != "b":
            raise CodecError(f"{label}: BOOL needs a bool array, got {array.dtype}")
        return datatype, array
    if target.kind == "f":
        if kind not in "iuf":
            raise CodecError(f"{label}: {datatype} needs a numeric array, got {array.dtype}")
        with np.errstate(over="ignore"):
            return datatype, array.astype(target, copy=False)
    # Integer datatypes: convert only when every value fits, so nothing wraps silently.
    if kind not in "iu":
        raise CodecError(f"{label}: {datatype} needs an integer array, got {array.dtype}")
    if not np.can_cast(array.dtype, target, "safe") and array.size:
        limits = np.iinfo(target)
        if int(array.min()) < limits.min or int(array.max()) > limits.max:
            raise CodecError(f"{label}: values do not fit in {datatype}")
    return datatype, array.astype(target, copy=False)


def _element_bytes(label: str, item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    raise CodecError(f"{label}: BYTES elements must be bytes or str, got {type(item).__name__}")


def _raw_payload(datatype: str, wire: np.ndarray | list[bytes]) -> bytes:
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in wire:
            parts.append(_U32.pack(len(item)))
            parts.append(item)
        return b"".join(parts)
    if datatype == "BF16":
        return wire.astype("<u2", copy=False).tobytes()
    # tobytes writes C order whatever the array's strides; the dtype is already little-endian.
    return wire.tobytes(order="C")


def _fill_contents(contents: oip_pb2.InferTensorContents, datatype: str, wire: np.ndarray | list[bytes]) -> None:
    field = getattr(contents, _TYPED_FIELD[datatype])
    if datatype == "BYTES":
        field.extend(wire)
        return
    if datatype == "BF16":
        wire = _bf16_to_float32(wire)
    field.extend(wire.ravel().tolist())
