"""The trained autoencoder (agent.detect.calibration.autoencoder_network) as an ONNX graph, written with
onnx.helper: input ``x`` and output ``reconstruction``, both ``[N, C, H, W]`` float32 with N dynamic, at
the model's opset, so that the fused detection graph can take its nodes
(agent.detect.adversarial.autoencoder).

>>> import onnxruntime
>>> from agent.detect.calibration.autoencoder_network import Autoencoder
>>> net = Autoencoder.initial("magnet_i", channels=1, filters=4, rng=np.random.default_rng(0))
>>> x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
>>> session = onnxruntime.InferenceSession(export_onnx(net, x.shape[1:], opset=17))
>>> bool(np.allclose(session.run(None, {INPUT_NAME: x})[0], net.forward(x), atol=1e-6))
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.detect.calibration import CalibrationError
from agent.detect.calibration.autoencoder_network import LAYOUTS, Autoencoder

INPUT_NAME = "x"
OUTPUT_NAME = "reconstruction"
# Resize with its roi and scales as inputs (the upsampling) is opset 11; the fused graph needs 11 too.
MIN_OPSET = 11


def export_onnx(net: Autoencoder, input_shape: Sequence[int], opset: int) -> bytes:
    """The autoencoder as ONNX bytes for inputs of shape [N, *input_shape] (``input_shape`` = C, H, W)."""
    if opset < MIN_OPSET:
        raise CalibrationError(f"sidewatch: the autoencoder detector needs ONNX opset {MIN_OPSET} or later; the "
                               f"model uses {opset}")
    nodes: list[onnx.NodeProto] = []
    initializers = []
    current = INPUT_NAME
    layers = LAYOUTS[net.architecture]
    conv = 0
    for index, layer in enumerate(layers):
        last = index == len(layers) - 1
        if layer == "conv":
            weight, bias = f"conv{conv}.weight", f"conv{conv}.bias"
            initializers += [numpy_helper.from_array(net.weights[conv], weight),
                             numpy_helper.from_array(net.biases[conv], bias)]
            nodes.append(helper.make_node("Conv", [current, weight, bias], [f"conv{conv}"], name=f"conv{conv}",
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            current = OUTPUT_NAME if last else f"sigmoid{conv}"
            nodes.append(helper.make_node("Sigmoid", [f"conv{conv}"], [current], name=f"sigmoid{conv}"))
            conv += 1
        elif layer == "pool":
            nodes.append(helper.make_node("AveragePool", [current], [f"pool{index}"], name=f"pool{index}",
                                          kernel_shape=[2, 2], strides=[2, 2]))
            current = f"pool{index}"
        else:
            # Nearest-neighbour upsampling by 2: output pixel i takes input pixel floor(i / 2).
            roi, scales = f"upsample{index}.roi", f"upsample{index}.scales"
            initializers += [numpy_helper.from_array(np.zeros(0, dtype=np.float32), roi),
                             numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), scales)]
            nodes.append(helper.make_node("Resize", [current, roi, scales], [f"upsample{index}"], name=f"upsample{index}",
                                          mode="nearest", coordinate_transformation_mode="asymmetric",
                                          nearest_mode="floor"))
            current = f"upsample{index}"
    shape = ["batch", *(int(d) for d in input_shape)]
    graph = helper.make_graph(nodes, "sidewatch_autoencoder",
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, shape)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="sidewatch")
    onnx.checker.check_model(model)
    return model.SerializeToString()
