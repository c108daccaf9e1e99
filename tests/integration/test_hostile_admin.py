"""Probes of hostile and careless callers of the admin API (issue 14), on a real sidecar:

- defect 6: an old Alertmanager firing payload posted again, byte for byte, after its incident resolved
  and the cooldown passed, opens no incident and runs no hook (before or after a restart), is counted,
  and is answered 200; a firing that starts after the resolution still opens one;
- defect 8: a body nested 100,000 deep, and every other body that cannot be parsed, gets 400 (not 500) on
  every endpoint that takes JSON, and is counted.
"""

from __future__ import annotations

import datetime
import json
import time

import pytest

from tests.support.alert_harness import HookedSidecar, admin_request, wait_until

pytestmark = pytest.mark.hostile

ALERT = "ModelBroken"
LABELS = {"alertname": ALERT, "model": "mnist_cnn", "version": "2", "severity": "critical"}

def _time(offset_seconds: float = 0.0) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_seconds)
    return moment.isoformat().replace("+00:00", "Z")


def _payload(status: str, starts: str, ends: str = "0001-01-01T00:00:00Z") -> bytes:
    """An Alertmanager webhook body (version 4), as Alertmanager writes it."""
    return json.dumps({
        "version": "4", "groupKey": "{}:{alertname=\"ModelBroken\"}", "status": status, "receiver": "sidewatch",
        "groupLabels": {"alertname": ALERT}, "commonLabels": LABELS, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "truncatedAlerts": 0,
        "alerts": [{"status": status, "labels": LABELS, "annotations": {"summary": "broken"}, "startsAt": starts,
                    "endsAt": ends, "generatorURL": "http://prometheus:9090/graph", "fingerprint": "0123456789abcdef"}],
    }).encode()


class Sidecar(HookedSidecar):
    """A HookedSidecar for ALERT, with the calls these probes make."""

    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path, ALERT, rollback={"max_per_hour": 100})
        self.start()

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        status, _, reply = admin_request(self.admin_port, "POST", path, self.token, body=body)
        return status, reply

    def incidents(self) -> list[dict]:
        return self.rollback_status()["incidents"]


@pytest.fixture
def sidecar(tmp_path):
    sidecar = Sidecar(tmp_path)
    yield sidecar
    sidecar.process.stop()


def test_a_stale_firing_payload_posted_again_opens_no_incident(sidecar):
    firing = _payload("firing", _time(-60))
    status, reply = sidecar.post("/alertmanager", firing)
    assert status == 200 and list(reply["incidents"]) == [f"{ALERT}{{model=mnist_cnn,severity=critical,version=2}}"]
    wait_until(lambda: list(sidecar.runs.iterdir()), 30, "the hook to run")
    starts = json.loads(firing)["alerts"][0]["startsAt"]
    status, _ = sidecar.post("/alertmanager", _payload("resolved", starts, _time(-5)))
    assert status == 200
    assert [incident["state"] for incident in sidecar.incidents()] == ["closed"]

    # The old firing payload again, byte for byte (cooldown_seconds is 0: the cooldown has passed).
    status, reply = sidecar.post("/alertmanager", firing)
    assert status == 200 and reply["incidents"] == {} and len(reply["stale"]) == 1
    assert len(sidecar.incidents()) == 1
    assert sidecar.metric("sidewatch_alert_firings_ignored_total", source="alertmanager", reason="stale") == 1
    time.sleep(0.5)
    assert len(list(sidecar.runs.iterdir())) == 1  # the hook ran once

    # After a restart, the resolution is read back from the audit log: still stale.
    sidecar.restart()
    status, reply = sidecar.post("/alertmanager", firing)
    assert status == 200 and reply["incidents"] == {}
    assert len(sidecar.incidents()) == 1
    assert sidecar.metric("sidewatch_alert_firings_ignored_total", source="alertmanager", reason="stale") == 1
    assert sidecar.metric("sidewatch_incidents_total", alert=ALERT, source="alertmanager") == 0

    # A firing that started after the resolution is a new incident, and its hook runs.
    status, reply = sidecar.post("/alertmanager", _payload("firing", _time(-1)))
    assert status == 200 and len(reply["incidents"]) == 1
    assert len(sidecar.incidents()) == 2
    wait_until(lambda: len(list(sidecar.runs.iterdir())) == 2, 30, "the hook to run for the new incident")


NESTED = b"[" * 100_000

UNPARSEABLE = [
    pytest.param(NESTED, id="nested-arrays"),
    pytest.param(b'{"a":' * 100_000, id="nested-objects"),
    pytest.param(b"{not json", id="bad-syntax"),
    pytest.param(b"\xff\xfe\x00", id="bad-utf8"),
    pytest.param(b"1" * 5000, id="long-number"),
    pytest.param(b"[]", id="wrong-shape"),
    pytest.param(b'"text"', id="a-string"),
]


@pytest.mark.parametrize("body", UNPARSEABLE)
@pytest.mark.parametrize("path, endpoint", [("/alertmanager", "alertmanager"), ("/routes/undo", "routes_undo"),
                                            ("/baseline/reset", "baseline_reset")])
def test_bodies_that_cannot_be_parsed_get_400_and_are_counted(admin_sidecar, path, endpoint, body):
    sidecar = admin_sidecar
    bad_before = sidecar.metric("sidewatch_admin_requests_total", endpoint=endpoint, code="400")
    failed_before = sidecar.metric("sidewatch_admin_requests_total", endpoint=endpoint, code="500")
    malformed_before = sidecar.metric("sidewatch_alertmanager_requests_total", result="malformed")
    status, reply = sidecar.post(path, body)
    assert status == 400, reply
    assert reply["error"].startswith("sidewatch: ")
    assert sidecar.metric("sidewatch_admin_requests_total", endpoint=endpoint, code="400") == bad_before + 1
    assert sidecar.metric("sidewatch_admin_requests_total", endpoint=endpoint, code="500") == failed_before
    malformed = sidecar.metric("sidewatch_alertmanager_requests_total", result="malformed")
    assert malformed == malformed_before + (endpoint == "alertmanager")
    # The sidecar still answers.
    assert admin_request(sidecar.admin_port, "GET", "/status", sidecar.token)[0] == 200


@pytest.fixture(scope="module")
def admin_sidecar(tmp_path_factory):
    sidecar = Sidecar(tmp_path_factory.mktemp("hostile-admin"))
    yield sidecar
    sidecar.process.stop()
