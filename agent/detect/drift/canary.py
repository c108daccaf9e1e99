"""Canary against stable: the newest version of a model, compared live with the version it is replacing.

While two versions of one model answer traffic at once (Triton or MLServer serving both, clients or a
router splitting requests between them), the new version has no baseline of its own yet: its first
traffic may already be wrong. :class:`CanaryWatch` notices which versions of each model are serving (a
version that answered within ``drift.canary.active_seconds``), and compares the newest with the oldest
(versions order as agent/repository.py orders them: by number when numeric, else by name; with more than
two serving, only the newest against the oldest).

:class:`CanaryDrift` is the comparison. It fits the features of the model's tensors (agent/detect/features,
kinds chosen as for a live baseline, from the stable version's tensors) on ``fit_rows`` of the stable
version's rows (state ``collecting``), then feeds both versions' rows of the same moments to
:class:`~agent.detect.drift.two_sample.TwoSampleMomentTest`\\ s (state ``watching``): every feature's mean
on the canary against its mean on the stable version in the same time slots, under the drift budget
(``drift.false_alarm_budget``, the comparison's own), with the effect gate and held flags of every drift
test. What users see are flags named ``canary.<detector>`` (``canary.inputs_mean``,
``canary.probabilities.class_mix``, ``canary.value.value``...) under the canary's ``model`` and ``version``,
so the drift alerts and the rollback hooks see a canary whose predictions diverge; inputs that differ say
the split itself is not random (one client pinned to the canary). ``sidewatch_drift_canary_state`` shows
the pair and the state.

A comparison ends when either version stops serving (its series are then removed) and is not saved: after
a restart it fits again on fresh rows. Bounds: at most ``max_comparisons`` models compared at once, 64
models and 16 versions per model remembered, the fit's rows within ``drift.baseline.max_bytes``.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

from agent.config import Drift
from agent.config.serve import Baseline
from agent.config.tensors import TensorOverride
from agent.dataplane.tap import TappedInference
from agent.detect.drift.baseline import LiveDrift, merge_pending
from agent.detect.drift.live_detectors import bounded_detector_names
from agent.detect.drift.moments import MomentFeatures
from agent.detect.drift.specs import choose_specs
from agent.detect.drift.two_sample import TwoSampleMomentTest
from agent.detect.features import ModelFeatures
from agent.metrics import OTHER, BoundedModels, DriftMetrics
from agent.repository import version_key

log = logging.getLogger(__name__)

PREFIX = "canary."
MAX_MODELS = 64
MAX_VERSIONS = 16
STREAMS = {"canary": "a", "stable": "b"}


class CanaryDrift(LiveDrift):
    """The comparison of one canary version with the stable version serving beside it (module docstring).

    ``observe(inference, side)`` takes a copy answered by the canary (``side="canary"``) or the stable
    version (``"stable"``); looks, exports and flushes as every watched version does.
    """

    version_gauges = False
    learned = "the features of a canary comparison"

    def __init__(self, model: str, canary: str, stable: str, metrics: DriftMetrics, labels: tuple[str, str],
                 stable_label: str, settings: Drift, overrides: Mapping[str, TensorOverride] | None = None,
                 clock=time.time, batch_rows: int = 64) -> None:
        self.stable = stable
        self.stable_label = stable_label
        fit = settings.canary.fit_rows
        # The fit collects the stable version's rows as a baseline would, only fewer of them.
        settings = settings.model_copy(update={"baseline": Baseline(
            rows=fit, min_rows=min(fit, settings.baseline.min_rows), max_seconds=settings.baseline.max_seconds,
            max_bytes=settings.baseline.max_bytes)})
        self._pending_sides: dict[str, list] = {side: [] for side in STREAMS}
        super().__init__(model, canary, metrics, labels, settings, overrides, clock, batch_rows)

    def _set_state(self, state: str) -> None:
        self.state = state
        for name in ("collecting", "watching"):
            self.metrics.canary_state.labels(*self.labels, self.stable_label, name).set(
                1.0 if name == state else 0.0)

    def collect(self) -> None:
        self._pending_sides = {side: [] for side in STREAMS}
        super().collect()

    def _choose_specs(self, inference: TappedInference) -> bool:
        """The kinds from the stable version's tensors in the traffic (its own baseline asks ModelMetadata,
        and counts where its kinds came from)."""
        if inference.response is None:
            return False
        self.specs = choose_specs(inference, self.overrides, None).specs
        return True

    def observe(self, inference: TappedInference, side: str = "canary") -> None:
        if self.specs is None and side != "stable":
            return  # the kinds come from the stable version's tensors
        tensors = self._tensors(inference)
        if tensors is None:
            return
        n = len(next(a for role in tensors.values() for a in role.values()))
        if n == 0:
            return
        if self.state == "collecting":
            if side == "stable":
                self._keep(tensors, n)
        elif self.state == "watching":
            self._pending_sides[side].append((tensors, n))
            self._pending_rows += n
            if self._pending_rows >= self.batch_rows:
                self.flush()

    def flush(self) -> None:
        if not self._pending_rows:
            return
        sides, self._pending_sides, self._pending_rows = self._pending_sides, {side: [] for side in STREAMS}, 0
        for side, pending in sides.items():
            if pending:
                for tensors, n in merge_pending(pending):
                    self._feed(tensors, n, stream=STREAMS[side])

    def _start(self, features: ModelFeatures, moments: dict[str, MomentFeatures]) -> None:
        self.features, self.moments = features, moments
        canary = self.settings.canary
        # A learned baseline's detector names (bounded in number), prefixed.
        named = bounded_detector_names(moments, features.specs, self.settings.max_detectors_per_version)
        self.start_tests(moments, lambda part, group: PREFIX + named(part, group), test_class=TwoSampleMomentTest,
                         sticky=canary.routing == "sticky", window_rows=canary.window_rows)
        self._set_state("watching")

    def state_dict(self) -> None:
        return None  # not saved (module docstring)

    def close(self) -> None:
        """Remove the comparison's series: its versions no longer serve side by side."""
        m, labels = self.metrics, self.labels
        for state in ("collecting", "watching"):
            _remove(m.canary_state, *labels, self.stable_label, state)
        if self.tests is None:
            return
        for detector in self.tests.detectors:
            _remove(m.drift, *labels, detector.name, "all")
            for gauge in (m.statistic, m.threshold, m.p_value, m.effect):
                _remove(gauge, *labels, detector.name, "all")
            for feature in self._exported_features.get(detector.name, ()):
                for gauge in (m.statistic, m.threshold, m.p_value, m.effect, m.drift):
                    _remove(gauge, *labels, detector.name, feature)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


