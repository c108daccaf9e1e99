"""The drift tests of one model version, sharing one false-alarm budget in time.

A model version's drift is watched by three :class:`~agent.detect.drift.moments.MomentTest`\\ s, one per
part of its calibration (agent/detect/drift/calibrate.py): ``inputs`` (image block means and their
squared projections), ``outputs`` (confidence and entropy bins, class shares) and ``score`` (the
squeezing score's bins). Each part is fed when its data arrives; all are tested together at each look
(:class:`~agent.detect.drift.budget.LookClock`), every feature of every part at the same level
``alpha = budget.alpha(look, features in all parts)``: by the union bound (budget.py), the version's
false rejections on benign traffic stay within the budget whatever the request rate.

What users see is one flag per *detector*, a group of features with one meaning:

==============  =======================================================================
``inputs_mean``   the block means themselves (brightness of each image region)
``inputs_shape``  squared random projections: variances and correlations of the block means
``confidence``    the top-1 probability's distribution (its reference-decile bins)
``entropy``       the output entropy's distribution
``class_mix``     the share of each predicted class
``score``         the squeezing score's distribution
==============  =======================================================================

A detector's flag rises at a look where one of its features rejects (evidence under the budget and
an effect of at least ``min_effect``) and stays up while its part's test holds its flag, which clears
only when every feature that rejected has been quiet for ``clear_looks`` tested looks
(moments.py, "A flag that holds"). So a flag does not flicker, and it says which features drifted.

>>> import numpy as np
>>> from agent.config.budget import AlarmBudget
>>> from agent.detect.drift.moments import MomentFeatures
>>> rng = np.random.default_rng(0)
>>> features = {"inputs": MomentFeatures(projections=2).fit(continuous=rng.normal(size=(3000, 2)))}
>>> drift = BudgetedDrift(features, AlarmBudget.parse("1/30d"), look_seconds=60, min_effect=0.3)
>>> [d.name for d in drift.detectors], drift.n_tests
(['inputs_mean', 'inputs_shape'], 4)
>>> for second in range(0, 180):                  # three minutes of benign traffic, then a shift
...     shift = [1.0, 0.0] if second >= 120 else [0.0, 0.0]
...     _ = drift.update("inputs", second, continuous=rng.normal(size=(20, 2)) + shift)
...     _ = drift.look(second)
>>> _ = drift.look(180)
>>> drift.flags, drift.alarms, drift.last_alarm_at   # a shifted column moves its squared projections too
({'inputs_mean': True, 'inputs_shape': True}, {'inputs_mean': 1, 'inputs_shape': 1}, 180.0)
>>> drift.tests["inputs"].last.rejected[:1]
('x0',)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Self

import numpy as np

from agent.config.budget import AlarmBudget
from agent.detect.drift.budget import LookClock
from agent.detect.drift.moments import MomentFeatures, MomentResult, MomentTest

STATE_KIND = "sidewatch-budgeted-drift"
FORMAT_VERSION = 1

# A feature group of MomentFeatures -> the detector users see it as.
DETECTOR_OF_GROUP = {
    "continuous": "inputs_mean",
    "projections": "inputs_shape",
    "scalar:confidence": "confidence",
    "scalar:entropy": "entropy",
    "classes": "class_mix",
    "scalar:score": "score",
}


@dataclass(frozen=True)
class Detector:
    """A named group of features of one part: what a flag and its metrics are about."""

    name: str
    part: str
    index: np.ndarray          # positions of its features in the part's test
    features: tuple[str, ...]


def default_detector_name(part: str, group: str) -> str:
    """The detector a feature group is shown as (DETECTOR_OF_GROUP, else the group without its kind)."""
    return DETECTOR_OF_GROUP.get(group, group.split(":", 1)[-1])


def _detectors(features: Mapping[str, MomentFeatures],
               detector_name: Callable[[str, str], str] = default_detector_name) -> list[Detector]:
    """One detector per name: the feature groups of one part that ``detector_name`` gives one name are
    merged into one detector (a live version's bound on detectors does so: live_detectors.py); one name
    for groups of two parts is an error (a detector belongs to one part's test)."""
    merged: dict[str, tuple[str, list[int]]] = {}
    for part, fitted in features.items():
        groups = np.asarray(fitted.groups)
        for group in dict.fromkeys(fitted.groups):
            name = detector_name(part, group)
            if name in merged and merged[name][0] != part:
                raise ValueError(f"sidewatch: feature groups of two parts map to one detector name: {name}")
            merged.setdefault(name, (part, []))[1].extend(np.flatnonzero(groups == group).tolist())
    detectors = []
    for name, (part, positions) in merged.items():
        index = np.asarray(sorted(positions), dtype=np.int64)
        detectors.append(Detector(name, part, index, tuple(features[part].names[i] for i in index)))
    return detectors


class BudgetedDrift:
    """The tests of one model version and their looks (module docstring).

    ``update(part, at, **inputs)`` feeds rows of one part (``MomentFeatures.transform``'s arguments)
    that arrived at ``at`` (unix seconds); ``look(now)`` tests every part when a look is due and returns
    the results by part (None when no look was due). ``test_options`` go to every MomentTest
    (``cluster_rows``, ``min_slots``, ...); ``detector_name(part, group)`` names the detectors (by default
    :data:`DETECTOR_OF_GROUP`). ``flags``, ``alarms`` (rises per detector),
    ``last_alarm_at`` and ``watching_since`` are what the metrics show; ``last_tested`` holds each part's
    last tested look.
    """

    def __init__(self, features: Mapping[str, MomentFeatures], budget: AlarmBudget, look_seconds: float,
                 min_effect: float, slot_seconds: float = 3.0, clear_looks: int = 3,
                 detector_name: Callable[[str, str], str] | None = None, **test_options: Any) -> None:
        if not features:
            raise ValueError("sidewatch: BudgetedDrift needs at least one part")
        self.features = dict(features)
        self.tests: dict[str, MomentTest] = {
            part: fitted.make_test(min_effect, slot_seconds=slot_seconds, clear_looks=clear_looks, **test_options)
            for part, fitted in self.features.items()}
        self.budget = budget
        self.min_effect = float(min_effect)
        self.clock = LookClock(look_seconds)
        self.n_tests = sum(len(fitted.names) for fitted in self.features.values())
        self.alpha = budget.alpha(look_seconds, self.n_tests)
        self.detectors = _detectors(self.features, detector_name or default_detector_name)
        self.flags = {d.name: False for d in self.detectors}
        self.alarms = {d.name: 0 for d in self.detectors}
        self.last_alarm_at: float | None = None
        self.watching_since: float | None = None
        self.last_tested: dict[str, MomentResult] = {}

    def update(self, part: str, at: float, **inputs: Any) -> Self:
        if self.watching_since is None:
            self.watching_since = float(at)
        self.tests[part].update(self.features[part].transform(**inputs), at)
        return self

    def update_rows(self, part: str, at: float, rows: np.ndarray, **options: Any) -> Self:
        """Feed moment-feature rows already transformed (NaN rows are skipped and counted by the test);
        ``options`` go to the test's ``update`` (a two-sample test's ``stream``)."""
        if self.watching_since is None:
            self.watching_since = float(at)
        self.tests[part].update(rows, at, **options)
        return self

    def look(self, now: float) -> dict[str, MomentResult] | None:
        """Test every part if a look is due at ``now``; update the detectors' flags."""
        if not self.clock.due(now):
            return None
        results = {part: test.look(self.alpha) for part, test in self.tests.items()}
        for part, result in results.items():
            if result.tested:
                self.last_tested[part] = result
        rose = False
        for detector in self.detectors:
            result, test = results[detector.part], self.tests[detector.part]
            if not test.drift_detected:
                self.flags[detector.name] = False
            elif result.tested and any(name in result.rejected for name in detector.features):
                if not self.flags[detector.name]:
                    self.alarms[detector.name] += 1
                    rose = True
                self.flags[detector.name] = True
        if rose:
            self.last_alarm_at = float(now)
        return results

    @property
    def drift_detected(self) -> bool:
        return any(self.flags.values())

    # --- persistence ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every test's window and flag, the look clock, the detectors' flags and counts, JSON-serialisable."""
        return {"kind": STATE_KIND, "format_version": FORMAT_VERSION,
                "tests": {part: test.state_dict() for part, test in self.tests.items()},
                "clock": self.clock.state_dict(), "flags": dict(self.flags), "alarms": dict(self.alarms),
                "last_alarm_at": self.last_alarm_at, "watching_since": self.watching_since}

    def load_state_dict(self, state: dict[str, Any]) -> Self:
        """Restore :meth:`state_dict`; raises ValueError for a state of other tests or parameters."""
        if state.get("kind") != STATE_KIND or state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sidewatch: not a {STATE_KIND} state of format {FORMAT_VERSION}")
        if set(state["tests"]) != set(self.tests) or set(state["flags"]) != set(self.flags):
            raise ValueError("sidewatch: this drift state holds other parts or detectors")
        for part, test_state in state["tests"].items():
            self.tests[part].load_state_dict(test_state)
        self.clock.load_state_dict(state["clock"])
        self.flags = {name: bool(state["flags"][name]) for name in self.flags}
        self.alarms = {name: int(state["alarms"].get(name, 0)) for name in self.alarms}
        for key in ("last_alarm_at", "watching_since"):
            value = state.get(key)
            setattr(self, key, None if value is None or not math.isfinite(value) else float(value))
        return self
