"""The dispatcher's safety rules with real hooks: a program that counts its runs, a real webhook receiver.

One rollback per incident, retries with backoff, cooldown and max per hour, dry run, the audit log and
its replay at start (open incidents, unfinished hooks, route pins)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import pytest
from prometheus_client import CollectorRegistry

from agent.alerts.audit import AuditLog
from agent.alerts.dispatcher import RollbackDispatcher
from agent.alerts.incident import Alert, alert_key, alert_to_dict
from agent.alerts.receiver import AlertmanagerReceiver
from agent.config.rollback import RollbackConfig
from agent.dataplane.routes import RouteTable
from agent.metrics import AlertMetrics
from tests.support.webhook import SECRET, WebhookReceiver

# Appends one line to the file named by its argument: the number of lines is the number of runs.
COUNTER = "import sys; open(sys.argv[1], 'a').write('ran\\n')"


def runs(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def alert(name: str = "AdversarialRateHigh", hooks=("script",), **labels) -> Alert:
    labels = labels or {"model": "mnist_cnn", "version": "2"}
    return Alert(name, alert_key(name, labels), "critical", labels, {"summary": "test"}, "sidecar", time.time(), 0.2,
                 tuple(hooks))


class Harness:
    """A dispatcher on a config, with its own registry; ``restart`` closes it and starts another on the same log."""

    def __init__(self, tmp_path, **config) -> None:
        self.tmp_path = tmp_path
        self.counter = tmp_path / "runs.txt"
        self.secret_file = tmp_path / "secret"
        self.secret_file.write_bytes(SECRET)
        hooks = {
            "script": {"type": "command", "argv": [sys.executable, "-c", COUNTER, str(self.counter)]},
            "failing": {"type": "command", "argv": [sys.executable, "-c", COUNTER + "; raise SystemExit(1)",
                                                    str(self.counter)], "retries": 2, "backoff_seconds": 0.05},
            "pin-v1": {"type": "route", "model": "mnist_cnn", "version": "1"},
            "pin-good": {"type": "route"},
            **config.pop("hooks", {}),
        }
        self.config = RollbackConfig.model_validate({
            "audit_log": str(tmp_path / "audit.jsonl"), "cooldown_seconds": 0, "max_per_hour": 100,
            "instance": "test", "hooks": hooks, **config})
        self.routes = RouteTable()
        self.start()

    def start(self) -> None:
        self.registry = CollectorRegistry()
        self.dispatcher = RollbackDispatcher(self.config, AlertMetrics(self.registry), self.routes)
        self.dispatcher.start()

    def restart(self, **changes) -> None:
        self.dispatcher.close()
        self.config = self.config.model_copy(update=changes)
        self.routes = RouteTable()
        self.start()

    def fire(self, an_alert: Alert) -> str:
        incident = self.dispatcher.firing(an_alert)
        assert self.dispatcher.wait_idle(30)
        return incident

    def incident(self, incident_id: str) -> dict:
        [found] = [i for i in self.dispatcher.status()["incidents"] if i["id"] == incident_id]
        return found

    def records(self, record_type: str | None = None) -> list[dict]:
        records = AuditLog(self.config.audit_log).records()
        return [r for r in records if record_type is None or r["type"] == record_type]

    def metric(self, name: str, **labels) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def close(self) -> None:
        self.dispatcher.close()


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(**config) -> Harness:
        directory = tmp_path / f"sidecar-{len(made)}"
        directory.mkdir()
        made.append(Harness(directory, **config))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_an_alert_that_keeps_firing_is_one_incident_and_one_run(harness):
    h = harness()
    first = h.fire(alert())
    assert h.fire(alert()) == first
    assert h.fire(alert()) == first
    assert runs(h.counter) == 1
    assert h.incident(first)["hooks"]["script"]["result"] == "success"
    assert h.metric("sidewatch_incidents_total", alert="AdversarialRateHigh", source="sidecar") == 1
    assert h.metric("sidewatch_rollback_hook_runs_total", alert="AdversarialRateHigh", hook="script",
                    result="success") == 1
    assert h.metric("sidewatch_rollback_last_timestamp_seconds", alert="AdversarialRateHigh", hook="script") > 0
    # Resolved, it can open a new incident and roll back again.
    h.dispatcher.resolved(alert().key)
    second = h.fire(alert())
    assert second != first and runs(h.counter) == 2
    assert h.incident(first)["state"] == "closed" and h.incident(second)["state"] == "open"


def test_failed_hook_is_retried_with_backoff_and_each_attempt_is_recorded(harness):
    h = harness()
    incident = h.fire(alert(hooks=("failing",)))
    assert runs(h.counter) == 3          # 1 + retries
    state = h.incident(incident)["hooks"]["failing"]
    assert state["result"] == "failure" and state["attempts"] == 3
    assert "exited with status 1" in state["message"]
    started = [r["attempt"] for r in h.records("attempt_started")]
    results = [(r["attempt"], r["ok"]) for r in h.records("attempt_result")]
    assert started == [1, 2, 3] and results == [(1, False), (2, False), (3, False)]
    # The second retry waited twice the first's backoff (0.05 s, then 0.1 s).
    times = {r["attempt"]: r["ts"] for r in h.records("attempt_started")}
    ends = {r["attempt"]: r["ts"] for r in h.records("attempt_result")}
    assert times[2] - ends[1] >= 0.05 and times[3] - ends[2] >= 0.1
    assert h.metric("sidewatch_rollback_hook_attempts_total", alert="AdversarialRateHigh", hook="failing") == 3
    assert h.metric("sidewatch_rollback_hook_runs_total", alert="AdversarialRateHigh", hook="failing",
                    result="failure") == 1


def test_cooldown_refuses_a_new_rollback_and_says_why(harness):
    h = harness(cooldown_seconds=3600)
    h.fire(alert("First"))
    skipped = h.fire(alert("Second"))
    assert runs(h.counter) == 1
    found = h.incident(skipped)
    assert found["decision"] == "skipped" and found["reason"].startswith("cooldown")
    assert found["hooks"]["script"]["result"] == "skipped"
    assert h.metric("sidewatch_rollback_hook_runs_total", alert="Second", hook="script", result="skipped") == 1
    assert h.dispatcher.status()["cooldown_until"] > time.time()


def test_max_per_hour_refuses_beyond_the_limit(harness):
    h = harness(max_per_hour=2)
    ids = [h.fire(alert(f"Alert{i}")) for i in range(3)]
    assert runs(h.counter) == 2
    third = h.incident(ids[2])
    assert third["decision"] == "skipped" and third["reason"].startswith("max_per_hour: 2 rollbacks")
    assert h.dispatcher.status()["rollbacks_last_hour"] == 2
    # The count survives a restart: the log holds the decisions.
    h.restart()
    assert h.dispatcher.status()["rollbacks_last_hour"] == 2
    assert h.incident(h.fire(alert("Alert3")))["decision"] == "skipped"
    assert runs(h.counter) == 2


def test_dry_run_fires_nothing_and_records_what_it_would_do(harness, tmp_path):
    with WebhookReceiver() as receiver:
        h = harness(dry_run=True, hooks={"notify": {"type": "webhook", "url": receiver.url,
                                                    "secret_file": str(tmp_path / "secret")}})
        incident = h.fire(alert(hooks=("script", "notify", "pin-v1")))
        assert receiver.deliveries == []
    assert runs(h.counter) == 0
    assert not h.routes.active
    hooks = h.incident(incident)["hooks"]
    assert {name: state["result"] for name, state in hooks.items()} == {
        "script": "dry_run", "notify": "dry_run", "pin-v1": "dry_run"}
    assert hooks["notify"]["message"] == f"dry run: would POST the incident to {receiver.url}"
    assert hooks["pin-v1"]["message"] == "dry run: would pin mnist_cnn to 1"
    assert h.records("incident_opened")[0]["decision"] == "dry_run"
    assert h.records("attempt_started") == []
    assert h.metric("sidewatch_rollback_hook_runs_total", alert="AdversarialRateHigh", hook="notify",
                    result="dry_run") == 1
    assert h.dispatcher.status()["dry_run"] is True


def test_restart_maps_the_open_incident_to_the_same_id_and_runs_nothing_again(harness):
    h = harness()
    incident = h.fire(alert(hooks=("script", "pin-v1")))
    assert runs(h.counter) == 1 and h.routes.get("mnist_cnn").version == "1"
    h.restart()
    assert h.fire(alert(hooks=("script", "pin-v1"))) == incident
    assert runs(h.counter) == 1
    # The pin came back from the log, with its metric.
    assert h.routes.get("mnist_cnn").version == "1"
    assert h.metric("sidewatch_route_pinned", model="mnist_cnn", version="1") == 1
    assert h.incident(incident)["hooks"]["script"]["result"] == "success"


def test_undo_route_is_recorded_and_survives_a_restart(harness):
    h = harness()
    h.fire(alert(hooks=("pin-v1",)))
    assert h.dispatcher.undo_route("mnist_cnn", actor="admin-api") is True
    assert not h.routes.active
    assert h.metric("sidewatch_route_pinned", model="mnist_cnn", version="1") == 0
    [undone] = h.records("route_undone")
    assert undone["model"] == "mnist_cnn" and undone["actor"] == "admin-api" and undone["version"] == "1"
    assert h.dispatcher.undo_route("mnist_cnn", actor="admin-api") is False
    h.restart()
    assert not h.routes.active and h.dispatcher.status()["routes"] == {}


def test_route_to_the_last_known_good_version(harness):
    h = harness()
    h.routes.observe("mnist_cnn", "1", at=100.0)
    h.routes.observe("mnist_cnn", "2", at=200.0)
    h.routes.observe("mnist_cnn", "3", at=150.0)
    incident = h.fire(alert(hooks=("pin-good",), model="mnist_cnn", version="2"))
    assert h.routes.get("mnist_cnn").version == "3"
    assert h.incident(incident)["hooks"]["pin-good"]["message"] == "mnist_cnn pinned to 3"


def test_route_without_a_known_good_version_fails_clearly(harness):
    h = harness()
    h.routes.observe("mnist_cnn", "2")
    incident = h.fire(alert(hooks=("pin-good",), model="mnist_cnn", version="2"))
    state = h.incident(incident)["hooks"]["pin-good"]
    assert state["result"] == "failure"
    assert state["message"] == ("no known-good version of mnist_cnn: no version other than 2 has served traffic "
                                "since the sidecar started (seen: 2)")
    assert not h.routes.active
    other = h.fire(alert("NoVersion", hooks=("pin-good",), model="mnist_cnn"))
    assert "alert has no version label" in h.incident(other)["hooks"]["pin-good"]["message"]


def test_unknown_hook_name_is_a_recorded_failure(harness):
    h = harness()
    incident = h.fire(alert(hooks=("nope",)))
    state = h.incident(incident)["hooks"]["nope"]
    assert state["result"] == "failure" and "no hook named 'nope'" in state["message"]


def test_alert_without_hooks_opens_an_incident_that_is_no_rollback(harness):
    h = harness(cooldown_seconds=3600)
    quiet = h.fire(alert("Quiet", hooks=()))
    assert h.incident(quiet)["decision"] == "none"
    h.fire(alert("Loud"))
    assert runs(h.counter) == 1      # the quiet incident started no cooldown


# --- replay of logs left by a crash ------------------------------------------------------------


def _crashed_log(h: Harness, an_alert: Alert, *records: dict) -> str:
    """Write the audit log a crashed sidecar would have left: the incident opened, then ``records``."""
    h.close()
    incident = "inc-crashed-1"
    log = AuditLog(h.config.audit_log)
    log.open()
    log.append("incident_opened", incident=incident, alert={
        "name": an_alert.name, "key": an_alert.key, "severity": an_alert.severity, "labels": an_alert.labels,
        "annotations": {}, "source": "sidecar", "started_at": an_alert.started_at, "value": 0.2,
        "hooks": list(an_alert.hooks)}, decision="run", reason="")
    for record in records:
        log.append(record.pop("type"), incident=incident, **record)
    log.close()
    return incident


def test_attempt_started_without_result_is_unknown_and_not_repeated(harness):
    h = harness()
    incident = _crashed_log(h, alert(), {"type": "attempt_started", "hook": "script", "attempt": 1})
    h.start()
    assert h.dispatcher.wait_idle(30)
    assert runs(h.counter) == 0
    state = h.incident(incident)["hooks"]["script"]
    assert state["result"] == "unknown"
    assert "may have run; not repeated" in state["message"]
    assert h.fire(alert()) == incident and runs(h.counter) == 0


def test_pending_retry_resumes_after_a_restart(harness):
    h = harness()
    incident = _crashed_log(h, alert(hooks=("script",)),
                            {"type": "attempt_started", "hook": "script", "attempt": 1},
                            {"type": "attempt_result", "hook": "script", "attempt": 1, "ok": False,
                             "message": "exited with status 1"})
    h.start()
    assert h.dispatcher.wait_idle(30)
    assert runs(h.counter) == 1
    state = h.incident(incident)["hooks"]["script"]
    assert state["result"] == "success" and state["attempts"] == 2


def test_interrupted_route_attempt_runs_again_and_a_recorded_pin_is_restored(harness):
    h = harness()
    incident = _crashed_log(h, alert(hooks=("pin-v1",)), {"type": "attempt_started", "hook": "pin-v1", "attempt": 1})
    h.start()
    assert h.dispatcher.wait_idle(30)
    assert h.routes.get("mnist_cnn").version == "1"
    assert h.incident(incident)["hooks"]["pin-v1"]["result"] == "success"
    [interrupted] = [r for r in h.records("attempt_result") if r.get("interrupted")]
    assert interrupted["attempt"] == 1

    h2 = harness()
    incident = _crashed_log(h2, alert(hooks=("pin-v1",)),
                            {"type": "attempt_started", "hook": "pin-v1", "attempt": 1},
                            {"type": "route_pinned", "model": "mnist_cnn", "version": "1", "upstream": None,
                             "hook": "pin-v1"})
    h2.start()
    assert h2.dispatcher.wait_idle(30)
    state = h2.incident(incident)["hooks"]["pin-v1"]
    assert state["result"] == "success" and "restored from the audit log" in state["message"]
    assert len(h2.records("attempt_started")) == 1     # no new attempt: only the crashed one


def test_torn_last_line_is_skipped_and_the_next_record_starts_a_new_line(harness):
    h = harness()
    incident = h.fire(alert())
    h.close()
    with open(h.config.audit_log, "ab") as log:
        log.write(b'{"ts": 1, "type": "incident_res')       # a write cut short by a crash
    h.start()
    assert h.fire(alert()) == incident and runs(h.counter) == 1
    h.dispatcher.resolved(alert().key)
    lines = h.config.audit_log.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert json.loads(lines[-2])["type"] == "incident_resolved"
    assert json.loads(lines[-3])["type"] == "started"
    assert lines[-4] == b'{"ts": 1, "type": "incident_res'


def test_without_an_audit_log_decisions_are_kept_in_memory(tmp_path):
    h = Harness(tmp_path, audit_log=None)
    try:
        incident = h.fire(alert())
        assert h.incident(incident)["hooks"]["script"]["result"] == "success"
        assert [r["type"] for r in h.dispatcher.audit.records()][:2] == ["started", "incident_opened"]
        assert h.dispatcher.status()["audit_log"] is None
    finally:
        h.close()


def from_alertmanager(name: str, started_at: float | None = None, **labels) -> Alert:
    fired = alert(name, **labels)
    return dataclasses.replace(fired, source="alertmanager", started_at=started_at or fired.started_at)


def test_open_incidents_of_alertmanager_alerts_are_bounded_and_the_sidecars_own_are_not(harness):
    h = harness(max_open_alertmanager_incidents=2)
    first, second = (h.dispatcher.admit(from_alertmanager(f"Fleet{i}")).incident for i in range(2))
    assert first and second
    refused = h.dispatcher.admit(from_alertmanager("Fleet2"))
    assert refused.incident is None and refused.refused == "max_open_incidents"
    assert h.metric("sidewatch_alert_firings_ignored_total", source="alertmanager", reason="max_open_incidents") == 1
    assert h.dispatcher.admit(from_alertmanager("Fleet0")).incident == first  # open already: no new incident
    assert h.fire(alert("OwnRule"))  # the engine's: neither counted nor refused
    h.dispatcher.resolved(from_alertmanager("Fleet0").key)
    assert h.dispatcher.admit(from_alertmanager("Fleet2")).incident  # sent again, with room: it opens
    assert not [r for r in h.records("incident_opened") if r["alert"]["name"] == "Fleet3"]
    h.restart()
    assert h.dispatcher.status()["open_incidents"] == 3
    assert h.dispatcher.admit(from_alertmanager("Fleet3")).refused == "max_open_incidents"


def test_the_replay_keeps_the_bound_in_the_logs_order(harness):
    h = harness()
    fired = [from_alertmanager(f"Fleet{index}") for index in range(5)]
    for each in fired:
        h.fire(each)
    h.dispatcher.resolved(fired[4].key)
    h.restart(max_open_alertmanager_incidents=3)  # lowered: the log holds more open than the bound
    status = h.dispatcher.status()
    assert status["open_incidents"] == 3
    assert sorted(incident["alert"] for incident in status["incidents"]) == ["Fleet0", "Fleet1", "Fleet2"]
    assert status["rollbacks_last_hour"] == 5  # restored or not, they were rollbacks
    # Not restored, but its resolution is: the old payload posted again is still stale.
    assert h.dispatcher.admit(fired[4]).refused == "stale"
    assert h.dispatcher.admit(fired[3]).refused == "max_open_incidents"


def test_a_start_dated_ahead_of_the_clock_opens_nothing_within_the_allowance_it_does(harness):
    h = harness(max_clock_skew_seconds=60)
    ahead = h.dispatcher.admit(from_alertmanager("Fleet", started_at=time.time() + 10 * 365 * 86400))
    assert ahead.incident is None and ahead.refused == "future"
    assert h.metric("sidewatch_alert_firings_ignored_total", source="alertmanager", reason="future") == 1
    assert not h.records("incident_opened")
    assert h.dispatcher.admit(from_alertmanager("Fleet", started_at=time.time() + 30)).incident


def test_a_resolution_dated_years_ahead_in_an_old_log_does_not_make_later_firings_stale(harness):
    h = harness(max_clock_skew_seconds=1)
    h.dispatcher.close()
    # As a sidecar without the clock check wrote it: a start in 2099, so a resolution in 2099.
    far, now = 4_070_908_800.0, time.time()
    broken = from_alertmanager("Fleet", started_at=far)
    with open(h.config.audit_log, "a") as log:
        for record in ({"ts": now - 10, "type": "incident_opened", "incident": "inc-old", "decision": "run",
                        "reason": "", "alert": alert_to_dict(broken)},
                       {"ts": now - 5, "type": "incident_resolved", "incident": "inc-old", "key": broken.key,
                        "resolved_at": far}):
            log.write(json.dumps(record) + "\n")
    h.start()
    # Remembered as resolved 1 s (the allowance) after the record, not in 2099: a firing that started before
    # that is stale, one that started after it is a new incident.
    assert h.dispatcher.admit(from_alertmanager("Fleet", started_at=now - 20)).refused == "stale"
    assert h.dispatcher.admit(from_alertmanager("Fleet", started_at=time.time())).incident


def _delivery(*alerts: tuple[str, str]) -> bytes:
    """A webhook body of (alert name, status) pairs, each naming the hook "script" by its label."""
    return json.dumps({"version": "4", "alerts": [
        {"status": status, "labels": {"alertname": name, "sidewatch_hooks": "script"},
         "startsAt": "2024-05-01T12:00:00Z", "endsAt": "2024-05-01T12:05:00Z"} for name, status in alerts]}).encode()


def test_the_receiver_truncates_a_delivery_and_resolves_before_it_opens(harness):
    h = harness(max_open_alertmanager_incidents=3)
    receiver = AlertmanagerReceiver({}, h.config.hooks, h.dispatcher, h.dispatcher.metrics, max_alerts_per_delivery=2)

    def post(*alerts: tuple[str, str]) -> dict:
        status, reply = receiver.handle(_delivery(*alerts))
        assert status == 200, reply
        names = {field: sorted(key.partition("{")[0] for key in reply[field]) for field in ("incidents", "refused")}
        return {**reply, **names}

    reply = post(*((f"Fleet{i}", "firing") for i in range(5)))
    assert reply["incidents"] == ["Fleet0", "Fleet1"] and reply["truncated"] == 3
    assert h.metric("sidewatch_alert_firings_ignored_total", source="alertmanager", reason="truncated") == 3
    assert post(("Fleet2", "firing"), ("Fleet3", "firing"))["incidents"] == ["Fleet2"]  # the bound: 3 open
    # Full: a resolution in the same delivery makes room for the firing, wherever it stands.
    reply = post(("Fleet3", "firing"), ("Fleet0", "resolved"))
    assert reply["incidents"] == ["Fleet3"] and reply["refused"] == []
    reply = post(("Fleet4", "firing"))
    assert reply["incidents"] == [] and reply["refused"] == ["Fleet4"]
