"""Calibrating a model: score the benign reference with the fused detector, set the threshold at the
target false-positive rate, summarise the reference and, unless skipped, calibrate the drift and
anomaly detectors on it (:mod:`agent.detect.drift.calibrate`).

With the autoencoder detector (``autoencoder=TrainingRecipe()``; ``sidewatch calibrate`` adds it unless
told ``--detectors feature_squeezing``), the reference is split by a seeded permutation: the autoencoder
is trained on one part (in numpy, agent.detect.calibration.autoencoder_training), and both detectors'
thresholds are set jointly on the other part, which the autoencoder never saw (its error on its own
training rows would be too low, and so would the thresholds). The score the drift detectors compare
traffic with comes from that part too.

The result is a :class:`~agent.detect.calibration.artifact.CalibrationArtifact`; the
``sidewatch calibrate`` command (agent.cli) writes it beside the model.

>>> import numpy as np
>>> x = np.random.default_rng(0).random((40, 1, 28, 28), dtype=np.float32)
>>> artifact = calibrate("agent/demo/models/mnist_cnn/1/model.onnx", x, "bit_depth:1", 0.1, device="cpu")
>>> artifact.benign_scores["count"], artifact.benign_scores["above_threshold"], artifact.drift
(40, 4, {})
>>> artifact.detector, artifact.threshold == artifact.detectors[0]["threshold"]
('feature_squeezing', True)
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime

from agent import __version__
from agent.detect.adversarial.autoencoder import ERRORS
from agent.detect.adversarial.graph import AUTOENCODER, SQUEEZING, FeatureSqueezingDetector
from agent.detect.adversarial.squeeze import Squeezer, parse_squeezers
from agent.detect.calibration import CalibrationError
from agent.detect.calibration.artifact import CalibrationArtifact, autoencoder_entry_fields, model_sha256
from agent.detect.calibration.autoencoder_export import export_onnx
from agent.detect.calibration.autoencoder_training import TrainingRecipe, train_autoencoder
from agent.detect.calibration.reference import reference_summary, round_floats
from agent.detect.calibration.threshold import JOINT_THRESHOLD_RULE, THRESHOLD_RULE, joint_thresholds, threshold_at_fpr
from agent.detect.drift.calibrate import MINIMUM_REFERENCE, ReferenceFeatures, calibrate_drift
from agent.detect.features import REGION_GRID

log = logging.getLogger(__name__)

DEFAULT_SQUEEZERS = "bit_depth:1,median:2"
DEFAULT_TARGET_FPR = 0.05
SCORE_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
DEFAULT_AUTOENCODER_ERROR = "l2"
# The share of the reference that calibrates the thresholds when the autoencoder trains on the rest.
DEFAULT_CALIBRATION_SHARE = 0.4
MINIMUM_AUTOENCODER_ROWS = 100
SPLIT_RULE = ("a permutation of the reference rows seeded with `seed`: its first calibration_rows set the detectors' "
              "thresholds, the rest train the autoencoder")


def calibrate(model_path: str | Path | bytes, reference_x: np.ndarray,
              squeezers: str | Iterable[str | Squeezer] = DEFAULT_SQUEEZERS, target_fpr: float = DEFAULT_TARGET_FPR,
              *, output_kind: str = "auto", input_name: str | None = None, output_name: str | None = None,
              device: str = "auto", batch_size: int = 256, reference_source: str | None = None,
              grid: int = REGION_GRID, drift: dict | None = None, autoencoder: TrainingRecipe | None = None,
              autoencoder_error: str = DEFAULT_AUTOENCODER_ERROR, calibration_share: float = DEFAULT_CALIBRATION_SHARE,
              split_seed: int = 0) -> CalibrationArtifact:
    """Score benign ``reference_x`` with the fused detector and set the threshold at ``target_fpr``.

    ``autoencoder``, when given, trains the autoencoder detector on ``1 - calibration_share`` of the
    reference and sets both detectors' thresholds jointly on the rest. ``drift``, when given, holds
    keyword arguments for agent.detect.drift.calibrate.calibrate_drift (``{}`` for its defaults): the
    drift detectors are calibrated on the same reference.
    """
    if not 0.0 <= target_fpr < 1.0:
        raise CalibrationError(f"sidewatch: target false-positive rate must be in [0, 1), got {target_fpr}")
    reference_x = np.asarray(reference_x, dtype=np.float32)
    if reference_x.ndim == 0 or len(reference_x) == 0:
        raise CalibrationError("sidewatch: the reference data is empty")
    squeezers = parse_squeezers(squeezers)
    if drift is not None and len(reference_x) < MINIMUM_REFERENCE:  # before any training
        raise CalibrationError(f"sidewatch: the drift detectors need at least {MINIMUM_REFERENCE} reference inputs, "
                               f"got {len(reference_x)}; give more reference data, or --no-drift")
    model_bytes = bytes(model_path) if isinstance(model_path, (bytes, bytearray, memoryview)) else Path(model_path).read_bytes()
    options = {"output_kind": output_kind, "input_name": input_name, "output_name": output_name, "device": device,
               "max_batch": batch_size}
    if autoencoder is None:
        detector = FeatureSqueezingDetector(model_bytes, squeezers, **options)
        result = detector.score(reference_x)
        calibration_rows = np.arange(len(reference_x))
        threshold = threshold_at_fpr(result.scores, target_fpr)
        combined = result.scores.astype(np.float64)
        detectors = [{"name": SQUEEZING, "threshold": threshold}]
        split: dict = {}
    else:
        if autoencoder_error not in ERRORS:
            raise CalibrationError(f"sidewatch: the autoencoder's error must be one of {', '.join(ERRORS)}, "
                                   f"got {autoencoder_error!r}")
        calibration_rows, fit_rows = split_reference(len(reference_x), calibration_share, split_seed)
        info = FeatureSqueezingDetector(model_bytes, squeezers, **options).info
        graph = _train_autoencoder(reference_x[fit_rows], autoencoder, info.opset)
        detector = FeatureSqueezingDetector(model_bytes, squeezers, autoencoder=graph,
                                            autoencoder_error=autoencoder_error, **options)
        result = detector.score(reference_x)
        benign = result.detector_scores[calibration_rows]
        thresholds = joint_thresholds(benign, target_fpr)
        # The score as the fused graph computes it (float32 division, then the largest), so that the counts
        # below are the sidecar's own.
        combined = (benign / thresholds.astype(np.float32)).max(axis=1).astype(np.float64)
        threshold = 1.0
        detectors = [{"name": SQUEEZING, "threshold": float(thresholds[0])},
                     {"name": AUTOENCODER, "threshold": float(thresholds[1]), "error": autoencoder_error,
                      "training": {**autoencoder.as_dict(), "rows": len(fit_rows)}, **autoencoder_entry_fields(graph)}]
        split = {"rows": len(reference_x), "calibration_rows": len(calibration_rows), "autoencoder_rows": len(fit_rows),
                 "seed": split_seed, "rule": SPLIT_RULE}
    if target_fpr * len(calibration_rows) < 10:
        log.warning("sidewatch: only %d reference inputs to calibrate on for a %.3g false-positive rate: the "
                    "threshold is rough", len(calibration_rows), target_fpr)
    for entry, column in zip(detectors, result.detector_scores[calibration_rows].T):
        entry["benign_scores"] = score_summary(column, entry["threshold"])
    info = detector.info
    return CalibrationArtifact(
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        created_by={"sidewatch": __version__, "onnxruntime": onnxruntime.__version__,
                    "execution_provider": detector.session.get_providers()[0]},
        model={"file": None if isinstance(model_path, (bytes, bytearray, memoryview)) else Path(model_path).name,
               "sha256": model_sha256(model_bytes), "input": info.input_name, "output": info.output_name,
               "output_kind": info.output_kind,
               "input_shape": [d if isinstance(d, int) and d > 0 else None for d in info.input_shape],
               "classes": int(result.probabilities.shape[1])},
        detector="+".join(entry["name"] for entry in detectors),
        squeezers=[str(s) for s in squeezers],
        threshold=threshold,
        target_fpr=target_fpr,
        threshold_rule=THRESHOLD_RULE if autoencoder is None else JOINT_THRESHOLD_RULE,
        benign_scores=score_summary(combined, threshold),
        detectors=detectors,
        split=split,
        reference=reference_summary(reference_x, result.probabilities, combined, reference_source, grid),
        drift=_calibrate_drift(reference_x, result.probabilities, combined, drift) if drift is not None else {},
    )


def split_reference(rows: int, calibration_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration rows, autoencoder rows): a seeded permutation of ``range(rows)``, cut at the share."""
    if not 0.0 < calibration_share < 1.0:
        raise CalibrationError(f"sidewatch: the calibration share must be in (0, 1), got {calibration_share}")
    order = np.random.default_rng(seed).permutation(rows)
    cut = int(round(calibration_share * rows))
    if cut < 1 or rows - cut < MINIMUM_AUTOENCODER_ROWS:
        raise CalibrationError(f"sidewatch: {rows} reference inputs are too few for the autoencoder detector: it "
                               f"trains on {rows - cut} and needs at least {MINIMUM_AUTOENCODER_ROWS}; give more "
                               "reference data, or --detectors feature_squeezing")
    return np.sort(order[:cut]), np.sort(order[cut:])


