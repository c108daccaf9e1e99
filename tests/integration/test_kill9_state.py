"""Nothing lost to kill -9: the audit log and the detector state survive a SIGKILL at any moment.

1. The audit log alone, killed at random moments while a process appends to it as fast as it can: every
   record whose append returned (the writer says so on stdout only then) is in the log after the kill,
   the log parses, and the next writer carries on after it.
2. The drift checkpoint alone, killed at random moments while a process checkpoints real detector state
   in a loop: the file always loads, and holds a state at least as recent as the last one reported.
3. A whole sidecar (model server, detectors with checkpoints, rollback hooks, admin API) under traffic
   and a stream of Alertmanager incidents, killed -9 at a random moment, restarted, again and again:
   every incident the receiver acknowledged is in the audit log and comes back after the restart, every
   resolve it acknowledged stays resolved, no webhook is delivered twice, and the drift state loads and
   never goes backwards.

The dispatcher's replay at given moments (mid-backoff, right after attempt_started) is in
test_rollback_crash.py; this file kills at random moments, many times.
"""

from __future__ import annotations

import http.client
import json
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.alerts.audit import AuditLog
from agent.demo.data import load_images
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol.client import InferenceClient
from tests.support.alert_harness import admin_config, admin_request, wait_until, write_config, write_token
from tests.support.harness import Process, start_model_server, start_sidecar
from tests.support.webhook import SECRET, WebhookReceiver

KILLS = 20            # kills of the log writer and of the checkpoint writer
SIDECAR_KILLS = 6     # kills of the whole sidecar


def kill_9(process: Process) -> None:
    process.popen.kill()
    process.popen.wait()
    process.stop()    # closes its log file


def _lines(process: Process, prefix: str) -> list[str]:
    """What follows ``prefix`` on the complete lines of the process's output (a kill can cut the last)."""
    complete = process.log().split("\n")[:-1]
    return [line[len(prefix):] for line in complete if line.startswith(prefix)]


# --- 1. the audit log ---------------------------------------------------------------------------------

APPENDER = """
import sys
from pathlib import Path
from agent.alerts.audit import AuditLog

log = AuditLog(Path(sys.argv[1]))
records = log.open()
sequence = max((r["sequence"] for r in records if r["type"] == "chaos"), default=-1) + 1
print("start", sequence, flush=True)
while True:
    log.append("chaos", sequence=sequence, padding="x" * (sequence % 500))
    print("acked", sequence, flush=True)   # only after the append returned: the record is durable
    sequence += 1
"""


