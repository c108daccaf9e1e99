"""`sidewatch serve --check-config`, the command itself: a good file passes, a bad value or a missing file it
names fails with the key. (Parsing the configuration in-process: tests/unit/test_config.py and
tests/unit/test_alert_config.py.)"""

from __future__ import annotations

import subprocess

from tests.support.harness import free_port, sidewatch


def test_check_config_command(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("upstream:\n  address: 127.0.0.1:8001\n")
    ok = subprocess.run(sidewatch("serve", "--config", str(good), "--check-config"), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_message_bytes: 10\n")
    refused = subprocess.run(sidewatch("serve", "--config", str(bad), "--check-config"), capture_output=True, text=True)
    assert refused.returncode == 2
    assert "max_message_bytes" in refused.stderr


def test_shipped_config_is_accepted():
    from tests.support.harness import REPO

    done = subprocess.run(sidewatch("serve", "--config", str(REPO / "deploy" / "sidewatch.yaml"), "--check-config"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_check_config_reads_the_token_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"admin:\n  token_file: {tmp_path / 'missing'}\n")
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 2
    assert "admin.token_file" in done.stderr and "missing" in done.stderr


def test_check_config_reads_the_reference_files(tmp_path):
    """A reference file that is missing, or one with a malformed line, fails --check-config and the start, naming
    the key and the file (and the line), without a traceback."""
    missing = tmp_path / "missing.npz"
    path = tmp_path / "c.yaml"
    path.write_text(f"models:\n  tabular:\n    reference: {missing}\n")
    start = ("--upstream", f"127.0.0.1:{free_port()}", "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen",
             f"127.0.0.1:{free_port()}")
    for args in (("--check-config",), start):
        done = subprocess.run(sidewatch("serve", "--config", str(path), *args), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2, done.stderr
        assert "models.tabular.reference" in done.stderr and str(missing) in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n{"x": 2\n')
    path.write_text(f"models:\n  tabular:\n    reference: {bad}\n")
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 2 and f"models.tabular.reference: {bad}: line 2: not JSON" in done.stderr, done.stderr


def test_check_config_has_envoy_validate_the_bootstrap(tmp_path):
    """With data_plane envoy, a listener certificate that is not there fails, naming the key and the file,
    and Envoy itself checks the configuration written from the file (resource bounds, envoy.*, pass)."""
    path = tmp_path / "c.yaml"
    path.write_text(f"data_plane: envoy\ntls:\n  cert_file: {tmp_path / 'absent.crt'}\n  key_file: {tmp_path / 'absent.key'}\n")
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("sidewatch: tls.cert_file:") and "absent.crt" in done.stderr, done.stderr
    path.write_text("data_plane: envoy\nenvoy:\n  max_connections: 100\n  max_heap_bytes: 536870912\n")
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_check_config_warns_that_envoy_does_not_enforce_max_message_bytes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data_plane: envoy\nmax_message_bytes: 65536\n")
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "sidewatch: warning: max_message_bytes is not enforced by the Envoy data plane" in done.stderr
    path.write_text("data_plane: python\nmax_message_bytes: 65536\n")
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr


def test_check_config_takes_every_query_detection_key(tmp_path):
    """Every key of detection.queries and the per-model ones pass --check-config, Envoy's validation of the verdict
    filter they route through included; a threshold past its bound fails, naming the key."""
    path = tmp_path / "c.yaml"
    path.write_text("data_plane: envoy\n"
                    "detection:\n  queries:\n    mode: flag\n    identity: metadata\n    identity_key: x-client-id\n"
                    "    quantization_step: 0.2\n    window: 50\n    hashes: 50\n    match_threshold: 20\n"
                    "    fingerprints_per_client: 32\n    history: 50\n    near_duplicates_to_flag: 10\n"
                    "    max_clients: 10000\n    client_idle_seconds: 1800\n    block_seconds: 600\n"
                    "    max_rows_per_request: 64\n"
                    "models:\n  mnist_cnn:\n    query_mode: enforce\n    query_quantization_step: 51\n")
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
    # Certificates as identities on a listener that asks for none: valid, with a warning.
    path.write_text("detection:\n  queries:\n    mode: flag\n    identity: certificate\n")
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 0 and "warning: detection.queries.identity is certificate" in done.stderr, done.stderr
    path.write_text("detection:\n  queries:\n    hashes: 16\n    match_threshold: 20\n")
    done = subprocess.run(sidewatch("serve", "--config", str(path), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 2 and "detection.queries" in done.stderr and "match_threshold" in done.stderr, done.stderr
