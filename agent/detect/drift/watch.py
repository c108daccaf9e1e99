"""Drift and anomaly detection on live traffic: a tap sink, one set of detectors per model version.

Every tapped inference of a calibrated model version feeds its detectors: the block means of the
input, the predicted class, the top-1 confidence and the entropy of the output, and (from the
squeezing detector) the adversarial score. Metrics are refreshed at most once a second, not per
request. Detector state is checkpointed to disk periodically and at shutdown, and restored at start,
so a restart does not reset the windows.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from pathlib import Path

import numpy as np

from agent.config import Drift
from agent.dataplane.tap import TappedInference
from agent.detect.drift.calibrate import build_anomaly, build_detectors
from agent.detect.drift.fleet import FleetBins
from agent.detect.drift.window import TimeWindowPSI
from agent.detect.features import input_features, output_features, softmax
from agent.detect.registry import CalibratedDetector, DetectorRegistry
from agent.durable import fsync_directory, write_atomic
from agent.metrics import BoundedModels, DriftMetrics

log = logging.getLogger(__name__)


class ModelDrift:
    """The drift detectors of one calibrated model version, and their metrics."""

    def __init__(self, calibrated: CalibratedDetector, metrics: DriftMetrics, labels: tuple[str, str],
                 top_k: int, fleet_features: list[str], window_seconds: float | None = None,
                 psi_threshold: float = 0.2, batch_rows: int = 64) -> None:
        section = calibrated.artifact.drift
        self.calibrated = calibrated
        self.labels = labels
        self.metrics = metrics
        self.top_k = top_k
        self.detectors = build_detectors(section)
        self.anomaly = build_anomaly(section)
        self.region_names: list[str] = section["region_names"]
        fleet = {name: section["fleet_bins"][name] for name in fleet_features if name in section["fleet_bins"]}
        self.fleet = FleetBins(fleet, metrics, *labels)
        # One PSI over the last T seconds per fleet feature, when a time window is configured.
        self.time_windows = {} if window_seconds is None else {
            name: TimeWindowPSI(bins["edges"], bins["ratios"], window_seconds, psi_threshold)
            for name, bins in fleet.items()}
        self._was_drifting: dict[str, bool] = {}
        self.seen = 0
        self.batch_rows = batch_rows
        self._pending_x: list[np.ndarray] = []
        self._pending_p: list[np.ndarray] = []
        self._pending_rows = 0
        self._exported_features: dict[str, set[str]] = {}
        metrics.anomaly_threshold.labels(*labels).set(self.anomaly.threshold_)
        for name, (_, detector) in self.detectors.items():
            ert = getattr(detector, "ert", None)
            if ert is not None:
                metrics.expected_run_time.labels(*labels, name).set(ert)

    def observe(self, inference: TappedInference) -> None:
        artifact_model = self.calibrated.artifact.model
        x = inference.inputs.get(artifact_model["input"])
        logits = inference.outputs.get(artifact_model["output"])
        if x is None or logits is None:
            self.metrics.skipped.labels(*self.labels, "missing_tensor").inc()
            return
        x, probabilities = np.asarray(x), np.asarray(logits)
        if not self._fits(x, probabilities):
            self.metrics.skipped.labels(*self.labels, "wrong_shape").inc()
            return
        if len(x) == 0:
            return  # an empty batch (shape [0, ...]) is valid and holds nothing to watch
        x = x.astype(np.float64, copy=False)
        probabilities = probabilities.astype(np.float64, copy=False)
        if artifact_model.get("output_kind") == "logits":
            probabilities = softmax(probabilities)
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1) & np.isfinite(probabilities).all(axis=1)
        if not finite.all():
            self.metrics.skipped.labels(*self.labels, "non_finite").inc(int((~finite).sum()))
            x, probabilities = x[finite], probabilities[finite]
        if len(x) == 0:
            return
        if self._pending_x and self._pending_x[0].shape[1:] != x.shape[1:]:
            self.flush()  # rows of another size (a model with dynamic dimensions) cannot share a batch
        # Detectors cost tens of microseconds per call but a few per row in a batch: gather rows,
        # update in micro-batches (results are the same as one row at a time).
        self._pending_x.append(x)
        self._pending_p.append(probabilities)
        self._pending_rows += len(x)
        if self._pending_rows >= self.batch_rows:
            self.flush()

    def _fits(self, x: np.ndarray, probabilities: np.ndarray) -> bool:
        """Whether a copy has the calibrated model's shapes. A model server may take other shapes (or
        datatypes); such rows would break the micro-batch they join, good rows included."""
        if not self.calibrated.fits_input(x) or probabilities.dtype.kind not in "biuf":
            return False
        classes = self.calibrated.artifact.model.get("classes")
        return probabilities.ndim == 2 and len(probabilities) == len(x) and probabilities.shape[1] == (
            classes or probabilities.shape[1])

    def flush(self) -> None:
        """Feed the gathered rows to every detector."""
        if not self._pending_rows:
            return
        x = np.concatenate(self._pending_x) if len(self._pending_x) > 1 else self._pending_x[0]
        probabilities = np.concatenate(self._pending_p) if len(self._pending_p) > 1 else self._pending_p[0]
        self._pending_x, self._pending_p, self._pending_rows = [], [], 0
        regions = input_features(x)
        classes, confidence, entropy = output_features(probabilities)
        sources = {"regions": regions, "classes": classes, "confidence": confidence, "entropy": entropy}
        for source, detector in self.detectors.values():
            if source in sources:
                detector.update(sources[source])
        scores = self.anomaly.score(regions)
        histogram = self.metrics.anomaly_score.labels(*self.labels)
        for score in scores.tolist():
            histogram.observe(score)
        flagged = int(np.count_nonzero(scores > self.anomaly.threshold_))
        if flagged:
            self.metrics.anomalies.labels(*self.labels).inc(flagged)
        for feature in self.fleet.features:
            if feature in ("confidence", "entropy"):
                self._observe_feature(feature, sources[feature])
            elif feature in self.region_names:
                self._observe_feature(feature, regions[:, self.region_names.index(feature)])
        self.metrics.samples.labels(*self.labels).inc(len(x))
        self.seen += len(x)

    def observe_scores(self, scores: np.ndarray) -> None:
        for source, detector in self.detectors.values():
            if source == "score":
                detector.update(scores)
        if "score" in self.fleet.features:
            self._observe_feature("score", scores)

    def _observe_feature(self, feature: str, values: np.ndarray) -> None:
        self.fleet.observe(feature, values)
        if feature in self.time_windows:
            self.time_windows[feature].update(values)

    def export(self) -> None:
        """Statistic, threshold, p-value and drift flag of every detector, as gauges."""
        m = self.metrics
        if not self.seen:
            return  # nothing to report for a version no traffic has reached
        for name, (_, detector) in self.detectors.items():
            result = detector.result
            if result is None:
                continue
            drifting = bool(np.any(result.drift))
            if drifting and not self._was_drifting.get(name, False):
                m.alarms.labels(*self.labels, name).inc()
            self._was_drifting[name] = drifting
            if np.ndim(result.statistic) == 0:
                self._set(name, "all", result.statistic, result.threshold, result.p_value, result.drift)
            else:
                self._export_per_feature(name, result)
        for feature, window in self.time_windows.items():
            result = window.result
            if result.statistic == result.statistic:  # NaN while the window is empty
                self._set("psi_time_window", feature, result.statistic, result.threshold, None, result.drift)

    def _export_per_feature(self, name: str, result) -> None:
        statistic = np.asarray(result.statistic, dtype=np.float64)
        threshold = np.broadcast_to(np.asarray(result.threshold, dtype=np.float64), statistic.shape)
        p_values = None if result.p_value is None else np.broadcast_to(np.asarray(result.p_value), statistic.shape)
        # The detector as a whole: the feature closest to (or furthest over) its threshold.
        ratio = np.where(threshold > 0, statistic / np.where(threshold > 0, threshold, 1), 0.0)
        worst = int(np.argmax(ratio))
        self._set(name, "all", statistic[worst], threshold[worst],
                  None if p_values is None else np.min(p_values), np.any(result.drift))
        # Per-feature series only for the top-k by statistic/threshold; features that drop out are removed.
        top = {self.region_names[i] if i < len(self.region_names) else str(i): i
               for i in np.argsort(-ratio)[:self.top_k]}
        for feature in self._exported_features.get(name, set()) - set(top):
            for gauge in (self.metrics.statistic, self.metrics.threshold, self.metrics.p_value, self.metrics.drift):
                try:
                    gauge.remove(*self.labels, name, feature)
                except KeyError:
                    pass
        for feature, i in top.items():
            self._set(name, feature, statistic[i], threshold[i], None if p_values is None else p_values[i],
                      bool(np.asarray(result.drift).reshape(-1)[i]))
        self._exported_features[name] = set(top)

    def _set(self, name, feature, statistic, threshold, p_value, drift) -> None:
        labels = (*self.labels, name, feature)
        self.metrics.statistic.labels(*labels).set(float(statistic))
        self.metrics.threshold.labels(*labels).set(float(threshold))
        if p_value is not None and np.isfinite(p_value):
            self.metrics.p_value.labels(*labels).set(float(p_value))
        self.metrics.drift.labels(*labels).set(1.0 if bool(np.any(drift)) else 0.0)

    def state(self) -> dict:
        self.flush()
        return {"model_sha256": self.calibrated.artifact.model["sha256"],
                "detectors": {name: detector.state_dict() for name, (_, detector) in self.detectors.items()},
                "time_windows": {name: window.state_dict() for name, window in self.time_windows.items()}}

    def restore(self, state: dict) -> bool:
        if state.get("model_sha256") != self.calibrated.artifact.model["sha256"]:
            return False  # state of another model: start afresh
        for name, detector_state in state.get("detectors", {}).items():
            if name in self.detectors:
                self.detectors[name][1].load_state_dict(detector_state)
        for name, window_state in state.get("time_windows", {}).items():
            if name in self.time_windows:
                self.time_windows[name].load_state_dict(window_state)
        return True


class DriftWatch:
    """The tap sink: routes each inference to its model version's detectors; checkpoints their state."""

    def __init__(self, registry: DetectorRegistry, settings: Drift, metrics: DriftMetrics,
                 bounded: BoundedModels) -> None:
        self._registry = registry
        self._checkpoint_dir = settings.checkpoint_dir
        self._checkpoint_interval = settings.checkpoint_interval_seconds
        self._export_interval = settings.export_interval_seconds
        self._last_checkpoint = self._last_export = time.monotonic()
        # Adversarial scores arrive from the detector's threads; the tap thread feeds them to the
        # detectors (which are not thread-safe) at its next tick.
        self._pending_scores: collections.deque = collections.deque(maxlen=10_000)
        self.models: dict[tuple[str, str], ModelDrift] = {}
        for calibrated in registry:
            if not calibrated.artifact.drift:
                log.warning("sidewatch: %s version %s has no drift calibration (rerun sidewatch calibrate); "
                            "drift is not watched", calibrated.model, calibrated.version)
                continue
            labels = bounded(calibrated.model, calibrated.version)
            model = ModelDrift(calibrated, metrics, labels, settings.top_k_features, list(settings.fleet_features),
                               settings.window_seconds, settings.psi_threshold)
            self.models[(calibrated.model, calibrated.version)] = model
            self._restore(model)

    def _model(self, model: str, version: str) -> ModelDrift | None:
        calibrated = self._registry.get(model, version)
        return None if calibrated is None else self.models.get((calibrated.model, calibrated.version))

    def __call__(self, inference: TappedInference) -> None:
        model = self._model(inference.model, inference.version)
        if model is not None:
            model.observe(inference)

    def observe_scores(self, model: str, version: str, scores: np.ndarray) -> None:
        """Called from any thread: queue the scores for the tap thread."""
        self._pending_scores.append((model, version, scores))

    def tick(self) -> None:
        # Rows first, then the scores of those rows: both arrive in order, each in its own stream.
        for model in self.models.values():
            model.flush()
        while self._pending_scores:
            model, version, scores = self._pending_scores.popleft()
            watched = self._model(model, version)
            if watched is not None:
                watched.observe_scores(scores)
        now = time.monotonic()
        if now - self._last_export >= self._export_interval:
            self._last_export = now
            for model in self.models.values():
                model.export()
        if self._checkpoint_dir is not None and now - self._last_checkpoint >= self._checkpoint_interval:
            self._last_checkpoint = now
            self.checkpoint()

    # --- state on disk ----------------------------------------------------------------------------

    def _path(self, model: ModelDrift) -> Path:
        return Path(self._checkpoint_dir) / f"drift-{model.calibrated.model}-{model.calibrated.version}.json"

    def checkpoint(self) -> None:
        """Write every model's detector state; atomically, so a crash mid-write leaves the last good file."""
        if self._checkpoint_dir is None:
            return
        Path(self._checkpoint_dir).mkdir(parents=True, exist_ok=True)
        for model in self.models.values():
            write_atomic(self._path(model), json.dumps(model.state()), sync_directory=False)
        fsync_directory(Path(self._checkpoint_dir))  # the renames, durable past a power cut too

    def _restore(self, model: ModelDrift) -> None:
        if self._checkpoint_dir is None or not self._path(model).exists():
            return
        try:
            restored = model.restore(json.loads(self._path(model).read_text()))
        except (OSError, ValueError, KeyError) as err:
            log.warning("sidewatch: cannot restore drift state from %s (%s); starting afresh", self._path(model), err)
            return
        if restored:
            log.info("sidewatch: restored drift state of %s version %s", model.calibrated.model,
                     model.calibrated.version)

    def close(self) -> None:
        for model in self.models.values():
            model.flush()
            model.export()
        self.checkpoint()
