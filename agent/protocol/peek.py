"""Read the model name and version from a serialized request without parsing it.

ModelInferRequest, ModelMetadataRequest and ModelReadyRequest all keep the model's name in
field 1 and its version in field 2, and protobuf encoders write fields in number order, so the
two strings are almost always the first bytes of the message. The hot path needs them for metric
labels and routing; a full parse would cost far more than this scan.
"""

from __future__ import annotations

from agent.metrics import label_bytes, max_label_bytes

_WIRE_VARINT = 0
_WIRE_FIXED64 = 1
_WIRE_LENGTH = 2
_WIRE_FIXED32 = 5
# Give up after this many top-level fields: the names are near the front, the tensors are not.
_MAX_FIELDS = 16


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def peek_model(message: bytes) -> tuple[str, str]:
    """Return (model_name, model_version) from fields 1 and 2; empty strings where absent or malformed.

    Each is cut to ``max_label_bytes()`` bytes before it is decoded, as the Envoy plane's Lua filter cuts it
    (agent.metrics.label_bytes): a client's 4 MB name never becomes a 4 MB label, log word or key.
    """
    name = ""
    version = ""
    pos = 0
    end = len(message)
    limit = max_label_bytes()
    try:
        for _ in range(_MAX_FIELDS):
            if pos >= end:
                break
            key, pos = _varint(message, pos)
            field, wire = key >> 3, key & 7
            if wire == _WIRE_LENGTH:
                length, pos = _varint(message, pos)
                if pos + length > end:
                    break
                if field == 1:
                    name = label_bytes(message[pos:pos + min(length, limit)])
                elif field == 2:
                    version = label_bytes(message[pos:pos + min(length, limit)])
                pos += length
                if field >= 2 and name:
                    break
            elif wire == _WIRE_VARINT:
                _, pos = _varint(message, pos)
            elif wire == _WIRE_FIXED64:
                pos += 8
            elif wire == _WIRE_FIXED32:
                pos += 4
            else:
                break
    except (IndexError, ValueError):
        pass
    return name, version
