"""Helpers for the alerting tests: sidecar configs, admin API requests, waiting for a condition."""

from __future__ import annotations

import http.client
import json
import secrets
import sys
import time
from pathlib import Path

from tests.support.harness import free_port, http_get, metric_value, start_sidecar


def write_token(tmp_path: Path, name: str = "admin-token") -> tuple[str, Path]:
    token = secrets.token_urlsafe(24)
    path = tmp_path / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token, path


def write_config(tmp_path: Path, config: dict, name: str = "sidewatch.json") -> Path:
    """A sidecar config file (JSON is YAML)."""
    path = tmp_path / name
    path.write_text(json.dumps(config, indent=1))
    return path


def admin_config(tmp_path: Path, token_file: Path, **extra) -> tuple[dict, int]:
    port = free_port()
    return {"listen": f"127.0.0.1:{port}", "token_file": str(token_file), **extra}, port


def admin_request(port: int, method: str, path: str, token: str | None = None, body: bytes | dict | None = None,
                  headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, response headers, JSON body) of one request to the admin API."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        connection.request(method, path, body=body, headers=all_headers)
        reply = connection.getresponse()
        data = reply.read()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, json.loads(data) if data else {}
    finally:
        connection.close()


def metric(metrics_port: int, name: str, **labels: str) -> float:
    try:
        return metric_value(http_get(f"http://127.0.0.1:{metrics_port}/metrics"), name, **labels)
    except KeyError:
        return 0.0


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll until ``predicate()`` returns something true; return it, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def read_audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# A command hook that leaves one file per run in the folder it is given, named by the incident.
RECORD_HOOK_PROGRAM = """
import os, pathlib, sys
pathlib.Path(sys.argv[1], os.environ["SIDEWATCH_INCIDENT_ID"]).write_text("ran")
"""


class HookedSidecar:
    """A sidecar with the admin API, an audit log and a command hook ``record`` (one file per run in ``runs``)
    that Alertmanager's ``alert`` is mapped to; ``rollback`` adds to or replaces the rollback settings
    (``extra_hooks`` adds hooks). No model server: the admin API does not need one. ``restart`` keeps the log."""

    def __init__(self, tmp_path: Path, alert: str, rollback: dict | None = None,
                 extra_hooks: dict | None = None) -> None:
        self.tmp_path = tmp_path
        self.token, token_file = write_token(tmp_path)
        self.runs = tmp_path / "runs"
        self.runs.mkdir()
        program = tmp_path / "hook.py"
        program.write_text(RECORD_HOOK_PROGRAM)
        admin, self.admin_port = admin_config(tmp_path, token_file, alertmanager_hooks={alert: ["record"]})
        self.audit_log = tmp_path / "audit.jsonl"
        hooks = {"record": {"type": "command", "argv": [sys.executable, str(program), str(self.runs)]},
                 **(extra_hooks or {})}
        self.config = write_config(tmp_path, {
            "rollback": {"audit_log": str(self.audit_log), "cooldown_seconds": 0, "hooks": hooks, **(rollback or {})},
            "admin": admin,
        })
        self.process = None

    def start(self) -> "HookedSidecar":
        self.process, _, self.metrics_port = start_sidecar(self.tmp_path, free_port(), config=self.config)
        self.process.wait_listening(self.admin_port)
        return self

    def restart(self) -> None:
        assert self.process.stop() == 0
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def rollback_status(self) -> dict:
        status, _, body = admin_request(self.admin_port, "GET", "/status", self.token)
        assert status == 200
        return body["rollback"]

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.metrics_port, name, **labels)

    def hook_runs(self) -> int:
        return len(list(self.runs.iterdir()))
