"""Which ONNX Runtime execution provider runs a graph: CUDA when present, else CPU; chosen at run time."""

from __future__ import annotations

import logging

import onnxruntime as ort

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")

# ONNX Runtime's type strings and the protocol's datatype names.
ORT_TO_DATATYPE = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES", "tensor(bfloat16)": "BF16",
}


def providers_for(device: str = "auto") -> list[str]:
    """Providers for ``device``: ``auto`` takes CUDA when this onnxruntime build has it, ``cuda`` requires it."""
    if device not in DEVICES:
        raise ValueError(f"sidewatch: device must be one of {', '.join(DEVICES)}, got {device!r}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise RuntimeError(
            "sidewatch: device 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu or use device 'cpu'"
        )
    if device == "cpu" or not has_cuda:
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def open_session(path, device: str = "auto", intra_op_threads: int = 0) -> ort.InferenceSession:
    """An InferenceSession on the chosen provider; the CPU provider stays as the fallback for unsupported ops.

    ``path`` is a model file, or a serialized model as bytes (a graph built in memory, such as the
    fused feature-squeezing graph).
    """
    options = ort.SessionOptions()
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    # ONNX Runtime's worker threads spin between calls by default; beside a model server that
    # burns the cores the server needs. Sleeping workers cost a wake-up per call instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    source = bytes(path) if isinstance(path, (bytes, bytearray, memoryview)) else str(path)
    session = ort.InferenceSession(source, sess_options=options, providers=providers_for(device))
    log.debug("sidewatch: %s runs on %s", "<model bytes>" if isinstance(source, bytes) else source,
              session.get_providers()[0])
    return session
