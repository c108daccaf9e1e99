"""Probes of a careless Alertmanager route (issue 14, defect 9), on a real sidecar's admin API:

- one delivery of 3,000 firing alerts of distinct names, each routed to a hook by its ``sidewatch_hooks``
  label (a rule grouped by a label without end, a route that does not group by ``alertname``), must open a
  bounded number of incidents and add a bounded number of series to ``/metrics``, before and after a
  restart (the audit log is replayed), and a real alert after it still opens its incident and runs its hook;
- the open incidents are bounded across deliveries: the rest are refused, counted and logged once per
  interval, and an alert refused while the bound was reached opens when Alertmanager sends it again once
  there is room; an audit log that holds more open incidents than the bound replays only the bound;
- a firing dated years ahead is not trusted as a time: it opens nothing, and does not make the real firing
  of the same alert after it look stale (defect 6's check).

The data plane plays no part (only the admin API is called): the default plane runs.
"""

from __future__ import annotations

import datetime
import json
import time

import pytest

from agent.config.rollback import RollbackConfig
from agent.config.serve import Admin, Metrics
from tests.support.alert_harness import HookedSidecar, admin_request, wait_until
from tests.support.harness import http_get

pytestmark = pytest.mark.hostile

JUNK = 3000
ALERT = "ModelBroken"   # the real alert: named in admin.alertmanager_hooks
LABELS = {"alertname": ALERT, "model": "mnist_cnn", "version": "2", "severity": "critical"}
KEY = f"{ALERT}{{model=mnist_cnn,severity=critical,version=2}}"
MAX_ALERTS_PER_DELIVERY = Admin.model_fields["max_alerts_per_delivery"].default
MAX_OPEN = RollbackConfig.model_fields["max_open_alertmanager_incidents"].default
MAX_ALERT_NAMES = Metrics.model_fields["max_alert_names"].default

# The real alert's hook: a program that leaves one file per run.


def _time(offset_seconds: float = 0.0) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_seconds)
    return moment.isoformat().replace("+00:00", "Z")


def _alert(labels: dict, status: str = "firing", starts: str | None = None, ends: str = "0001-01-01T00:00:00Z"):
    return {"status": status, "labels": labels, "annotations": {"summary": "probe"},
            "startsAt": starts or _time(-60), "endsAt": ends, "generatorURL": "http://prometheus:9090/graph",
            "fingerprint": "0123456789abcdef"}


def _junk(prefix: str, count: int = JUNK) -> list[dict]:
    """``count`` firing alerts of distinct names, each naming the cheap hook by its sidewatch_hooks label."""
    return [_alert({"alertname": f"{prefix}{index:05d}", "sidewatch_hooks": "noop"}) for index in range(count)]


def _delivery(alerts: list[dict]) -> bytes:
    """An Alertmanager webhook body (version 4), as Alertmanager writes it."""
    return json.dumps({
        "version": "4", "groupKey": "{}:{}", "status": alerts[0]["status"], "receiver": "sidewatch",
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
        "truncatedAlerts": 0, "alerts": alerts,
    }).encode()


class Sidecar(HookedSidecar):
    """A HookedSidecar for ALERT with a cheap second hook (``noop``), and the calls these probes make."""

    def __init__(self, tmp_path, rollback: dict | None = None) -> None:
        super().__init__(tmp_path, ALERT, rollback={"max_per_hour": 1000, **(rollback or {})},
                         extra_hooks={"noop": {"type": "command", "argv": ["/bin/true"]}})

    def post(self, alerts: list[dict]) -> tuple[int, dict]:
        status, _, reply = admin_request(self.admin_port, "POST", "/alertmanager", self.token, body=_delivery(alerts))
        return status, reply

    def open_incidents(self) -> int:
        return self.rollback_status()["open_incidents"]

    def scrape(self) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def idle(self) -> None:
        """Wait until every hook decided so far has finished (no attempt pending or running)."""
        wait_until(lambda: all(hook["result"] != "pending" for incident in self.rollback_status()["incidents"]
                               for hook in incident["hooks"].values()), 60, "the hooks to finish")


