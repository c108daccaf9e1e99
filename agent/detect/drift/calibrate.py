"""Calibrating the drift and anomaly detectors on the reference data, and rebuilding them from an artifact.

``sidewatch calibrate`` runs this after scoring the reference with the squeezing detector: every
threshold (each set for the configured expected run time by simulation) is computed here, at
calibration time, and stored in the artifact's ``drift`` section, so the sidecar only loads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.detect.anomaly import AnomalyScorer
from agent.detect.drift.change import AdwinChange, PageHinkleyChange
from agent.detect.drift.fleet import reference_bins
from agent.detect.drift.mmd import OnlineMMD
from agent.detect.drift.prediction import ClassMixDrift, ScalarWindowDrift
from agent.detect.drift.univariate import WindowedCVM
from agent.detect.features import OUTPUT_FEATURES, input_features, output_features, region_names

DETECTOR_CLASSES = {cls.__name__: cls for cls in (WindowedCVM, OnlineMMD, ClassMixDrift, ScalarWindowDrift,
                                                  PageHinkleyChange, AdwinChange)}

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


# Reference points the online MMD keeps; it holds out the rest to simulate no-drift streams.
MMD_REFERENCE_POINTS = 300


def minimum_reference(window: int) -> int:
    """Reference inputs the drift calibration needs: the MMD keeps some and simulates streams from the rest."""
    return MMD_REFERENCE_POINTS + 2 * window


def calibrate_drift(features: ReferenceFeatures, ert: float = 500.0, window: int = 100,
                    anomaly_fpr: float = 0.01, seed: int = 0) -> dict[str, Any]:
    """Fit and calibrate every drift detector; returns the artifact's ``drift`` section."""
    plans: list[tuple[str, str, Any, Any]] = [
        # (name, source, detector, fit argument)
        ("inputs_cvm", "regions", WindowedCVM(window=window, ert=ert, seed=seed), features.regions),
        ("inputs_mmd", "regions", OnlineMMD(ert=ert, window_size=window, n_ref=MMD_REFERENCE_POINTS, seed=seed),
         features.regions),
        ("class_mix", "classes", ClassMixDrift(window=max(window, 2 * features.n_classes * 10), ert=ert, seed=seed),
         None),
        ("confidence", "confidence", ScalarWindowDrift(window=window, ert=ert, seed=seed), features.confidence),
        ("entropy", "entropy", ScalarWindowDrift(window=window, ert=ert, seed=seed), features.entropy),
        ("score_change", "score", PageHinkleyChange(ert=ert, seed=seed), features.scores),
        ("confidence_change", "confidence", AdwinChange(seed=seed), features.confidence),
    ]
    detectors = {}
    for name, source, detector, reference in plans:
        if name == "class_mix":
            detector.fit(features.classes, n_classes=features.n_classes)
        else:
            detector.fit(reference)
        detectors[name] = {"class": type(detector).__name__, "source": source,
                           "calibration": detector.calibration_dict()}
    anomaly = AnomalyScorer(target_fpr=anomaly_fpr, seed=seed).fit(features.regions)
    fleet = {name: reference_bins(features.scalar(name))
             for name in (*DEFAULT_FLEET_FEATURES, *features.region_names)}
    return {"ert": ert, "window": window, "region_names": features.region_names, "detectors": detectors,
            "anomaly": {"source": "regions", "calibration": anomaly.calibration_dict()}, "fleet_bins": fleet}


def build_detectors(section: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """name -> (source, detector) from an artifact's ``drift`` section."""
    built = {}
    for name, entry in section["detectors"].items():
        cls = DETECTOR_CLASSES.get(entry["class"])
        if cls is None:
            raise ValueError(f"sidewatch: drift detector {name} has an unknown class {entry['class']!r}")
        built[name] = (entry["source"], cls.from_calibration(entry["calibration"]))
    return built


def build_anomaly(section: dict[str, Any]) -> AnomalyScorer:
    return AnomalyScorer.from_calibration(section["anomaly"]["calibration"])


__all__ = ["ReferenceFeatures", "calibrate_drift", "build_detectors", "build_anomaly", "OUTPUT_FEATURES"]
