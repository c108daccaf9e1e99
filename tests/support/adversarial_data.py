"""Adversarial and benign MNIST inputs for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.demo.data import load_images

# tests/data/, beside this package (bench/make_adversarial_testdata.py writes it).
COMMITTED = Path(__file__).resolve().parents[1] / "data" / "adversarial_mnist.npz"


def adversarial_and_benign() -> tuple[np.ndarray, np.ndarray]:
    """(adversarial [N,1,28,28], benign [M,1,28,28]) float32 in [0, 1]."""
    if COMMITTED.exists():
        with np.load(COMMITTED) as data:
            return data["adversarial"].astype(np.float32), data["benign"].astype(np.float32)
    # Until attack examples are committed: blends of two digits, which sit on the decision
    # boundary the way adversarial examples do and are flagged by the 1-bit squeezer.
    images = load_images()[0]
    blends = (0.5 * images[0:32:2] + 0.5 * images[1:32:2]).astype(np.float32)
    return blends, images[100:116]
