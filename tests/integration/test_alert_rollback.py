"""The alert engine in a real sidecar: adversarial traffic fires a rule, whose hooks pin the model's traffic
to its last known-good version (route) and run a real program (command); the alert resolves after its
clear period, the pin stays until undone, and the sidecar shuts down cleanly."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from agent.demo.data import load_adversarial, load_images
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol.client import InferenceClient
from tests.support.alert_harness import admin_config, admin_request, metric, read_audit, wait_until, write_config, write_token
from tests.support.harness import start_model_server, start_sidecar

MODEL = "mnist_cnn"
RULE = "AdversarialRateHigh"

HOOK_PROGRAM = """
import json, os, pathlib, sys
run = pathlib.Path(sys.argv[1]) / (os.environ["SIDEWATCH_INCIDENT_ID"] + ".json")
run.write_text(json.dumps({k: v for k, v in os.environ.items() if k.startswith("SIDEWATCH_")}))
"""


@pytest.fixture
def running(tmp_path):
    model_server, model_port = start_model_server(tmp_path)
    token, token_file = write_token(tmp_path)
    admin, admin_port = admin_config(tmp_path, token_file)
    runs = tmp_path / "runs"
    runs.mkdir()
    program = tmp_path / "hook.py"
    program.write_text(HOOK_PROGRAM)
    audit_log = tmp_path / "audit.jsonl"
    config = write_config(tmp_path, {
        "detection": {"model_repository": str(BUNDLED_REPOSITORY), "device": "cpu"},
        "drift": {"enabled": False},
        # The demo's windows: a rollback within seconds of the first adversarial request.
        "alerts": {"evaluation_interval_seconds": 0.5, "rules": [{
            "name": RULE, "kind": "ratio", "numerator": "sidewatch_adversarial_detections_total",
            "denominator": "sidewatch_adversarial_inputs_total", "window_seconds": 5, "min_denominator": 10,
            # Benign inputs are flagged at the calibrated 5%: the threshold sits well above that.
            "above": 0.3, "for_seconds": 1, "clear_for_seconds": 2, "severity": "critical",
            "annotations": {"summary": "{value:.0%} of {model} v{version} inputs flagged"},
            "hooks": ["pin-last-good", "record"]}]},
        "rollback": {"audit_log": str(audit_log), "hooks": {
            "pin-last-good": {"type": "route"},
            "record": {"type": "command", "argv": [sys.executable, str(program), str(runs)]}}},
        "admin": admin,
    })
    sidecar, port, metrics_port = start_sidecar(tmp_path, model_port, config=config)
    sidecar.wait_listening(admin_port)
    client = InferenceClient(f"127.0.0.1:{port}")
    yield {"sidecar": sidecar, "client": client, "metrics_port": metrics_port, "admin_port": admin_port,
           "token": token, "runs": runs, "audit_log": audit_log}
    client.close()
    sidecar.stop()
    model_server.stop()


def _infer(client, rows: np.ndarray, version: str) -> str:
    _, response, _ = client.infer(MODEL, {"input": rows}, version=version, timeout=10)
    return response.model_version


def _status(running) -> dict:
    status, _, body = admin_request(running["admin_port"], "GET", "/status", running["token"])
    assert status == 200
    return body


def test_adversarial_traffic_rolls_the_model_back_to_its_last_good_version(running):
    client, metrics_port = running["client"], running["metrics_port"]
    benign = load_images()[0]
    adversarial = load_adversarial()[0]
    # Both versions serve benign traffic: version 1 first, then the new version 2.
    for index in range(20):
        assert _infer(client, benign[index:index + 1], "1") == "1"
    for index in range(20, 60):
        assert _infer(client, benign[index:index + 1], "2") == "2"
    time.sleep(1.5)  # three evaluations of benign traffic
    assert metric(metrics_port, "sidewatch_alert_active", alert=RULE, severity="critical") == 0
    assert _status(running)["alerts"][0]["state"] == "inactive"

    # An attack on version 2, until requests for version 2 are answered by version 1.
    first_adversarial = time.monotonic()
    answered = []
    for index in range(10_000):
        answered.append(_infer(client, adversarial[index % len(adversarial)][None], "2"))
        if answered[-1] == "1":
            break
        assert time.monotonic() - first_adversarial < 60, "no rollback within 60 s of adversarial traffic"
    rollback_seconds = time.monotonic() - first_adversarial
    print(f"rollback {rollback_seconds:.2f} s after the first adversarial request ({len(answered)} requests)")

    assert metric(metrics_port, "sidewatch_alert_active", alert=RULE, severity="critical") == 1
    assert metric(metrics_port, "sidewatch_alert_transitions_total", alert=RULE, state="firing") == 1
    assert metric(metrics_port, "sidewatch_alert_value", alert=RULE) > 0.3
    assert metric(metrics_port, "sidewatch_route_pinned", model=MODEL, version="1") == 1
    [run] = wait_until(lambda: list(running["runs"].iterdir()), 30, "the command hook to run")
    seen = json.loads(run.read_text())
    assert seen["SIDEWATCH_ALERT"] == RULE and seen["SIDEWATCH_SOURCE"] == "sidecar"
    assert seen["SIDEWATCH_MODEL"] == MODEL and seen["SIDEWATCH_VERSION"] == "2"
    incident = json.loads(seen["SIDEWATCH_INCIDENT_JSON"])
    assert incident["annotations"]["summary"].endswith(f"of {MODEL} v2 inputs flagged")
    assert incident["value"] > 0.3

    [rule] = _status(running)["alerts"]
    states = {series["labels"]["version"]: series for series in rule["series"]}
    assert rule["state"] == "firing" and states["2"]["labels"] == {"model": MODEL, "version": "2"}
    assert states["2"]["state"] == "firing" and states["2"]["incident"] == seen["SIDEWATCH_INCIDENT_ID"]
    assert states["1"]["state"] == "inactive"

    # Benign traffic again: the attack leaves the 5 s window, the alert clears for 2 s and resolves.
    def resolved() -> bool:
        _infer(client, benign[:1], "2")
        return metric(metrics_port, "sidewatch_alert_transitions_total", alert=RULE, state="resolved") == 1

    wait_until(resolved, 60, "the alert to resolve")
    assert metric(metrics_port, "sidewatch_alert_active", alert=RULE, severity="critical") == 0
    [incident_status] = _status(running)["rollback"]["incidents"]
    assert incident_status["state"] == "closed"
    assert incident_status["hooks"] == {
        "pin-last-good": {**incident_status["hooks"]["pin-last-good"], "result": "success", "attempts": 1},
        "record": {**incident_status["hooks"]["record"], "result": "success", "attempts": 1}}
    # Resolving never undoes a pin silently: version 2's traffic still goes to version 1.
    assert _infer(client, benign[:1], "2") == "1"
    assert len(list(running["runs"].iterdir())) == 1

    # SIGTERM: the engine stops, the dispatcher closes and the audit log holds the whole incident.
    assert running["sidecar"].stop() == 0
    assert "sidewatch: stopped" in running["sidecar"].log()
    types = [record["type"] for record in read_audit(running["audit_log"])]
    assert types.count("incident_opened") == 1 and types.count("route_pinned") == 1
    assert "incident_resolved" in types and "route_undone" not in types