@pytest.fixture
def make_sidecar(tmp_path):
    made = []

    def make(**kwargs) -> Sidecar:
        directory = tmp_path / f"sidecar-{len(made)}"
        directory.mkdir()
        made.append(Sidecar(directory, **kwargs))
        return made[-1]

    yield make
    for sidecar in made:
        sidecar.stop()


def _series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def _alert_labels(text: str) -> set[str]:
    return {line.split('alert="', 1)[1].split('"', 1)[0] for line in text.splitlines()
            if not line.startswith("#") and 'alert="' in line}


def _figures(before: str, after: str, opened: int) -> str:
    return (f"incidents opened {opened}, /metrics {_series(before)} -> {_series(after)} series, "
            f"{len(before)} -> {len(after)} bytes, {len(_alert_labels(after))} alert label values")


def _assert_bounded(before: str, after: str, figures: str) -> None:
    # Every alert name beyond the bound is counted as "_other"; the configured name (ALERT) keeps its own.
    assert len(_alert_labels(after)) <= MAX_ALERT_NAMES + 2, figures
    # A name's series: incidents (2 samples), hook attempts (2), hook runs (2), last success (1).
    assert _series(after) - _series(before) <= 8 * (MAX_ALERT_NAMES + 2), figures
    assert len(after) < 100_000, figures


def test_one_delivery_of_3000_alert_names_opens_a_bounded_number_of_incidents(make_sidecar):
    sidecar = make_sidecar().start()
    before = sidecar.scrape()
    started = time.monotonic()
    status, reply = sidecar.post(_junk("Junk"))
    seconds = time.monotonic() - started
    assert status == 200, reply
    opened = len(reply["incidents"])
    sidecar.idle()
    after = sidecar.scrape()
    figures = _figures(before, after, opened) + f", delivery answered in {seconds:.2f} s"
    print(f"one delivery of {JUNK} alert names: {figures}")
    assert opened == MAX_ALERTS_PER_DELIVERY, figures
    # The rest are truncated: not acted on, counted, and answered as such (200: Alertmanager must not retry).
    assert reply["truncated"] == JUNK - opened, reply["truncated"]
    assert sidecar.metric("sidewatch_alert_firings_ignored_total", source="alertmanager",
                          reason="truncated") == JUNK - opened
    assert sidecar.open_incidents() == opened
    _assert_bounded(before, after, figures)

    # A restart replays the audit log: the same incidents, no more.
    sidecar.restart()
    assert sidecar.open_incidents() == opened
    # Alertmanager sends the group again: the incidents already open, nothing new.
    status, reply = sidecar.post(_junk("Junk"))
    assert status == 200 and len(reply["incidents"]) == opened and sidecar.open_incidents() == opened
    sidecar.idle()
    replayed = sidecar.scrape()
    print(f"after a restart and the same delivery again: {_figures(before, replayed, opened)}")
    _assert_bounded(before, replayed, _figures(before, replayed, opened))

    # A real alert still opens its incident, and its hook runs.
    status, reply = sidecar.post([_alert(LABELS)])
    assert status == 200 and list(reply["incidents"]) == [KEY], reply
    wait_until(lambda: sidecar.hook_runs() == 1, 30, "the real alert's hook to run")