def score_summary(scores: np.ndarray, threshold: float) -> dict:
    """count, how many are above the threshold, and the distribution of benign scores."""
    scores = np.asarray(scores, dtype=np.float64)
    above = int((scores > threshold).sum())
    _r = round_floats
    return {"count": int(scores.size), "above_threshold": above, "fpr": _r(above / scores.size),
            "min": _r(scores.min()), "max": _r(scores.max()), "mean": _r(scores.mean()), "std": _r(scores.std()),
            "quantiles": {str(q): _r(np.quantile(scores, q)) for q in SCORE_QUANTILES}}


def _train_autoencoder(x: np.ndarray, recipe: TrainingRecipe, opset: int) -> bytes:
    started = time.perf_counter()
    net = train_autoencoder(x, recipe)
    graph = export_onnx(net, x.shape[1:], opset)
    log.info("sidewatch: trained the autoencoder detector on %d reference inputs in %.0f s", len(x),
             time.perf_counter() - started)
    return graph


def _calibrate_drift(x: np.ndarray, probabilities: np.ndarray, scores: np.ndarray, options: dict) -> dict:
    # The scores may be fewer than the rows: with the autoencoder, only those of the rows it never saw.
    return calibrate_drift(ReferenceFeatures.of(x, probabilities, scores), **options)
