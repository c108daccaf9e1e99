"""Calibration: the feature-squeezing threshold, set on benign data alone, and a reference summary,
kept in a versioned JSON artifact beside the model (``sidewatch-calibration.json``).

The threshold is the one the paper uses: a target false-positive rate on benign inputs (5% by
default). Precisely, with ``n`` benign scores and ``k = floor(target_fpr * n)``, the threshold is the
smallest value with at most ``k`` benign scores strictly above it: the ``(n - k)``-th smallest score
(numpy's ``quantile(scores, 1 - target_fpr, method="inverted_cdf")``). An input is flagged when its
score is strictly above the threshold, so on the calibration data at most ``target_fpr`` is flagged.

The artifact also records summary statistics of the reference data (pixels, region means,
predicted classes, confidence, entropy, scores), for the drift detectors to compare traffic with.
It names the model by sha256, and :func:`load_artifact` refuses to pair it with another model.

Artifact schema (``format_version`` 1; floats in the summaries rounded to 7 significant digits,
the threshold exact)::

    {
      "format_version": 1,
      "kind": "sidewatch-calibration",
      "created_at": "2025-01-01T00:00:00Z",
      "created_by": {"sidewatch": "0.1.0", "onnxruntime": "1.x", "execution_provider": "CPUExecutionProvider"},
      "model": {"file": "model.onnx", "sha256": "...", "input": "input", "output": "probabilities",
                "output_kind": "probabilities", "input_shape": [null, 1, 28, 28], "classes": 10},
      "detector": "feature_squeezing",
      "squeezers": ["bit_depth:1", "median:2"],
      "threshold": 0.0123,                   # flag when score > threshold
      "target_fpr": 0.05,
      "threshold_rule": "...",
      "benign_scores": {"count", "above_threshold", "fpr", "min", "max", "mean", "std",
                        "quantiles": {"0.5": ..., "0.9", "0.95", "0.99", "0.999"}},
      "reference": {
        "source": "mnist_reference.npz", "count": 5000,
        "input": {"mean", "std", "min", "max", "channel_mean": [C], "channel_std": [C]},
        "regions": {"grid": [7, 7], "block_rows": [4, ...], "block_cols": [4, ...], "channels": C,
                    "order": "channel, grid row, grid column",
                    "mean": [F], "std": [F], "deciles": [[9] x F]},   # F = C * 7 * 7 block-mean features
        "predictions": {"classes": 10, "counts": [10], "fractions": [10]},
        "confidence": {"mean", "deciles": [9]},        # top-1 probability
        "entropy": {"unit": "nats", "mean", "deciles": [9]},
        "score": {"mean", "deciles": [9]}
      }
    }

Deciles are numpy's default (linear) quantiles at 0.1, 0.2, ..., 0.9.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.detect.adversarial.graph import (
    FeatureSqueezingDetector,
    FusedModelError,
    ModelSource,
    inspect_model,
    load_model,
)
from agent.detect.adversarial.squeeze import (
    Squeezer,
    SqueezerSpecError,
    format_squeezers,
    parse_squeezers,
)
from agent.detect.features import REGION_GRID, output_features, region_means
from agent.durable import write_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARTIFACT_KIND = "sidewatch-calibration"
ARTIFACT_FILE = "sidewatch-calibration.json"
DEFAULT_SQUEEZERS = "bit_depth:1,median:2"
DEFAULT_TARGET_FPR = 0.05
THRESHOLD_RULE = ("smallest threshold with at most floor(target_fpr * n) of the n benign scores strictly above it; "
                  "flag when score > threshold")
DECILES = tuple(round(0.1 * i, 1) for i in range(1, 10))
SCORE_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


class CalibrationError(ValueError):
    """A calibration that cannot be made, or an artifact that cannot be used."""


# --- the threshold and the summaries -------------------------------------------------------------


def threshold_at_fpr(scores: np.ndarray, target_fpr: float) -> float:
    """The smallest threshold with at most ``floor(target_fpr * n)`` of ``scores`` strictly above it."""
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if scores.size == 0:
        raise CalibrationError("sidewatch: no benign scores to set a threshold on")
    if not 0.0 <= target_fpr < 1.0:
        raise CalibrationError(f"sidewatch: target false-positive rate must be in [0, 1), got {target_fpr}")
    # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28.
    allowed_above = math.floor(target_fpr * scores.size + 1e-9)
    return float(scores[scores.size - 1 - allowed_above])


def _r(value) -> Any:
    """Round floats (or nested lists of them) to 7 significant digits: float32 precision, compact JSON."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_r(v) for v in value]
    return float(f"{float(value):.7g}")


def _deciles(values: np.ndarray, axis: int = 0) -> np.ndarray:
    return np.quantile(np.asarray(values, dtype=np.float64), DECILES, axis=axis)


