"""The benign reference: read from a file, and summarised for the artifact's ``reference`` section.

The summary records statistics of the reference data (pixels, region means, predicted classes,
confidence, entropy, scores), for the drift detectors to compare traffic with. Floats are rounded
to 7 significant digits (float32 precision, compact JSON); deciles are numpy's default (linear)
quantiles at 0.1, 0.2, ..., 0.9. Its schema (``F = C * 7 * 7`` block-mean features)::

    "reference": {
      "source": "mnist_reference.npz", "count": 5000,
      "input": {"mean", "std", "min", "max", "channel_mean": [C], "channel_std": [C]},
      "regions": {"grid": [7, 7], "block_rows": [4, ...], "block_cols": [4, ...], "channels": C,
                  "order": "channel, grid row, grid column",
                  "mean": [F], "std": [F], "deciles": [[9] x F]},
      "predictions": {"classes": 10, "counts": [10], "fractions": [10]},
      "confidence": {"mean", "deciles": [9]},        # top-1 probability
      "entropy": {"unit": "nats", "mean", "deciles": [9]},
      "score": {"mean", "deciles": [9]}
    }

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x, p = rng.random((20, 1, 28, 28)), rng.dirichlet(np.ones(10), size=20)
>>> summary = reference_summary(x, p, rng.random(20), source="example")
>>> summary["count"], summary["regions"]["grid"], summary["predictions"]["classes"]
(20, [7, 7], 10)
>>> round_floats([0.123456789, [1 / 3]])
[0.1234568, [0.3333333]]
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from agent.detect.calibration import CalibrationError
from agent.detect.features import REGION_GRID, output_features, region_means

DECILES = tuple(round(0.1 * i, 1) for i in range(1, 10))


def round_floats(value) -> Any:
    """Round floats (or nested lists of them) to 7 significant digits: float32 precision, compact JSON."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [round_floats(v) for v in value]
    return float(f"{float(value):.7g}")


def _deciles(values: np.ndarray, axis: int = 0) -> np.ndarray:
    return np.quantile(np.asarray(values, dtype=np.float64), DECILES, axis=axis)


def reference_summary(x: np.ndarray, probabilities: np.ndarray, scores: np.ndarray,
                      source: str | None = None, grid: int = REGION_GRID) -> dict:
    """Summary statistics of benign reference data, for drift detectors (see the module docstring)."""
    _r = round_floats
    x = np.asarray(x, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    channels_first = x.reshape(x.shape[0], -1, *x.shape[-2:]) if x.ndim >= 3 else None
    summary: dict[str, Any] = {"source": source, "count": len(x)}
    summary["input"] = {"mean": _r(x.mean()), "std": _r(x.std()), "min": _r(x.min()), "max": _r(x.max())}
    if channels_first is not None:
        summary["input"]["channel_mean"] = _r(channels_first.mean(axis=(0, 2, 3)))
        summary["input"]["channel_std"] = _r(channels_first.std(axis=(0, 2, 3)))
        features, row_sizes, col_sizes = region_means(x, grid)
        summary["regions"] = {
            "grid": [grid, grid], "block_rows": row_sizes, "block_cols": col_sizes,
            "channels": int(channels_first.shape[1]), "order": "channel, grid row, grid column",
            "mean": _r(features.mean(axis=0)), "std": _r(features.std(axis=0)),
            "deciles": _r(_deciles(features).T),
        }
    else:
        summary["regions"] = None
    classes = probabilities.shape[1]
    predicted, confidence, entropy = output_features(probabilities)
    counts = np.bincount(predicted, minlength=classes)
    summary["predictions"] = {"classes": int(classes), "counts": counts.tolist(),
                              "fractions": _r(counts / max(len(probabilities), 1))}
    summary["confidence"] = {"mean": _r(confidence.mean()), "deciles": _r(_deciles(confidence))}
    summary["entropy"] = {"unit": "nats", "mean": _r(entropy.mean()), "deciles": _r(_deciles(entropy))}
    summary["score"] = {"mean": _r(np.mean(scores)), "deciles": _r(_deciles(scores))}
    return summary


def load_reference(path: str | Path, input_shape: Iterable[int | str | None] | None = None) -> np.ndarray:
    """Benign inputs from a file, as float32 the model can take.

    - ``.npz``: the array under key ``x``, or the only array in the file; ``.npy``: the array.
    - uint8 values (0..255) are divided by 255; float values are taken as they are; other
      dtypes are refused (say which scale they are in by converting them first).
    - ``[N, H, W]`` gets a channel axis (``[N, 1, H, W]``) when the model's input is ``[N, 1, H, W]``.
    """
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                keys = list(data.keys())
                if "x" in keys:
                    array = data["x"]
                elif len(keys) == 1:
                    array = data[keys[0]]
                else:
                    raise CalibrationError(f"sidewatch: {path} holds {', '.join(keys) or 'no arrays'}; "
                                           "put the inputs under key 'x'")
        elif path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            raise CalibrationError(f"sidewatch: reference data must be .npz or .npy, got {path}")
    except (OSError, ValueError) as err:
        if isinstance(err, CalibrationError):
            raise
        raise CalibrationError(f"sidewatch: cannot read reference data {path}: {err}") from err
    if array.dtype == np.uint8:
        x = array.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(array.dtype, np.floating):
        x = array.astype(np.float32)
    else:
        raise CalibrationError(f"sidewatch: reference data {path} is {array.dtype}; give uint8 (0..255) or floats")
    if input_shape is not None:
        shape = list(input_shape)
        if x.ndim == len(shape) - 1 and len(shape) >= 4 and shape[1] == 1:
            x = x[:, None]
        fits = x.ndim == len(shape) and all(not isinstance(w, int) or w <= 0 or w == g for w, g in zip(shape[1:], x.shape[1:]))
        if not fits:
            wanted = ", ".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in shape[1:])
            raise CalibrationError(f"sidewatch: reference data {path} has shape {list(array.shape)}; "
                                   f"the model wants [N, {wanted}]")
    return x
