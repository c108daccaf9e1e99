"""Rollback hooks, one module per type, all behind one interface: :class:`Hook`.

The dispatcher (agent/alerts/dispatcher.py) runs every hook the same way, in two steps:

- ``plan(call) -> Plan`` decides what this attempt would do, and does nothing. A dry run stops here
  and records the plan's ``action``. A plan may carry an audit record (``record_type``,
  ``record``): the dispatcher writes it to the audit log *before* the effect, so a crash never leaves
  an effect the log does not know about (the route hook's pin).
- ``apply(plan, call) -> str`` does it within the hook's ``timeout_seconds`` and says what it did; it
  raises :class:`HookFailed` when it did not succeed (the dispatcher retries it).

``effect_is_recorded`` tells the dispatcher what an attempt interrupted by a restart means: for most
hooks (a webhook, a script, a cluster rollback) it may have taken effect, so it is not repeated; for
the route hook the effect exists only through its audit record, so an attempt without one is run
again, and one with one is restored from the log.

Each module also keeps ``run(hook, call)`` and ``describe(hook, call)`` as plain functions of the
hook's configuration, the way its tests call it.

``route``          pin the model inside the sidecar (to a version, the last known-good one, or an upstream)
``webhook``        POST the incident, signed with HMAC-SHA256
``command``        run a program (no shell) with the incident in its environment
``kubernetes``     roll a Deployment back, as ``kubectl rollout undo`` does (``kubeclient``: the API client)
``argo_rollouts``  abort an Argo Rollout
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from agent.alerts.incident import Incident

if TYPE_CHECKING:
    from agent.dataplane.routes import Pin, RouteTable


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


@dataclass(frozen=True)
class Plan:
    """What one attempt will do, decided before it does anything."""

    action: str                         # "POST the incident to https://...", "pin mnist_cnn to 1"
    record_type: str | None = None      # an audit record written before the effect, or None
    record: dict = field(default_factory=dict)
    target: Any = None                  # what apply needs (the route hook's Pin)


@dataclass(frozen=True)
class HookContext:
    """What hooks that change the sidecar itself are given: its route table, and how a pin is applied
    (the dispatcher's function, which also keeps the sidewatch_route_pinned series)."""

    routes: "RouteTable"
    apply_pin: "Callable[[Pin], Pin | None]"


class Hook:
    """One configured hook (``config`` is its section under ``rollback.hooks``)."""

    effect_is_recorded: ClassVar[bool] = False

    def __init__(self, config, context: HookContext) -> None:
        self.config = config
        self.context = context

    def plan(self, call: HookCall) -> Plan:
        """What this attempt would do; raises HookFailed when there is nothing it can do."""
        raise NotImplementedError

    def apply(self, plan: Plan, call: HookCall) -> str:
        """Do what ``plan`` says; returns what was done, raises HookFailed when it failed."""
        raise NotImplementedError

    def describe(self, call: HookCall) -> str:
        """The dry run's words for what it would do."""
        return self.plan(call).action
