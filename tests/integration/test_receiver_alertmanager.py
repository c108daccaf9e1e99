"""A real Alertmanager (Debian's prometheus-alertmanager) delivering to the sidecar's receiver.

Alerts are pushed to Alertmanager through its API v2; its webhook receiver posts them, with the bearer
token from its credentials_file, to the sidecar's admin API, whose hooks run a real program. A receiver
configured with a wrong token is refused and counted, and its alert runs nothing.
"""

from __future__ import annotations

import datetime
import json
import sys
import urllib.request

import pytest

from tests.support.alert_harness import admin_config, admin_request, metric, wait_until, write_config, write_token
from tests.support.harness import Process, http_get, start_alertmanager, start_model_server, start_sidecar

ALERT = "SidewatchAdversarialRateHigh"

# The hook: a real program that leaves one file per run, holding what it was told about the incident.
HOOK_PROGRAM = """
import json, os, pathlib, sys
out = pathlib.Path(sys.argv[1])
incident = os.environ["SIDEWATCH_INCIDENT_ID"]
run = out / f"{incident}-{os.environ['SIDEWATCH_ATTEMPT']}.json"
run.write_text(json.dumps({k: v for k, v in os.environ.items() if k.startswith("SIDEWATCH_")}))
"""


def _time(offset_seconds: float = 0.0) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_seconds)
    return moment.isoformat().replace("+00:00", "Z")


def _push(alertmanager_port: int, alerts: list[dict]) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{alertmanager_port}/api/v2/alerts",
                                     data=json.dumps(alerts).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200


def _start_alertmanager(tmp_path, admin_port: int, token_file, wrong_token_file) -> tuple[Process, int]:
    url = f"http://127.0.0.1:{admin_port}/alertmanager"

    def webhook(credentials_file):
        return {"url": url, "send_resolved": True, "max_alerts": 0,
                "http_config": {"authorization": {"type": "Bearer", "credentials_file": str(credentials_file)}}}

    return start_alertmanager(tmp_path, {
        "route": {
            "receiver": "sidewatch", "group_by": ["alertname", "model", "version"],
            "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h",
            "routes": [{"receiver": "wrong-token", "matchers": ['via="wrong-token"']}],
        },
        "receivers": [{"name": "sidewatch", "webhook_configs": [webhook(token_file)]},
                      {"name": "wrong-token", "webhook_configs": [webhook(wrong_token_file)]}],
    })


@pytest.fixture
def setup(tmp_path):
    model_server, model_port = start_model_server(tmp_path)
    token, token_file = write_token(tmp_path)
    _, wrong_token_file = write_token(tmp_path, "wrong-token")
    runs = tmp_path / "runs"
    runs.mkdir()
    program = tmp_path / "hook.py"
    program.write_text(HOOK_PROGRAM)
    admin, admin_port = admin_config(tmp_path, token_file, alertmanager_hooks={ALERT: ["record"]})
    config = write_config(tmp_path, {
        "rollback": {"audit_log": str(tmp_path / "audit.jsonl"), "cooldown_seconds": 0, "max_per_hour": 100,
                     "hooks": {"record": {"type": "command", "argv": [sys.executable, str(program), str(runs)]}}},
        "admin": admin,
    })
    sidecar, _, metrics_port = start_sidecar(tmp_path, model_port, config=config)
    sidecar.wait_listening(admin_port)
    alertmanager, alertmanager_port = _start_alertmanager(tmp_path, admin_port, token_file, wrong_token_file)
    yield {"token": token, "admin_port": admin_port, "metrics_port": metrics_port, "runs": runs,
           "alertmanager_port": alertmanager_port, "alertmanager": alertmanager}
    alertmanager.stop()
    sidecar.stop()
    model_server.stop()


def _alert(starts: str, ends: str | None = None, **labels: str) -> dict:
    alert = {"labels": {"alertname": ALERT, "service": "sidewatch", "severity": "critical", **labels},
             "annotations": {"summary": "adversarial inputs over 5%"}, "startsAt": starts,
             "generatorURL": "http://prometheus:9090/graph"}
    if ends is not None:
        alert["endsAt"] = ends
    return alert


def _incidents(setup) -> list[dict]:
    status, _, body = admin_request(setup["admin_port"], "GET", "/status", setup["token"])
    assert status == 200
    return body["rollback"]["incidents"]


def test_alertmanager_delivers_to_the_hooks_and_resolves(setup):
    am_port, metrics_port = setup["alertmanager_port"], setup["metrics_port"]
    started = _time(-30)
    _push(am_port, [_alert(started, model="mnist_cnn", version="2")])
    [run] = wait_until(lambda: list(setup["runs"].iterdir()), 60, "the hook to run on Alertmanager's delivery")
    seen = json.loads(run.read_text())
    assert seen["SIDEWATCH_ALERT"] == ALERT and seen["SIDEWATCH_SOURCE"] == "alertmanager"
    assert seen["SIDEWATCH_MODEL"] == "mnist_cnn" and seen["SIDEWATCH_VERSION"] == "2"
    assert seen["SIDEWATCH_SEVERITY"] == "critical"
    incident = json.loads(seen["SIDEWATCH_INCIDENT_JSON"])
    assert incident["annotations"] == {"summary": "adversarial inputs over 5%"}
    assert incident["started_at"] == pytest.approx(datetime.datetime.fromisoformat(started).timestamp(), abs=0.01)
    assert metric(metrics_port, "sidewatch_alertmanager_requests_total", result="ok") >= 1
    assert metric(metrics_port, "sidewatch_incidents_total", alert=ALERT, source="alertmanager") == 1

    # Pushed again (as Prometheus re-sends a firing alert every evaluation): the same incident, no new run.
    _push(am_port, [_alert(started, model="mnist_cnn", version="2")])
    [incident] = _incidents(setup)
    assert incident["state"] == "open" and incident["hooks"]["record"]["result"] == "success"

    # Resolved: Alertmanager sends it (send_resolved) and the sidecar closes the incident.
    _push(am_port, [_alert(started, _time(-1), model="mnist_cnn", version="2")])
    wait_until(lambda: _incidents(setup)[0]["state"] == "closed", 60, "the incident to close on the resolved alert")
    assert len(list(setup["runs"].iterdir())) == 1  # the hook ran once over the whole incident
    assert metric(metrics_port, "sidewatch_alertmanager_requests_total", result="ok") >= 2
    assert metric(metrics_port, "sidewatch_alertmanager_requests_total", result="unauthorized") == 0


def test_a_wrong_token_in_alertmanagers_config_is_refused_and_counted(setup):
    am_port, metrics_port = setup["alertmanager_port"], setup["metrics_port"]
    _push(am_port, [_alert(_time(-5), model="mnist_cnn", version="2", via="wrong-token")])
    wait_until(lambda: metric(metrics_port, "sidewatch_alertmanager_requests_total", result="unauthorized") >= 1,
               60, "the receiver to refuse the delivery with the wrong token")

    def failed_notifications() -> float:
        text = http_get(f"http://127.0.0.1:{am_port}/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("alertmanager_notifications_failed_total") and 'integration="webhook"' in line)

    # Alertmanager sees the refusal as a failed notification.
    wait_until(lambda: failed_notifications() >= 1, 60, "Alertmanager to count the failed notification")
    assert list(setup["runs"].iterdir()) == []
    assert _incidents(setup) == []
    assert metric(metrics_port, "sidewatch_alertmanager_requests_total", result="ok") == 0
