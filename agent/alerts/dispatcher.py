"""The rollback dispatcher: incidents, the safety rules, and the hooks run on a worker thread.

What it guarantees:

* **One rollback per incident.** An alert key with an open incident maps to that incident; firing
  again (the engine, Alertmanager's repeats, a restart) starts nothing new. A hook that succeeded for
  an incident never runs again for it; a failed one is retried with exponential backoff up to its
  ``retries``, each attempt audit-logged.
* **Cooldown and max per hour.** The decision is taken once, when the incident opens: ``run``,
  ``skipped`` (cooldown or max_per_hour, with the reason) or ``dry_run``. A skipped incident stays
  skipped until it resolves and fires again. A rollback is an incident whose hooks were run, however
  they ended; in dry-run mode the dry runs are counted instead, so a dry run shows what would happen.
* **Record first.** Every decision, attempt and result is written to the audit log and fsync'd before
  the next step: "attempt_started" before a hook runs, "route_pinned" before a pin takes effect,
  "route_undone" before it is removed.
* **Replay.** At start the log is read back: open incidents, hook results, route pins and the
  rollbacks of the last hour are restored. A hook that had not finished resumes: pending retries run
  (at their backoff), an interrupted route hook runs again (nothing took effect without its record),
  and any other hook whose attempt had started but has no result is recorded ``unknown`` and not
  repeated: it may have run, and running a webhook, a script or a cluster rollback twice is worse
  than once.
* **A stale firing opens nothing.** A firing whose start is not after the last resolution of the same
  alert key (an old Alertmanager payload posted again, byte for byte) is the incident that closed, not a
  new one: it is counted (``sidewatch_alert_firings_ignored_total{reason="stale"}``) and nothing runs. The
  resolution times are in the audit log's ``incident_resolved`` records, so this holds across restarts.
* **A firing dated ahead is not a time.** A firing whose start is later than the sidecar's clock plus
  ``rollback.max_clock_skew_seconds`` opens nothing (``reason="future"``), and no resolution is remembered
  later than that: a start dated years ahead cannot make the alert's real firings stale for years.
* **Bounded open incidents.** At most ``rollback.max_open_alertmanager_incidents`` incidents of Alertmanager's
  alerts are open at once; a new one is refused while the bound is reached (``reason="max_open_incidents"``,
  logged once per interval), and Alertmanager's next notification of the alert opens it once there is room.
  The replay keeps the same bound. The sidecar's own alerts are bounded by its rules and model labels, and
  its engine hands a firing over once: they are neither counted nor refused.
* **Dry run** decides and records, runs nothing.

Refusals are counted in ``sidewatch_alert_firings_ignored_total{source,reason}`` and logged at most once per
interval per reason (agent.logs.ThrottledLog); they are not audit-logged: they decide nothing, and one
delivery may carry thousands.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass

from agent.alerts.audit import AuditLog
from agent.alerts.hooks import Hook, HookCall, HookContext, HookFailed, argo_rollouts, command, kubernetes, route, webhook
from agent.alerts.incident import ALERTMANAGER, Alert, HookState, Incident, alert_from_dict, alert_to_dict, new_incident_id
from agent.config.rollback import RollbackConfig
from agent.dataplane.routes import Pin, RouteTable
from agent.logs import ThrottledLog
from agent.metrics import AlertMetrics, bound_label

log = logging.getLogger(__name__)

# Hook types, by the ``type`` of their configuration: each implements plan/apply (agent/alerts/hooks).
HOOK_TYPES: dict[str, type[Hook]] = {
    "route": route.Route, "webhook": webhook.Webhook, "command": command.Command,
    "kubernetes": kubernetes.KubernetesRollback, "argo-rollouts": argo_rollouts.ArgoRolloutsAbort,
}
_HOUR = 3600.0
# Incidents kept in memory (and listed by status) beyond the open or unfinished ones.
_KEEP_FINISHED = 500
# Alert keys whose last resolution is remembered (for stale firings); the oldest are forgotten beyond it.
_KEEP_RESOLVED = 10_000


@dataclass(frozen=True)
class Admission:
    """What became of a firing alert: its incident (opened now, or already open), or why none opened."""

    incident: str | None
    refused: str = ""   # "stale", "future" or "max_open_incidents" (agent.metrics.FIRING_REFUSALS)


class RollbackDispatcher:
    def __init__(self, config: RollbackConfig, metrics: AlertMetrics, routes: RouteTable) -> None:
        self.config = config
        self.metrics = metrics
        self.routes = routes
        self.audit = AuditLog(config.audit_log)
        context = HookContext(routes, self._apply_pin)
        self.hooks: dict[str, Hook] = {name: HOOK_TYPES[hook.type](hook, context) for name, hook in config.hooks.items()}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._incidents: dict[str, Incident] = {}
        self._open: dict[str, str] = {}                 # alert key -> open incident id
        # Alert key -> when its last incident resolved, on the alert source's clock (bounded, oldest out).
        self._resolved_at: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._rollbacks: collections.deque[float] = collections.deque()   # decision times, last hour
        self._last_rollback: float | None = None
        # Hook attempts due: (unix time, sequence, incident id, hook name).
        self._queue: list[tuple[float, int, str, str]] = []
        self._sequence = itertools.count()
        self._running = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Refused firings, logged once per interval per reason (a delivery may carry thousands).
        self._refusals = ThrottledLog(log)

    # --- the interface -------------------------------------------------------------------------

    def start(self) -> None:
        """Replay the audit log (open incidents, results, route pins), then start the worker thread."""
        records = self.audit.open()
        with self._lock:
            self._replay(records)
            self._record("started", instance=self.config.instance, dry_run=self.config.dry_run,
                         replayed_records=len(records), open_incidents=len(self._open),
                         pins=sorted(self.routes.pins))
            self._stopping = False
        self._thread = threading.Thread(target=self._work, name="sidewatch-rollback", daemon=True)
        self._thread.start()

    def firing(self, alert: Alert) -> str | None:
        """The incident id for a firing alert (:meth:`admit`), or None when it opened none."""
        return self.admit(alert).incident

    def admit(self, alert: Alert) -> Admission:
        """The incident for a firing alert; a new incident (and its hooks, queued) only when none is open, and
        none when the firing is refused: stale (it started no later than the alert's last resolution), dated
        ahead of the clock, or beyond the bound on open incidents. A refusal is counted and logged, not recorded."""
        with self._lock:
            existing = self._open.get(alert.key)
            if existing is not None:
                return Admission(existing)
            now = time.time()
            refusal = self._refusal(alert, now)
            if refusal is not None:
                reason, why = refusal
                self.metrics.firings_ignored.labels(alert.source, reason).inc()
                self._refusals.warning(reason, "sidewatch: firing of %s from %s opened no incident (%s): %s",
                                       bound_label(alert.key), alert.source, reason, why)
                return Admission(None, reason)
            decision, reason = self._decide(alert, now)
            incident = Incident(new_incident_id(now), alert, now, decision, reason,
                                hooks={name: HookState() for name in alert.hooks})
            try:
                self.audit.append("incident_opened", incident=incident.id, alert=alert_to_dict(alert),
                                  decision=decision, reason=reason)
            except OSError as err:
                # Never act on a decision the log does not hold.
                log.error("sidewatch: cannot write the audit log (%s): incident for %s not acted on", err,
                          bound_label(alert.key))
                incident.decision, incident.reason = "skipped", f"audit log not writable: {err}"
                decision = "skipped"
            self._incidents[incident.id] = incident
            self._open[alert.key] = incident.id
            self.metrics.incidents.labels(self.metrics.alert_label(alert.name), alert.source).inc()
            log.warning("sidewatch: incident %s opened for %s: %s%s", incident.id, bound_label(alert.key), decision,
                        f" ({incident.reason})" if incident.reason else "")
            if decision in ("run", "dry_run"):
                self._count_rollback(now)
            for name in alert.hooks:
                if decision == "run":
                    self._schedule(now, incident.id, name)
                elif decision == "dry_run":
                    self._finish(incident, name, "dry_run", "dry run: would " + self._describe(incident, name))
                else:
                    self._finish(incident, name, "skipped", incident.reason)
            self._prune()
            return Admission(incident.id)

    def resolved(self, key: str, ended_at: float | None = None) -> None:
        """The alert cleared: close its open incident. Hooks still retrying for it carry on.

        ``ended_at``: when it ended on the alert source's clock (Alertmanager's ``endsAt``), the clock its
        firings' starts are on; else now. A later firing that did not start after it is stale."""
        with self._lock:
            incident_id = self._open.pop(key, None)
            if incident_id is None:
                return
            incident = self._incidents[incident_id]
            now = time.time()
            # Never before the incident's own start: the very payload that opened it is stale, whatever endsAt says.
            # An endsAt later than now (a careless caller's) would make every later firing stale: capped at now.
            # So is a start dated ahead (one replayed from a log written before the clock check): not beyond
            # the clock-skew allowance.
            resolved_at = min(max(now if ended_at is None or ended_at <= 0 else min(ended_at, now),
                                  incident.alert.started_at), now + self.config.max_clock_skew_seconds)
            self._record("incident_resolved", incident=incident_id, key=key, resolved_at=resolved_at)
            incident.closed_at = now
            self._remember_resolution(key, resolved_at)

    def undo_route(self, model: str, actor: str) -> bool:
        """Remove the model's route pin (recorded first, with who asked); False when there is none."""
        with self._lock:
            pin = self.routes.get(model)
            if pin is None:
                return False
            # Raises when the log cannot be written: the pin then stays, as the log says.
            self.audit.append("route_undone", model=model, actor=actor, version=pin.version,
                              upstream=pin.upstream, incident=pin.incident)
            self.routes.unpin(model)
            self.metrics.route_pinned.labels(model, pin.target).set(0)
            log.warning("sidewatch: route pin of %s to %s undone by %s", model, pin.target, actor)
            return True

    def status(self) -> dict:
        with self._lock:
            now = time.time()
            self._expire(now)
            cooldown_until = None
            if self._last_rollback is not None and self._last_rollback + self.config.cooldown_seconds > now:
                cooldown_until = self._last_rollback + self.config.cooldown_seconds
            incidents = sorted(self._incidents.values(), key=lambda inc: inc.opened_at, reverse=True)
            return {
                "dry_run": self.config.dry_run,
                "instance": self.config.instance,
                "audit_log": str(self.config.audit_log) if self.config.audit_log else None,
                "cooldown_seconds": self.config.cooldown_seconds,
                "cooldown_until": cooldown_until,
                "max_per_hour": self.config.max_per_hour,
                "rollbacks_last_hour": len(self._rollbacks),
                "open_incidents": len(self._open),
                "incidents": [incident.to_dict() for incident in incidents],
                "routes": {model: pin.to_dict() for model, pin in self.routes.pins.items()},
                "hooks": {name: hook.type for name, hook in self.config.hooks.items()},
            }

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no hook attempt is queued or running (retries waiting for their backoff count as
        queued); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue or self._running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker after the attempt it is running (queued retries resume at the next start)."""
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("sidewatch: a rollback hook was still running at shutdown")
            self._thread = None
        self.audit.close()

    # --- decisions -----------------------------------------------------------------------------

    def _refusal(self, alert: Alert, now: float) -> tuple[str, str] | None:
        """(reason, why) when a firing with no open incident must open none; None when it may."""
        skew = self.config.max_clock_skew_seconds
        if alert.started_at > now + skew:
            # Not a time: compared with a resolution it would be after every one, and as a resolution
            # (an incident's start bounds it from below) before every later firing.
            return "future", (f"it starts {alert.started_at - now:.0f} s ahead of this sidecar's clock "
                              f"(rollback.max_clock_skew_seconds {skew:g}); taken when sent again once it has started")
        resolved_at = self._resolved_at.get(alert.key)
        if resolved_at is not None and alert.started_at <= resolved_at:
            return "stale", (f"it started at {alert.started_at:.3f}, not after its last resolution at "
                             f"{resolved_at:.3f}: an old payload again")
        bound = self.config.max_open_alertmanager_incidents
        if alert.source == ALERTMANAGER and self._open_from(ALERTMANAGER) >= bound:
            return "max_open_incidents", (f"{bound} incidents of Alertmanager's alerts are open "
                                          f"(rollback.max_open_alertmanager_incidents); it opens when Alertmanager "
                                          "sends it again once one has resolved")
        return None

    def _open_from(self, source: str) -> int:
        """Open incidents of alerts from ``source``."""
        return sum(1 for incident_id in self._open.values() if self._incidents[incident_id].alert.source == source)

    def _decide(self, alert: Alert, now: float) -> tuple[str, str]:
        if not alert.hooks:
            return "none", "no hooks configured for this alert"
        self._expire(now)
        cooldown = self.config.cooldown_seconds
        if self._last_rollback is not None and now - self._last_rollback < cooldown:
            return "skipped", (f"cooldown: the last rollback was {now - self._last_rollback:.0f} s ago "
                               f"(cooldown_seconds {cooldown:g})")
        if len(self._rollbacks) >= self.config.max_per_hour:
            return "skipped", (f"max_per_hour: {len(self._rollbacks)} rollbacks in the last hour "
                               f"(limit {self.config.max_per_hour})")
        return ("dry_run" if self.config.dry_run else "run"), ""

    def _remember_resolution(self, key: str, at: float) -> None:
        self._resolved_at[key] = max(at, self._resolved_at.get(key, at))
        self._resolved_at.move_to_end(key)
        while len(self._resolved_at) > _KEEP_RESOLVED:
            self._resolved_at.popitem(last=False)

    def _count_rollback(self, at: float) -> None:
        self._rollbacks.append(at)
        self._last_rollback = at if self._last_rollback is None else max(self._last_rollback, at)

    def _expire(self, now: float) -> None:
        while self._rollbacks and self._rollbacks[0] <= now - _HOUR:
            self._rollbacks.popleft()

    def _describe(self, incident: Incident, name: str) -> str:
        hook = self.hooks.get(name)
        if hook is None:
            return f"fail: no hook named {name!r} is configured"
        return hook.describe(HookCall(incident, name, 0, self.config.instance))

    # --- the worker ----------------------------------------------------------------------------

    def _schedule(self, due: float, incident_id: str, name: str) -> None:
        heapq.heappush(self._queue, (due, next(self._sequence), incident_id, name))
        self._changed.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._stopping:
                    now = time.time()
                    if self._queue and self._queue[0][0] <= now:
                        break
                    self._changed.wait(self._queue[0][0] - now if self._queue else None)
                if self._stopping:
                    return
                _, _, incident_id, name = heapq.heappop(self._queue)
                self._running += 1
            try:
                self._attempt(incident_id, name)
            except Exception:  # noqa: BLE001 - a bug in one hook must not stop the worker
                log.exception("sidewatch: rollback hook %s for incident %s failed unexpectedly", name, incident_id)
            finally:
                with self._lock:
                    self._running -= 1
                    self._changed.notify_all()

    def _attempt(self, incident_id: str, name: str) -> None:
        with self._lock:
            incident = self._incidents[incident_id]
            state = incident.hooks[name]
            if state.result is not None:
                return  # finished already: a success is never repeated
            hook = self.hooks.get(name)
            if hook is None:
                self._finish(incident, name, "failure", f"no hook named {name!r} is configured")
                return
            attempt = state.attempts + 1
            try:
                self.audit.append("attempt_started", incident=incident_id, hook=name, attempt=attempt)
            except OSError as err:
                log.error("sidewatch: cannot write the audit log (%s): hook %s not run", err, name)
                state.result, state.message = "failure", f"audit log not writable: {err}; not run"
                self.metrics.hook_runs.labels(self.metrics.alert_label(incident.alert.name), name, "failure").inc()
                return
            state.attempts, state.in_flight = attempt, True
            self.metrics.hook_attempts.labels(self.metrics.alert_label(incident.alert.name), name).inc()
        call = HookCall(incident, name, attempt, self.config.instance)
        started = time.monotonic()
        retry = True
        try:
            message, ok = self._plan_and_apply(hook, call), True
        except HookFailed as err:
            message, ok, retry = str(err), False, err.retry
        except Exception as err:  # noqa: BLE001 - recorded as a failure like any other
            log.exception("sidewatch: rollback hook %s raised", name)
            message, ok = f"sidewatch: hook {name} raised {err!r}", False
        seconds = round(time.monotonic() - started, 3)
        with self._lock:
            self._record("attempt_result", incident=incident_id, hook=name, attempt=attempt, ok=ok,
                         message=message, seconds=seconds)
            state.in_flight, state.message = False, message
            if ok:
                self._finish(incident, name, "success", message)
            elif not retry:
                self._finish(incident, name, "unknown", message)
            elif attempt - state.interrupted <= hook.config.retries:
                delay = hook.config.backoff(attempt - state.interrupted)
                state.message = f"{message}; attempt {attempt + 1} in {delay:g} s"
                self._schedule(time.time() + delay, incident_id, name)
            else:
                self._finish(incident, name, "failure", message)

    def _plan_and_apply(self, hook: Hook, call: HookCall) -> str:
        plan = hook.plan(call)
        if plan.record_type is None:
            return hook.apply(plan, call)
        with self._lock:
            # Recorded before it takes effect: replay restores exactly the effects the log holds (route pins).
            self.audit.append(plan.record_type, **plan.record)
            return hook.apply(plan, call)

    def _apply_pin(self, pin: Pin) -> Pin | None:
        previous = self.routes.pin(pin)
        if previous is not None:
            self.metrics.route_pinned.labels(previous.model, previous.target).set(0)
        self.metrics.route_pinned.labels(pin.model, pin.target).set(1)
        return previous

    def _finish(self, incident: Incident, name: str, result: str, message: str) -> None:
        state = incident.hooks[name]
        self._record("hook_result", incident=incident.id, hook=name, result=result, message=message,
                     attempts=state.attempts)
        state.result, state.message, state.finished_at, state.in_flight = result, message, time.time(), False
        label = self.metrics.alert_label(incident.alert.name)
        self.metrics.hook_runs.labels(label, name, result).inc()
        if result == "success":
            self.metrics.hook_last_timestamp.labels(label, name).set(state.finished_at)
        (log.warning if result in ("success", "dry_run") else log.error)(
            "sidewatch: hook %s for incident %s: %s: %s", name, incident.id, result, message)

    def _record(self, record_type: str, **fields) -> None:
        """Append a record whose loss is survivable (results, notes): an unwritable log is logged, not raised."""
        try:
            self.audit.append(record_type, **fields)
        except OSError as err:
            log.error("sidewatch: cannot write %s to the audit log: %s", record_type, err)

    def _prune(self) -> None:
        finished = [incident for incident in self._incidents.values()
                    if not incident.open and all(state.result is not None for state in incident.hooks.values())]
        if len(finished) > _KEEP_FINISHED:
            finished.sort(key=lambda incident: incident.opened_at)
            for incident in finished[:len(finished) - _KEEP_FINISHED]:
                del self._incidents[incident.id]

    # --- replay --------------------------------------------------------------------------------

    def _replay(self, records: list[dict]) -> None:
        counted = "dry_run" if self.config.dry_run else "run"
        pins: dict[str, Pin] = {}
        pinned_by: set[tuple[str, str]] = set()
        last_result_at: dict[tuple[str, str], float] = {}
        # Whether the last recorded attempt of each (incident, hook) succeeded.
        last_ok: dict[tuple[str, str], bool] = {}
        # Incident id -> alert key of the open incidents beyond max_open_alertmanager_incidents: not restored.
        dropped: dict[str, str] = {}
        for record in records:
            try:
                self._replay_record(record, counted, pins, pinned_by, last_result_at, last_ok, dropped)
            except (KeyError, TypeError, ValueError) as err:
                log.warning("sidewatch: audit log record %r not understood (%s); skipped", record, err)
        if dropped:
            log.warning("sidewatch: %d incidents of Alertmanager's alerts in the audit log %s not restored (the "
                        "first: %s): they opened while %d were open, beyond rollback.max_open_alertmanager_incidents "
                        "(written without that bound, or with a larger one); their hooks are not resumed",
                        len(dropped), self.config.audit_log, bound_label(next(iter(dropped))),
                        self.config.max_open_alertmanager_incidents)
        for pin in pins.values():
            try:
                self._apply_pin(pin)
            except ValueError as err:
                log.error("sidewatch: route pin of %s to %s not restored: %s", pin.model, pin.target, err)
        now = time.time()
        self._expire(now)
        for incident in list(self._incidents.values()):
            if incident.decision != "run":
                continue
            for name, state in incident.hooks.items():
                if state.result is None and not state.in_flight and last_ok.get((incident.id, name)):
                    # Stopped between a successful attempt's result and the hook's: it succeeded; never again.
                    self._finish(incident, name, "success", state.message)
                elif state.result is None:
                    self._resume(incident, name, state, (incident.id, name) in pinned_by,
                                 last_result_at.get((incident.id, name)), now)
        self._prune()
        if records:
            log.warning("sidewatch: audit log %s replayed: %d records, %d open incidents, %d route pins",
                        self.config.audit_log, len(records), len(self._open), len(pins))

    def _replay_record(self, record: dict, counted: str, pins: dict[str, Pin], pinned_by: set,
                       last_result_at: dict, last_ok: dict, dropped: dict[str, str]) -> None:
        kind = record["type"]
        at = float(record.get("ts") or 0.0)
        if kind == "incident_opened":
            alert = alert_from_dict(record["alert"])
            incident = Incident(record["incident"], alert, at, record.get("decision", "run"), record.get("reason", ""),
                                hooks={name: HookState() for name in alert.hooks})
            if incident.decision == counted:
                self._count_rollback(at)  # restored or not, it was decided: it counts for max_per_hour
            if (alert.source == ALERTMANAGER and alert.key not in self._open
                    and self._open_from(ALERTMANAGER) >= self.config.max_open_alertmanager_incidents):
                # The bound the live dispatcher keeps, kept the same way (in the log's order): the later
                # records of this incident find no incident (but its resolution, below).
                dropped[incident.id] = alert.key
                return
            self._incidents[incident.id] = incident
            self._open[alert.key] = incident.id
            return
        if kind in ("route_pinned", "route_undone"):
            if kind == "route_pinned":
                pin = Pin(record["model"], record.get("version"), record.get("upstream"), record.get("incident", ""),
                          record.get("hook", ""), float(record.get("pinned_at") or at))
                pins[pin.model] = pin
                pinned_by.add((pin.incident, pin.hook))
            else:
                pins.pop(record["model"], None)
            return
        incident = self._incidents.get(record.get("incident", ""))
        if incident is None:
            key = dropped.get(record.get("incident", ""))
            if kind == "incident_resolved" and key is not None:
                # Not restored, but an old payload of it posted again is still stale.
                self._remember_resolution(key, self._replayed_resolution(record, at, 0.0))
            return  # "started" notes, or an incident pruned from memory
        if kind == "incident_resolved":
            incident.closed_at = at
            if self._open.get(incident.alert.key) == incident.id:
                del self._open[incident.alert.key]
            self._remember_resolution(incident.alert.key, self._replayed_resolution(record, at, incident.alert.started_at))
            return
        state = incident.hooks.get(record.get("hook", ""))
        if state is None:
            return
        if kind == "attempt_started":
            state.attempts, state.in_flight = int(record["attempt"]), True
        elif kind == "attempt_result":
            state.in_flight, state.message = False, str(record.get("message", ""))
            state.interrupted += bool(record.get("interrupted"))
            last_result_at[(incident.id, record["hook"])] = at
            last_ok[(incident.id, record["hook"])] = bool(record.get("ok"))
        elif kind == "hook_result":
            state.result, state.message, state.finished_at = record["result"], str(record.get("message", "")), at
            state.in_flight = False

    def _replayed_resolution(self, record: dict, at: float, started_at: float) -> float:
        """When an ``incident_resolved`` record says the alert resolved, on the alert source's clock: not before
        the incident's start, and not later than the clock-skew allowance after the record was written (a start
        dated years ahead, written before the clock check, would make every later firing stale)."""
        # Records written before resolved_at was: the sidecar's clock at the resolution.
        resolved_at = max(float(record.get("resolved_at") or at), started_at)
        return min(resolved_at, at + self.config.max_clock_skew_seconds) if at > 0 else resolved_at

    def _resume(self, incident: Incident, name: str, state: HookState, pinned: bool,
                last_result_at: float | None, now: float) -> None:
        """A hook left unfinished by the previous run of the sidecar."""
        hook = self.hooks.get(name)
        if hook is None:
            self._finish(incident, name, "failure", f"no hook named {name!r} is configured any more")
            return
        if state.in_flight:
            if not hook.effect_is_recorded:
                self._finish(incident, name, "unknown",
                             f"attempt {state.attempts} started before sidewatch stopped and has no recorded "
                             "result: it may have run; not repeated")
                return
            if pinned:
                self._record("attempt_result", incident=incident.id, hook=name, attempt=state.attempts, ok=True,
                             message="pinned before a restart; restored from the audit log", seconds=0)
                self._finish(incident, name, "success", "pinned before a restart; restored from the audit log")
                return
            # The pin was never recorded, so it never took effect: run the attempt again, uncounted.
            self._record("attempt_result", incident=incident.id, hook=name, attempt=state.attempts, ok=False,
                         interrupted=True, message="interrupted by a restart before it took effect; run again")
            state.in_flight, state.interrupted = False, state.interrupted + 1
            self._schedule(now, incident.id, name)
            return
        counted_attempts = state.attempts - state.interrupted
        if counted_attempts > hook.config.retries:
            self._finish(incident, name, "failure", state.message or "no attempts left")
            return
        due = now
        if counted_attempts and last_result_at is not None:
            due = max(now, last_result_at + hook.config.backoff(counted_attempts))
        self._schedule(due, incident.id, name)
