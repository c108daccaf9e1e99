"""The MNIST images shipped with the package: a test sample for the demo and a reference set for calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEMO_DIR = Path(__file__).resolve().parent
DATA_DIR = DEMO_DIR / "data"
# The bundled model's two versions (bench/train_mnist.py trains them), each with its calibration.
MODEL_DIR = DEMO_DIR / "models" / "mnist_cnn"
TEST_SAMPLE = DATA_DIR / "mnist_test_sample.npz"
REFERENCE = DATA_DIR / "mnist_reference.npz"
# Validation images after the reference: the demo's benign traffic, unseen by calibration.
BENIGN_STREAM = DATA_DIR / "mnist_benign_stream.npz"
# Adversarial examples against version 2 of the bundled model (bench/make_demo_adversarial.py).
ADVERSARIAL = DATA_DIR / "mnist_adversarial.npz"


def load_images(path: Path = TEST_SAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Images as the model takes them (FP32 in [0, 1], shape [N, 1, 28, 28]) and their labels."""
    with np.load(path) as data:
        images = data["x"].astype(np.float32)[:, None, :, :] / 255.0
        labels = data["y"].astype(np.int64)
    return images, labels


def load_adversarial(path: Path = ADVERSARIAL) -> tuple[np.ndarray, np.ndarray, str]:
    """Adversarial images (FP32 [N, 1, 28, 28]), their true labels, and how they were made."""
    with np.load(path) as data:
        return data["x"].astype(np.float32), data["y"].astype(np.int64), str(data["attack"])
