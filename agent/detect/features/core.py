"""The image classifier's features (block means; class, confidence, entropy), written once.

Images are summarised by a bounded set of features: the means of a 7 x 7 grid of blocks (for
MNIST, 4 x 4 pixels each; per channel for colour images): coarse enough to be stable per request,
fine enough that a rotation, a shift or a brightness change moves many of them. Outputs are
summarised by the predicted class, the top-1 confidence and the entropy of the class
probabilities; a model that answers logits gets its softmax first. The adversarial score joins
them when the squeezing detector runs.

>>> import numpy as np
>>> p = softmax(np.array([[0.0, 0.0], [0.0, 50.0]]))
>>> p.round(3).tolist()
[[0.5, 0.5], [0.0, 1.0]]
>>> classes, confidence, nats = output_features(p)
>>> classes.tolist(), confidence.round(3).tolist(), nats.round(3).tolist()
([0, 1], [0.5, 1.0], [0.693, 0.0])
>>> input_features(np.ones((2, 1, 28, 28))).shape       # one image channel: 7 x 7 block means
(2, 49)
>>> region_names(channels=1)[:2]
['region_0_0', 'region_0_1']
"""

from __future__ import annotations

import numpy as np

REGION_GRID = 7
OUTPUT_FEATURES = ("confidence", "entropy")


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax over ``axis``, shifted by the max for stability (as ONNX Runtime does).

    Computed in the logits' own float type (float32 stays float32); other types in float64.
    """
    z = np.asarray(logits)
    if z.dtype.kind != "f":
        z = z.astype(np.float64)
    exp = np.exp(z - z.max(axis=axis, keepdims=True))
    return exp / exp.sum(axis=axis, keepdims=True)


def entropy(probabilities: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of class probabilities along ``axis``, in float64, with 0 log 0 = 0.

    >>> entropy(np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])).round(4).tolist()
    [0.6931, 1.3863]
    """
    p = np.asarray(probabilities, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=axis)


def region_means(x: np.ndarray, grid: int = REGION_GRID) -> tuple[np.ndarray, list[int], list[int]]:
    """Block means on a ``grid`` x ``grid`` grid over the last two axes: ``[N, C * grid * grid]``.

    Axes between the batch and the last two count as channels. Rows and columns are cut at
    ``(i * H) // grid``, so 28 x 28 MNIST gives 7 x 7 blocks of 4 x 4 pixels. Returns the features
    and the block heights and widths.

    >>> features, rows, cols = region_means(np.arange(36.0).reshape(1, 6, 6), grid=2)
    >>> features.tolist(), rows, cols
    ([[7.0, 10.0, 25.0, 28.0]], [3, 3], [3, 3])
    >>> region_means(np.arange(6.0).reshape(1, 2, 3), grid=3)[0].tolist()   # smaller than the grid
    [[0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    """
    x = np.asarray(x, dtype=np.float64)
    n, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    x = x.reshape(n, -1, height, width)
    rows = (np.arange(grid) * height) // grid
    cols = (np.arange(grid) * width) // grid
    # A grid finer than the image (height < grid): a block of no rows takes its first row (reduceat's rule).
    row_sizes = np.maximum(np.diff(np.append(rows, height)), 1)
    col_sizes = np.maximum(np.diff(np.append(cols, width)), 1)
    sums = np.add.reduceat(np.add.reduceat(x, rows, axis=2), cols, axis=3)
    means = sums / (row_sizes[:, None] * col_sizes[None, :])
    return means.reshape(n, -1), row_sizes.tolist(), col_sizes.tolist()


def region_names(channels: int, grid: int = REGION_GRID) -> list[str]:
    """The names of :func:`input_features`' columns: channel, grid row, grid column."""
    prefix = [""] if channels == 1 else [f"c{c}_" for c in range(channels)]
    return [f"{p}region_{row}_{col}" for p in prefix for row in range(grid) for col in range(grid)]


def input_features(x: np.ndarray, grid: int = REGION_GRID) -> np.ndarray:
    """[N, C * grid * grid] block means of an image batch [N, (C,) H, W]."""
    return region_means(x, grid)[0]


def output_features(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted class [N], top-1 confidence [N], entropy in nats [N]) of class probabilities [N, K]."""
    p = np.asarray(probabilities, dtype=np.float64)
    return p.argmax(axis=1), p.max(axis=1), entropy(p, axis=1)
