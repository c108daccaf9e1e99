#!/usr/bin/env python3
"""The colour benchmark model ``cifar10_cnn`` (bench/train_cifar10.py) rebuilt as a torch module with the
ONNX file's own weights, as bench/mnist_torch.py does for ``mnist_cnn``; the same functions, so that
bench/adversarial.py and bench/adaptive_attack.py take either module.

    .venv/bin/python bench/cifar10_torch.py [--images 1000]

checks that the torch module's probabilities equal onnxruntime's on the first N CIFAR-10 test images
within 1e-5 and exits 1 otherwise.
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

import cifar10_data  # noqa: E402
import mnist_torch  # noqa: E402  (onnx_weights, torch_probabilities)
import train_cifar10  # noqa: E402  (the architecture, where the model is written)
import train_mnist  # noqa: E402  (onnx_session)

MODEL = train_cifar10.MODEL_NAME
REPOSITORY = train_cifar10.REPOSITORY
CHANNELS = 3
INPUT_SHAPE = (3, 32, 32)
TOLERANCE = mnist_torch.TOLERANCE
torch_probabilities = mnist_torch.torch_probabilities


def model_path(version: str) -> Path:
    return train_cifar10.MODEL_DIR / str(version) / "model.onnx"


def load_torch_model(version: str = "1"):
    """The logits module (eval mode, no gradients on its parameters) with the ONNX file's weights."""
    import torch

    path = model_path(version)
    if not path.exists():
        raise SystemExit(f"{path} is missing: run bench/train_cifar10.py first")
    module = train_cifar10.build_model(torch)
    weights = mnist_torch.onnx_weights(path, train_cifar10.EXPECTED_OPS)
    module.load_state_dict({name: torch.from_numpy(array) for name, array in weights.items()}, strict=True)
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def onnx_probabilities(version: str, x: np.ndarray, batch: int = 500) -> np.ndarray:
    session = train_mnist.onnx_session(model_path(version))
    return np.concatenate([session.run([train_mnist.OUTPUT_NAME], {train_mnist.INPUT_NAME: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def test_data() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 CIFAR-10 test images ([N, 3, 32, 32] float32 in [0, 1], byte / 255) and labels."""
    data = cifar10_data.load_uint8()
    return cifar10_data.to_model_input(data["x_test"]), data["y_test"].astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default="1")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args(argv)
    x, _ = test_data()
    x = np.ascontiguousarray(x[:args.images])
    diff = float(np.abs(torch_probabilities(load_torch_model(args.version), x) - onnx_probabilities(args.version, x)).max())
    ok = diff <= TOLERANCE
    print(f"{MODEL} v{args.version}: max |torch - onnxruntime| over {args.images} test images = {diff:.3g} "
          f"({'ok' if ok else 'FAIL'}, tolerance {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
