"""The run counters that the alarm-counting drift detectors save and restore alike."""

from __future__ import annotations

import math
from typing import Any


def json_float(x: float) -> float | None:
    """NaN and infinities are not JSON; they travel as null."""
    return float(x) if math.isfinite(x) else None


def from_json_float(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def alarm_state(detector) -> dict[str, Any]:
    """Samples seen and skipped, alarms so far, where the last update alarmed, and its statistic."""
    return {
        "n": int(detector.n),
        "n_skipped": int(detector.n_skipped),
        "n_detections": int(detector.n_detections),
        "drift": detector._drift,
        "alarm_positions": list(detector.alarm_positions),
        "last_statistic": json_float(detector._last_statistic),
    }


def load_alarm_state(detector, state: dict[str, Any]) -> None:
    detector.n = int(state["n"])
    detector.n_skipped = int(state["n_skipped"])
    detector.n_detections = int(state["n_detections"])
    detector._drift = bool(state["drift"])
    detector.alarm_positions = [int(p) for p in state.get("alarm_positions", [])]
    detector._last_statistic = from_json_float(state["last_statistic"])
