"""A model version watched from a baseline learned from its own traffic: no model file, no artifact.

A version the sidecar has no calibration for (a Triton model from TensorRT or a Python backend, a
scikit-learn model on MLServer, a regressor, a text classifier) goes through three states, exported
as ``sidewatch_drift_baseline_state{model,version,state}``:

``collecting``   its first ``drift.baseline.rows`` requests' tensors are kept (a copy, bounded in rows,
                 in bytes and in time: ``max_bytes``, ``max_seconds`` with at least ``min_rows``);
``calibrating``  the features of each tensor's kind (agent/detect/features: chosen from the upstream's
                 ModelMetadata of the version, else from the first request's and response's names,
                 datatypes and shapes: agent/detect/drift/specs.py; overridable per tensor in
                 ``models.<name>.tensors``) and the moment features of the drift tests are fitted on them;
``watching``     the version's tests (an ``inputs`` and an ``outputs`` part, under the false-alarm budget,
                 agent/detect/drift/budgeted.py) are fed every later request and look as drift always does.
                 Their detectors are bounded in number, ``drift.max_detectors_per_version``, whatever the
                 tensors (agent/detect/drift/live_detectors.py).

Rows the features cannot read (strings where numbers are expected, ragged BYTES, NaN) are invalid:
left out of the baseline's fit and skipped (counted) by the tests, so they never poison the baseline.
The fitted baseline is written with the drift checkpoints and read back at start; an operator re-baselines
after an intended change (``sidewatch baseline reset MODEL VERSION``), which starts collecting again.

A model with a reference file (``models.<name>.reference``, agent/detect/drift/reference_file.py) skips
collecting: at the version's first answered request (the specs come from its tensors) the same features and
moment features are fitted on the file's tensors instead of kept traffic, and it is watched at once. A reset
fits them from the file again (the file as read at start: restart the sidecar to read a changed file). A
file that cannot be fitted to the model (no tensor of the model's, shapes the features refuse) is dropped for
that version with a warning, and its baseline is learned from traffic.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import numpy as np

from agent.config import Drift
from agent.config.tensors import TensorOverride
from agent.dataplane.tap import TappedInference
from agent.detect.drift.blocks import fit_moments, moment_rows
from agent.detect.drift.live_detectors import bounded_detector_names
from agent.detect.drift.moments import MomentFeatures
from agent.detect.drift.reference_file import reference_digest, reference_key, split_roles, unused_keys
from agent.detect.drift.specs import MAX_TENSORS, MetadataLookup, Question, choose_specs
from agent.detect.drift.version import VersionDrift
from agent.detect.features import ModelFeatures, TensorShapeError
from agent.metrics import DriftMetrics

log = logging.getLogger(__name__)

STATES = ("collecting", "calibrating", "watching")
STATE_KIND = "sidewatch-live-baseline"
FORMAT_VERSION = 1
PARTS = {"input": "inputs", "output": "outputs"}


def merge_pending(pending: list[tuple[dict[str, dict[str, np.ndarray]], int]]) -> list[tuple[dict, int]]:
    """Gathered ``(tensors by role, rows)`` as one batch, or one by one when their shapes or names differ
    (a dynamic dimension)."""
    try:
        merged = {role: {name: np.concatenate([t[role][name] for t, _ in pending])
                         for name in pending[0][0][role]} for role in PARTS}
        return [(merged, sum(n for _, n in pending))]
    except (ValueError, KeyError):
        return pending


class LiveDrift(VersionDrift):
    """The baseline and the tests of one version without an artifact (module docstring)."""

    learned = "a drift baseline"   # what calibrate() logs it learned

    def __init__(self, model: str, version: str, metrics: DriftMetrics, labels: tuple[str, str], settings: Drift,
                 overrides: Mapping[str, TensorOverride] | None = None, clock=time.time, batch_rows: int = 64,
                 lookup: MetadataLookup | None = None,
                 reference: Mapping[str, np.ndarray] | None = None, reference_sha256: str | None = None) -> None:
        super().__init__(metrics, labels, settings, clock)
        self.model, self.version = model, version
        self.overrides = dict(overrides or {})
        # Asks the upstream's ModelMetadata for the tensors' kinds (None: kinds from the traffic).
        self.lookup = lookup
        # The tensors of the model's reference file, by key as written (None: learn from traffic).
        self.reference = reference
        # Its digest (given by a caller that has it: the file is the same for all of a model's versions).
        self.reference_sha256 = None if reference is None else reference_sha256 or reference_digest(reference)
        self.batch_rows = batch_rows
        self._pending: list[tuple[dict[str, dict[str, np.ndarray]], int]] = []
        self._pending_rows = 0
        self.collect()

    # --- states -----------------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        self.state = state
        for name in STATES:
            self.metrics.baseline_state.labels(*self.labels, name).set(1.0 if name == state else 0.0)

    def collect(self) -> None:
        """(Re)start collecting a baseline: forget the features, the tests and what was kept."""
        self.features: ModelFeatures | None = None
        self.moments: dict[str, MomentFeatures] = {}
        self.tests = None
        self._pending, self._pending_rows = [], 0
        self._kept: dict[str, dict[str, list[np.ndarray]]] = {"input": {}, "output": {}}
        self._rows = self._bytes = 0
        self._started: float | None = None
        self.specs = None
        self.specs_source: str | None = None
        self._question: Question | None = None   # the ModelMetadata question in flight
        self._set_state("collecting")

    def reset(self) -> None:
        """An operator's re-baseline: collect a new baseline; the old tests' flags drop."""
        flags = list(self._alarms_exported)
        self.collect()
        for name in flags:
            self.metrics.drift.labels(*self.labels, name, "all").set(0.0)

    def _tensors(self, inference: TappedInference) -> dict[str, dict[str, np.ndarray]] | None:
        """The watched tensors of a copy by role, or None (counted) when their batch sizes disagree."""
        if self.specs is None and not self._choose_specs(inference):
            return None
        tensors = {"input": {}, "output": {}}
        for spec in self.specs:
            source = inference.inputs if spec.role == "input" else inference.outputs
            if spec.name in source:
                tensors[spec.role][spec.name] = np.asarray(source[spec.name])
        rows = {len(a) for role in tensors.values() for a in role.values() if np.ndim(a) > 0}
        if len(rows) != 1 or any(np.ndim(a) == 0 for role in tensors.values() for a in role.values()):
            self.metrics.skipped.labels(*self.labels, "wrong_shape").inc()
            return None
        return tensors

    def _choose_specs(self, inference: TappedInference) -> bool:
        """Choose the tensors' kinds (agent/detect/drift/specs.py); False while the copy cannot be used: no
        response, or the version's ModelMetadata question is still in flight (the copy is dropped, counted)."""
        if inference.response is None:
            return False
        answer = None
        if self.lookup is not None:
            if self._question is None:
                self._question = self.lookup.ask(self.model, self.version)
            if not self._question.ready():
                self.metrics.skipped.labels(*self.labels, "awaiting_metadata").inc()
                return False
            answer = self._question.answer()
        chosen = choose_specs(inference, self.overrides, answer)
        self.specs, self.specs_source = chosen.specs, chosen.source
        self.metrics.specs.labels(*self.labels, chosen.source, chosen.reason).inc()
        kinds = ", ".join(f"{spec.role} {spec.name}={spec.kind}" for spec in chosen.specs)
        if chosen.reason in ("unavailable", "unusable"):
            log.warning("sidewatch: drift kinds of %s version %s chosen from its traffic, not its ModelMetadata "
                        "(%s: %s): %s", self.model, self.version, chosen.reason, chosen.detail, kinds)
        else:
            log.info("sidewatch: drift kinds of %s version %s chosen from its %s: %s", self.model, self.version,
                     chosen.source, kinds)
        if chosen.ignored:
            log.info("sidewatch: tensors of %s version %s not in its ModelMetadata are not watched: %s", self.model,
                     self.version, ", ".join(chosen.ignored))
        return True

    def observe(self, inference: TappedInference) -> None:
        tensors = self._tensors(inference)
        if tensors is None:
            return
        if self.state == "collecting" and self.reference is not None:
            self.fit_reference()  # the specs are known now; this request is the first one watched
        n = len(next(a for role in tensors.values() for a in role.values()))
        if n == 0:
            return
        if self.state == "collecting":
            self._keep(tensors, n)
        elif self.state == "watching":
            # Features cost tens of microseconds per call but about one per row in a batch: gather rows,
            # feed them in micro-batches (flushed at batch_rows rows or at the tap's next tick).
            self._pending.append((tensors, n))
            self._pending_rows += n
            if self._pending_rows >= self.batch_rows:
                self.flush()

    def flush(self) -> None:
        """Feed the gathered rows to the tests."""
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        for tensors, n in merge_pending(pending):
            self._feed(tensors, n)

    def _keep(self, tensors: dict[str, dict[str, np.ndarray]], n: int) -> None:
        baseline = self.settings.baseline
        now = self.clock()
        if self._started is None:
            self._started = now
        size = sum(a.nbytes if a.dtype != object else sum(len(x) if isinstance(x, bytes) else 8 for x in a.flat)
                   for role in tensors.values() for a in role.values())
        if self._bytes + size <= baseline.max_bytes:
            for role, arrays in tensors.items():
                for name, array in arrays.items():
                    self._kept[role].setdefault(name, []).append(array.copy())
            self._rows += n
            self._bytes += size
        full = self._rows >= baseline.rows or self._bytes + size > baseline.max_bytes
        late = now - self._started >= baseline.max_seconds and self._rows >= baseline.min_rows
        if full or late:
            self.calibrate()

    def calibrate(self) -> bool:
        """Fit the baseline on what was kept and start watching; back to collecting if it cannot be fitted."""
        self._set_state("calibrating")
        kept, self._kept = self._kept, {"input": {}, "output": {}}
        try:
            # Rows of other shapes (a dynamic dimension that changed) cannot be stacked: collect again.
            stacked = {role: {name: np.concatenate(parts) for name, parts in arrays.items()}
                       for role, arrays in kept.items()}
            features, moments = self._fit(stacked)
        except (ValueError, TensorShapeError) as err:
            log.warning("sidewatch: cannot learn a drift baseline for %s version %s from %d requests' rows (%s); "
                        "collecting again", self.model, self.version, self._rows, err)
            self.collect()
            return False
        self._start(features, moments)
        log.info("sidewatch: learned %s for %s version %s from %d rows; watching", self.learned, self.model,
                 self.version, self._rows)
        return True

    def fit_reference(self) -> bool:
        """Fit the baseline on the reference file's tensors and start watching. False when they cannot be
        fitted: the file is dropped for this version and its baseline is learned from traffic."""
        self._set_state("calibrating")
        key = reference_key(self.model)
        inputs = [s.name for s in self.specs if s.role == "input"]
        outputs = [s.name for s in self.specs if s.role == "output"]
        unused = unused_keys(self.reference, inputs, outputs)
        if unused:
            log.warning("sidewatch: %s: tensors %s of the file are not tensors of %s version %s: left out", key,
                        unused[:MAX_TENSORS], self.model, self.version)
        try:
            features, moments = self._fit(split_roles(self.reference, inputs, outputs))
        except (ValueError, TensorShapeError) as err:
            log.warning("sidewatch: %s: cannot fit a drift baseline for %s version %s from the file (%s); learning "
                        "it from traffic instead", key, self.model, self.version, err)
            self.reference = self.reference_sha256 = None
            self.collect()
            return False
        self._start(features, moments)
        rows = len(next(iter(self.reference.values())))
        log.info("sidewatch: fitted the drift baseline of %s version %s from %s (%d rows); watching %s", self.model,
                 self.version, key, rows, " and ".join(sorted(moments)))
        if "outputs" not in moments:
            log.info("sidewatch: %s version %s: only its inputs are watched for drift: %s has no output tensor "
                     "that can be watched", self.model, self.version, key)
        return True

    def _fit(self, tensors: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[ModelFeatures, dict[str, MomentFeatures]]:
        """The features and moment features of each role's reference tensors (``{role: {name: array}}``);
        ValueError or TensorShapeError when nothing can be watched."""
        features = ModelFeatures(self.specs)
        moments = {}
        for role, part in PARTS.items():
            if not tensors[role]:
                continue
            try:
                features.fit(role, tensors[role])
            except ValueError:
                continue  # nothing of this role to watch (every tensor ignored)
            moments[part] = fit_moments(features.transform(role, tensors[role]), seed=0)
        if not moments:
            raise ValueError("no tensor to watch")
        return features, moments

    def _start(self, features: ModelFeatures, moments: dict[str, MomentFeatures]) -> None:
        self.features, self.moments = features, moments
        self.start_tests(moments, bounded_detector_names(moments, features.specs,
                                                         self.settings.max_detectors_per_version))
        self._set_state("watching")

    def _feed(self, tensors: dict[str, dict[str, np.ndarray]], n: int, **options: Any) -> None:
        """Transform a batch and feed it to the tests (``options``: to their ``update``)."""
        at = self.clock()
        for role, part in PARTS.items():
            if part not in self.moments:
                continue
            try:
                block = self.features.transform(role, tensors[role])
            except (TensorShapeError, ValueError):
                self.metrics.skipped.labels(*self.labels, "wrong_shape").inc(n)
                return
            self.tests.update_rows(part, at, moment_rows(self.moments[part], block), **options)
        self.metrics.samples.labels(*self.labels).inc(n)

    # --- persistence ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any] | None:
        """The fitted baseline and the tests' state (None while collecting: a restart collects again)."""
        if self.state != "watching":
            return None
        self.flush()
        return {"kind": STATE_KIND, "format_version": FORMAT_VERSION, "model": self.model, "version": self.version,
                "specs_source": self.specs_source, "reference_sha256": self.reference_sha256,
                "features": self.features.state_dict(),
                "moments": {part: m.calibration_dict() for part, m in self.moments.items()},
                "tests": self.tests.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a baseline (and its tests' state when they match); raises ValueError for another state."""
        if state.get("kind") != STATE_KIND or state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sidewatch: not a {STATE_KIND} state of format {FORMAT_VERSION}")
        if (state.get("model"), state.get("version")) != (self.model, self.version):
            raise ValueError("sidewatch: a baseline of another model version")
        if state.get("reference_sha256") != self.reference_sha256:
            raise ValueError("sidewatch: a baseline fitted on another reference (the model's reference file was "
                             "changed, added or removed since)")
        features = ModelFeatures.from_state(state["features"])
        moments = {part: MomentFeatures.from_calibration(d) for part, d in state["moments"].items()}
        self.specs = features.specs
        self.specs_source = state.get("specs_source")
        self._start(features, moments)
        try:
            self.restore_tests(state["tests"])
        except (ValueError, KeyError, TypeError):
            log.warning("sidewatch: drift tests of %s version %s restarted (other settings)", self.model, self.version)
