#!/usr/bin/env python3
"""The bundled ONNX model ``mnist_cnn`` rebuilt as a torch module with the SAME weights.

Attacks need gradients, and the served model is an ONNX file; so this reads the ONNX file's
initializers (the ``onnx`` package) and loads them into the training architecture
(``build_model`` in bench/train_mnist.py). The ONNX graph ends in a Softmax; the torch module
returns the logits before it, which is what gradient attacks (and ART's PyTorchClassifier with a
cross-entropy loss) want: ``softmax(module(x))`` equals the ONNX model's ``probabilities``.

The ONNX initializers are named after the exported ``Sequential(model, Softmax)``: ``0.<layer>.weight``
for layer ``<layer>`` of the inner model, so ``0.3.bias`` is ``model[3].bias``. The graph is
checked to be exactly the expected op sequence before its weights are trusted.

    .venv/bin/python bench/mnist_torch.py [--version 1] [--images 1000]

checks that the torch module's probabilities equal onnxruntime's on the first N MNIST test images
within 1e-5 and exits 1 otherwise. Needs torch and onnx (the ``train`` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import train_mnist  # noqa: E402  (bench/train_mnist.py: the architecture, the MNIST pickle)

MODEL = "mnist_cnn"
REPOSITORY = ROOT / "agent" / "demo" / "models"
MODEL_DIR = REPOSITORY / MODEL
CHANNELS = 1
INPUT_SHAPE = (1, 28, 28)
ONNX_PREFIX = "0."
EXPECTED_OPS = ["Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Relu", "Gemm", "Softmax"]
TOLERANCE = 1e-5


def model_path(version: str) -> Path:
    return MODEL_DIR / str(version) / "model.onnx"


def onnx_weights(path: Path, expected_ops: list[str] = EXPECTED_OPS) -> dict[str, np.ndarray]:
    """The initializers of the ONNX file, renamed to the torch state_dict keys (``0.3.bias`` -> ``3.bias``).

    ``expected_ops``: the graph's op sequence, checked first (bench/cifar10_torch.py passes its model's)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    ops = [node.op_type for node in model.graph.node]
    if ops != expected_ops:
        raise ValueError(f"{path}: graph ops {ops}, expected {expected_ops}")
    weights = {}
    for initializer in model.graph.initializer:
        if not initializer.name.startswith(ONNX_PREFIX):
            raise ValueError(f"{path}: unexpected initializer {initializer.name!r}")
        weights[initializer.name[len(ONNX_PREFIX):]] = numpy_helper.to_array(initializer).copy()
    return weights


def load_torch_model(version: str = "1"):
    """The logits module (eval mode, no gradients on its parameters) with the ONNX file's weights."""
    import torch

    module = train_mnist.build_model(torch)
    state = {name: torch.from_numpy(array) for name, array in onnx_weights(model_path(version)).items()}
    # strict: every parameter must come from the file, and nothing may be left over.
    module.load_state_dict(state, strict=True)
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def torch_probabilities(module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([torch.softmax(module(torch.from_numpy(x[i:i + batch])), dim=1).numpy()
                               for i in range(0, len(x), batch)])


def onnx_probabilities(version: str, x: np.ndarray, batch: int = 500) -> np.ndarray:
    session = train_mnist.onnx_session(model_path(version))
    return np.concatenate([session.run([train_mnist.OUTPUT_NAME], {train_mnist.INPUT_NAME: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test images ([N, 1, 28, 28] float32 in [0, 1]) and labels, from the pinned pickle."""
    return train_mnist.load_mnist(train_mnist.fetch_mnist())["test"]


test_data = mnist_test   # the name bench/adversarial.py and bench/adaptive_attack.py use for every model


def verify(version: str = "1", images: int = 1000) -> float:
    """Largest |torch - onnxruntime| probability difference on the first ``images`` test images."""
    x, _ = mnist_test()
    x = np.ascontiguousarray(x[:images])
    return float(np.abs(torch_probabilities(load_torch_model(version), x) - onnx_probabilities(version, x)).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default="1", help="model version (default 1)")
    parser.add_argument("--images", type=int, default=1000, help="test images to compare on (default 1000)")
    args = parser.parse_args(argv)
    diff = verify(args.version, args.images)
    ok = diff <= TOLERANCE
    print(f"mnist_cnn v{args.version}: max |torch - onnxruntime| over {args.images} test images = {diff:.3g} "
          f"({'ok' if ok else 'FAIL'}, tolerance {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
