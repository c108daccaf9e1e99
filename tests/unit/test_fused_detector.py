"""The fused feature-squeezing graph equals the unfused numpy computation (numpy squeezers, plain model calls)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.demo.data import MODEL_DIR, load_images
from agent.detect.adversarial.graph import (
    FeatureSqueezingDetector,
    FusedModelError,
    build_fused_model,
    detect_output_kind,
    squeeze_graph,
)
from agent.detect.adversarial.onnx_ops import Builder
from agent.detect.adversarial.squeeze import BitDepth, Median, NonLocalMeans, parse_squeezers
from agent.execution import open_session
from tests.support.reference_math import reference_score

MNIST_V1 = MODEL_DIR / "1" / "model.onnx"
ATOL = 2e-5
# Ops the squeezing adds around the model: all standard, all implemented by the CPU and CUDA providers.
SQUEEZE_OPS = {"Mul", "Round", "Div", "Pad", "Slice", "Concat", "Unsqueeze", "TopK", "ReduceMin", "Min", "Max",
               "Sub", "ReduceMean", "AveragePool", "Exp", "ReduceSum", "Flatten", "Softmax", "Shape", "Reshape",
               "Gather", "Abs", "Transpose", "ReduceMax", "Identity"}


@pytest.fixture(scope="module")
def mnist():
    x, _ = load_images()
    return x[:37]


@pytest.fixture(scope="module")
def plain_v1():
    return ort.InferenceSession(str(MNIST_V1), providers=["CPUExecutionProvider"])


def assert_matches_reference(detector, session, x, input_name, output_name, output_kind):
    got = detector.score(x)
    probabilities, scores, distances = reference_score(session, x, detector.squeezers, output_kind,
                                                       input_name, output_name)
    np.testing.assert_allclose(got.probabilities, probabilities, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got.distances, distances, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got.scores, scores, rtol=0, atol=ATOL)
    assert got.scores.shape == (len(x),) and got.distances.shape == (len(x), len(detector.squeezers))
    return got


# --- each squeezer's subgraph alone -----------------------------------------------------------------


def run_squeezer_graph(squeezer, x, opset=17):
    b = Builder(opset)
    out = squeeze_graph(b, "x", x.ndim, squeezer)
    shape = ["n", *x.shape[1:]]
    graph = helper.make_graph(b.nodes, "squeeze", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return open_session(model.SerializeToString(), "cpu").run(None, {"x": x})[0]


@pytest.mark.parametrize("opset", [11, 17, 18])
@pytest.mark.parametrize("squeezer", [BitDepth(1), BitDepth(3), BitDepth(8), Median(2), Median(3), Median(4),
                                      Median(5)], ids=str)
def test_squeezer_graph_is_bit_identical_to_numpy(squeezer, opset):
    rng = np.random.default_rng(1)
    x = rng.random((3, 2, 9, 8)).astype(np.float32)
    # Exact halves for the rounding (0.5 * 1, 1.5 / 3 ...) and ties for the medians.
    x[0, 0, :4, :4] = np.array([0.5, 0.5, 0.25, 0.75], dtype=np.float32)
    x[1] = np.round(x[1] * 2) / 2
    np.testing.assert_array_equal(run_squeezer_graph(squeezer, x, opset), squeezer(x))


def test_nl_means_graph_matches_numpy():
    rng = np.random.default_rng(2)
    x = (0.5 + 0.05 * rng.standard_normal((2, 3, 12, 10))).astype(np.float32)
    squeezer = NonLocalMeans(5, 3, 10.0)
    np.testing.assert_allclose(run_squeezer_graph(squeezer, x), squeezer(x), rtol=0, atol=1e-5)


# --- the fused graph around mnist_cnn ---------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 37])
def test_fused_equals_unfused_on_mnist(mnist, plain_v1, n):
    detector = FeatureSqueezingDetector(MNIST_V1, "bit_depth:1,median:2", device="cpu")
    got = assert_matches_reference(detector, plain_v1, mnist[:n], "input", "probabilities", "probabilities")
    np.testing.assert_allclose(got.probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 37])
def test_fused_equals_unfused_on_random_inputs(plain_v1, n):
    x = np.random.default_rng(n).random((n, 1, 28, 28)).astype(np.float32)
    detector = FeatureSqueezingDetector(MNIST_V1, "median:3,bit_depth:4,median:2", device="cpu")
    assert_matches_reference(detector, plain_v1, x, "input", "probabilities", "probabilities")


def strip_softmax(model: onnx.ModelProto) -> onnx.ModelProto:
    """mnist_cnn with its final Softmax turned into an Identity: it outputs logits, named 'logits'."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    last = model.graph.node[-1]
    assert last.op_type == "Softmax"
    last.op_type = "Identity"
    del last.attribute[:]
    last.output[0] = "logits"
    model.graph.output[0].name = "logits"
    return model


