"""The admin API of a real sidecar: bearer token, limits, status, route undo, and the CLI that uses it."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from agent.demo.data import load_images
from agent.protocol.client import InferenceClient
from tests.support.alert_harness import admin_config, admin_request, metric, read_audit, wait_until, write_config, write_token
from tests.support.harness import Process, free_port, sidewatch, start_sidecar

MODEL = "mnist_cnn"


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, model_server):
    tmp_path = tmp_path_factory.mktemp("admin")
    token, token_file = write_token(tmp_path)
    admin, admin_port = admin_config(tmp_path, token_file, max_body_bytes=4096,
                                     alertmanager_hooks={"ModelBroken": ["pin-v1"]})
    audit_log = tmp_path / "audit.jsonl"
    config = write_config(tmp_path, {
        "rollback": {"audit_log": str(audit_log), "cooldown_seconds": 0,
                     "hooks": {"pin-v1": {"type": "route", "model": MODEL, "version": "1"}}},
        "admin": admin,
    })
    process, port, metrics_port = start_sidecar(tmp_path, model_server, config=config)
    process.wait_listening(admin_port)
    client = InferenceClient(f"127.0.0.1:{port}")
    yield {"token": token, "token_file": token_file, "admin_port": admin_port, "port": port,
           "metrics_port": metrics_port, "client": client, "audit_log": audit_log, "config": config,
           "process": process}
    client.close()
    process.stop()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-of-enough-length", "Basic YWRtaW46YWRtaW4=",
                                           "Bearer", "bearer  "])
def test_requests_without_the_right_token_are_refused(sidecar, authorization):
    port = sidecar["admin_port"]
    before = metric(sidecar["metrics_port"], "sidewatch_admin_requests_total", endpoint="status", code="401")
    headers = {} if authorization is None else {"Authorization": authorization}
    status, reply_headers, body = admin_request(port, "GET", "/status", headers=headers)
    assert status == 401
    assert reply_headers["www-authenticate"] == 'Bearer realm="sidewatch"'
    assert "token" in body["error"] and "alerts" not in body
    after = metric(sidecar["metrics_port"], "sidewatch_admin_requests_total", endpoint="status", code="401")
    assert after == before + 1
    # Route undo and the receiver are refused the same way, before their bodies are looked at.
    assert admin_request(port, "POST", "/routes/undo", headers=headers, body={"model": MODEL})[0] == 401
    assert admin_request(port, "POST", "/alertmanager", headers=headers, body=b"{}")[0] == 401


def test_status_lists_alerts_and_rollback_state(sidecar):
    status, headers, body = admin_request(sidecar["admin_port"], "GET", "/status", sidecar["token"])
    assert status == 200 and headers["content-type"] == "application/json"
    assert body["alerts"] == []  # no rules configured
    assert body["rollback"]["hooks"] == {"pin-v1": "route"}
    assert body["rollback"]["audit_log"] == str(sidecar["audit_log"])


@pytest.mark.parametrize("method, path, body, headers, expected", [
    ("GET", "/nothing-here", None, {}, 404),
    ("POST", "/status", b"{}", {}, 405),
    ("GET", "/routes/undo", None, {}, 405),
    ("POST", "/routes/undo", b"x" * 5000, {}, 413),
    ("POST", "/routes/undo", b"{not json", {}, 400),
    ("POST", "/routes/undo", b'{"model": 5}', {}, 400),
    ("POST", "/routes/undo", b'["mnist_cnn"]', {}, 400),
    ("POST", "/routes/undo", b'{"model": "mnist_cnn", "actor": 7}', {}, 400),
])
def test_bad_requests_get_clear_errors(sidecar, method, path, body, headers, expected):
    status, _, reply = admin_request(sidecar["admin_port"], method, path, sidecar["token"], body=body, headers=headers)
    assert status == expected
    assert reply["error"].startswith("sidewatch: ")


def test_body_without_length_is_refused_and_the_server_keeps_serving(sidecar):
    port = sidecar["admin_port"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /routes/undo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {sidecar['token']}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode())
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 411")
    assert admin_request(port, "GET", "/status", sidecar["token"])[0] == 200


def test_oversized_alertmanager_delivery_is_counted(sidecar):
    metrics_port = sidecar["metrics_port"]
    before = metric(metrics_port, "sidewatch_alertmanager_requests_total", result="too_large")
    status, _, _ = admin_request(sidecar["admin_port"], "POST", "/alertmanager", sidecar["token"], body=b" " * 5000)
    assert status == 413
    assert metric(metrics_port, "sidewatch_alertmanager_requests_total", result="too_large") == before + 1


def test_undo_of_a_model_without_a_pin_is_not_found(sidecar):
    status, _, body = admin_request(sidecar["admin_port"], "POST", "/routes/undo", sidecar["token"],
                                    body={"model": "never_pinned"})
    assert status == 404 and body["undone"] is False
    done = subprocess.run(sidewatch("route", "undo", "--model", "never_pinned", "--config", str(sidecar["config"])),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "never_pinned has no route pin" in done.stderr


def _served_version(client) -> str:
    _, response, _ = client.infer(MODEL, {"input": load_images()[0][:1]}, timeout=10)
    return response.model_version


def test_pin_from_the_receiver_is_listed_and_undone_by_the_cli(sidecar):
    client, port, token = sidecar["client"], sidecar["admin_port"], sidecar["token"]
    assert _served_version(client) == "2"  # no version asked: the model server answers with its latest
    payload = {"version": "4", "status": "firing", "receiver": "sidewatch", "groupKey": "{}:{}", "alerts": [{
        "status": "firing", "labels": {"alertname": "ModelBroken", "model": MODEL, "version": "2"},
        "annotations": {}, "startsAt": "2024-05-01T12:00:00Z", "endsAt": "0001-01-01T00:00:00Z"}]}
    status, _, reply = admin_request(port, "POST", "/alertmanager", token, body=payload)
    assert status == 200
    assert list(reply["incidents"]) == ["ModelBroken{model=mnist_cnn,version=2}"]
    wait_until(lambda: _served_version(client) == "1", 30, "the route pin to version 1")

    shown = subprocess.run(sidewatch("alerts", "status", "--config", str(sidecar["config"])),
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    pins = shown.stdout[shown.stdout.index("ROUTE PINS"):]
    assert MODEL in pins and reply["incidents"]["ModelBroken{model=mnist_cnn,version=2}"] in pins
    assert "pin-v1:success" in shown.stdout
    as_json = subprocess.run(sidewatch("alerts", "status", "--json", "--admin-url", f"http://127.0.0.1:{port}",
                                       "--token-file", str(sidecar["token_file"])),
                             capture_output=True, text=True, timeout=60)
    assert json.loads(as_json.stdout)["rollback"]["routes"][MODEL]["version"] == "1"

    undone = subprocess.run(sidewatch("route", "undo", "--model", MODEL, "--actor", "alice",
                                      "--config", str(sidecar["config"])), capture_output=True, text=True, timeout=60)
    assert undone.returncode == 0, undone.stderr
    assert _served_version(client) == "2"
    records = [r for r in read_audit(sidecar["audit_log"]) if r["type"] == "route_undone"]
    assert records[-1]["model"] == MODEL and records[-1]["actor"] == "alice@127.0.0.1"
    assert metric(sidecar["metrics_port"], "sidewatch_route_pinned", model=MODEL, version="1") == 0


def test_cli_with_a_wrong_token_is_refused(sidecar, tmp_path):
    _, wrong = write_token(tmp_path, "wrong")
    done = subprocess.run(sidewatch("alerts", "status", "--admin-url", f"http://127.0.0.1:{sidecar['admin_port']}",
                                    "--token-file", str(wrong)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "bearer token" in done.stderr


def test_without_a_token_the_admin_api_stays_off(tmp_path, model_server):
    admin_port = free_port()
    config = write_config(tmp_path, {"admin": {"listen": f"127.0.0.1:{admin_port}"}})
    process, _, _ = start_sidecar(tmp_path, model_server, config=config)
    try:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", admin_port), timeout=1).close()
        assert "admin API off: no token" in process.log()
    finally:
        process.stop()


def test_alertmanager_hooks_without_a_token_refuse_to_start(tmp_path, model_server):
    config = write_config(tmp_path, {
        "rollback": {"hooks": {"pin-v1": {"type": "route", "model": MODEL, "version": "1"}}},
        "admin": {"alertmanager_hooks": {"ModelBroken": ["pin-v1"]}},
    })
    process = Process(sidewatch("serve", "--listen", f"127.0.0.1:{free_port()}", "--upstream",
                                f"127.0.0.1:{model_server}", "--metrics-listen", f"127.0.0.1:{free_port()}",
                                "--config", str(config)), tmp_path / "refused.log", env={"SIDEWATCH_ADMIN_TOKEN": ""})
    assert process.popen.wait(60) == 2
    process.stop()
    assert "admin.alertmanager_hooks needs the admin API" in process.log()


def test_admin_api_over_tls(tmp_path, model_server):
    from tests.support.certs import CertificateAuthority

    authority = CertificateAuthority(tmp_path)
    server = authority.issue("localhost", server=True)
    token, token_file = write_token(tmp_path)
    admin, admin_port = admin_config(tmp_path, token_file, tls={"cert_file": str(server.cert),
                                                                 "key_file": str(server.key)})
    config = write_config(tmp_path, {"admin": admin})
    process, _, _ = start_sidecar(tmp_path, model_server, config=config)
    try:
        process.wait_listening(admin_port)
        done = subprocess.run(sidewatch("alerts", "status", "--json", "--config", str(config),
                                        "--ca-file", str(authority.cert_file)), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["alerts"] == []
        # Plain HTTP to the TLS listener gets no answer, and the listener keeps serving.
        with pytest.raises((ConnectionError, OSError)):
            admin_request(admin_port, "GET", "/status", token)
        again = subprocess.run(sidewatch("alerts", "status", "--config", str(config), "--ca-file",
                                         str(authority.cert_file)), capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
    finally:
        process.stop()


def test_admin_port_in_use_is_a_clear_error(tmp_path, model_server):
    _, token_file = write_token(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(tmp_path, {"admin": {"listen": f"127.0.0.1:{taken.getsockname()[1]}",
                                                   "token_file": str(token_file)}})
        process = Process(sidewatch("serve", "--listen", f"127.0.0.1:{free_port()}", "--upstream",
                                    f"127.0.0.1:{model_server}", "--metrics-listen", f"127.0.0.1:{free_port()}",
                                    "--config", str(config)), tmp_path / "in-use.log")
        assert process.popen.wait(60) == 2
        process.stop()
    assert "sidewatch: cannot listen on admin.listen" in process.log()