def reference_summary(x: np.ndarray, probabilities: np.ndarray, scores: np.ndarray,
                      source: str | None = None, grid: int = REGION_GRID) -> dict:
    """Summary statistics of benign reference data, for drift detectors (see the module docstring)."""
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


# --- the artifact --------------------------------------------------------------------------------


def model_sha256(model: str | Path | bytes) -> str:
    """sha256 of a model file (or of serialized model bytes)."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(model)).hexdigest()
    digest = hashlib.sha256()
    with open(model, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CalibrationArtifact:
    """A calibrated feature-squeezing detector for one model: the JSON artifact, as an object."""

    model: dict                 # file, sha256, input, output, output_kind, input_shape, classes
    squeezers: list[str]
    threshold: float
    target_fpr: float
    benign_scores: dict
    reference: dict
    created_at: str = ""
    created_by: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    kind: str = ARTIFACT_KIND
    detector: str = "feature_squeezing"
    threshold_rule: str = THRESHOLD_RULE
    # The drift and anomaly detectors' calibration (agent.detect.drift.calibrate); empty when skipped.
    drift: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        order = ["format_version", "kind", "created_at", "created_by", "model", "detector", "squeezers",
                 "threshold", "target_fpr", "threshold_rule", "benign_scores", "reference", "drift"]
        return {key: data[key] for key in order}

    @classmethod
    def from_dict(cls, data: dict, source: str = "the artifact") -> CalibrationArtifact:
        if not isinstance(data, dict) or data.get("kind") != ARTIFACT_KIND:
            raise CalibrationError(f"sidewatch: {source} is not a sidewatch calibration artifact "
                                   f"(no \"kind\": \"{ARTIFACT_KIND}\")")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CalibrationError(f"sidewatch: {source} has format_version {version!r}; this sidewatch reads "
                                   f"versions up to {FORMAT_VERSION} (upgrade sidewatch, or recalibrate)")
        missing = [key for key in ("model", "squeezers", "threshold", "target_fpr", "benign_scores", "reference")
                   if key not in data]
        if missing or "sha256" not in data.get("model", {}):
            raise CalibrationError(f"sidewatch: {source} lacks {', '.join(missing) or 'model.sha256'}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})

    def make_detector(self, model: ModelSource, device: str = "auto", **options) -> FeatureSqueezingDetector:
        """A detector with this artifact's squeezers, model I/O, output kind and threshold."""
        return FeatureSqueezingDetector(model, self.squeezers, output_kind=self.model["output_kind"],
                                        input_name=self.model["input"], output_name=self.model["output"],
                                        device=device, threshold=self.threshold, **options)