class CanaryWatch:
    """Which versions of each model serve, and the comparison of the newest with the oldest (module docstring).

    ``observe(inference, version)`` is called by the tap sink for every copy (``version``: the one that
    answered); ``update()`` at its tick starts and ends comparisons; ``comparisons`` are watched (looked at,
    exported, flushed) with the sink's other versions.
    """

    def __init__(self, settings: Drift, metrics: DriftMetrics, bounded: BoundedModels,
                 overrides: Mapping[str, Mapping] | None = None, clock=time.time) -> None:
        self._settings = settings
        self._metrics = metrics
        self._bounded = bounded
        self._overrides = dict(overrides or {})
        self._clock = clock
        self._serving: dict[str, dict[str, float]] = {}      # model -> version -> last answered (clock)
        self.comparisons: dict[str, CanaryDrift] = {}         # model -> its comparison

    def observe(self, inference: TappedInference, version: str) -> None:
        if not self._settings.canary.enabled or not version:
            return
        model = inference.model
        versions = self._serving.get(model)
        if versions is None:
            if len(self._serving) >= MAX_MODELS:
                return
            versions = self._serving[model] = {}
        if version in versions or len(versions) < MAX_VERSIONS:
            versions[version] = self._clock()
        comparison = self.comparisons.get(model)
        if comparison is not None:
            if version == comparison.version:
                comparison.observe(inference, "canary")
            elif version == comparison.stable:
                comparison.observe(inference, "stable")

    def update(self) -> None:
        """Forget versions that stopped serving; start and end comparisons accordingly."""
        now = self._clock()
        active = self._settings.canary.active_seconds
        for model in list(self._serving):
            versions = self._serving[model]
            for version in [v for v, last in versions.items() if now - last > active]:
                del versions[version]
            pair = self._pair(versions)
            comparison = self.comparisons.get(model)
            if comparison is not None and (pair is None or pair != (comparison.stable, comparison.version)):
                self._end(model)
            if pair is not None and model not in self.comparisons:
                self._start(model, *pair)
            if not versions:
                del self._serving[model]

    @staticmethod
    def _pair(versions: Mapping[str, float]) -> tuple[str, str] | None:
        if len(versions) < 2:
            return None
        ordered = sorted(versions, key=version_key)
        return ordered[0], ordered[-1]

    def _start(self, model: str, stable: str, canary: str) -> None:
        if len(self.comparisons) >= self._settings.canary.max_comparisons:
            return
        # Both versions answered with inference responses (DriftWatch feeds only those): they may take labels.
        labels = self._bounded.admit(model, canary)
        stable_label = self._bounded.admit(model, stable)[1]
        if OTHER in labels or stable_label == OTHER:
            return
        self.comparisons[model] = CanaryDrift(model, canary, stable, self._metrics, labels, stable_label,
                                              self._settings, self._overrides.get(model), clock=self._clock)
        log.info("sidewatch: %s version %s serves beside version %s: comparing them", model, canary, stable)

    def _end(self, model: str) -> None:
        comparison = self.comparisons.pop(model)
        comparison.close()
        log.info("sidewatch: %s versions %s and %s no longer serve side by side: their comparison ended", model,
                 comparison.version, comparison.stable)

    def close(self) -> None:
        for comparison in self.comparisons.values():
            comparison.flush()


__all__ = ["CanaryDrift", "CanaryWatch"]
