"""Calibrating a model: score the benign reference with the fused squeezing detector, set the
threshold at the target false-positive rate, summarise the reference and, unless skipped,
calibrate the drift and anomaly detectors on it (:mod:`agent.detect.drift.calibrate`).

The result is a :class:`~agent.detect.calibration.artifact.CalibrationArtifact`; the
``sidewatch calibrate`` command (agent.cli) writes it beside the model.

>>> import numpy as np
>>> x = np.random.default_rng(0).random((40, 1, 28, 28), dtype=np.float32)
>>> artifact = calibrate("agent/demo/models/mnist_cnn/1/model.onnx", x, "bit_depth:1", 0.1, device="cpu")
>>> artifact.benign_scores["count"], artifact.benign_scores["above_threshold"], artifact.drift
(40, 4, {})
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime

from agent import __version__
from agent.detect.adversarial.graph import FeatureSqueezingDetector
from agent.detect.adversarial.squeeze import Squeezer, parse_squeezers
from agent.detect.calibration import CalibrationError
from agent.detect.calibration.artifact import CalibrationArtifact, model_sha256
from agent.detect.calibration.reference import reference_summary, round_floats
from agent.detect.calibration.threshold import threshold_at_fpr
from agent.detect.drift.calibrate import MINIMUM_REFERENCE, ReferenceFeatures, calibrate_drift
from agent.detect.features import REGION_GRID

log = logging.getLogger(__name__)

DEFAULT_SQUEEZERS = "bit_depth:1,median:2"
DEFAULT_TARGET_FPR = 0.05
SCORE_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


def calibrate(model_path: str | Path | bytes, reference_x: np.ndarray,
              squeezers: str | Iterable[str | Squeezer] = DEFAULT_SQUEEZERS, target_fpr: float = DEFAULT_TARGET_FPR,
              *, output_kind: str = "auto", input_name: str | None = None, output_name: str | None = None,
              device: str = "auto", batch_size: int = 256, reference_source: str | None = None,
              grid: int = REGION_GRID, drift: dict | None = None) -> CalibrationArtifact:
    """Score benign ``reference_x`` with the fused detector and set the threshold at ``target_fpr``.

    ``drift``, when given, holds keyword arguments for agent.detect.drift.calibrate.calibrate_drift
    (``{}`` for its defaults): the drift detectors are calibrated on the same reference.
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
    _r = round_floats
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
    if len(x) < MINIMUM_REFERENCE:
        raise CalibrationError(f"sidewatch: the drift detectors need at least {MINIMUM_REFERENCE} reference inputs, "
                               f"got {len(x)}; give more reference data, or --no-drift")
    return calibrate_drift(ReferenceFeatures.of(x, probabilities, scores), **options)
