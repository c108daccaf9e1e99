"""Probes of a careless operator's configuration (issue 14, defects 7 and 11), through the real command.

Defect 7: every file the configuration names (TLS certificates, keys and CAs of every section, a webhook's
secret, a command hook's program) and every value in a calibration artifact it points to fails
`sidewatch serve --check-config` and the start alike: exit 2, one line per problem naming the key and the
file, no traceback. (Before: "configuration is valid", then a traceback at start, or nothing until a
rollback was needed.) On the grpc.aio data plane, so that Envoy's own validation cannot be what catches it.

Defect 11: a version directory with a calibration artifact but no model.onnx is reported, by --check-config
and in the start's log, naming the directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.harness import Process, free_port, sidewatch

pytestmark = pytest.mark.hostile

BUNDLED_REPOSITORY = Path(__file__).resolve().parents[2] / "agent" / "demo" / "models"
# A start that is not refused would run until stopped: this long, then the probe fails.
START_TIMEOUT = 30


def _start_args() -> tuple[str, ...]:
    return ("--listen", f"127.0.0.1:{free_port()}", "--upstream", f"127.0.0.1:{free_port()}",
            "--metrics-listen", f"127.0.0.1:{free_port()}")


def _refused_by_both(config: Path, key: str, file: str | Path, *extra: str) -> None:
    """--check-config and the start both exit 2, naming ``key`` and ``file`` on one line, without a traceback."""
    for args in (("--check-config",), _start_args()):
        try:
            done = subprocess.run(sidewatch("serve", "--config", str(config), *extra, *args), capture_output=True,
                                  text=True, timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve {' '.join(args)} was not refused: still running after {START_TIMEOUT} s")
        mode = "--check-config" if args == ("--check-config",) else "start"
        assert done.returncode == 2, f"{mode}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        assert "Traceback" not in done.stderr, f"{mode}:\n{done.stderr}"
        assert "configuration is valid" not in done.stdout
        lines = [line for line in done.stderr.splitlines() if key in line and str(file) in line]
        assert lines, f"{mode}: no line names {key} and {file}:\n{done.stderr}"
        assert lines[0].startswith("sidewatch: "), lines


def _config(tmp_path: Path, text: str, admin: str = "") -> Path:
    """A config on the grpc.aio data plane, its admin API on a free port with a token (so admin.tls is used);
    ``admin``: more of the admin: mapping."""
    token = tmp_path / "admin-token"
    token.write_text("t" * 32 + "\n")
    path = tmp_path / "sidewatch.yaml"
    path.write_text(f"data_plane: python\nadmin:\n  listen: 127.0.0.1:{free_port()}\n  token_file: {token}\n{admin}"
                    + text)
    return path


def _pem(tmp_path: Path, name: str) -> Path:
    """A file that is there (its contents do not matter to the check of the one that is not)."""
    path = tmp_path / name
    path.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    return path


# (case, YAML with {present} and {absent} for files, the key that must be named); admin.tls's goes under admin:.
TLS_CASES = [
    ("listener-cert", "tls:\n  cert_file: {absent}\n  key_file: {present}\n", "tls.cert_file"),
    ("listener-key", "tls:\n  cert_file: {present}\n  key_file: {absent}\n", "tls.key_file"),
    ("listener-client-ca", "tls:\n  cert_file: {present}\n  key_file: {present}\n  client_ca_file: {absent}\n"
                           "  require_client_cert: true\n", "tls.client_ca_file"),
    ("upstream-ca", "upstream:\n  tls:\n    ca_file: {absent}\n", "upstream.tls.ca_file"),
    ("upstream-client-key", "upstream:\n  tls:\n    ca_file: {present}\n    cert_file: {present}\n"
                            "    key_file: {absent}\n", "upstream.tls.key_file"),
    ("metrics-cert", "metrics:\n  tls:\n    cert_file: {absent}\n    key_file: {present}\n", "metrics.tls.cert_file"),
    ("admin-key", "  tls:\n    cert_file: {present}\n    key_file: {absent}\n", "admin.tls.key_file"),
    # A fallback upstream (a route hook's upstream) is reached with upstream.tls: its CA is checked at start,
    # not when the hook first pins a model to it.
    ("fallback-upstream-ca", "upstream:\n  tls:\n    ca_file: {absent}\nrollback:\n  hooks:\n"
                             "    fallback: {{type: route, upstream: '127.0.0.1:9'}}\n", "upstream.tls.ca_file"),
]


@pytest.mark.parametrize("case,text,key", TLS_CASES, ids=[case[0] for case in TLS_CASES])
def test_a_missing_tls_file_is_refused_by_check_config_and_start(tmp_path, case, text, key):
    absent = tmp_path / f"{case}-absent.pem"
    text = text.format(present=_pem(tmp_path, "present.pem"), absent=absent)
    path = _config(tmp_path, "", admin=text) if key.startswith("admin.") else _config(tmp_path, text)
    _refused_by_both(path, key, absent)


def test_a_command_hook_whose_program_does_not_exist_is_refused(tmp_path):
    program = tmp_path / "no-such-rollback.sh"
    path = _config(tmp_path, f"rollback:\n  hooks:\n    undo: {{type: command, argv: ['{program}', '--now']}}\n")
    _refused_by_both(path, "rollback.hooks.undo.argv", program)


def test_a_command_hook_whose_program_is_not_executable_is_refused(tmp_path):
    program = tmp_path / "rollback.sh"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o644)
    path = _config(tmp_path, f"rollback:\n  hooks:\n    undo: {{type: command, argv: ['{program}']}}\n")
    _refused_by_both(path, "rollback.hooks.undo.argv", program)


def test_a_command_hook_whose_program_is_not_on_path_is_refused(tmp_path):
    path = _config(tmp_path, "rollback:\n  hooks:\n    undo: {type: command, argv: [sidewatch-no-such-kubectl]}\n")
    _refused_by_both(path, "rollback.hooks.undo.argv", "sidewatch-no-such-kubectl")


def test_a_webhook_whose_secret_file_does_not_exist_is_refused(tmp_path):
    secret = tmp_path / "no-webhook-secret"
    path = _config(tmp_path, f"rollback:\n  hooks:\n    notify: {{type: webhook, url: 'http://127.0.0.1:9/x', "
                             f"secret_file: '{secret}'}}\n")
    _refused_by_both(path, "rollback.hooks.notify.secret_file", secret)


def test_a_webhook_whose_secret_file_cannot_be_read_is_refused(tmp_path):
    # A directory in its place: it cannot be read as a file, even by root (for whom chmod 000 would not do).
    secret = tmp_path / "secret-dir"
    secret.mkdir()
    path = _config(tmp_path, f"rollback:\n  hooks:\n    notify: {{type: webhook, url: 'http://127.0.0.1:9/x', "
                             f"secret_file: '{secret}'}}\n")
    _refused_by_both(path, "rollback.hooks.notify.secret_file", secret)


def test_a_calibration_whose_threshold_is_not_a_number_is_refused(tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(BUNDLED_REPOSITORY, repository)
    artifact = repository / "mnist_cnn" / "1" / "sidewatch-calibration.json"
    data = json.loads(artifact.read_text())
    data["threshold"] = "high"
    artifact.write_text(json.dumps(data))
    path = _config(tmp_path, f"detection:\n  model_repository: {repository}\n")
    _refused_by_both(path, "detection.model_repository", artifact)
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True,
                          timeout=START_TIMEOUT)
    assert 'threshold: expected a number, got "high"' in done.stderr, done.stderr


def test_a_calibration_without_its_model_is_reported(tmp_path):
    """Defect 11: a version directory holding an artifact but no model.onnx is not skipped in silence."""
    repository = tmp_path / "models"
    shutil.copytree(BUNDLED_REPOSITORY, repository)
    orphan = repository / "mnist_cnn" / "3"
    orphan.mkdir()
    shutil.copy(repository / "mnist_cnn" / "1" / "sidewatch-calibration.json", orphan)
    path = _config(tmp_path, f"detection:\n  model_repository: {repository}\n")
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True,
                          timeout=START_TIMEOUT)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("sidewatch: warning:")]
    assert any(str(orphan) in line and "model.onnx" in line for line in warnings), done.stderr
    port = free_port()
    args = sidewatch("serve", "--config", str(path), "--listen", f"127.0.0.1:{port}", "--upstream",
                     f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}")
    with Process(args, tmp_path / "sidecar.log") as sidecar:
        sidecar.wait_listening(port, timeout=60)
        logged = [json.loads(line) for line in sidecar.log().splitlines() if line.startswith("{")]
    assert any(record["level"] == "warning" and str(orphan) in record["message"] and "model.onnx" in record["message"]
               for record in logged), sidecar.log()
