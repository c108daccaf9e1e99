"""A colour-image classifier trained here and served by the bundled model server, for drift watched from a
reference file (models.<name>.reference): sidewatch is given no model file for it.

Data: the two colour photos of scikit-learn's ``load_sample_images()`` (a Chinese temple, a flower; they ship
with scikit-learn, read with pillow: no download), cut into 128 x 128 crops on a 16-pixel stride, shrunk to
32 x 32 RGB patches (4 x 4 block means), scaled to [0, 1], as ``[N, 3, 32, 32]`` FP32 (NCHW). Four
classes: which photo, and whether the patch is from its top or bottom half (about 76% right on held-out
patches). The patches are shuffled once (seeded) and split three ways: ``train`` (the classifier's),
``reference`` (held out: the reference file) and ``benign`` (held out, the same source: traffic that must stay
quiet). Drift: ``darker`` (every pixel times 0.6) and ``rotated`` (each patch turned a quarter, np.rot90).

The classifier: multinomial logistic regression on 8 x 8 average-pooled patches (192 features), fitted with
numpy (full-batch gradient descent), written as ONNX (AveragePool, Flatten, Gemm, Softmax) with input ``x``
FP32 [-1, 3, 32, 32] and output ``probabilities`` FP32 [-1, 4]. ``predict`` is the same computation in numpy.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

MODEL = "colour_patches"
VERSION = "1"
SIZE, SHRINK, STRIDE, POOL = 32, 4, 16, 4
CLASSES = 4
SPLIT = (0.4, 0.3, 0.3)  # train, reference, benign


@functools.cache
def _patches() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_sample_images

    images, labels = [], []
    crop = SIZE * SHRINK
    for photo, image in enumerate(load_sample_images().images):
        h, w, _ = image.shape
        for top in range(0, h - crop + 1, STRIDE):
            for left in range(0, w - crop + 1, STRIDE):
                images.append(image[top:top + crop, left:left + crop].transpose(2, 0, 1))
                labels.append(2 * photo + int(top + crop / 2 >= h / 2))
    x = np.stack(images).astype(np.float32) / 255.0
    # Crops of 128 pixels shrunk to 32 (4 x 4 block means): a patch holds some of the scene's layout (sky
    # above, ground below), which a turned patch no longer has.
    x = x.reshape(len(x), 3, SIZE, SHRINK, SIZE, SHRINK).mean(axis=(3, 5))
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], np.asarray(labels, dtype=np.int64)[order]


def split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(patches [N, 3, 32, 32] FP32, labels [N])`` of ``train``, ``reference`` or ``benign``."""
    x, y = _patches()
    cuts = np.cumsum([0, *(int(share * len(x)) for share in SPLIT)])
    index = ("train", "reference", "benign").index(name)
    return x[cuts[index]:cuts[index + 1]], y[cuts[index]:cuts[index + 1]]


def darker(x: np.ndarray) -> np.ndarray:
    return (x * 0.6).astype(np.float32)


def rotated(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(x, k=1, axes=(2, 3)))


DRIFT = {"darker": darker, "rotated": rotated}


def _pooled(x: np.ndarray) -> np.ndarray:
    n = len(x)
    return x.reshape(n, 3, SIZE // POOL, POOL, SIZE // POOL, POOL).mean(axis=(3, 5)).reshape(n, -1)


@functools.cache
def weights(steps: int = 300, rate: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``(W [192, 4], b [4])`` of the logistic regression fitted on ``train`` (a few seconds, cached)."""
    x, y = split("train")
    features = _pooled(x).astype(np.float64)
    mean = features.mean(axis=0)
    centred = features - mean
    onehot = np.eye(CLASSES)[y]
    w = np.zeros((features.shape[1], CLASSES))
    b = np.zeros(CLASSES)
    for _ in range(steps):
        p = _softmax(centred @ w + b)
        grad = (p - onehot) / len(x)
        w -= rate * (centred.T @ grad + 1e-3 * w)
        b -= rate * grad.sum(axis=0)
    # The centring folded into the bias: the graph takes the pooled pixels as they are.
    return w.astype(np.float32), (b - mean @ w).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict(x: np.ndarray) -> np.ndarray:
    """The served model's probabilities, in numpy."""
    w, b = weights()
    return _softmax(_pooled(x).astype(np.float64) @ w + b).astype(np.float32)


def onnx_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, b = weights()
    nodes = [
        helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[POOL, POOL], strides=[POOL, POOL]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, MODEL, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", CLASSES])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def write_repository(root: Path) -> Path:
    """``root/<model>/<version>/model.onnx`` for the bundled model server; returns ``root``."""
    folder = Path(root) / MODEL / VERSION
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(onnx_model())
    return Path(root)


def write_reference(path: Path, outputs: bool = True) -> Path:
    """The held-out ``reference`` patches as a ``.npz`` reference file (``x``; ``probabilities`` too when
    ``outputs``)."""
    x, _ = split("reference")
    tensors = {"x": x}
    if outputs:
        tensors["probabilities"] = predict(x)
    np.savez(path, **tensors)
    return Path(path)
