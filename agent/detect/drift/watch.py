"""Drift and anomaly detection on live traffic: a tap sink, one set of tests per model version.

Every tapped inference of a calibrated model version feeds its drift tests
(:class:`~agent.detect.drift.budgeted.BudgetedDrift`: the block means of the input, the top-1
confidence, entropy and class of the output, and the squeezing detector's score), the anomaly scorer
and the fleet bins. The tests look at the evidence once per ``drift.look_interval_seconds``, under the
version's false-alarm budget; metrics are refreshed at most once a second, not per request. State
(the tests' windows and flags, the look clock) is checkpointed to disk periodically and at shutdown,
and restored at start, so a restart neither resets the windows nor adds a look.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from agent.config import AlarmBudget, Drift
from agent.dataplane.tap import TappedInference
from agent.detect.drift.budgeted import BudgetedDrift, Detector
from agent.detect.drift.calibrate import OutdatedDriftCalibration, build_anomaly, build_moment_features
from agent.detect.drift.fleet import FleetBins
from agent.detect.drift.window import TimeWindowPSI
from agent.detect.features import input_features, output_features, softmax
from agent.detect.registry import CalibratedDetector, DetectorRegistry
from agent.durable import fsync_directory, write_atomic
from agent.metrics import BoundedModels, DriftMetrics

log = logging.getLogger(__name__)

STATE_FORMAT = 2


class ModelDrift:
    """The drift tests, anomaly scorer and fleet bins of one calibrated model version, and their metrics.

    Raises :class:`OutdatedDriftCalibration` for an artifact an older sidewatch wrote.
    """

    def __init__(self, calibrated: CalibratedDetector, metrics: DriftMetrics, labels: tuple[str, str],
                 settings: Drift, batch_rows: int = 64, clock=time.time) -> None:
        section = calibrated.artifact.drift
        self.calibrated = calibrated
        self.labels = labels
        self.metrics = metrics
        self.top_k = settings.top_k_features
        self.clock = clock
        budget = AlarmBudget.parse(settings.false_alarm_budget)
        features = build_moment_features(section)

        def new_tests() -> BudgetedDrift:
            return BudgetedDrift(features, budget, settings.look_interval_seconds, settings.min_effect,
                                 slot_seconds=settings.slot_seconds, clear_looks=settings.clear_looks,
                                 cluster_rows=settings.cluster_rows, min_slots=settings.min_clusters)

        self._new_tests = new_tests
        self.tests = new_tests()
        self.anomaly = build_anomaly(section)
        self.region_names: list[str] = section["region_names"]
        fleet = {name: section["fleet_bins"][name] for name in settings.fleet_features if name in section["fleet_bins"]}
        self.fleet = FleetBins(fleet, metrics, *labels)
        # One PSI over the last T seconds per fleet feature, when a time window is configured.
        self.time_windows = {} if settings.window_seconds is None else {
            name: TimeWindowPSI(bins["edges"], bins["ratios"], settings.window_seconds, settings.psi_threshold)
            for name, bins in fleet.items()}
        self._was_drifting: dict[str, bool] = {}
        self.seen = 0
        self.batch_rows = batch_rows
        self._pending_x: list[np.ndarray] = []
        self._pending_p: list[np.ndarray] = []
        self._pending_rows = 0
        self._exported_features: dict[str, set[str]] = {}
        self._alarms_exported = dict.fromkeys(self.tests.alarms, 0)
        metrics.anomaly_threshold.labels(*labels).set(self.anomaly.threshold_)
        metrics.min_effect.labels(*labels).set(settings.min_effect)
        metrics.budget.labels(*labels).set(budget.period_seconds / budget.alarms)
        metrics.alpha.labels(*labels).set(self.tests.alpha)
        for detector in self.tests.detectors:  # every flag exists from the start, at 0
            metrics.drift.labels(*labels, detector.name, "all").set(0.0)
            metrics.alarms.labels(*labels, detector.name)

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
        sources = {"confidence": confidence, "entropy": entropy}
        at = self.clock()
        self.tests.update("inputs", at, continuous=regions)
        self.tests.update("outputs", at, scalars=sources, classes=classes)
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
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.size:
            self.tests.update("score", self.clock(), scalars={"score": scores})
        if "score" in self.fleet.features:
            self._observe_feature("score", scores)

    def _observe_feature(self, feature: str, values: np.ndarray) -> None:
        self.fleet.observe(feature, values)
        if feature in self.time_windows:
            self.time_windows[feature].update(values)

    def look(self) -> bool:
        """Test the evidence if a look is due; count the look. True when one was."""
        results = self.tests.look(self.clock())
        if results is None:
            return False
        tested = any(result.tested for result in results.values())
        self.metrics.looks.labels(*self.labels, "tested" if tested else "untested").inc()
        return True

    def export(self) -> None:
        """Flags, evidence, thresholds, p-values and effects of every detector, as gauges."""
        m = self.metrics
        tests = self.tests
        for detector in tests.detectors:
            flag = tests.flags[detector.name]
            m.drift.labels(*self.labels, detector.name, "all").set(1.0 if flag else 0.0)
            rises = tests.alarms[detector.name] - self._alarms_exported[detector.name]
            if rises > 0:
                m.alarms.labels(*self.labels, detector.name).inc(rises)
                self._alarms_exported[detector.name] = tests.alarms[detector.name]
            result = tests.last_tested.get(detector.part)
            if result is not None:
                self._export_detector(detector, result, flag)
        if tests.last_alarm_at is not None:
            m.last_alarm.labels(*self.labels).set(tests.last_alarm_at)
        if tests.watching_since is not None:
            m.watching_since.labels(*self.labels).set(tests.watching_since)
        for feature, window in self.time_windows.items():
            result = window.result
            if result.statistic == result.statistic:  # NaN while the window is empty
                self._set("psi_time_window", feature, result.statistic, result.threshold, None, None,
                          bool(np.any(result.drift)))

    def _export_detector(self, detector: Detector, result, flag: bool) -> None:
        index = detector.index
        evidence = np.abs(result.t[index])
        p_values, effects = result.p[index], result.effects[index]
        self._set(detector.name, "all", evidence.max(), result.threshold, p_values.min(), effects.max(), flag,
                  flag_set=False)
        # Per-feature series only for the top-k by evidence; features that drop out are removed.
        top = {detector.features[i]: i for i in np.argsort(-evidence, kind="stable")[:self.top_k]}
        rejected = set(result.rejected)
        for feature in self._exported_features.get(detector.name, set()) - set(top):
            for gauge in (self.metrics.statistic, self.metrics.threshold, self.metrics.p_value, self.metrics.effect,
                          self.metrics.drift):
                try:
                    gauge.remove(*self.labels, detector.name, feature)
                except KeyError:
                    pass
        for feature, i in top.items():
            self._set(detector.name, feature, evidence[i], result.threshold, p_values[i], effects[i],
                      flag and feature in rejected)
        self._exported_features[detector.name] = set(top)

    def _set(self, name, feature, statistic, threshold, p_value, effect, drift, flag_set: bool = True) -> None:
        labels = (*self.labels, name, feature)
        self.metrics.statistic.labels(*labels).set(float(statistic))
        self.metrics.threshold.labels(*labels).set(float(threshold))
        if p_value is not None and math.isfinite(p_value):
            self.metrics.p_value.labels(*labels).set(float(p_value))
        if effect is not None and math.isfinite(effect):
            self.metrics.effect.labels(*labels).set(float(effect))
        if flag_set:
            self.metrics.drift.labels(*labels).set(1.0 if drift else 0.0)

    def state(self) -> dict:
        self.flush()
        return {"format": STATE_FORMAT, "model_sha256": self.calibrated.artifact.model["sha256"],
                "tests": self.tests.state_dict(),
                "time_windows": {name: window.state_dict() for name, window in self.time_windows.items()}}

    def restore(self, state: dict) -> bool:
        if state.get("model_sha256") != self.calibrated.artifact.model["sha256"]:
            return False  # state of another model: start afresh
        if state.get("format") != STATE_FORMAT:
            log.warning("sidewatch: drift state of %s version %s is from an older sidewatch (detectors calibrated "
                        "to an expected run time); starting afresh under the false-alarm budget", *self.labels)
            return False
        try:
            self.tests.load_state_dict(state["tests"])
        except (ValueError, KeyError, TypeError):
            self.tests = self._new_tests()  # nothing half-restored
            raise
        for name, window_state in state.get("time_windows", {}).items():
            if name in self.time_windows:
                self.time_windows[name].load_state_dict(window_state)
        return True


class DriftWatch:
    """The tap sink: routes each inference to its model version's tests, looks when a look is due,
    exports, and checkpoints their state. Versions whose artifact an older sidewatch wrote are not
    watched for drift (a warning says how to recalibrate)."""

    def __init__(self, registry: DetectorRegistry, settings: Drift, metrics: DriftMetrics,
                 bounded: BoundedModels, clock=time.time) -> None:
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
            try:
                model = ModelDrift(calibrated, metrics, labels, settings, clock=clock)
            except OutdatedDriftCalibration as err:
                log.warning("sidewatch: %s version %s: drift is not watched: %s", calibrated.model,
                            calibrated.version, err)
                continue
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
        looked = [model.look() for model in self.models.values()]
        now = time.monotonic()
        if any(looked) or now - self._last_export >= self._export_interval:
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
