"""Start real processes on loopback for the integration tests, and wait until they answer."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[2]  # tests/support/harness.py -> the repository


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer after {timeout} s")


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


class Process:
    """A child process with its output in a log file, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, cwd=cwd or REPO)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, port: int, timeout: float = 30.0) -> None:
        try:
            wait_for_port(port, timeout, self.popen)
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            raise RuntimeError(f"{err}; {self.args[2:5]} said:\n{self.log()[-3000:]}") from err

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def sidewatch(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def start_model_server(tmp_path: Path, repository: Path | None = None) -> tuple[Process, int]:
    port = free_port()
    args = sidewatch("model-server", "--listen", f"127.0.0.1:{port}", "--device", "cpu")
    if repository is not None:
        args += ["--model-repository", str(repository)]
    process = Process(args, tmp_path / f"model-server-{port}.log")
    process.wait_listening(port)
    return process, port


# The data plane of the tests that do not choose one. The tests of the data plane's contract choose, and run
# on both (test_dataplane_conformance.py and the modules parametrized over data_plane); the rest test what is
# behind the data plane (detectors, alerts, hooks: the same code on both) on the grpc.aio relay, whose
# per-call metrics are counted before a call returns (Envoy's come in its access log, within half a second).
TESTS_DATA_PLANE = "python"


def start_sidecar(tmp_path: Path, upstream_port: int, *extra: str, config: Path | None = None,
                  upstream_host: str = "127.0.0.1") -> tuple[Process, int, int]:
    port, metrics_port = free_port(), free_port()
    args = sidewatch("serve", "--listen", f"127.0.0.1:{port}", "--upstream", f"{upstream_host}:{upstream_port}",
                     "--metrics-listen", f"127.0.0.1:{metrics_port}", *extra)
    if config is not None:
        args += ["--config", str(config)]
    if "--data-plane" not in extra and (config is None or "data_plane" not in config.read_text()):
        args += ["--data-plane", TESTS_DATA_PLANE]
    process = Process(args, tmp_path / f"sidecar-{port}.log")
    process.wait_listening(port)
    process.wait_listening(metrics_port)
    return process, port, metrics_port


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    found = False
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        sample_labels = dict(
            part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
        )
        sample_labels = {k: v.strip('"') for k, v in sample_labels.items()}
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            total += float(value)
            found = True
    if not found:
        raise KeyError(f"no sample of {name} with {labels}")
    return total


def grpc_unavailable(port: int) -> bool:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=0.5)
        return False
    except grpc.FutureTimeoutError:
        return True
    finally:
        channel.close()


def start_prometheus(tmp_path: Path, targets: list[str], rule_files: list[Path] | None = None,
                     interval: str = "1s") -> tuple[Process, int]:
    """A real Prometheus server (Debian's package) scraping ``targets`` every ``interval``."""
    import json
    import shutil

    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed: `make test` installs Debian's package")
    port = free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files or []],
        "scrape_configs": [{"job_name": "sidewatch", "static_configs": [{"targets": targets}]}],
    }))
    process = Process([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "prometheus.log")
    wait_for_http(f"http://127.0.0.1:{port}/-/ready")
    return process, port


def prometheus_query(port: int, query: str) -> list[dict]:
    import json
    import urllib.parse

    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    reply = json.loads(http_get(url))
    if reply["status"] != "success":
        raise RuntimeError(f"query {query!r} failed: {reply}")
    return reply["data"]["result"]


SHIPPED_ALERTMANAGER_CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"


def shipped_alertmanager_config(admin_port: int, token_file: Path) -> dict:
    """deploy/alertmanager/alertmanager.yml with its rollback receiver pointed at this sidecar's admin API."""
    import yaml

    config = yaml.safe_load(SHIPPED_ALERTMANAGER_CONFIG.read_text())
    (receiver,) = [r for r in config["receivers"] if r["name"] == "sidewatch-rollback"]
    (webhook,) = receiver["webhook_configs"]
    webhook["url"] = f"http://127.0.0.1:{admin_port}/alertmanager"
    webhook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    return config


def start_alertmanager(directory: Path, config: dict) -> tuple[Process, int]:
    """A real Alertmanager (Debian's package) running ``config``, alone: without
    ``--cluster.listen-address=`` it would wait for peers to settle before notifying."""
    import shutil

    import yaml

    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        raise RuntimeError("prometheus-alertmanager is not installed: `make system-deps` installs Debian's package")
    path = directory / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    process = Process([binary, f"--config.file={path}", f"--storage.path={directory / 'am-data'}",
                       f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                      directory / "alertmanager.log")
    try:
        wait_for_http(f"http://127.0.0.1:{port}/-/ready")
    except TimeoutError:
        process.stop()
        raise RuntimeError(f"Alertmanager did not start:\n{process.log()[-3000:]}") from None
    return process, port


def start_shipped_prometheus(directory: Path, sidecar_metrics: str, alertmanager_port: int, rule_files: list[Path],
                             scrape_interval: str, evaluation_interval: str) -> tuple[Process, int]:
    """deploy/prometheus/prometheus.yml with this run's addresses, intervals and rule files."""
    import shutil

    import yaml

    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed: `make system-deps` installs Debian's package")
    port = free_port()
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval}
    config["rule_files"] = [str(path) for path in rule_files]
    config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]
    targets = {"sidewatch": sidecar_metrics, "prometheus": f"127.0.0.1:{port}"}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    process = Process([binary, f"--config.file={path}", f"--storage.tsdb.path={directory / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{port}"], directory / "prometheus.log")
    try:
        wait_for_http(f"http://127.0.0.1:{port}/-/ready")
    except TimeoutError:
        process.stop()
        raise RuntimeError(f"Prometheus did not start:\n{process.log()[-3000:]}") from None
    return process, port

