"""Rollback in a real sidecar (`sidewatch serve`), with real model servers, an HMAC-checking webhook receiver
and kill -9: route pins (version and fallback upstream) survive a crash and are undone only explicitly;
a webhook retrying when the sidecar is killed is delivered exactly once after the restart; dry run
fires nothing. Alerts reach the dispatcher through the admin API's Alertmanager receiver."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest

from agent.demo.data import load_images
from agent.protocol import oip_pb2, paths
from agent.protocol.client import InferenceClient
from tests.support.alert_harness import admin_config, admin_request, metric, read_audit, wait_until, write_config, write_token
from tests.support.harness import Process, free_port, sidewatch, start_sidecar
from tests.support.webhook import SECRET, WebhookReceiver

MODEL = "mnist_cnn"


class Sidecar:
    """`sidewatch serve` on a fixed config (admin API on a fixed port), restartable after kill -9."""

    def __init__(self, tmp_path, model_port: int, rollback: dict, alertmanager_hooks: dict,
                 data_plane: str = "python") -> None:
        self.tmp_path = tmp_path
        self.data_plane = data_plane
        self.model_port = model_port
        self.token, token_file = write_token(tmp_path)
        admin, self.admin_port = admin_config(tmp_path, token_file, alertmanager_hooks=alertmanager_hooks)
        self.audit_log = tmp_path / "audit.jsonl"
        self.config = write_config(tmp_path, {"rollback": {"audit_log": str(self.audit_log), **rollback},
                                              "admin": admin})
        self.process: Process | None = None
        self.client: InferenceClient | None = None

    def start(self) -> None:
        self.process, port, self.metrics_port = start_sidecar(self.tmp_path, self.model_port, "--data-plane",
                                                              self.data_plane, config=self.config)
        self.process.wait_listening(self.admin_port)
        self.port = port
        self.client = InferenceClient(f"127.0.0.1:{port}")

    def kill_9(self) -> None:
        self.client.close()
        self.process.popen.kill()
        self.process.popen.wait()
        self.process.stop()

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.process is not None:
            self.process.stop()

    def served_version(self, version: str = "") -> str:
        _, response, _ = self.client.infer(MODEL, {"input": load_images()[0][:1]}, version=version, timeout=10)
        return response.model_version

    def metadata_versions(self) -> list[str]:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            call = channel.unary_unary(paths.MODEL_METADATA,
                                       request_serializer=oip_pb2.ModelMetadataRequest.SerializeToString,
                                       response_deserializer=oip_pb2.ModelMetadataResponse.FromString)
            return list(call(oip_pb2.ModelMetadataRequest(name=MODEL), timeout=10).versions)

    def alertmanager(self, alertname: str, status: str = "firing") -> dict:
        payload = {"version": "4", "status": status, "receiver": "sidewatch", "groupKey": "{}:{}", "alerts": [{
            "status": status, "labels": {"alertname": alertname, "model": MODEL, "version": "2"},
            "annotations": {"summary": "test"}, "startsAt": "2024-05-01T12:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z"}]}
        code, _, reply = admin_request(self.admin_port, "POST", "/alertmanager", self.token, body=payload)
        assert code == 200, reply
        return reply

    def undo(self, model: str = MODEL) -> int:
        code, _, _ = admin_request(self.admin_port, "POST", "/routes/undo", self.token, body={"model": model})
        return code

    def status(self) -> dict:
        code, _, body = admin_request(self.admin_port, "GET", "/status", self.token)
        assert code == 200
        return body["rollback"]

    def records(self, record_type: str) -> list[dict]:
        return [r for r in read_audit(self.audit_log) if r["type"] == record_type]


@pytest.fixture
def make_sidecar(tmp_path):
    made: list[Sidecar] = []

    def make(*args, **kwargs) -> Sidecar:
        made.append(Sidecar(tmp_path, *args, **kwargs))
        made[-1].start()
        return made[-1]

    yield make
    for sidecar in made:
        sidecar.stop()


@pytest.mark.parametrize("data_plane", ["python", "envoy"])
def test_version_pin_survives_kill_9_and_is_undone_only_explicitly(make_sidecar, model_server, data_plane):
    sidecar = make_sidecar(model_server, {"cooldown_seconds": 0, "hooks": {
        "pin-v1": {"type": "route", "model": MODEL, "version": "1"}}}, {"ModelBroken": ["pin-v1"]}, data_plane)
    assert sidecar.served_version() == "2"
    incident = sidecar.alertmanager("ModelBroken")["incidents"]
    wait_until(lambda: sidecar.served_version() == "1", 30, "the pin to version 1")
    assert sidecar.served_version("2") == "1"

    sidecar.kill_9()
    sidecar.start()
    # Replayed from the audit log before the first call is forwarded.
    assert sidecar.served_version() == "1"
    assert metric(sidecar.metrics_port, "sidewatch_route_pinned", model=MODEL, version="1") == 1
    # Alertmanager repeats the firing alert: the same incident, no second pin.
    assert sidecar.alertmanager("ModelBroken")["incidents"] == incident
    assert len(sidecar.records("route_pinned")) == 1
    # Resolving the alert does not undo the pin either.
    sidecar.alertmanager("ModelBroken", status="resolved")
    wait_until(lambda: sidecar.status()["open_incidents"] == 0, 30, "the incident to close")
    assert sidecar.served_version() == "1"

    assert sidecar.undo() == 200
    # Envoy applies the undo from the route file it watches: within a second.
    wait_until(lambda: sidecar.served_version() == "2", 0 if data_plane == "python" else 1, "the undo")
    sidecar.stop()
    sidecar.start()
    assert sidecar.served_version() == "2" and sidecar.status()["routes"] == {}


@pytest.mark.parametrize("data_plane", ["python", "envoy"])
def test_fallback_upstream_pin_in_a_real_sidecar(make_sidecar, model_server, fallback_server, data_plane):
    sidecar = make_sidecar(model_server, {"cooldown_seconds": 0, "hooks": {
        "fallback": {"type": "route", "model": MODEL, "upstream": f"127.0.0.1:{fallback_server}"}}},
        {"ModelGone": ["fallback"]}, data_plane)
    sidecar.alertmanager("ModelGone")
    wait_until(lambda: sidecar.served_version() == "7", 30, "the pin to the fallback upstream")
    assert sidecar.metadata_versions() == ["7"]
    assert metric(sidecar.metrics_port, "sidewatch_route_pinned", model=MODEL,
                  version=f"upstream:127.0.0.1:{fallback_server}") == 1
    sidecar.kill_9()
    sidecar.start()
    assert sidecar.served_version() == "7"
    assert sidecar.undo() == 200
    wait_until(lambda: sidecar.served_version() == "2", 0 if data_plane == "python" else 1, "the undo")
    assert sidecar.metadata_versions() == ["1", "2"]


def test_kill_9_during_webhook_retries_then_one_delivery(make_sidecar, model_server, tmp_path):
    (tmp_path / "secret").write_bytes(SECRET)
    with WebhookReceiver(fail_first=2) as receiver:
        sidecar = make_sidecar(model_server, {"hooks": {
            "pin-v1": {"type": "route", "model": MODEL, "version": "1"},
            "notify": {"type": "webhook", "url": receiver.url, "secret_file": str(tmp_path / "secret"),
                       "retries": 3, "backoff_seconds": 2}}}, {"ModelBroken": ["pin-v1", "notify"]})
        [incident] = sidecar.alertmanager("ModelBroken")["incidents"].values()
        wait_until(lambda: any(r["hook"] == "notify" and r["attempt"] == 2 for r in sidecar.records("attempt_result")),
                   30, "the second failed delivery", interval=0.02)
        sidecar.kill_9()                       # the third attempt is waiting for its 4 s backoff
        assert [d.status for d in receiver.deliveries] == [500, 500]

        sidecar.start()
        assert sidecar.served_version() == "1"
        wait_until(lambda: receiver.successful(), 30, "the delivery after the restart")
        sidecar.alertmanager("ModelBroken")   # still firing after the restart: nothing new
        wait_until(lambda: sidecar.status()["incidents"][0]["hooks"]["notify"]["result"] == "success", 30,
                   "the hook result")
        sidecar.kill_9()
        sidecar.start()
        assert sidecar.status()["incidents"][0]["id"] == incident

    # The figure: hooks fired for one incident under retries and a kill -9 in the middle = 1.
    assert len(receiver.successful()) == 1
    assert [d.status for d in receiver.deliveries] == [500, 500, 200]
    assert json.loads(receiver.successful()[0].body)["incident"] == incident
    assert len(sidecar.records("incident_opened")) == 1 and len(sidecar.records("route_pinned")) == 1


def test_dry_run_in_a_real_sidecar_fires_nothing(make_sidecar, model_server, tmp_path):
    (tmp_path / "secret").write_bytes(SECRET)
    with WebhookReceiver() as receiver:
        sidecar = make_sidecar(model_server, {"dry_run": True, "hooks": {
            "pin-v1": {"type": "route", "model": MODEL, "version": "1"},
            "notify": {"type": "webhook", "url": receiver.url, "secret_file": str(tmp_path / "secret")}}},
            {"ModelBroken": ["pin-v1", "notify"]})
        sidecar.alertmanager("ModelBroken")
        [incident] = sidecar.status()["incidents"]
        assert incident["decision"] == "dry_run"
        assert {name: hook["result"] for name, hook in incident["hooks"].items()} == {
            "pin-v1": "dry_run", "notify": "dry_run"}
        assert sidecar.served_version() == "2"
        assert metric(sidecar.metrics_port, "sidewatch_rollback_hook_runs_total", alert="ModelBroken", hook="notify",
                      result="dry_run") == 1
    assert receiver.deliveries == []
    assert sidecar.records("attempt_started") == [] and sidecar.records("route_pinned") == []


def test_unusable_audit_log_stops_the_sidecar_at_start_with_a_clear_message(tmp_path, model_server):
    (tmp_path / "not-a-directory").write_text("")
    config = write_config(tmp_path, {"rollback": {
        "audit_log": str(tmp_path / "not-a-directory" / "audit.jsonl"),
        "hooks": {"pin-v1": {"type": "route", "model": MODEL, "version": "1"}}}})
    done = subprocess.run(sidewatch("serve", "--listen", f"127.0.0.1:{free_port()}", "--upstream",
                                    f"127.0.0.1:{model_server}", "--metrics-listen", f"127.0.0.1:{free_port()}",
                                    "--config", str(config)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"sidewatch: cannot open rollback.audit_log {tmp_path / 'not-a-directory' / 'audit.jsonl'}" in done.stderr
    assert "Traceback" not in done.stderr
