"""The Alertmanager receiver: Alertmanager's webhook payload (version 4) -> alerts for the rollback hooks.

Fleet-wide alerts computed by Prometheus reach the same hooks as the sidecar's own: a firing alert
whose name is mapped in ``admin.alertmanager_hooks``, or that carries a ``sidewatch_hooks`` label
("pin-v1,notify"), goes to the dispatcher as an :class:`Alert` (source "alertmanager"); a resolved one
closes its incident. The alert's key is its name and labels, Alertmanager's own identity of an alert,
so a notification repeated every ``repeat_interval`` maps to the incident already open. A firing alert
whose ``startsAt`` is not after the same key's last resolution (the resolved alert's ``endsAt``) is an
old payload again: it opens nothing, is counted, and is answered 200 so Alertmanager does not retry it.

Bounds (a careless rule, or a route that does not group by alert name, can put thousands of alerts in one
group): only the first ``admin.max_alerts_per_delivery`` firing alerts with hooks of a delivery are acted
on, and the dispatcher refuses new incidents beyond ``rollback.max_open_alertmanager_incidents`` and firings
dated ahead of its clock. Every refusal is counted (``sidewatch_alert_firings_ignored_total{reason}``), logged
at most once per interval, and answered 200 with what became of each alert: a 4xx would make Alertmanager
drop the whole notification, the alerts acted on with it, and a 5xx would make it retry the same payload at
once, refused the same way. What was not acted on comes back with Alertmanager's next notification of the
group (``group_interval`` when the group changed, ``repeat_interval`` otherwise), and is acted on then if it
fits. Resolutions come first in a delivery (they free room) and are never truncated.

The payload is checked whole before anything is dispatched: a malformed one changes nothing.
Payload: https://prometheus.io/docs/alerting/latest/configuration/#webhook_config
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from agent.alerts.incident import ALERTMANAGER, Alert, alert_key
from agent.jsonbody import BadBody, parse_json_body
from agent.logs import ThrottledLog
from agent.metrics import FIRING_REFUSALS, bound_label

if TYPE_CHECKING:
    from agent.alerts.dispatcher import RollbackDispatcher
    from agent.metrics import AlertMetrics

log = logging.getLogger(__name__)

# An alert label naming hooks (comma-separated), for Prometheus rules that choose their own hooks.
HOOKS_LABEL = "sidewatch_hooks"
# Lines about deliveries that repeat (unknown hooks, truncated deliveries): each kind once per interval.
_throttled = ThrottledLog(log)


class MalformedPayload(ValueError):
    """The body is not an Alertmanager webhook payload of version 4."""


@dataclass
class Delivery:
    """What one webhook payload asks for."""

    firing: list[Alert] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)   # alert keys
    ended_at: dict[str, float] = field(default_factory=dict)  # resolved alert key -> its endsAt, when given
    ignored: int = 0                                   # alerts with no hooks: not ours to act on


def _string_map(value, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise MalformedPayload(f"{where} must be an object of strings")
    return value


def _timestamp(value, where: str) -> float:
    if not isinstance(value, str):
        raise MalformedPayload(f"{where} must be an RFC 3339 time")
    try:
        return datetime.fromisoformat(value).timestamp()
    except (ValueError, OverflowError, OSError):  # a year out of range, naive or aware
        raise MalformedPayload(f"{where}: {value!r} is not an RFC 3339 time") from None


def _optional_timestamp(value) -> float | None:
    """endsAt of a resolved alert: when it resolved on Alertmanager's clock, or None when it says nothing
    usable (absent, Go's zero time): the receiver then takes the time the resolution arrives."""
    try:
        at = _timestamp(value, "endsAt")
    except MalformedPayload:
        return None
    return at if at > 0 else None


def parse_payload(body: bytes, mapping: dict[str, list[str]], known_hooks) -> Delivery:
    """Check a webhook body and sort its alerts into firing and resolved; raises MalformedPayload."""
    try:
        payload = parse_json_body(body)  # every way a body fails to parse (nested too deep too) is BadBody
    except BadBody as err:
        raise MalformedPayload(str(err)) from None
    if payload.get("version") != "4":
        raise MalformedPayload(f"version must be \"4\", got {payload.get('version')!r}")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise MalformedPayload("alerts must be a list")
    delivery = Delivery()
    for index, item in enumerate(alerts):
        where = f"alerts[{index}]"
        if not isinstance(item, dict):
            raise MalformedPayload(f"{where} must be an object")
        status = item.get("status")
        if status not in ("firing", "resolved"):
            raise MalformedPayload(f"{where}.status must be firing or resolved, got {status!r}")
        labels = dict(_string_map(item.get("labels"), f"{where}.labels"))
        annotations = _string_map(item.get("annotations"), f"{where}.annotations")
        name = labels.pop("alertname", "")
        if not name:
            raise MalformedPayload(f"{where}.labels has no alertname")
        started_at = _timestamp(item.get("startsAt"), f"{where}.startsAt")
        hooks = _hooks(name, labels, mapping, known_hooks)
        if not hooks:
            delivery.ignored += 1
            continue
        key = alert_key(name, labels)
        if status == "resolved":
            delivery.resolved.append(key)
            ended_at = _optional_timestamp(item.get("endsAt"))
            if ended_at is not None:
                delivery.ended_at[key] = ended_at
            continue
        delivery.firing.append(Alert(
            name=name, key=key, severity=labels.get("severity", ""), labels=labels, annotations=dict(annotations),
            source=ALERTMANAGER, started_at=started_at if started_at > 0 else time.time(), value=None,
            hooks=hooks))
    return delivery


def _hooks(name: str, labels: dict[str, str], mapping: dict[str, list[str]], known_hooks) -> tuple[str, ...]:
    hooks = list(mapping.get(name, ()))
    for hook in (part.strip() for part in labels.get(HOOKS_LABEL, "").split(",")):
        if not hook or hook in hooks:
            continue
        if hook not in known_hooks:
            # A rule's label can name anything; only configured hooks ever run. (One key for every name: the
            # names are the caller's, and each key is remembered.)
            _throttled.warning("unknown_hook", "sidewatch: Alertmanager alert %s names hook %r, which is not "
                               "configured", bound_label(name), bound_label(hook))
            continue
        hooks.append(hook)
    return tuple(hooks)


class AlertmanagerReceiver:
    """Hands the alerts of each delivery to the dispatcher and counts deliveries by result."""

    def __init__(self, mapping: dict[str, list[str]], known_hooks, dispatcher: "RollbackDispatcher",
                 metrics: "AlertMetrics", max_alerts_per_delivery: int) -> None:
        self.mapping = mapping
        self.known_hooks = frozenset(known_hooks)
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.max_alerts_per_delivery = max_alerts_per_delivery
        for result in ("ok", "malformed", "unauthorized", "too_large", "error"):
            metrics.receiver_requests.labels(result)
        for reason in FIRING_REFUSALS:  # 0 until it happens, for alerts on their rate
            metrics.firings_ignored.labels(ALERTMANAGER, reason)

    def count(self, result: str) -> None:
        self.metrics.receiver_requests.labels(result).inc()

    def handle(self, body: bytes) -> tuple[int, dict]:
        """(HTTP status, JSON reply) for one webhook delivery."""
        try:
            delivery = parse_payload(body, self.mapping, self.known_hooks)
        except MalformedPayload as err:
            self.count("malformed")
            log.warning("sidewatch: malformed Alertmanager payload: %s", err)
            return 400, {"error": f"sidewatch: malformed Alertmanager payload: {err}"}
        acted, truncated = delivery.firing[:self.max_alerts_per_delivery], delivery.firing[self.max_alerts_per_delivery:]
        incidents: dict[str, str] = {}
        refused: dict[str, list[str]] = {"stale": [], "future": [], "max_open_incidents": []}
        try:
            # Resolutions first: they free room under the bound on open incidents for the firings after them.
            for key in delivery.resolved:
                self.dispatcher.resolved(key, delivery.ended_at.get(key))
            for alert in acted:
                admission = self.dispatcher.admit(alert)
                if admission.incident is None:
                    # Refused (counted and logged by the dispatcher), answered 200 all the same: see above.
                    refused[admission.refused].append(alert.key)
                else:
                    incidents[alert.key] = admission.incident
        except Exception as err:  # answered 500: Alertmanager retries the delivery
            self.count("error")
            log.exception("sidewatch: the rollback dispatcher failed on an Alertmanager delivery")
            return 500, {"error": f"sidewatch: dispatcher failed: {err}"}
        if truncated:
            self.metrics.firings_ignored.labels(ALERTMANAGER, "truncated").inc(len(truncated))
            _throttled.warning("truncated", "sidewatch: an Alertmanager delivery of %d firing alerts with hooks: the "
                               "first %d acted on, %d truncated (admin.max_alerts_per_delivery; the first truncated: "
                               "%s); set max_alerts in Alertmanager's webhook_config, or group the route more finely",
                               len(delivery.firing), len(acted), len(truncated), bound_label(truncated[0].key))
        self.count("ok")
        return 200, {"incidents": incidents, "resolved": delivery.resolved, "ignored": delivery.ignored,
                     "stale": refused["stale"], "future": refused["future"], "refused": refused["max_open_incidents"],
                     "truncated": len(truncated)}
