"""The result every drift detector reports: statistic, threshold, p-value and the drift flag.

A field is a float (or bool) for a detector with one statistic, or a numpy array with one entry per
feature for a per-feature detector. ``p_value`` may be None (or NaN) where the method has none.
Metrics export the statistic, its threshold and its p-value, not only the flag (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


# eq=False: with numpy array fields the generated __eq__ would raise ("truth value of an array is
# ambiguous"); compare fields with numpy instead.
@dataclass(frozen=True, eq=False)
class DriftResult:
    statistic: float | np.ndarray
    threshold: float | np.ndarray
    p_value: float | np.ndarray | None
    drift: bool | np.ndarray

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy: arrays become lists, numpy scalars Python numbers (NaN stays NaN)."""

        def plain(v: Any) -> Any:
            if v is None:
                return None
            if isinstance(v, np.ndarray):
                return v.tolist()
            if isinstance(v, np.generic):
                return v.item()
            return v

        return {"statistic": plain(self.statistic), "threshold": plain(self.threshold),
                "p_value": plain(self.p_value), "drift": plain(self.drift)}