def test_logits_model_gets_a_softmax(mnist):
    logits_model = strip_softmax(onnx.load(str(MNIST_V1)))
    assert detect_output_kind(logits_model, "logits") == "logits"
    detector = FeatureSqueezingDetector(logits_model.SerializeToString(), "bit_depth:1,median:2", device="cpu")
    assert detector.info.output_kind == "logits"
    session = ort.InferenceSession(logits_model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = assert_matches_reference(detector, session, mnist, "input", "logits", "logits")
    # Softmax of the logits is what the original model outputs, so the scores agree with it.
    original = FeatureSqueezingDetector(MNIST_V1, "bit_depth:1,median:2", device="cpu").score(mnist)
    np.testing.assert_allclose(got.probabilities, original.probabilities, atol=ATOL)
    np.testing.assert_allclose(got.scores, original.scores, atol=1e-4)


def tiny_linear_model(opset, shape=(1, 6, 6), classes=4, final=None, seed=0, batch="n"):
    """[N, *shape] -> Flatten -> MatMul -> Add -> logits (optionally a final op such as Softmax)."""
    rng = np.random.default_rng(seed)
    features = int(np.prod(shape))
    weight = numpy_helper.from_array(rng.standard_normal((features, classes)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b")
    nodes = [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["out" if final is None else "z"])]
    if final is not None:
        nodes.append(helper.make_node(final, ["z"], ["out"], axis=1))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, *shape])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, classes])],
                              [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
@pytest.mark.parametrize("n", [1, 37])
def test_tiny_logits_model_across_opsets(opset, n):
    model = tiny_linear_model(opset)
    x = np.random.default_rng(opset).random((n, 1, 6, 6)).astype(np.float32)
    detector = FeatureSqueezingDetector(model, "bit_depth:2,median:2,median:3", device="cpu")
    assert detector.info.output_kind == "logits"
    onnx.checker.check_model(detector.fused_model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_matches_reference(detector, session, x, "pixels", "out", "logits")


def test_colour_model_with_nl_means():
    model = tiny_linear_model(17, shape=(3, 10, 10), classes=5, final="Softmax")
    rng = np.random.default_rng(4)
    x = np.clip(0.5 + 0.1 * rng.standard_normal((5, 3, 10, 10)), 0, 1).astype(np.float32)
    detector = FeatureSqueezingDetector(model, "nl_means:5-3-8,median:2,bit_depth:5", device="cpu")
    assert detector.info.output_kind == "probabilities"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_matches_reference(detector, session, x, "pixels", "out", "probabilities")


# --- details ---------------------------------------------------------------------------------------


def test_output_kind_rule():
    assert detect_output_kind(tiny_linear_model(17, final="Softmax"), "out") == "probabilities"
    assert detect_output_kind(tiny_linear_model(17, final="LogSoftmax"), "out") == "logits"
    assert detect_output_kind(tiny_linear_model(17), "out") == "logits"
    through_identity = tiny_linear_model(17, final="Softmax")
    through_identity.graph.node[-1].output[0] = "p"
    through_identity.graph.node.append(helper.make_node("Identity", ["p"], ["out"]))
    assert detect_output_kind(through_identity, "out") == "probabilities"
    # An explicit kind wins over the rule.
    detector = FeatureSqueezingDetector(tiny_linear_model(17), "bit_depth:1", output_kind="probabilities")
    assert detector.info.output_kind == "probabilities"


def test_fused_graph_is_valid_and_uses_standard_ops_only():
    fused, info = build_fused_model(MNIST_V1, "bit_depth:1,median:2,median:3")
    onnx.checker.check_model(fused, full_check=True)
    assert [i.name for i in fused.graph.input] == ["input"]
    assert [o.name for o in fused.graph.output] == ["probabilities", "score", "distances", "detector_scores"]
    model_ops = {node.op_type for node in onnx.load(str(MNIST_V1)).graph.node}
    added = {node.op_type for node in fused.graph.node} - model_ops
    assert added <= SQUEEZE_OPS, added - SQUEEZE_OPS
    assert all(node.domain in ("", "ai.onnx") for node in fused.graph.node)
    assert (info.input_name, info.output_name, info.num_classes) == ("input", "probabilities", 10)


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA provider here")
def test_cuda_provider_agrees_with_cpu(mnist):
    cpu = FeatureSqueezingDetector(MNIST_V1, "bit_depth:1,median:2", device="cpu").score(mnist)
    detector = FeatureSqueezingDetector(MNIST_V1, "bit_depth:1,median:2", device="cuda")
    assert detector.session.get_providers()[0] == "CUDAExecutionProvider"
    cuda = detector.score(mnist)
    np.testing.assert_allclose(cuda.scores, cpu.scores, atol=1e-4)


def test_chunks_empty_batches_update_and_flags(mnist):
    whole = FeatureSqueezingDetector(MNIST_V1, device="cpu", threshold=0.05)
    chunked = FeatureSqueezingDetector(MNIST_V1, device="cpu", max_batch=8)
    a, b = whole.score(mnist), chunked.score(mnist)
    np.testing.assert_allclose(a.scores, b.scores, atol=ATOL)
    np.testing.assert_array_equal(a.flagged, a.scores > 0.05)
    assert b.flagged is None
    empty = whole.score(mnist[:0])
    assert empty.scores.shape == (0,) and empty.distances.shape == (0, 2) and empty.probabilities.shape == (0, 10)
    assert whole.update(mnist[:3]) is whole and whole.result.scores.shape == (3,)


def test_bad_models_and_batches_are_refused_clearly(tmp_path):
    with pytest.raises(FusedModelError, match="sidewatch: a batch of shape \\[2, 28, 28\\] does not fit"):
        FeatureSqueezingDetector(MNIST_V1, device="cpu").score(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(FusedModelError, match="fixed batch axis of 1"):
        build_fused_model(tiny_linear_model(17, batch=1), "bit_depth:1")
    two_inputs = tiny_linear_model(17)
    two_inputs.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    with pytest.raises(FusedModelError, match="2 inputs \\(pixels, extra\\); name the image input"):
        build_fused_model(two_inputs, "bit_depth:1")
    with pytest.raises(FusedModelError, match="no output 'nope'"):
        build_fused_model(tiny_linear_model(17), "bit_depth:1", output_name="nope")
    with pytest.raises(FusedModelError, match="output_kind must be one of"):
        FeatureSqueezingDetector(MNIST_V1, output_kind="softmax")
    with pytest.raises(FusedModelError, match="opset 10"):
        build_fused_model(tiny_linear_model(10), "bit_depth:1")
    assert parse_squeezers("median:2") == FeatureSqueezingDetector(MNIST_V1, "median:2").squeezers