def test_open_incidents_are_bounded_and_an_alert_refused_opens_when_sent_again_with_room(make_sidecar):
    bound = MAX_ALERTS_PER_DELIVERY + 8
    sidecar = make_sidecar(rollback={"max_open_alertmanager_incidents": bound}).start()
    before = sidecar.scrape()
    log_start = sidecar.process.log_path.stat().st_size
    first_junk = _junk("First")
    opened = 0
    for prefix in ("First", "Second", "Third"):
        status, reply = sidecar.post(first_junk if prefix == "First" else _junk(prefix))
        assert status == 200, reply
        opened += len(reply["incidents"])
    sidecar.idle()
    after = sidecar.scrape()
    figures = _figures(before, after, opened)
    print(f"three deliveries of {JUNK} alert names, max_open_alertmanager_incidents {bound}: {figures}")
    assert opened == bound and sidecar.open_incidents() == bound, figures
    refused = sidecar.metric("sidewatch_alert_firings_ignored_total", source="alertmanager",
                             reason="max_open_incidents")
    assert refused == 2 * MAX_ALERTS_PER_DELIVERY - 8, refused
    _assert_bounded(before, after, figures)

    # The real alert is refused too while the bound is reached, and says so.
    status, reply = sidecar.post([_alert(LABELS)])
    assert status == 200 and reply["incidents"] == {} and reply["refused"] == [KEY], reply
    log = sidecar.process.log_path.read_bytes()[log_start:].decode()
    assert log.count("max_open_alertmanager_incidents") == 1, "refusals are logged once per interval"

    # One junk alert resolves; Alertmanager sends the real one again: it opens, and its hook runs.
    resolved = {**first_junk[0], "status": "resolved", "endsAt": _time(-1)}
    assert sidecar.post([resolved])[0] == 200
    status, reply = sidecar.post([_alert(LABELS)])
    assert status == 200 and list(reply["incidents"]) == [KEY], reply
    wait_until(lambda: sidecar.hook_runs() == 1, 30, "the real alert's hook to run")
    assert sidecar.open_incidents() == bound


def test_an_audit_log_holding_3000_open_incidents_replays_only_the_bound(make_sidecar):
    # Written by a sidecar without the bound (or with a larger one): every junk alert has an open incident.
    bound = 40
    sidecar = make_sidecar(rollback={"max_open_alertmanager_incidents": bound})
    now = time.time()
    records = []
    for index in range(JUNK):
        name, incident = f"Old{index:05d}", f"inc-old-{index:05d}"
        records.append({"ts": now - 60, "type": "incident_opened", "incident": incident, "decision": "skipped",
                        "reason": "max_per_hour", "alert": {
                            "name": name, "key": name, "severity": "", "labels": {"sidewatch_hooks": "noop"},
                            "annotations": {}, "source": "alertmanager", "started_at": now - 120, "value": None,
                            "hooks": ["noop"]}})
        records.append({"ts": now - 60, "type": "hook_result", "incident": incident, "hook": "noop",
                        "result": "skipped", "message": "max_per_hour", "attempts": 0})
    sidecar.audit_log.write_text("".join(json.dumps(record) + "\n" for record in records))
    sidecar.start()
    replayed = sidecar.open_incidents()
    listed = len(sidecar.rollback_status()["incidents"])
    print(f"an audit log of {JUNK} open incidents, max_open_alertmanager_incidents {bound}: {replayed} open "
          f"after the replay, {listed} listed by /status")
    assert replayed == bound
    assert listed == bound


def test_a_firing_dated_years_ahead_is_not_trusted_as_a_time(make_sidecar):
    sidecar = make_sidecar().start()
    future = _alert(LABELS, starts="2099-01-01T00:00:00Z")
    status, reply = sidecar.post([future])
    assert status == 200, reply
    print(f"a firing dated 2099: incidents {list(reply['incidents'])}, reply {reply}")
    assert reply["incidents"] == {} and reply["future"] == [KEY], reply
    assert sidecar.metric("sidewatch_alert_firings_ignored_total", source="alertmanager", reason="future") == 1
    # Its resolution closes nothing; the real firing of the same alert after it is not stale: it opens, and runs.
    assert sidecar.post([{**future, "status": "resolved", "endsAt": _time(-1)}])[0] == 200
    status, reply = sidecar.post([_alert(LABELS, starts=_time(0))])
    assert status == 200 and list(reply["incidents"]) == [KEY], reply
    wait_until(lambda: sidecar.hook_runs() == 1, 30, "the real alert's hook to run")
    # Within the clock-skew allowance, a start a little ahead of the sidecar's clock is trusted.
    status, reply = sidecar.post([_alert({**LABELS, "version": "3"}, starts=_time(30))])
    assert status == 200 and len(reply["incidents"]) == 1, reply
