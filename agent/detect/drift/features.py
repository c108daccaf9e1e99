"""What the drift detectors watch, computed from a decoded inference.

Images are summarised by a bounded set of features: the means of a 7 x 7 grid of blocks (for
MNIST, 4 x 4 pixels each; per channel for colour images): coarse enough to be stable per request,
fine enough that a rotation, a shift or a brightness change moves many of them. Outputs are
summarised by the predicted class, the top-1 confidence and the entropy of the class
probabilities. The adversarial score joins them when the squeezing detector runs.
"""

from __future__ import annotations

import numpy as np

from agent.detect.calibration import REGION_GRID, region_means

OUTPUT_FEATURES = ("confidence", "entropy")


def region_names(channels: int, grid: int = REGION_GRID) -> list[str]:
    prefix = [""] if channels == 1 else [f"c{c}_" for c in range(channels)]
    return [f"{p}region_{row}_{col}" for p in prefix for row in range(grid) for col in range(grid)]


def input_features(x: np.ndarray, grid: int = REGION_GRID) -> np.ndarray:
    """[N, C * grid * grid] block means of an image batch [N, (C,) H, W]."""
    return region_means(x, grid)[0]


def output_features(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted class [N], top-1 confidence [N], entropy in nats [N]) of class probabilities [N, K]."""
    p = np.asarray(probabilities, dtype=np.float64)
    classes = p.argmax(axis=1)
    confidence = p.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return classes, confidence, entropy
