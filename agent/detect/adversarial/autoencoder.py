"""The autoencoder detector (MagNet, Meng and Chen, CCS 2017) as nodes of the fused detection graph.

An autoencoder trained on benign inputs only (``sidewatch calibrate``:
agent.detect.calibration.autoencoder_training) reproduces inputs like them and changes inputs unlike
them; the score is the reconstruction error of each input, the mean over its elements of
``|x - AE(x)|`` (``l1``) or ``(x - AE(x))^2`` (``l2``). It catches what feature squeezing misses:
high-confidence attacks, whose squeezed copies keep the adversarial class (Carlini-Wagner with a
confidence margin), and large perturbations, which an autoencoder of the benign data cannot reproduce.

The sidecar never trains: the calibration artifact carries the autoencoder as an ONNX
graph (input ``x``, output ``reconstruction``, both ``[N, C, H, W]``), and :func:`append_autoencoder`
copies its nodes into the fused graph, fed by the model's input, so that one ONNX Runtime call gives
both detectors' scores.
"""

from __future__ import annotations

import onnx
from onnx import helper

from agent.detect.adversarial.onnx_ops import Builder

ERRORS = ("l1", "l2")
PREFIX = "sidewatch_autoencoder/"


class AutoencoderError(ValueError):
    """An autoencoder graph that the fused detector cannot take."""


def load_autoencoder(source: bytes | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    try:
        return onnx.load_from_string(bytes(source))
    except Exception as err:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise AutoencoderError(f"sidewatch: the autoencoder is not a readable ONNX model: {err}") from err


def check_autoencoder(autoencoder: onnx.ModelProto, opset: int, rank: int) -> tuple[str, str]:
    """The autoencoder's input and output names, once it is known to fit the fused graph: one float input
    and one output of the model input's rank, and the model's ONNX opset (the graphs share one opset import)."""
    graph = autoencoder.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise AutoencoderError(f"sidewatch: the autoencoder must have one input and one output, it has "
                               f"{len(inputs)} and {len(graph.output)}")
    versions = {entry.domain or "ai.onnx": entry.version for entry in autoencoder.opset_import}
    if set(versions) - {"ai.onnx"}:
        raise AutoencoderError(f"sidewatch: the autoencoder uses operator domains {sorted(set(versions) - {'ai.onnx'})}; "
                               "only the default ONNX domain is supported")
    if versions.get("ai.onnx") != opset:
        raise AutoencoderError(f"sidewatch: the autoencoder uses ONNX opset {versions.get('ai.onnx')}, the model "
                               f"{opset}; recalibrate (calibration exports it at the model's opset)")
    for value_info in (inputs[0], graph.output[0]):
        tensor_type = value_info.type.tensor_type
        if tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise AutoencoderError(f"sidewatch: the autoencoder's {value_info.name!r} must be float32")
        if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != rank:
            raise AutoencoderError(f"sidewatch: the autoencoder's {value_info.name!r} has rank "
                                   f"{len(tensor_type.shape.dim)}, the model's input {rank}")
    return inputs[0].name, graph.output[0].name


def append_autoencoder(b: Builder, x: str, rank: int, autoencoder: bytes | onnx.ModelProto,
                       error: str) -> str:
    """Append the autoencoder's nodes, fed by ``x``, and its reconstruction error per input; returns the
    name of the ``[N]`` error tensor. Its names get a prefix of their own, so none can clash."""
    if error not in ERRORS:
        raise AutoencoderError(f"sidewatch: the autoencoder's error must be one of {', '.join(ERRORS)}, got {error!r}")
    model = load_autoencoder(autoencoder)
    input_name, output_name = check_autoencoder(model, b.opset, rank)
    prefixed = onnx.compose.add_prefix(model, PREFIX)
    b.nodes.append(helper.make_node("Identity", [x], [PREFIX + input_name], name=b.fresh("autoencoder_input")))
    b.nodes.extend(prefixed.graph.node)
    b.initializers.extend(prefixed.graph.initializer)
    difference = b.op("Sub", [x, PREFIX + output_name])
    elementwise = b.op("Abs", [difference]) if error == "l1" else b.op("Mul", [difference, difference])
    return b.reduce("ReduceMean", elementwise, list(range(1, rank)), keepdims=0)
