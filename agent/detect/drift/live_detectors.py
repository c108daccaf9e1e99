"""The detectors of a version whose baseline is learned from traffic, and the bound on their number.

A detector is a named group of moment features with one meaning; its name is a label value of
``sidewatch_drift_detected``, ``sidewatch_drift_alarms_total`` and the other drift series. Named from the
feature groups (:func:`live_detector_name`): ``inputs_mean`` / ``inputs_shape`` (and ``outputs_*``) for the
continuous columns of every tensor of a part and their projections, else the group named by its tensor:
``features.missing``, ``features.out_of_range``, one per categorical column (``flags.colour``), ``text.length``,
``probabilities.class_mix``...

Their number grows with the tensors (16 per part at most) and a categorical tensor's columns (256 at most), so
one version gets at most ``max_detectors`` (``drift.max_detectors_per_version``) whatever its tensors. When the
groups would make more, they are merged by this rule (the tests and their statistics do not change: only which
features share a name, a flag and an alarm count):

1. the tensor with the most detectors (the later tensor on a tie, so that the first tensors keep their detail)
   has all of them merged into one: ``<tensor>.categories`` for a categorical tensor (every column's category
   shares), ``<tensor>.all`` otherwise; again until the number fits or every tensor has one;
2. if one detector per tensor is still too many, the tensors that do not fit (the last ones, inputs before
   outputs) share one detector per part: ``inputs_other``, ``outputs_other``.

The cross-tensor detectors (``inputs_mean``, ``inputs_shape``, ``outputs_mean``, ``outputs_shape``) are never
merged. A merged detector's flag says which tensor (or which tensors) drifted; its per-feature series (the
top-k features by statistic) say which column. So a live version exports at most ``max_detectors`` detector
label values, and at most ``max_detectors x (top_k_features + 1)`` series per drift gauge (one ``feature="all"``
and the top-k features per detector).

>>> import numpy as np
>>> from agent.detect.drift.moments import MomentFeatures
>>> from agent.detect.features import TensorSpec
>>> rng = np.random.default_rng(0)
>>> shares = {f"flags.c{j}=a": rng.integers(0, 2, 100).astype(float) for j in range(10)}
>>> moments = {"inputs": MomentFeatures(projections=2).fit(
...     continuous=rng.normal(size=(100, 2)), shares=shares, share_groups={k: k.split("=")[0] for k in shares})}
>>> specs = [TensorSpec("x", "input", "FP32", (-1, 2), "numeric"),
...          TensorSpec("flags", "input", "BYTES", (-1, 10), "categorical")]
>>> name = bounded_detector_names(moments, specs, max_detectors=8)
>>> sorted({name("inputs", g) for g in moments["inputs"].groups})
['flags.categories', 'inputs_mean', 'inputs_shape']
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from agent.detect.drift.moments import MomentFeatures
from agent.detect.features import TensorSpec

ROLE_OF_PART = {"inputs": "input", "outputs": "output"}
SHARED_GROUPS = ("continuous", "projections")


def live_detector_name(part: str, group: str) -> str:
    """Detectors of a live baseline: ``inputs_mean`` / ``inputs_shape`` (and ``outputs_*``) for the
    continuous columns and their projections; otherwise the feature group, named by its tensor
    (``features.missing``, ``probabilities.confidence``, ``text.oov``...)."""
    if group in SHARED_GROUPS:
        return f"{part}_{'mean' if group == 'continuous' else 'shape'}"
    return group.split(":", 1)[-1]


def _tensor_of(name: str, tensors: list[str]) -> str:
    """The tensor a detector's natural name belongs to (its longest tensor-name prefix); the name itself
    when none matches, so that such a group still counts as its own unit."""
    for tensor in tensors:
        if name.startswith(tensor + "."):
            return tensor
    return name


def bounded_detector_names(features: Mapping[str, MomentFeatures], specs: Iterable[TensorSpec],
                           max_detectors: int) -> Callable[[str, str], str]:
    """``detector_name(part, group)`` for :class:`~agent.detect.drift.budgeted.BudgetedDrift`, naming at most
    ``max_detectors`` detectors by the rule of the module docstring."""
    specs = list(specs)
    names: dict[tuple[str, str], str] = {}
    units: dict[tuple[str, str], list[str]] = {}   # (part, tensor) -> its groups, in order
    shared: set[str] = set()
    for part, fitted in features.items():
        role = ROLE_OF_PART.get(part, part)
        tensors = sorted({s.name for s in specs if s.role == role}, key=len, reverse=True)
        for group in dict.fromkeys(fitted.groups):
            name = names[(part, group)] = live_detector_name(part, group)
            if group in SHARED_GROUPS:
                shared.add(name)
            else:
                units.setdefault((part, _tensor_of(name, tensors)), []).append(group)

    def count() -> int:
        return len(set(names.values()))

    def unit_names(unit: tuple[str, str]) -> set[str]:
        return {names[(unit[0], group)] for group in units[unit]}

    categorical = {(part, s.name) for s in specs if s.kind == "categorical"
                   for part, role in ROLE_OF_PART.items() if s.role == role}
    order = list(units)
    while count() > max_detectors:
        wide = [unit for unit in order if len(unit_names(unit)) > 1]
        if not wide:
            break
        unit = max(wide, key=lambda u: (len(unit_names(u)), order.index(u)))
        merged = f"{unit[1]}.{'categories' if unit in categorical else 'all'}"
        for group in units[unit]:
            names[(unit[0], group)] = merged
    if count() > max_detectors:
        parts = {part for part, _ in order}
        room = max(max_detectors - len(shared) - len(parts), 0)
        for unit in order[room:]:
            for group in units[unit]:
                names[(unit[0], group)] = f"{unit[0]}_other"

    def detector_name(part: str, group: str) -> str:
        return names.get((part, group)) or live_detector_name(part, group)

    return detector_name