def _to_json(value, indent: str = "") -> str:
    """JSON with one key per line but each list of scalars on one line: readable, and diffs stay small."""
    inner = indent + "  "
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(key)}: {_to_json(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(inner + _to_json(item, inner) for item in value) + "\n" + indent + "]"
    return json.dumps(value, separators=(", ", ": "))


def save_artifact(artifact: CalibrationArtifact, path: str | Path) -> Path:
    """Write the artifact as JSON (atomically: a reader never sees half a file)."""
    return write_atomic(Path(path), _to_json(artifact.to_dict()) + "\n")


def load_artifact(path: str | Path, model_path: str | Path | bytes | None) -> CalibrationArtifact:
    """Read an artifact and check that it belongs to the model at ``model_path`` (same sha256).

    ``model_path=None`` skips the check (to inspect an artifact on its own); a mismatch raises a
    CalibrationError naming both hashes and both files, because a threshold set for one model means
    nothing for another.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CalibrationError(f"sidewatch: cannot read calibration artifact {path}: {err}") from err
    artifact = CalibrationArtifact.from_dict(data, str(path))
    if model_path is not None:
        actual = model_sha256(model_path)
        expected = artifact.model["sha256"]
        if actual != expected:
            model_name = "the given model bytes" if isinstance(model_path, (bytes, bytearray, memoryview)) else str(model_path)
            raise CalibrationError(
                f"sidewatch: calibration {path} was made for model file {artifact.model.get('file')!r} with sha256 "
                f"{expected}, but {model_name} has sha256 {actual}; recalibrate: "
                f"sidewatch calibrate --model {model_name} --reference DATA.npz")
    return artifact


# --- calibrating ----------------------------------------------------------------------------------


def calibrate(model_path: str | Path | bytes, reference_x: np.ndarray,
              squeezers: str | Iterable[str | Squeezer] = DEFAULT_SQUEEZERS, target_fpr: float = DEFAULT_TARGET_FPR,
              *, output_kind: str = "auto", input_name: str | None = None, output_name: str | None = None,
              device: str = "auto", batch_size: int = 256, reference_source: str | None = None,
              grid: int = REGION_GRID, drift: dict | None = None) -> CalibrationArtifact:
    """Score benign ``reference_x`` with the fused detector and set the threshold at ``target_fpr``.

    ``drift``, when given, holds keyword arguments for agent.detect.drift.calibrate.calibrate_drift
    (e.g. ``{"ert": 500, "window": 100}``): the drift detectors are calibrated on the same reference.
    """
    if not 0.0 <= target_fpr < 1.0:
        raise CalibrationError(f"sidewatch: target false-positive rate must be in [0, 1), got {target_fpr}")
    reference_x = np.asarray(reference_x, dtype=np.float32)
    if reference_x.ndim == 0 or len(reference_x) == 0:
        raise CalibrationError("sidewatch: the reference data is empty")
    squeezers = parse_squeezers(squeezers)
    model_bytes = bytes(model_path) if isinstance(model_path, (bytes, bytearray, memoryview)) else Path(model_path).read_bytes()
    detector = FeatureSqueezingDetector(model_bytes, squeezers, output_kind=output_kind, input_name=input_name,
                                        output_name=output_name, device=device, max_batch=batch_size)
    result = detector.score(reference_x)
    threshold = threshold_at_fpr(result.scores, target_fpr)
    if target_fpr * len(reference_x) < 10:
        log.warning("sidewatch: only %d reference inputs for a %.3g false-positive rate: the threshold is rough",
                    len(reference_x), target_fpr)
    info = detector.info
    scores = result.scores.astype(np.float64)
    above = int((scores > threshold).sum())
    import onnxruntime

    from agent import __version__

    return CalibrationArtifact(
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        created_by={"sidewatch": __version__, "onnxruntime": onnxruntime.__version__,
                    "execution_provider": detector.session.get_providers()[0]},
        model={"file": None if isinstance(model_path, (bytes, bytearray, memoryview)) else Path(model_path).name,
               "sha256": model_sha256(model_bytes), "input": info.input_name, "output": info.output_name,
               "output_kind": info.output_kind,
               "input_shape": [d if isinstance(d, int) and d > 0 else None for d in info.input_shape],
               "classes": int(result.probabilities.shape[1])},
        squeezers=[str(s) for s in squeezers],
        threshold=threshold,
        target_fpr=target_fpr,
        benign_scores={"count": int(scores.size), "above_threshold": above, "fpr": _r(above / scores.size),
                       "min": _r(scores.min()), "max": _r(scores.max()), "mean": _r(scores.mean()),
                       "std": _r(scores.std()),
                       "quantiles": {str(q): _r(np.quantile(scores, q)) for q in SCORE_QUANTILES}},
        reference=reference_summary(reference_x, result.probabilities, scores, reference_source, grid),
        drift=_calibrate_drift(reference_x, result.probabilities, scores, drift) if drift is not None else {},
    )


def _calibrate_drift(x: np.ndarray, probabilities: np.ndarray, scores: np.ndarray, options: dict) -> dict:
    from agent.detect.drift.calibrate import ReferenceFeatures, calibrate_drift, minimum_reference

    needed = minimum_reference(options.get("window", 100))
    if len(x) < needed:
        raise CalibrationError(f"sidewatch: the drift detectors need at least {needed} reference inputs for a "
                               f"window of {options.get('window', 100)}, got {len(x)}; give more reference data, "
                               f"a smaller --drift-window, or --no-drift")
    return calibrate_drift(ReferenceFeatures.of(x, probabilities, scores), **options)


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


def default_artifact_path(model_path: str | Path) -> Path:
    """Where an artifact goes by default: ``sidewatch-calibration.json`` beside the model."""
    return Path(model_path).with_name(ARTIFACT_FILE)


def run_calibrate(args) -> int:
    """The ``sidewatch calibrate`` command (arguments from agent.cli)."""
    try:
        model = load_model(args.model)
        info = inspect_model(model, args.input_name, args.output_name, args.output_kind)
        x = load_reference(args.reference, info.input_shape)
        artifact = calibrate(args.model, x, args.squeezers, args.target_fpr, output_kind=args.output_kind,
                             input_name=args.input_name, output_name=args.output_name, device=args.device,
                             reference_source=Path(args.reference).name,
                             drift=None if args.no_drift else {"ert": args.ert, "window": args.drift_window})
        out = save_artifact(artifact, args.out or default_artifact_path(args.model))
    except (CalibrationError, FusedModelError, SqueezerSpecError, OSError) as err:
        print(err if str(err).startswith("sidewatch:") else f"sidewatch: {err}", file=sys.stderr)
        return 2
    scores = artifact.benign_scores
    print(f"sidewatch: calibrated {args.model} on {scores['count']} reference inputs with "
          f"{format_squeezers(parse_squeezers(artifact.squeezers))}: threshold {artifact.threshold:.6g} "
          f"({scores['above_threshold']} of {scores['count']} benign scores above it; target FPR {artifact.target_fpr:g})")
    print(f"sidewatch: wrote {out}")
    return 0
