"""Rollback hooks, one module per type.

Each module has ``run(hook, call) -> str``: it does its one thing within ``hook.timeout_seconds``,
returns a short description of what it did, and raises :class:`HookFailed` when it did not succeed
(the dispatcher retries it). ``describe(hook, call) -> str`` says what it would do (dry run).
The route hook is different: it changes the sidecar itself, so the dispatcher records the pin
before applying it (see agent/alerts/hooks/route.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from agent.alerts.incident import Incident


class HookFailed(Exception):
    """A hook attempt did not succeed; the message says why (it goes to the audit log).

    ``retry=False``: the attempt may have taken effect (a request sent and no answer), and doing it again
    would not be safe; the dispatcher records the result as ``unknown`` and does not retry.
    """

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class HookCall:
    """One attempt of one hook for one incident."""

    incident: Incident
    hook: str                   # the hook's configured name
    attempt: int                # 1 for the first attempt
    instance: str               # the sidewatch instance (rollback.instance)

    def payload(self) -> dict:
        """The incident as JSON: the webhook body and SIDEWATCH_INCIDENT_JSON of command hooks."""
        incident = self.incident
        alert = incident.alert
        return {
            "incident": incident.id,
            "alert": alert.name,
            "key": alert.key,
            "severity": alert.severity,
            "labels": dict(alert.labels),
            "annotations": dict(alert.annotations),
            "value": alert.value if alert.value is not None and math.isfinite(alert.value) else None,
            "started_at": alert.started_at,
            "opened_at": incident.opened_at,
            "source": alert.source,
            "hook": self.hook,
            "attempt": self.attempt,
            "instance": self.instance,
            # Signed with the rest of the body: receivers reject deliveries older than a few minutes.
            "sent_at": round(time.time(), 3),
        }
