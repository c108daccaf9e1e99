"""kill -9 of a process running the dispatcher mid-incident, and restarts that replay the audit log.

The process is a small driver around RollbackDispatcher (what the sidecar runs, without the data
plane): it starts the dispatcher, fires the alert it is given (as a sidecar whose alert still fires
after a restart would), and prints its status once idle. The webhook receiver is a real HTTP server in
the test that checks the HMAC signature and counts deliveries.

The figure this file checks: hooks fired for one incident under retries and a restart in the middle
of them = 1 successful delivery.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from agent.alerts.audit import AuditLog
from tests.support.harness import Process
from tests.support.webhook import SECRET, WebhookReceiver

DRIVER = """
import json, sys, time
from prometheus_client import CollectorRegistry
from agent.config.rollback import RollbackConfig
from agent.alerts.incident import alert_from_dict
from agent.alerts.dispatcher import RollbackDispatcher
from agent.metrics import AlertMetrics
from agent.dataplane.routes import RouteTable

config = RollbackConfig.model_validate_json(open(sys.argv[1]).read())
alert = alert_from_dict(json.load(open(sys.argv[2])))
dispatcher = RollbackDispatcher(config, AlertMetrics(CollectorRegistry()), RouteTable())
dispatcher.start()
print("incident", dispatcher.firing(alert), flush=True)
dispatcher.wait_idle()
print("idle", json.dumps(dispatcher.status()), flush=True)
while True:
    time.sleep(60)  # until the test kills it
"""

ALERT = {"name": "AdversarialRateHigh", "key": "AdversarialRateHigh{model=mnist_cnn,version=2}",
         "severity": "critical", "labels": {"model": "mnist_cnn", "version": "2"}, "annotations": {},
         "source": "sidecar", "started_at": 1700000000.0, "value": 0.3, "hooks": ["pin-v1", "notify"]}


class Driver:
    def __init__(self, tmp_path, receiver: WebhookReceiver, **notify) -> None:
        self.tmp_path = tmp_path
        self.audit_log = tmp_path / "audit.jsonl"
        (tmp_path / "secret").write_bytes(SECRET)
        (tmp_path / "driver.py").write_text(DRIVER)
        (tmp_path / "config.json").write_text(json.dumps({
            "audit_log": str(self.audit_log), "instance": "crash-test", "cooldown_seconds": 300,
            "hooks": {
                "pin-v1": {"type": "route", "model": "mnist_cnn", "version": "1"},
                "notify": {"type": "webhook", "url": receiver.url, "secret_file": str(tmp_path / "secret"),
                           "timeout_seconds": 5, **notify},
            }}))
        (tmp_path / "alert.json").write_text(json.dumps(ALERT))
        self.runs = 0

    def start(self) -> Process:
        self.runs += 1
        return Process([sys.executable, str(self.tmp_path / "driver.py"), str(self.tmp_path / "config.json"),
                        str(self.tmp_path / "alert.json")], self.tmp_path / f"driver-{self.runs}.log")

    def records(self, record_type: str) -> list[dict]:
        return [r for r in AuditLog(self.audit_log).records() if r["type"] == record_type]


def wait_until(condition, what: str, timeout: float = 30.0, process: Process | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.popen.poll() is not None:
            raise AssertionError(f"driver exited while waiting for {what}:\n{process.log()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{process.log()[-3000:]}" if process else ""))


def output_line(process: Process, prefix: str, timeout: float = 30.0) -> str:
    def find():
        for line in process.log().splitlines():
            if line.startswith(prefix + " "):
                return line[len(prefix) + 1:]
        return None
    return wait_until(find, f"{prefix!r} from the driver", timeout, process)


def kill_9(process: Process) -> None:
    process.popen.kill()
    process.popen.wait()
    process.stop()


def test_kill_during_retry_backoff_then_restarts_deliver_exactly_once(tmp_path):
    with WebhookReceiver(fail_first=2) as receiver:
        # Backoff 2 s, then 4 s: the kill lands while the third attempt waits.
        driver = Driver(tmp_path, receiver, retries=3, backoff_seconds=2)
        first = driver.start()
        incident = output_line(first, "incident")
        wait_until(lambda: any(r["hook"] == "notify" and r["attempt"] == 2 for r in driver.records("attempt_result")),
                   "the second failed attempt", process=first)
        kill_9(first)
        assert [d.status for d in receiver.deliveries] == [500, 500]
        assert driver.records("attempt_started")[-1]["attempt"] == 2      # killed during the backoff

        second = driver.start()
        assert output_line(second, "incident") == incident     # the same incident, not a new one
        status = json.loads(output_line(second, "idle"))
        notify = status["incidents"][0]["hooks"]["notify"]
        assert notify["result"] == "success" and notify["attempts"] == 3
        # The route pin was recorded before it took effect, so the kill did not lose it.
        assert status["routes"]["mnist_cnn"]["version"] == "1"
        kill_9(second)

        third = driver.start()
        assert output_line(third, "incident") == incident
        status = json.loads(output_line(third, "idle"))
        kill_9(third)

    # The figure: one successful, correctly signed delivery for the incident across two kill -9s.
    assert len(receiver.successful()) == 1
    assert [d.status for d in receiver.deliveries] == [500, 500, 200]
    assert json.loads(receiver.successful()[0].body)["incident"] == incident
    assert status["incidents"][0]["hooks"]["notify"]["result"] == "success"
    assert len(driver.records("incident_opened")) == 1
    assert [r["hook"] for r in driver.records("hook_result")] == ["pin-v1", "notify"]


def test_kill_right_after_attempt_started_is_unknown_and_not_repeated(tmp_path):
    with WebhookReceiver() as receiver:
        driver = Driver(tmp_path, receiver, retries=3, backoff_seconds=0.1)
        receiver.hold = threading.Event()
        first = driver.start()
        incident = output_line(first, "incident")
        assert receiver.arrived.wait(30), first.log()
        assert driver.records("attempt_started")[-1]["hook"] == "notify"
        kill_9(first)                # the request is in the receiver's hands, the result never recorded
        receiver.hold.set()

        second = driver.start()
        assert output_line(second, "incident") == incident
        status = json.loads(output_line(second, "idle"))
        kill_9(second)

    notify = status["incidents"][0]["hooks"]["notify"]
    assert notify["result"] == "unknown"
    assert "may have run; not repeated" in notify["message"]
    assert len(receiver.deliveries) == 1
