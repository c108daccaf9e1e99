"""What every watched model version has in common: its budgeted tests, their looks and their metrics.

:class:`VersionDrift` holds one :class:`~agent.detect.drift.budgeted.BudgetedDrift` (the version's tests
under its false-alarm budget), looks when a look is due, and exports flags, evidence, thresholds,
p-values and effects with bounded labels (the top-k features of each detector). A version calibrated
offline (agent/detect/drift/watch.py: ``ModelDrift``) and one whose baseline is learned from its own
traffic (agent/detect/drift/baseline.py: ``LiveDrift``) differ only in how their tests are fitted and fed.
The detectors of a calibrated version are fixed by its artifact; those of a live version are at most
``drift.max_detectors_per_version`` (agent/detect/drift/live_detectors.py), so each drift gauge holds at most
``max_detectors_per_version x (top_k_features + 1)`` series of a version.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping

import numpy as np

from agent.config import AlarmBudget, Drift
from agent.detect.drift.budgeted import BudgetedDrift, Detector
from agent.detect.drift.moments import MomentFeatures
from agent.metrics import DriftMetrics


class VersionDrift:
    """The tests of one model version and their metrics; a subclass fits and feeds them."""

    # Whether the version-wide gauges (budget, alpha, minimum effect, looks, last alarm, watching since) are
    # this object's to set: not for a comparison that shares its version's labels with the version's own tests.
    version_gauges = True

    def __init__(self, metrics: DriftMetrics, labels: tuple[str, str], settings: Drift, clock=time.time) -> None:
        self.metrics = metrics
        self.labels = labels
        self.settings = settings
        self.top_k = settings.top_k_features
        self.clock = clock
        self.budget = AlarmBudget.parse(settings.false_alarm_budget)
        self.tests: BudgetedDrift | None = None
        self.time_windows: dict = {}
        self._exported_features: dict[str, set[str]] = {}
        self._alarms_exported: dict[str, int] = {}
        self._new_tests: Callable[[], BudgetedDrift] | None = None

    def start_tests(self, features: Mapping[str, MomentFeatures],
                    detector_name: Callable[[str, str], str] | None = None, **test_options: Any) -> None:
        """Build the tests on fitted ``features`` (part -> MomentFeatures) and show their settings
        (``test_options``: more for every test, e.g. ``test_class``)."""
        settings = self.settings

        def new_tests() -> BudgetedDrift:
            return BudgetedDrift(features, self.budget, settings.look_interval_seconds, settings.min_effect,
                                 slot_seconds=settings.slot_seconds, clear_looks=settings.clear_looks,
                                 detector_name=detector_name, cluster_rows=settings.cluster_rows,
                                 min_slots=settings.min_clusters, **test_options)

        self._new_tests = new_tests
        self.tests = new_tests()
        self._alarms_exported = dict.fromkeys(self.tests.alarms, 0)
        m, labels = self.metrics, self.labels
        if self.version_gauges:
            m.min_effect.labels(*labels).set(settings.min_effect)
            m.budget.labels(*labels).set(self.budget.period_seconds / self.budget.alarms)
            m.alpha.labels(*labels).set(self.tests.alpha)
        for detector in self.tests.detectors:  # every flag exists from the start, at 0
            m.drift.labels(*labels, detector.name, "all").set(0.0)
            m.alarms.labels(*labels, detector.name)

    def flush(self) -> None:
        """Feed rows gathered for the next micro-batch (a subclass that gathers them overrides it)."""

    def _restart_tests(self) -> None:
        """Fresh tests on the same features: empty windows, flags down, no alarms yet."""
        self.tests = self._new_tests()
        self._alarms_exported = dict.fromkeys(self.tests.alarms, 0)

    def reset(self) -> None:
        """An operator's re-baseline: the tests start afresh on the same reference, every flag drops."""
        self._restart_tests()
        self.export()

    def restore_tests(self, state: dict[str, Any]) -> None:
        """Load the tests' state; on a state of other tests, start them afresh (nothing half-restored) and raise.
        Alarms restored are not counted again: the alarm counter counts rises seen by this process."""
        try:
            self.tests.load_state_dict(state)
        except (ValueError, KeyError, TypeError):
            self._restart_tests()
            raise
        self._alarms_exported = dict(self.tests.alarms)

    def look(self) -> bool:
        """Test the evidence if a look is due; count the look. True when one was."""
        if self.tests is None:
            return False
        results = self.tests.look(self.clock())
        if results is None:
            return False
        tested = any(result.tested for result in results.values())
        if self.version_gauges:
            self.metrics.looks.labels(*self.labels, "tested" if tested else "untested").inc()
        return True

    def export(self) -> None:
        """Flags, evidence, thresholds, p-values and effects of every detector, as gauges."""
        m = self.metrics
        tests = self.tests
        if tests is None:
            return
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
        if self.version_gauges and tests.last_alarm_at is not None:
            m.last_alarm.labels(*self.labels).set(tests.last_alarm_at)
        if self.version_gauges and tests.watching_since is not None:
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
