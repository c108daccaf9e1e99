"""Feature squeezing as ONE ONNX graph: the squeezers and the served model, fused, with the autoencoder
detector beside them when the calibration has one, so that one ONNX Runtime call scores a whole batch,
on the CPU or the CUDA execution provider alike.

The fused graph takes the model's own input (same name, dynamic batch ``N``) and returns

- ``probabilities``   ``[N, C]``: the softmax on the unsqueezed input (what the model answered);
- ``distances``       ``[N, S]``: for each of the ``S`` squeezers, the L1 distance between the softmax
  on the input and the softmax on its squeezed copy;
- ``detector_scores`` ``[N, D]``: each detector's own score: squeezing's, the largest of those distances
  (Xu, Evans and Qi, NDSS 2018), then the autoencoder's reconstruction error (agent.detect.adversarial.
  autoencoder) when there is one;
- ``score``           ``[N]``: the verdict's score. With the detectors' thresholds (set jointly at
  calibration), the largest detector score over its own threshold: above 1, some detector flags the
  input. Without them, the squeezing score.

Inside, the input and its ``S`` squeezed copies are concatenated along the batch axis and the
model's own nodes run once on the ``(1 + S) N`` batch: one big batch keeps the matrix kernels busy,
where ``1 + S`` separate calls would each pay the per-call overhead. The squeezers use standard
ops only (Mul, Round, Div, Pad, Slice, Concat, TopK, Reduce*, AveragePool, Exp), all of which both
execution providers implement.

Softmax: if the model ends in a Softmax it already gives probabilities; if it gives logits, the
fused graph adds the Softmax (``output_kind``, see :func:`detect_output_kind`).

The same detection without fusing (numpy squeezers and one plain model call per copy), which the
fused graph is tested against, is ``reference_score`` in ``tests/support/reference_math.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from agent.detect.adversarial.autoencoder import append_autoencoder
from agent.detect.adversarial.onnx_ops import INT64_MAX, INT64_MIN, Builder
from agent.detect.adversarial.squeeze import (
    BitDepth,
    Median,
    NonLocalMeans,
    Squeezer,
    format_squeezers,
    median_window,
    parse_squeezers,
)
from agent.execution import open_session

ModelSource = str | Path | bytes | onnx.ModelProto

OUTPUT_KINDS = ("auto", "probabilities", "logits")
# Ops between a Softmax and the graph output that do not change the values: "auto" looks through them.
_PASS_THROUGH_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
# Round, and Pad/TopK with their sizes as inputs, are opset 11; older models are refused.
MIN_OPSET = 11
FUSED_OUTPUTS = ("probabilities", "score", "distances", "detector_scores")
# The detectors' names: metric labels and the calibration artifact's keys.
SQUEEZING = "feature_squeezing"
AUTOENCODER = "autoencoder"
MODEL_PREFIX = "sidewatch_model/"


class FusedModelError(ValueError):
    """A model that the fused detector cannot take, or a batch that does not fit it."""


# --- the served model ----------------------------------------------------------------------------


def load_model(model: ModelSource) -> onnx.ModelProto:
    """An ONNX model from a path, serialized bytes, or a ModelProto (returned as is)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray, memoryview)):
        return onnx.load_from_string(bytes(model))
    return onnx.load(str(model))


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain that the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise FusedModelError("sidewatch: the model imports no version of the default ONNX domain")


@dataclass(frozen=True)
class ModelInfo:
    """What the fused graph needs to know about the served model."""

    input_name: str
    output_name: str
    output_kind: str                         # "probabilities" or "logits", never "auto"
    input_shape: tuple[int | str | None, ...]  # dims: int when static, str (dim_param) or None when not
    num_classes: int | None                  # None when the output's class axis is not static
    opset: int


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)


