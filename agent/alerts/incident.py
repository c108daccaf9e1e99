"""What fires (an Alert) and what the rollback side keeps about it (an Incident).

An incident is one firing of one alert series: the alert's ``key`` (name plus sorted labels) maps to
at most one open incident at a time, so an alert that keeps firing, or is delivered again by
Alertmanager, or is seen again after a restart, never starts a second rollback.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

# Results of one hook for one incident, as recorded in the audit log and exported as
# sidewatch_rollback_hook_runs_total{result}. "unknown" is only written on replay: an attempt that
# was started before a crash and has no recorded result (it may or may not have run).
HOOK_RESULTS = ("success", "failure", "dry_run", "skipped", "unknown")
# Alert.source of the alerts that Alertmanager delivers (agent/alerts/receiver.py); the engine's are "sidecar".
ALERTMANAGER = "alertmanager"


@dataclass(frozen=True)
class Alert:
    """What the alert engine or the Alertmanager receiver hands over when an alert fires."""

    name: str                       # rule name, or Alertmanager's alertname
    key: str                        # stable identity of the series: name + sorted labels
    severity: str
    labels: dict[str, str]          # includes model and version when the rule groups by them
    annotations: dict[str, str]
    source: str                     # "sidecar" or "alertmanager"
    started_at: float               # unix seconds when it started firing
    value: float | None             # the value that made it fire, when known
    hooks: tuple[str, ...]          # names of configured hooks to run for it


def alert_key(name: str, labels: dict[str, str]) -> str:
    """The key of an alert series: ``Name{a=1,b=2}`` with the labels sorted (``Name`` without labels)."""
    if not labels:
        return name
    return name + "{" + ",".join(f"{k}={labels[k]}" for k in sorted(labels)) + "}"


def new_incident_id(now: float | None = None) -> str:
    """A unique, sortable incident id: UTC time to the second and 6 random hex digits."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"inc-{stamp}-{os.urandom(3).hex()}"


@dataclass
class HookState:
    """One hook's progress for one incident."""

    result: str | None = None       # one of HOOK_RESULTS once finished; None while pending
    attempts: int = 0
    message: str = ""
    finished_at: float | None = None
    # An attempt was started and has no result yet (in the log: between attempt_started and attempt_result).
    in_flight: bool = False
    # Attempts cut short by a restart before they took effect (route hooks): run again, not counted.
    interrupted: int = 0

    def to_dict(self) -> dict:
        return {"result": self.result or "pending", "attempts": self.attempts, "message": self.message,
                "finished_at": self.finished_at}


@dataclass
class Incident:
    id: str
    alert: Alert
    opened_at: float
    # "run" (hooks run), "dry_run" or "skipped" (cooldown, max per hour): taken once, when opened.
    decision: str = "run"
    reason: str = ""
    closed_at: float | None = None
    hooks: dict[str, HookState] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return self.closed_at is None

    def to_dict(self) -> dict:
        alert = self.alert
        return {
            "id": self.id,
            "alert": alert.name,
            "key": alert.key,
            "severity": alert.severity,
            "source": alert.source,
            "labels": dict(alert.labels),
            "annotations": dict(alert.annotations),
            "value": alert.value,
            "started_at": alert.started_at,
            "opened_at": self.opened_at,
            "closed_at": self.closed_at,
            "state": "open" if self.open else "closed",
            "decision": self.decision,
            "reason": self.reason,
            "hooks": {name: state.to_dict() for name, state in self.hooks.items()},
        }


def alert_to_dict(alert: Alert) -> dict:
    """The alert as JSON (the audit log's incident_opened record, webhook bodies, command hooks)."""
    return {
        "name": alert.name,
        "key": alert.key,
        "severity": alert.severity,
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "source": alert.source,
        "started_at": alert.started_at,
        "value": alert.value,
        "hooks": list(alert.hooks),
    }


def alert_from_dict(data: dict) -> Alert:
    """Inverse of :func:`alert_to_dict` (replay of the audit log)."""
    value = data.get("value")
    return Alert(
        name=str(data["name"]),
        key=str(data["key"]),
        severity=str(data.get("severity", "")),
        labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
        annotations={str(k): str(v) for k, v in (data.get("annotations") or {}).items()},
        source=str(data.get("source", "")),
        started_at=float(data.get("started_at") or 0.0),
        value=None if value is None else float(value),
        hooks=tuple(str(h) for h in data.get("hooks") or ()),
    )
