"""Calibrating the drift and anomaly detectors on the reference data, and rebuilding them from an artifact.

``sidewatch calibrate`` runs this after scoring the reference with the squeezing detector. Drift is
watched by budgeted moment tests (:mod:`agent.detect.drift.moments`): calibration fits their features
on the reference (means, scales, bin edges, projections) and stores them in the artifact's ``drift``
section, format 2. Nothing here depends on the false-alarm budget or the request rate: the budget is
a setting of ``sidewatch serve`` (``drift.false_alarm_budget``), spent at run time, so changing it needs
no recalibration. Three parts, each one :class:`~agent.detect.drift.moments.MomentFeatures`, so that
each is fed when its data arrives:

``inputs``   the image block means (groups ``continuous`` and ``projections``)
``outputs``  the top-1 confidence and the entropy (their reference-decile bins) and the class shares
``score``    the squeezing detector's score (its reference-decile bins; the scores arrive on their own)

Artifacts of format 1 (sidewatch before the budget: ERT-calibrated detectors counted in requests) are
refused for drift with :class:`OutdatedDriftCalibration`, whose message says how to recalibrate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.detect.anomaly import AnomalyScorer
from agent.detect.drift.fleet import reference_bins
from agent.detect.drift.moments import MomentFeatures
from agent.detect.features import OUTPUT_FEATURES, input_features, output_features, region_names

FORMAT = 2
# Squared random projections of the standardised block means: variance and correlation changes.
PROJECTIONS = 16
# The fewest reference rows drift is calibrated on: deciles and scales need some hundreds, and the anomaly
# scorer holds out 30% to set its threshold at 1%.
MINIMUM_REFERENCE = 500
# Features whose bin counts every replica exports for the fleet PSI, unless configured otherwise.
DEFAULT_FLEET_FEATURES = ("confidence", "entropy", "score")


@dataclass
class ReferenceFeatures:
    """Everything the drift detectors watch, computed on the reference data."""

    regions: np.ndarray       # [N, F] block means of the inputs
    region_names: list[str]
    classes: np.ndarray       # [N] predicted class
    n_classes: int
    confidence: np.ndarray    # [N] top-1 probability
    entropy: np.ndarray       # [N] nats
    scores: np.ndarray        # [N] squeeze scores

    @classmethod
    def of(cls, x: np.ndarray, probabilities: np.ndarray, scores: np.ndarray) -> "ReferenceFeatures":
        regions = input_features(x)
        classes, confidence, entropy = output_features(probabilities)
        channels = regions.shape[1] // len(region_names(1))
        return cls(regions, region_names(channels), classes, probabilities.shape[1], confidence, entropy,
                   np.asarray(scores, dtype=np.float64))

    def scalar(self, name: str) -> np.ndarray:
        if name in ("confidence", "entropy", "score"):
            return {"confidence": self.confidence, "entropy": self.entropy, "score": self.scores}[name]
        return self.regions[:, self.region_names.index(name)]


class OutdatedDriftCalibration(ValueError):
    """An artifact whose drift section an older sidewatch wrote: it cannot be watched under a budget."""


def calibrate_drift(features: ReferenceFeatures, anomaly_fpr: float = 0.01, seed: int = 0) -> dict[str, Any]:
    """Fit the moment features, the anomaly scorer and the fleet bins; returns the artifact's ``drift`` section."""
    if len(features.classes) < MINIMUM_REFERENCE:
        raise ValueError(f"sidewatch: drift calibration needs at least {MINIMUM_REFERENCE} reference inputs, "
                         f"got {len(features.classes)}")
    moments = {
        "inputs": MomentFeatures(projections=PROJECTIONS, seed=seed).fit(
            continuous=features.regions, continuous_names=features.region_names),
        "outputs": MomentFeatures(n_classes=features.n_classes, seed=seed).fit(
            scalars={"confidence": features.confidence, "entropy": features.entropy}, classes=features.classes),
        "score": MomentFeatures(seed=seed).fit(scalars={"score": features.scores}),
    }
    anomaly = AnomalyScorer(target_fpr=anomaly_fpr, seed=seed).fit(features.regions)
    fleet = {name: reference_bins(features.scalar(name))
             for name in (*DEFAULT_FLEET_FEATURES, *features.region_names)}
    return {"format": FORMAT, "region_names": features.region_names,
            "moments": {part: f.calibration_dict() for part, f in moments.items()},
            "anomaly": {"source": "regions", "calibration": anomaly.calibration_dict()}, "fleet_bins": fleet}


def build_moment_features(section: dict[str, Any]) -> dict[str, MomentFeatures]:
    """part -> fitted MomentFeatures, from an artifact's ``drift`` section (format 2)."""
    if section.get("format") != FORMAT or "moments" not in section:
        raise OutdatedDriftCalibration(
            "its drift calibration is from a sidewatch before false-alarm budgets (detectors calibrated to an "
            "expected run time in requests, a false alarm every few hundred requests); drift is now tested "
            "under a budget in time (drift.false_alarm_budget, default 1/30d) and needs a new calibration: "
            "rerun `sidewatch calibrate --model MODEL.onnx --reference REFERENCE.npz` (the squeezing "
            "threshold and everything else in the artifact are unchanged)")
    return {part: MomentFeatures.from_calibration(d) for part, d in section["moments"].items()}


def build_anomaly(section: dict[str, Any]) -> AnomalyScorer:
    return AnomalyScorer.from_calibration(section["anomaly"]["calibration"])


__all__ = ["ReferenceFeatures", "calibrate_drift", "build_moment_features", "build_anomaly", "OutdatedDriftCalibration",
           "OUTPUT_FEATURES"]