def detect_output_kind(model: onnx.ModelProto, output_name: str) -> str:
    """The rule behind ``output_kind="auto"``.

    The output holds probabilities when the node that produces it is a Softmax of the default
    domain, or when a Softmax reaches it through value-preserving ops only (Identity, Reshape,
    Flatten, Squeeze, Unsqueeze). Anything else is taken as logits, and the fused graph applies a
    Softmax. A LogSoftmax output counts as logits, which is right: softmax(log_softmax(z)) = softmax(z).
    A model that computes probabilities some other way (Exp and Div, say) needs
    ``output_kind="probabilities"`` given explicitly.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    name = output_name
    while name in producers:
        node = producers[name]
        if node.domain in ("", "ai.onnx") and node.op_type == "Softmax":
            return "probabilities"
        if node.domain in ("", "ai.onnx") and node.op_type in _PASS_THROUGH_OPS:
            name = node.input[0]
            continue
        break
    return "logits"


def inspect_model(model: onnx.ModelProto, input_name: str | None = None, output_name: str | None = None,
                  output_kind: str = "auto") -> ModelInfo:
    """Pick the input and output (automatic when there is only one), check them, resolve ``output_kind``."""
    if output_kind not in OUTPUT_KINDS:
        raise FusedModelError(f"sidewatch: output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {output_kind!r}")
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    # Inputs that have an initializer are defaults a caller may override, not data inputs.
    inputs = [vi for vi in graph.input if vi.name not in initializers]
    outputs = list(graph.output)

    if input_name is None:
        if len(inputs) != 1:
            raise FusedModelError(
                f"sidewatch: the model has {len(inputs)} inputs ({', '.join(vi.name for vi in inputs)}); "
                "name the image input")
        chosen_input = inputs[0]
    else:
        matches = [vi for vi in inputs if vi.name == input_name]
        if not matches:
            raise FusedModelError(f"sidewatch: the model has no input {input_name!r} "
                                  f"(inputs: {', '.join(vi.name for vi in inputs)})")
        chosen_input = matches[0]
    others = [vi.name for vi in inputs if vi.name != chosen_input.name]
    if others:
        raise FusedModelError(f"sidewatch: the fused detector feeds one input, {chosen_input.name!r}; "
                              f"the model also needs {', '.join(others)}")
    if output_name is None:
        if len(outputs) != 1:
            raise FusedModelError(
                f"sidewatch: the model has {len(outputs)} outputs ({', '.join(vi.name for vi in outputs)}); "
                "name the class-score output")
        chosen_output = outputs[0]
    else:
        matches = [vi for vi in outputs if vi.name == output_name]
        if not matches:
            raise FusedModelError(f"sidewatch: the model has no output {output_name!r} "
                                  f"(outputs: {', '.join(vi.name for vi in outputs)})")
        chosen_output = matches[0]

    if chosen_input.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise FusedModelError(f"sidewatch: input {chosen_input.name!r} must be float32 for feature squeezing, got "
                              f"{TensorProto.DataType.Name(chosen_input.type.tensor_type.elem_type)}")
    input_shape = _dims(chosen_input)
    if input_shape is None or len(input_shape) < 2:
        raise FusedModelError(f"sidewatch: input {chosen_input.name!r} needs a known rank of at least 2 "
                              f"([batch, ...]), got shape {input_shape}")
    if isinstance(input_shape[0], int) and input_shape[0] > 0:
        # The fused graph runs the model on (1 + S) N inputs at once: a fixed batch cannot take that.
        raise FusedModelError(f"sidewatch: input {chosen_input.name!r} has a fixed batch axis of "
                              f"{input_shape[0]}; export the model with a dynamic batch axis")
    if chosen_input.name in FUSED_OUTPUTS:
        raise FusedModelError(f"sidewatch: the model's input is named {chosen_input.name!r}, "
                              "which is also an output name of the fused graph")
    output_shape = _dims(chosen_output)
    if output_shape is not None and len(output_shape) != 2:
        raise FusedModelError(f"sidewatch: output {chosen_output.name!r} must be [batch, classes], "
                              f"got shape {list(output_shape)}")
    num_classes = output_shape[1] if output_shape and isinstance(output_shape[1], int) and output_shape[1] > 0 else None

    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise FusedModelError(f"sidewatch: the model uses ONNX opset {opset}; feature squeezing needs opset "
                              f">= {MIN_OPSET} (convert it with onnx.version_converter)")
    kind = detect_output_kind(model, chosen_output.name) if output_kind == "auto" else output_kind
    return ModelInfo(chosen_input.name, chosen_output.name, kind, input_shape, num_classes, opset)


# --- building the graph --------------------------------------------------------------------------


def _end(offset_from_end: int) -> int:
    """A Slice end that stops ``offset_from_end`` elements before the end (0: at the end)."""
    return -offset_from_end if offset_from_end else INT64_MAX


def _symmetric_pad(b: Builder, x: str, rank: int, before: int, after: int) -> str:
    """Pad the last two axes by mirroring with the edge repeated (scipy 'reflect', numpy 'symmetric').

    One pixel of that is the edge pixel, which Pad's 'edge' mode does in one op; ONNX Pad has no
    symmetric mode, so wider margins are built from reversed Slices.
    """
    if before <= 1 and after <= 1:
        pads = [0] * rank + [0] * rank
        pads[rank - 2], pads[rank - 1] = before, before
        pads[2 * rank - 2], pads[2 * rank - 1] = after, after
        return b.op("Pad", [x, b.ints(pads)], mode="edge")
    for axis in (rank - 2, rank - 1):
        parts = []
        if before:  # elements before-1 .. 0, reversed
            parts.append(b.slice(x, [before - 1], [INT64_MIN], [axis], [-1]))
        parts.append(x)
        if after:   # the last `after` elements, reversed
            parts.append(b.slice(x, [-1], [-1 - after], [axis], [-1]))
        x = b.op("Concat", parts, axis=axis)
    return x


def _shifted_stack(b: Builder, padded: str, rank: int, size: int, margin: int, axis: int) -> str:
    """All ``size`` x ``size`` shifts of ``padded`` (cropped by ``margin`` = size - 1 in total), stacked on a new ``axis``."""
    shifts = []
    for dy in range(size):
        for dx in range(size):
            shifted = b.slice(padded, [dy, dx], [_end(margin - dy), _end(margin - dx)], [rank - 2, rank - 1])
            shifts.append(b.unsqueeze(shifted, [axis]))
    return b.op("Concat", shifts, axis=axis)


def _median_graph(b: Builder, x: str, rank: int, size: int) -> str:
    before, after = median_window(size)
    padded = _symmetric_pad(b, x, rank, before, after)
    if size == 2:
        # The paper's MNIST squeezer, so it gets the cheap form: the upper middle of 4 values by
        # 6 elementwise Min/Max (4 times faster than TopK on the CPU provider). Split the 4 into
        # pairs: the largest value is the larger of the pair maxima, so the smaller pair maximum is
        # the larger of the other three, and the larger pair minimum is the only other candidate.
        a, c, d, e = (b.slice(padded, [dy, dx], [_end(1 - dy), _end(1 - dx)], [rank - 2, rank - 1])
                      for dy in (0, 1) for dx in (0, 1))
        smaller_max = b.op("Min", [b.op("Max", [a, c]), b.op("Max", [d, e])])
        larger_min = b.op("Max", [b.op("Min", [a, c]), b.op("Min", [d, e])])
        return b.op("Max", [smaller_max, larger_min])
    stack = _shifted_stack(b, padded, rank, size, size - 1, axis=rank)       # [..., H, W, size*size]
    # The median is the value at ascending index size*size // 2, which is the smallest of the
    # size*size - size*size//2 largest values: TopK (largest) then ReduceMin.
    count = size * size
    top = count - count // 2
    values, _ = b.op("TopK", [stack, b.ints([top])], n_outputs=2, axis=rank, largest=1, sorted=0)
    return b.reduce("ReduceMin", values, [rank], keepdims=0)


def _bit_depth_graph(b: Builder, x: str, bits: int) -> str:
    levels = b.const(2**bits - 1, np.float32, "levels")
    return b.op("Div", [b.op("Round", [b.op("Mul", [x, levels])]), levels])


def _nl_means_graph(b: Builder, x: str, rank: int, squeezer: NonLocalMeans) -> str:
    """The same computation as squeeze.nl_means, with all search offsets stacked on a new axis 1.

    Memory: the stack holds search**2 copies of the (padded) batch, fine for small images; large
    images would want a loop instead.
    """
    if rank != 4:
        raise FusedModelError(f"sidewatch: {squeezer} needs an [N, C, H, W] input, the model's has rank {rank}")
    s, p = squeezer.search // 2, squeezer.patch // 2
    margin = s + p
    padded = b.op("Pad", [x, b.ints([0, 0, margin, margin, 0, 0, margin, margin])], mode="reflect")
    centre = b.slice(padded, [s, s], [-s, -s], [2, 3])                                # [N, C, H+2p, W+2p]
    stack = _shifted_stack(b, padded, 4, squeezer.search, 2 * s, axis=1)             # [N, S2, C, H+2p, W+2p]
    diff = b.op("Sub", [stack, b.unsqueeze(centre, [1])])
    squared = b.reduce("ReduceMean", b.op("Mul", [diff, diff]), [2], keepdims=0)     # [N, S2, H+2p, W+2p]
    d2 = b.op("AveragePool", [squared], kernel_shape=[squeezer.patch] * 2, strides=[1, 1])  # [N, S2, H, W]
    minus_inv_h2 = b.const(-(255.0 / squeezer.strength) ** 2, np.float32, "minus_inv_h2")
    weight = b.op("Exp", [b.op("Mul", [d2, minus_inv_h2])])
    values = b.slice(stack, [p, p], [_end(p), _end(p)], [3, 4])                    # [N, S2, C, H, W]
    numerator = b.reduce("ReduceSum", b.op("Mul", [values, b.unsqueeze(weight, [2])]), [1], keepdims=0)
    denominator = b.reduce("ReduceSum", weight, [1], keepdims=1)
    return b.op("Div", [numerator, denominator])


def squeeze_graph(b: Builder, x: str, rank: int, squeezer: Squeezer) -> str:
    """Append the nodes of one squeezer; return the name of its output."""
    if isinstance(squeezer, BitDepth):
        return _bit_depth_graph(b, x, squeezer.bits)
    if rank < 3:
        raise FusedModelError(f"sidewatch: {squeezer} needs [N, ..., H, W] inputs, the model's has rank {rank}")
    if isinstance(squeezer, Median):
        return _median_graph(b, x, rank, squeezer.size)
    if isinstance(squeezer, NonLocalMeans):
        return _nl_means_graph(b, x, rank, squeezer)
    raise TypeError(f"not a squeezer: {squeezer!r}")


def build_fused_model(model: ModelSource, squeezers: str | Iterable[str | Squeezer], output_kind: str = "auto",
                      input_name: str | None = None, output_name: str | None = None, *,
                      autoencoder: bytes | onnx.ModelProto | None = None, autoencoder_error: str = "l2",
                      detector_thresholds: Sequence[float] | None = None) -> tuple[onnx.ModelProto, ModelInfo]:
    """The fused detection graph for ``model``, and what was found out about the model.

    ``autoencoder`` (ONNX, agent.detect.adversarial.autoencoder) adds the second detector;
    ``detector_thresholds``, one per detector (squeezing first), makes ``score`` the combined score.
    """
    model = load_model(model)
    squeezers = parse_squeezers(squeezers)
    info = inspect_model(model, input_name, output_name, output_kind)
    detectors = detector_names(autoencoder is not None)
    if detector_thresholds is not None:
        detector_thresholds = np.asarray(detector_thresholds, dtype=np.float32)
        if detector_thresholds.shape != (len(detectors),) or not np.all(detector_thresholds > 0):
            raise FusedModelError(f"sidewatch: {len(detectors)} positive detector thresholds are needed "
                                  f"({', '.join(detectors)}), got {detector_thresholds.tolist()}")
    rank = len(info.input_shape)
    # Prefix every name of the model, so none can clash with ours (its output may well be called
    # "probabilities" too); the prefixed input is then fed by our Concat instead of the caller.
    fused = onnx.compose.add_prefix(model, MODEL_PREFIX)
    graph = fused.graph
    model_input, model_output = MODEL_PREFIX + info.input_name, MODEL_PREFIX + info.output_name
    initializer_names = {init.name for init in graph.initializer}

    pre = Builder(info.opset)
    x = info.input_name
    squeezed = [squeeze_graph(pre, x, rank, squeezer) for squeezer in squeezers]
    pre.op("Concat", [x] + squeezed, outputs=[model_input], axis=0)                  # [(1+S) N, ...]

    post = Builder(info.opset, prefix="sidewatch/post/")
    scores = post.op("Flatten", [model_output], axis=1)                               # [(1+S) N, C]
    if info.output_kind == "logits":
        # axis=1 on a 2-D tensor means the same in every Softmax version (13 changed only N-D).
        scores = post.op("Softmax", [scores], axis=1)
    # [(1+S) N, C] -> [1+S, N, C]; C is taken from the tensor, so it need not be static.
    class_axis = post.slice(post.op("Shape", [scores]), [1], [2], [0])
    grouped = post.op("Reshape", [scores, post.op("Concat", [post.ints([1 + len(squeezers), -1]), class_axis], axis=0)])
    probabilities = post.op("Gather", [grouped, post.const(0, np.int64, "zero")], outputs=["probabilities"], axis=0)
    squeezed_probabilities = post.slice(grouped, [1], [INT64_MAX], [0])             # [S, N, C]
    l1 = post.reduce("ReduceSum", post.op("Abs", [post.op("Sub", [squeezed_probabilities, probabilities])]),
                     [2], keepdims=0)                                                 # [S, N]
    post.op("Transpose", [l1], outputs=["distances"], perm=[1, 0])                   # [N, S]
    per_detector = [post.reduce("ReduceMax", l1, [0], keepdims=0)]                    # [N] each
    if autoencoder is not None:
        per_detector.append(append_autoencoder(post, x, rank, autoencoder, autoencoder_error))
    columns = post.op("Concat", [post.unsqueeze(s, [1]) for s in per_detector], outputs=["detector_scores"],
                      axis=1)                                                         # [N, D]
    if detector_thresholds is None:
        post.op("Identity", [per_detector[0]], outputs=["score"])                    # squeezing alone
    else:
        # Each score over its threshold; the largest of them, so that score > 1 when any detector is over its own.
        ratios = post.op("Div", [columns, post.const(detector_thresholds[None, :], np.float32, "thresholds")])
        post.reduce("ReduceMax", ratios, [1], keepdims=0, output="score")

    nodes = pre.nodes + list(graph.node) + post.nodes
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(pre.initializers + post.initializers)
    kept_inputs = [vi for vi in graph.input if vi.name in initializer_names]
    del graph.input[:]
    batch = "batch"
    input_dims = [batch] + [d if isinstance(d, int) and d > 0 else (d or None) for d in info.input_shape[1:]]
    graph.input.extend([helper.make_tensor_value_info(info.input_name, TensorProto.FLOAT, input_dims)] + kept_inputs)
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, info.num_classes or "classes"]),
        helper.make_tensor_value_info("score", TensorProto.FLOAT, [batch]),
        helper.make_tensor_value_info("distances", TensorProto.FLOAT, [batch, len(squeezers)]),
        helper.make_tensor_value_info("detector_scores", TensorProto.FLOAT, [batch, len(detectors)]),
    ])
    # The model's shape hints describe N inputs, but its nodes now see (1 + S) N: drop them.
    del graph.value_info[:]
    graph.name = f"sidewatch_{'_'.join(detectors)}({graph.name})"
    graph.doc_string = (f"Feature squeezing ({format_squeezers(squeezers)}) around the model's graph"
                        + (f", beside an autoencoder ({autoencoder_error} reconstruction error)" if autoencoder else "")
                        + f"; output_kind={info.output_kind}")
    return fused, info


def detector_names(autoencoder: bool) -> tuple[str, ...]:
    """The detectors of a fused graph, in the order of its ``detector_scores`` columns."""
    return (SQUEEZING, AUTOENCODER) if autoencoder else (SQUEEZING,)


# --- the detector --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SqueezeResult:
    """Detection results for a batch of N inputs, S squeezers, D detectors and C classes."""

    probabilities: np.ndarray     # [N, C] float32: the model's softmax on each unsqueezed input
    scores: np.ndarray            # [N] float32: the verdict's score (combined when calibrated jointly)
    distances: np.ndarray         # [N, S] float32: the L1 distance for each squeezer
    threshold: float | None = None
    detector_scores: np.ndarray | None = None  # [N, D] float32: each detector's own score (squeezing first)

    @property
    def flagged(self) -> np.ndarray | None:
        """Adversarial verdicts, ``scores > threshold``, when the detector has a threshold."""
        return None if self.threshold is None else self.scores > self.threshold


class FeatureSqueezingDetector:
    """Feature-squeezing detector for adversarial inputs (Xu, Evans and Qi, NDSS 2018), with an autoencoder
    detector beside it when one is given (MagNet; agent.detect.adversarial.autoencoder), in one graph.

    Parameters only in the constructor (river style; the spec strings are checked at once, so a bad
    one fails at start). The fused ONNX graph and its session are built on first use.

    model         path to an .onnx file, its bytes, or an onnx.ModelProto
    squeezers     "bit_depth:1,median:2" (the paper's MNIST pair) or a list of specs / squeezer objects
    output_kind   "auto", "probabilities" or "logits" (see detect_output_kind)
    input_name / output_name   required only when the model has more than one
    device        "auto", "cpu" or "cuda" (agent.execution.providers_for)
    threshold     a calibrated threshold on ``scores`` (agent.detect.calibration.threshold); then results
                  carry `flagged`
    autoencoder   the autoencoder detector as ONNX bytes (from the calibration artifact), or None
    autoencoder_error   "l1" or "l2": its reconstruction error
    detector_thresholds one threshold per detector (squeezing, then the autoencoder), calibrated jointly
                  (agent.detect.calibration.threshold.joint_thresholds): ``scores`` is then the largest
                  detector score over its threshold, and ``threshold`` is 1. Without them ``scores`` is the
                  squeezing score.
    max_batch     larger batches are scored in chunks of this size, to bound memory

    ``score(batch)`` returns a SqueezeResult; ``update(batch)`` does the same, keeps it in
    ``result`` and returns the detector.

    >>> import numpy as np
    >>> detector = FeatureSqueezingDetector("agent/demo/models/mnist_cnn/1/model.onnx", "bit_depth:1,median:2",
    ...                                     device="cpu", threshold=0.5)
    >>> x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)   # 8 images in [0, 1]
    >>> result = detector.update(x).result
    >>> result.scores.shape, result.distances.shape, result.probabilities.shape, result.flagged.shape
    ((8,), (8, 2), (8, 10), (8,))
    >>> result.detector_scores.shape, detector.detectors
    ((8, 1), ('feature_squeezing',))
    >>> detector.reset().result is None
    True
    """

    def __init__(self, model: ModelSource, squeezers: str | Iterable[str | Squeezer] = "bit_depth:1,median:2", *,
                 output_kind: str = "auto", input_name: str | None = None, output_name: str | None = None,
                 device: str = "auto", threshold: float | None = None, max_batch: int = 256,
                 intra_op_threads: int = 0, autoencoder: bytes | None = None, autoencoder_error: str = "l2",
                 detector_thresholds: Sequence[float] | None = None):
        if output_kind not in OUTPUT_KINDS:
            raise FusedModelError(f"sidewatch: output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {output_kind!r}")
        if max_batch < 1:
            raise ValueError(f"sidewatch: max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.squeezers = parse_squeezers(squeezers)
        self.output_kind = output_kind
        self.input_name = input_name
        self.output_name = output_name
        self.device = device
        self.threshold = threshold
        self.max_batch = max_batch
        self.intra_op_threads = intra_op_threads
        self.autoencoder = autoencoder
        self.autoencoder_error = autoencoder_error
        self.detector_thresholds = None if detector_thresholds is None else tuple(float(t) for t in detector_thresholds)
        self.detectors = detector_names(autoencoder is not None)
        self.result: SqueezeResult | None = None
        self._fused: onnx.ModelProto | None = None
        self._info: ModelInfo | None = None
        self._session = None

    def _build(self) -> None:
        if self._fused is None:
            self._fused, self._info = build_fused_model(
                self.model, self.squeezers, self.output_kind, self.input_name, self.output_name,
                autoencoder=self.autoencoder, autoencoder_error=self.autoencoder_error,
                detector_thresholds=self.detector_thresholds)

    @property
    def fused_model(self) -> onnx.ModelProto:
        """The fused ONNX graph (built on first access)."""
        self._build()
        return self._fused

    @property
    def info(self) -> ModelInfo:
        """The model's resolved input, output, output kind and shapes."""
        self._build()
        return self._info

    @property
    def session(self):
        """The ONNX Runtime session of the fused graph (opened on first access).

        Touch it once before scoring from several threads: ``run`` is thread-safe, opening is not.
        """
        if self._session is None:
            self._session = open_session(self.fused_model.SerializeToString(), self.device, self.intra_op_threads)
        return self._session

    def _check(self, batch) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        shape = self.info.input_shape
        fits = x.ndim == len(shape) and all(
            not isinstance(want, int) or want <= 0 or want == got for want, got in zip(shape[1:], x.shape[1:]))
        if not fits:
            wanted = ", ".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in shape[1:])
            raise FusedModelError(f"sidewatch: a batch of shape {list(x.shape)} does not fit input "
                                  f"{self.info.input_name!r} [batch, {wanted}]")
        return x

    def score(self, batch: np.ndarray) -> SqueezeResult:
        """Score a batch ``[N, ...]`` (N >= 0) in one fused call per ``max_batch`` inputs."""
        x = self._check(batch)
        if len(x) == 0:
            classes = self.info.num_classes or 0
            return SqueezeResult(np.zeros((0, classes), np.float32), np.zeros(0, np.float32),
                                 np.zeros((0, len(self.squeezers)), np.float32), self.threshold,
                                 np.zeros((0, len(self.detectors)), np.float32))
        parts = [self.session.run(list(FUSED_OUTPUTS), {self.info.input_name: x[i:i + self.max_batch]})
                 for i in range(0, len(x), self.max_batch)]
        probabilities, scores, distances, detector_scores = (np.concatenate([p[k] for p in parts])
                                                             for k in range(len(FUSED_OUTPUTS)))
        return SqueezeResult(probabilities, scores, distances, self.threshold, detector_scores)

    def update(self, batch: np.ndarray) -> FeatureSqueezingDetector:
        """Score a batch, keep the result in ``self.result``, return the detector."""
        self.result = self.score(batch)
        return self

    def reset(self) -> FeatureSqueezingDetector:
        """Forget the last result; keep the fused graph and its session. Returns the detector."""
        self.result = None
        return self

    def __repr__(self) -> str:
        return (f"FeatureSqueezingDetector(squeezers={format_squeezers(self.squeezers)!r}, "
                f"detectors={'+'.join(self.detectors)!r}, output_kind={self.output_kind!r}, device={self.device!r}, "
                f"threshold={self.threshold!r})")
