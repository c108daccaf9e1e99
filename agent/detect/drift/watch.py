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
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from agent.config import Drift
from agent.dataplane.tap import TappedInference
from agent.detect.drift.baseline import LiveDrift
from agent.detect.drift.calibrate import OutdatedDriftCalibration, build_anomaly, build_moment_features
from agent.detect.drift.canary import CanaryWatch
from agent.detect.drift.fleet import FleetBins
from agent.detect.drift.reference_file import reference_digest
from agent.detect.drift.specs import Metadata, MetadataLookup
from agent.detect.drift.version import VersionDrift
from agent.detect.drift.window import TimeWindowPSI
from agent.detect.features import input_features, output_features, softmax
from agent.detect.registry import CalibratedDetector, DetectorRegistry
from agent.durable import fsync_directory, write_atomic
from agent.metrics import OTHER, BoundedModels, DriftMetrics

log = logging.getLogger(__name__)

STATE_FORMAT = 2


class ModelDrift(VersionDrift):
    """The drift tests, anomaly scorer and fleet bins of one calibrated model version, and their metrics.

    Raises :class:`OutdatedDriftCalibration` for an artifact an older sidewatch wrote.
    """

    def __init__(self, calibrated: CalibratedDetector, metrics: DriftMetrics, labels: tuple[str, str],
                 settings: Drift, batch_rows: int = 64, clock=time.time) -> None:
        section = calibrated.artifact.drift
        super().__init__(metrics, labels, settings, clock)
        self.calibrated = calibrated
        self.start_tests(build_moment_features(section))
        self.anomaly = build_anomaly(section)
        self.region_names: list[str] = section["region_names"]
        fleet = {name: section["fleet_bins"][name] for name in settings.fleet_features if name in section["fleet_bins"]}
        self.fleet = FleetBins(fleet, metrics, *labels)
        # One PSI over the last T seconds per fleet feature, when a time window is configured.
        self.time_windows = {} if settings.window_seconds is None else {
            name: TimeWindowPSI(bins["edges"], bins["ratios"], settings.window_seconds, settings.psi_threshold)
            for name, bins in fleet.items()}
        self.seen = 0
        self.batch_rows = batch_rows
        self._pending_x: list[np.ndarray] = []
        self._pending_p: list[np.ndarray] = []
        self._pending_rows = 0
        metrics.anomaly_threshold.labels(*labels).set(self.anomaly.threshold_)

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
        self.restore_tests(state["tests"])
        for name, window_state in state.get("time_windows", {}).items():
            if name in self.time_windows:
                self.time_windows[name].load_state_dict(window_state)
        return True