def test_audit_log_keeps_every_acknowledged_record_across_random_kills(tmp_path):
    path = tmp_path / "audit.jsonl"
    script = tmp_path / "appender.py"
    script.write_text(APPENDER)
    rng = random.Random(1)
    acknowledged: set[int] = set()
    for run in range(KILLS):
        writer = Process([sys.executable, str(script), str(path)], tmp_path / f"appender-{run}.log")
        wait_until(lambda: _lines(writer, "acked "), 30, "the first acknowledged record", interval=0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        kill_9(writer)
        acknowledged.update(int(n) for n in _lines(writer, "acked "))

        reader = AuditLog(path)
        written = [r["sequence"] for r in reader.records() if r["type"] == "chaos"]
        assert acknowledged <= set(written), f"run {run}: acknowledged records lost"
        assert written == sorted(set(written)), f"run {run}: records out of order or repeated"
        # Only a record cut by the kill can be torn, and only as the last line.
        lines = path.read_bytes().split(b"\n")
        assert reader.skipped_lines <= 1 and all(json.loads(line) for line in lines[:-1] if line.strip())
    assert len(acknowledged) > KILLS


# --- 2. the drift checkpoint ----------------------------------------------------------------------------

CHECKPOINTER = """
import sys
from pathlib import Path
import numpy as np
from prometheus_client import CollectorRegistry
from agent.config import load_config
from agent.demo.data import load_images
from agent.detect.drift.watch import DriftWatch
from agent.detect.registry import DetectorRegistry
from agent.metrics import DriftMetrics, ProxyMetrics
from agent.dataplane.tap import TappedInference

repository, state = sys.argv[1], sys.argv[2]
config = load_config(overrides={"detection.model_repository": repository, "drift.checkpoint_dir": state})
detectors = DetectorRegistry(Path(repository), "cpu")
watch = DriftWatch(detectors, config.drift, DriftMetrics(CollectorRegistry()), ProxyMetrics(CollectorRegistry()).bounded)
model = watch.models[("mnist_cnn", "1")]
images = load_images()[0]
probabilities = np.full((64, 10), 0.01, np.float32)
probabilities[:, 0] = 0.91
outputs = model.tests.tests["outputs"]
print("restored", outputs.n, flush=True)
for step in range(10**9):
    start = (step * 64) % (len(images) - 64)
    rows = images[start:start + 64]
    watch(TappedInference("mnist_cnn", "1", {"input": rows}, {"probabilities": probabilities}, None, None, 0.0, 0.0))
    watch.checkpoint()
    print("checkpointed", outputs.n, flush=True)   # after checkpoint() returned
"""


def _checkpointed_n(path: Path) -> int:
    """Rows the outputs drift test had taken in a checkpoint (every row of traffic feeds it)."""
    return json.loads(path.read_text())["tests"]["tests"]["outputs"]["alarm"]["n"]


def test_drift_checkpoint_always_loads_after_random_kills(tmp_path):
    state = tmp_path / "state"
    script = tmp_path / "checkpointer.py"
    script.write_text(CHECKPOINTER)
    checkpoint = state / "drift-mnist_cnn-1.json"
    rng = random.Random(2)
    reported = 0
    for run in range(KILLS):
        writer = Process([sys.executable, str(script), str(BUNDLED_REPOSITORY), str(state)],
                         tmp_path / f"checkpointer-{run}.log")
        wait_until(lambda: _lines(writer, "checkpointed "), 60, "the first checkpoint", interval=0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        kill_9(writer)
        assert "cannot restore" not in writer.log()
        reported = max([reported] + [int(n) for n in _lines(writer, "checkpointed ")])
        # The file loads (never half-written) and is no older than the last checkpoint reported done.
        assert _checkpointed_n(checkpoint) >= reported, f"run {run}"
    assert reported > 0


# --- 3. a whole sidecar -------------------------------------------------------------------------------

ALERT = "ChaosIncident"


def _alertmanager_payload(n: int, status: str) -> dict:
    return {"version": "4", "status": status, "receiver": "sidewatch", "groupLabels": {}, "commonLabels": {},
            "alerts": [{"status": status, "labels": {"alertname": ALERT, "n": str(n)}, "annotations": {},
                        "startsAt": "2026-01-01T00:00:00Z"}]}


class Incidents:
    """Fires Alertmanager alerts at the sidecar, resolving each after the next one fired; records what the
    receiver acknowledged (answered 200) and what was only attempted."""

    def __init__(self, admin_port: int, token: str, first: int) -> None:
        self.admin_port, self.token, self.next = admin_port, token, first
        self.opened: dict[int, str] = {}      # n -> incident id, acknowledged
        self.resolved: set[int] = set()       # acknowledged
        self.resolving: set[int] = set()      # attempted (perhaps recorded, perhaps not)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _post(self, n: int, status: str) -> dict | None:
        try:
            code, _, body = admin_request(self.admin_port, "POST", "/alertmanager", self.token,
                                          _alertmanager_payload(n, status))
        except (OSError, http.client.HTTPException):
            return None   # killed, perhaps in the middle of the answer: not acknowledged
        assert code == 200, body
        return body

    def _run(self) -> None:
        while not self._stop.is_set():
            n = self.next
            body = self._post(n, "firing")
            if body is None:
                return
            self.opened[n] = body["incidents"][f"{ALERT}{{n={n}}}"]
            self.next += 1
            if n - 1 in self.opened:
                self.resolving.add(n - 1)
                if self._post(n - 1, "resolved") is None:
                    return
                self.resolved.add(n - 1)
            time.sleep(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def _traffic(port: int, stop: threading.Event) -> None:
    client = InferenceClient(f"127.0.0.1:{port}")
    images = load_images()[0]
    rng = np.random.default_rng(0)
    while not stop.is_set():
        try:
            client.infer("mnist_cnn", {"input": images[rng.integers(0, len(images), 8)]}, version="1", timeout=5)
        except Exception:  # noqa: BLE001 - the sidecar is killed under it
            time.sleep(0.05)
    client.close()


@pytest.fixture
def receiver():
    with WebhookReceiver() as server:
        yield server


@pytest.fixture
def model_server(tmp_path):
    process, port = start_model_server(tmp_path)
    yield port
    process.stop()


def test_sidecar_killed_at_random_moments_during_incidents_loses_nothing(tmp_path, receiver, model_server):
    model_port = model_server
    token, token_file = write_token(tmp_path)
    admin, admin_port = admin_config(tmp_path, token_file, alertmanager_hooks={ALERT: ["notify"]})
    (tmp_path / "secret").write_bytes(SECRET)
    audit_log, state = tmp_path / "audit.jsonl", tmp_path / "state"
    config = write_config(tmp_path, {
        "detection": {"model_repository": str(BUNDLED_REPOSITORY), "device": "cpu"},
        "drift": {"checkpoint_dir": str(state), "checkpoint_interval_seconds": 0.2},
        "rollback": {"audit_log": str(audit_log), "cooldown_seconds": 0, "max_per_hour": 100_000, "hooks": {
            "notify": {"type": "webhook", "url": receiver.url, "secret_file": str(tmp_path / "secret"),
                       "retries": 0, "timeout_seconds": 5}}},
        "admin": admin,
    })
    rng = random.Random(3)
    opened: dict[int, str] = {}
    resolved: set[int] = set()
    resolving: set[int] = set()
    drift_n = 0
    sidecar = None
    try:
        for run in range(SIDECAR_KILLS + 1):
            sidecar, port, _ = start_sidecar(tmp_path, model_port, config=config)
            sidecar.wait_listening(admin_port)
            if run:
                # The restart restored the detector state and every incident acknowledged before the kill.
                assert "cannot restore" not in sidecar.log()
                wait_until(lambda: "restored drift state of mnist_cnn version 1" in sidecar.log(), 10,
                           "the drift state restored")
                status = admin_request(admin_port, "GET", "/status", token)[2]["rollback"]
                incidents = {incident["id"]: incident for incident in status["incidents"]}
                for n, incident_id in opened.items():
                    assert incident_id in incidents, f"run {run}: acknowledged incident {n} lost"
                    state_now = incidents[incident_id]["state"]
                    if n in resolved:
                        assert state_now == "closed", f"run {run}: acknowledged resolve of {n} lost"
                    elif n not in resolving:
                        assert state_now == "open", f"run {run}: incident {n} closed without a resolve"
            if run == SIDECAR_KILLS:
                break
            stop = threading.Event()
            traffic = threading.Thread(target=_traffic, args=(port, stop), daemon=True)
            traffic.start()
            alerts = Incidents(admin_port, token, first=max(opened, default=-1) + 1)
            alerts.start()
            time.sleep(rng.uniform(0.5, 2.5))
            kill_9(sidecar)
            alerts.stop()
            stop.set()
            traffic.join(10)
            opened.update(alerts.opened)
            resolved |= alerts.resolved
            resolving |= alerts.resolving

            # The log parses (a torn last line at most), and holds every acknowledged decision.
            log = AuditLog(audit_log)
            records = log.records()
            assert log.skipped_lines <= 1
            recorded_open = {r["incident"] for r in records if r["type"] == "incident_opened"}
            recorded_resolved = {r["incident"] for r in records if r["type"] == "incident_resolved"}
            assert set(opened.values()) <= recorded_open, f"run {run}"
            assert {opened[n] for n in resolved} <= recorded_resolved, f"run {run}"
            # The detector state loads and never goes back.
            checkpoint = state / "drift-mnist_cnn-1.json"
            if checkpoint.exists():
                n_now = _checkpointed_n(checkpoint)
                assert n_now >= drift_n, f"run {run}: drift state went back from {drift_n} to {n_now}"
                drift_n = n_now

        # Every hook finishes (success, or "unknown" when a kill cut its attempt short) and none ran twice.
        def settled():
            hooks = [incident["hooks"]["notify"] for incident in
                     admin_request(admin_port, "GET", "/status", token)[2]["rollback"]["incidents"]]
            return hooks if all(hook["result"] != "pending" for hook in hooks) else None

        hooks = wait_until(settled, 30, "every hook to finish")
        assert {hook["result"] for hook in hooks} <= {"success", "unknown"}
        delivered = [json.loads(d.body)["incident"] for d in receiver.successful()]
        assert len(delivered) == len(set(delivered)), "a webhook was delivered twice for one incident"
        assert set(delivered) <= set(opened.values()) | {r["incident"] for r in AuditLog(audit_log).records()
                                                         if r["type"] == "incident_opened"}
        assert len(opened) >= SIDECAR_KILLS and drift_n > 0
        sidecar.stop()
        assert sidecar.popen.returncode == 0
    finally:
        if sidecar is not None and sidecar.popen.poll() is None:
            sidecar.stop()


# --- the moment the sidecar run above found: between a successful attempt and the hook's result ------------


@pytest.mark.parametrize("retries", [0, 2])
def test_kill_between_a_successful_attempt_and_its_hook_result_replays_as_success(tmp_path, receiver, retries):
    from prometheus_client import CollectorRegistry

    from agent.alerts.dispatcher import RollbackDispatcher
    from agent.alerts.incident import Alert, alert_to_dict
    from agent.config.rollback import RollbackConfig
    from agent.dataplane.routes import RouteTable
    from agent.metrics import AlertMetrics

    (tmp_path / "secret").write_bytes(SECRET)
    config = RollbackConfig.model_validate({
        "audit_log": str(tmp_path / "audit.jsonl"), "cooldown_seconds": 0,
        "hooks": {"notify": {"type": "webhook", "url": receiver.url, "secret_file": str(tmp_path / "secret"),
                             "retries": retries}}})
    alert = Alert(ALERT, f"{ALERT}{{n=1}}", "", {"n": "1"}, {}, "alertmanager", 1.0, None, ("notify",))
    # The audit log as a kill -9 leaves it right after the attempt's result was written.
    log = AuditLog(config.audit_log)
    log.open()
    log.append("incident_opened", incident="inc-1", alert=alert_to_dict(alert), decision="run", reason="")
    log.append("attempt_started", incident="inc-1", hook="notify", attempt=1)
    log.append("attempt_result", incident="inc-1", hook="notify", attempt=1, ok=True,
               message="delivered (200)", seconds=0.01)
    log.close()

    dispatcher = RollbackDispatcher(config, AlertMetrics(CollectorRegistry()), RouteTable())
    dispatcher.start()
    try:
        assert dispatcher.wait_idle(10)
        hook = dispatcher.status()["incidents"][0]["hooks"]["notify"]
    finally:
        dispatcher.close()
    assert hook["result"] == "success" and hook["attempts"] == 1
    assert receiver.deliveries == []          # delivered before the kill: never again