class DriftWatch:
    """The tap sink: routes each inference to its model version's tests, looks when a look is due,
    exports, and checkpoints their state.

    Versions with a calibration artifact (``registry``) are watched as calibrated (``models``); versions
    without one, from a baseline learned from their own traffic (``live``, agent/detect/drift/baseline.py),
    at most ``max_live`` of them, keyed by the version that answered; their tensors' kinds come from
    ``metadata(model, version)`` (the upstream's ModelMetadata, asked on worker threads: specs.py), or from
    their traffic without it; a model with a reference file (``references``) has its versions' baselines
    fitted from it instead, at their first request. Versions whose artifact an older sidewatch wrote are not
    watched for drift (a warning says how to recalibrate).
    """

    def __init__(self, registry: DetectorRegistry | None, settings: Drift, metrics: DriftMetrics,
                 bounded: BoundedModels, clock=time.time, overrides: Mapping[str, Mapping] | None = None,
                 max_live: int = 64, metadata: Metadata | None = None,
                 references: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        self._registry = registry
        # Per model, the tensors of its reference file (agent/detect/drift/reference_file.py, read at start).
        self._references = dict(references or {})
        # Each file's digest, once: every version of the model is fitted from (and checkpointed with) it.
        self._reference_digests = {model: reference_digest(tensors) for model, tensors in self._references.items()}
        self._settings = settings
        self._metrics = metrics
        self._bounded = bounded
        self._clock = clock
        self._overrides = dict(overrides or {})
        self._max_live = max_live
        # The question may wait for a worker behind other versions' questions, each bounded by its deadline.
        self._lookup = None if metadata is None else MetadataLookup(
            metadata, give_up_seconds=3 * settings.baseline.metadata_timeout_seconds + 1.0)
        self._checkpoint_dir = settings.checkpoint_dir
        self._checkpoint_interval = settings.checkpoint_interval_seconds
        self._export_interval = settings.export_interval_seconds
        self._last_checkpoint = self._last_export = time.monotonic()
        # Adversarial scores arrive from the detector's threads; the tap thread feeds them to the
        # detectors (which are not thread-safe) at its next tick.
        self._pending_scores: collections.deque = collections.deque(maxlen=10_000)
        # Operator requests (baseline resets) from the admin thread, applied by the tap thread.
        self._pending_resets: collections.deque = collections.deque(maxlen=100)
        self.models: dict[tuple[str, str], ModelDrift] = {}
        self.live: dict[tuple[str, str], LiveDrift] = {}
        # Two versions of a model serving at once: the newer compared live with the older.
        self.canaries = CanaryWatch(settings, metrics, bounded, self._overrides, clock=clock)
        for calibrated in registry or ():
            if not calibrated.artifact.drift:
                log.warning("sidewatch: %s version %s has no drift calibration (rerun sidewatch calibrate); "
                            "drift is not watched", calibrated.model, calibrated.version)
                continue
            labels = bounded.admit(calibrated.model, calibrated.version)
            try:
                model = ModelDrift(calibrated, metrics, labels, settings, clock=clock)
            except OutdatedDriftCalibration as err:
                log.warning("sidewatch: %s version %s: drift is not watched: %s", calibrated.model,
                            calibrated.version, err)
                continue
            self.models[(calibrated.model, calibrated.version)] = model
            self._restore(model)
        self._restore_baselines()

    def _calibrated(self, model: str, version: str) -> CalibratedDetector | None:
        return None if self._registry is None else self._registry.get(model, version)

    def _model(self, model: str, version: str) -> ModelDrift | None:
        calibrated = self._calibrated(model, version)
        return None if calibrated is None else self.models.get((calibrated.model, calibrated.version))

    def _live(self, model: str, version: str, answered: bool = True) -> LiveDrift | None:
        """The live baseline of a version without an artifact; made at its first answered request."""
        key = (model, version)
        watched = self.live.get(key)
        # A model with a reference file is watched from it even when baselines from traffic are off.
        wanted = self._settings.baseline.enabled or model in self._references
        if watched is None and wanted and len(self.live) < self._max_live:
            # A copy with an inference response (the upstream served that version, or a baseline learned
            # from such copies before a restart) may take labels; a streamed error only looks them up.
            labels = self._bounded.admit(model, version) if answered else self._bounded(model, version)
            if labels == (OTHER, OTHER):
                return None
            watched = self.live[key] = LiveDrift(model, version, self._metrics, labels, self._settings,
                                                 self._overrides.get(model), clock=self._clock, lookup=self._lookup,
                                                 reference=self._references.get(model),
                                                 reference_sha256=self._reference_digests.get(model))
        return watched

    def __call__(self, inference: TappedInference) -> None:
        answered = (inference.response.model_version if inference.response else "") or inference.version
        if inference.response is not None:  # not a streamed error: the version served (BoundedModels)
            self.canaries.observe(inference, answered)
        calibrated = self._calibrated(inference.model, inference.version)
        if calibrated is not None:
            # Not in models: calibrated, but its drift is not watched (no drift section, or an outdated one).
            model = self.models.get((calibrated.model, calibrated.version))
            if model is not None:
                model.observe(inference)
            return
        version = inference.version or (inference.response.model_version if inference.response else "")
        live = self._live(inference.model, version, inference.response is not None)
        if live is not None:
            live.observe(inference)

    def observe_scores(self, model: str, version: str, scores: np.ndarray) -> None:
        """Called from any thread: queue the scores for the tap thread."""
        self._pending_scores.append((model, version, scores))

    def reset_baseline(self, model: str, version: str) -> bool:
        """Called from any thread (the admin API): re-baseline a version at the tap thread's next tick.
        False when the version is not watched."""
        if (model, version) not in self.live and (model, version) not in self.models:
            return False
        self._pending_resets.append((model, version))
        return True

    def _watched(self) -> list[VersionDrift]:
        return [*self.models.values(), *self.live.values(), *self.canaries.comparisons.values()]

    def tick(self) -> None:
        self.canaries.update()
        # Rows first, then the scores of those rows: both arrive in order, each in its own stream.
        for model in self._watched():
            model.flush()
        while self._pending_scores:
            model, version, scores = self._pending_scores.popleft()
            watched = self._model(model, version)
            if watched is not None:
                watched.observe_scores(scores)
        while self._pending_resets:
            self._reset(*self._pending_resets.popleft())
        looked = [model.look() for model in self._watched()]
        now = time.monotonic()
        if any(looked) or now - self._last_export >= self._export_interval:
            self._last_export = now
            for model in self._watched():
                model.export()
        if self._checkpoint_dir is not None and now - self._last_checkpoint >= self._checkpoint_interval:
            self._last_checkpoint = now
            self.checkpoint()

    def _reset(self, model: str, version: str) -> None:
        """Re-baseline: a live version collects its baseline again (one with a reference file fits it from the
        file again, at its next request); a calibrated one restarts its tests (its reference is the
        artifact's: recalibrate to change it). Either way every flag drops."""
        watched = self.live.get((model, version)) or self.models.get((model, version))
        if watched is None:
            return
        watched.reset()
        if (model, version) in self.live and self._checkpoint_dir is not None:
            self._baseline_path(model, version).unlink(missing_ok=True)
        log.info("sidewatch: drift baseline of %s version %s reset by an operator", model, version)

    # --- state on disk ----------------------------------------------------------------------------

    def _path(self, model: ModelDrift) -> Path:
        return Path(self._checkpoint_dir) / f"drift-{model.calibrated.model}-{model.calibrated.version}.json"

    def _baseline_path(self, model: str, version: str) -> Path:
        # Names come from traffic: the file is named by their hash, and holds them.
        digest = hashlib.sha256(f"{model}\0{version}".encode()).hexdigest()[:24]
        return Path(self._checkpoint_dir) / f"baseline-{digest}.json"

    def checkpoint(self) -> None:
        """Write every model's state; atomically, so a crash mid-write leaves the last good file."""
        if self._checkpoint_dir is None:
            return
        Path(self._checkpoint_dir).mkdir(parents=True, exist_ok=True)
        for model in self.models.values():
            write_atomic(self._path(model), json.dumps(model.state()), sync_directory=False)
        for (name, version), live in self.live.items():
            state = live.state_dict()
            if state is not None:
                write_atomic(self._baseline_path(name, version), json.dumps(state), sync_directory=False)
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

    def _restore_baselines(self) -> None:
        """The baselines learned before a restart: watched again at once, no new collection."""
        if self._checkpoint_dir is None or not (self._settings.baseline.enabled or self._references):
            return
        for path in sorted(Path(self._checkpoint_dir).glob("baseline-*.json"))[:self._max_live]:
            try:
                state = json.loads(path.read_text())
                live = self._live(str(state["model"]), str(state["version"]))
                if live is None:
                    continue
                live.load_state_dict(state)
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("sidewatch: cannot restore the drift baseline in %s (%s); it is learned again", path, err)
                continue
            log.info("sidewatch: restored the drift baseline of %s version %s", live.model, live.version)

    def close(self) -> None:
        if self._lookup is not None:
            self._lookup.close()
        for model in self._watched():
            model.flush()
        for model in self._watched():
            model.export()
        self.checkpoint()
