#!/usr/bin/env python3
"""How fast does an attack roll a model back? Two alerting paths, end to end, same traffic.

Both paths alarm on the sidecar's flagged-share test (agent/detect/adversarial/rate.py: the share of
inputs over the squeezing threshold against the calibrated false-positive rate, one-sided, under the
default false-alarm budget 1/30d), with the demo's looks every 2 s (``detection.rate_alarm`` in
agent/demo/sidewatch-demo.yaml).

``--path sidecar``: the sidecar's own alert engine, with the demo's alerting
(agent/demo/sidewatch-demo.yaml): a gauge rule on ``sidewatch_adversarial_rate_detected``, evaluated
every 0.5 s, and its route hook (pin the alert's model to version 1).

``--path alertmanager``: the alert is computed by a real Prometheus (Debian's) scraping the sidecar's
/metrics and delivered by a real Alertmanager to the sidecar's receiver (POST /alertmanager on its
admin API, bearer token from Alertmanager's credentials_file), which maps SidewatchAdversarialRateHigh
to the same route hook. The sidecar has no alert rule of its own. Prometheus loads
deploy/prometheus/recording-rules.yml and alert-rules.yml as shipped (SidewatchAdversarialRateHigh:
the sidecar's flag, ``for: 0s``). Alertmanager runs deploy/alertmanager/alertmanager.yml with the
rollback route's group_wait set to ``--group-wait``. The figure is bounded below by the look interval,
the scrape and the evaluation intervals (``--scrape-interval``, ``--evaluation-interval``), which the
JSON states with everything else.

Each run starts everything afresh. A client sends unversioned requests at a steady rate (the demo's
50/s): benign MNIST digits for the benign period, then adversarial ones. The model server answers
unversioned requests with its latest version, 2, until the hook pins the model to version 1. Measured
per run: the time from the first adversarial request to the first response from version 1, and how
many adversarial requests version 2 answered before that. For the Alertmanager path also where the
time went, from the sidecar's incident (wall clock, relative to the first adversarial request): when
Prometheus's alert became active (its startsAt), when the receiver opened the incident, when the hook
finished.

    .venv/bin/python bench/alert_rollback.py --out bench-results/alert_rollback.json
    .venv/bin/python bench/alert_rollback.py --path alertmanager --scrape-interval 5 --evaluation-interval 5 \\
        --out bench-results/alert_rollback-5s.json
    .venv/bin/python bench/alert_rollback.py --runs 1 --out /tmp/alert_rollback.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.demo.data import BENIGN_STREAM, load_adversarial, load_images  # noqa: E402
from agent.modelserver.repository import BUNDLED_REPOSITORY  # noqa: E402
from agent.protocol.client import InferenceClient  # noqa: E402
from tests.support.alert_harness import admin_config, admin_request, write_config, write_token  # noqa: E402
from tests.support.harness import (  # noqa: E402
    Process,
    prometheus_query,
    shipped_alertmanager_config,
    start_alertmanager,
    start_model_server,
    start_shipped_prometheus,
    start_sidecar,
)

CONFIG = ROOT / "agent" / "demo" / "sidewatch-demo.yaml"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
MODEL = "mnist_cnn"
ALERT = "SidewatchAdversarialRateHigh"
# The sidecar's flagged-share test, as in the demo's config: looks every 2 s, the default budget (1/30d).
RATE_ALARM = yaml.safe_load(CONFIG.read_text())["detection"]["rate_alarm"]
DEFAULT_BENIGN_SECONDS = {"sidecar": 8.0, "alertmanager": 15.0}


def drive(port: int, rate: float, benign_seconds: float, timeout: float) -> dict:
    """Benign traffic, then adversarial traffic until version 1 answers; the timings of one run."""
    client = InferenceClient(f"127.0.0.1:{port}")
    benign = load_images(BENIGN_STREAM)[0]
    adversarial = load_adversarial()[0]
    try:
        period = 1.0 / rate
        next_at = time.monotonic()
        sent = 0

        def send(row) -> str:
            nonlocal next_at, sent
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += period
            sent += 1
            _, response, _ = client.infer(MODEL, {"input": row[None]}, timeout=10)
            return response.model_version

        started = time.monotonic()
        while time.monotonic() - started < benign_seconds:
            version = send(benign[sent % len(benign)])
            if version != "2":
                raise RuntimeError(f"benign traffic was answered by version {version}: the alert fired on it")
        first_adversarial = time.monotonic()
        first_adversarial_wall = time.time()
        answered_by_2 = 0
        index = 0
        while True:
            version = send(adversarial[index % len(adversarial)])
            index += 1
            if version == "1":
                break
            answered_by_2 += 1
            if time.monotonic() - first_adversarial > timeout:
                raise RuntimeError(f"no rollback within {timeout} s")
        return {"rollback_seconds": round(time.monotonic() - first_adversarial, 3),
                "adversarial_answered_by_bad_version": answered_by_2, "benign_requests": sent - index,
                "_first_adversarial_wall": first_adversarial_wall}
    finally:
        client.close()


def sidecar_run(directory: Path, args) -> dict:
    model_server, model_port = start_model_server(directory)
    try:
        sidecar, port, _ = start_sidecar(directory, model_port, "--model-repository", str(BUNDLED_REPOSITORY),
                                         "--device", "cpu", config=CONFIG)
        try:
            result = drive(port, args.rate, args.benign_seconds["sidecar"], args.timeout)
        finally:
            sidecar.stop()
    finally:
        model_server.stop()
    del result["_first_adversarial_wall"]
    return result


# --- the Prometheus + Alertmanager path -------------------------------------------------------------------

def seconds_text(seconds: float) -> str:
    """A Prometheus duration: whole seconds as "5s", otherwise milliseconds ("500ms")."""
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{round(seconds * 1000)}ms"


def bench_rules(directory: Path) -> list[Path]:
    """The rule files Prometheus loads: the shipped ones, copied into ``directory`` (a new path per run:
    Prometheus offsets each rule group's evaluations by a hash of its file and name)."""
    files = []
    for name in ("recording-rules.yml", "alert-rules.yml"):
        copy = directory / f"bench-{name}"
        copy.write_text((PROMETHEUS_DIR / name).read_text())
        files.append(copy)
    return files


def start_shipped_alertmanager(directory: Path, admin_port: int, token_file: Path,
                               group_wait: str) -> tuple[Process, int]:
    """deploy/alertmanager/alertmanager.yml with this run's receiver address, token file and group_wait."""
    config = shipped_alertmanager_config(admin_port, token_file)
    (route,) = [r for r in config["route"]["routes"] if r["receiver"] == "sidewatch-rollback"]
    route["group_wait"] = group_wait
    return start_alertmanager(directory, config)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def alertmanager_run(directory: Path, args) -> dict:
    processes: list[Process] = []
    try:
        model_server, model_port = start_model_server(directory)
        processes.append(model_server)
        token, token_file = write_token(directory)
        admin, admin_port = admin_config(directory, token_file, alertmanager_hooks={ALERT: ["pin-v1"]})
        config = write_config(directory, {
            "alerts": {"rules": []},
            # The demo's flagged-share looks (agent/demo/sidewatch-demo.yaml), under the default budget.
            "detection": {"rate_alarm": RATE_ALARM},
            # The demo's hook: the alert's model (its `model` label), pinned to version 1.
            "rollback": {"audit_log": str(directory / "audit.jsonl"), "cooldown_seconds": 60,
                         "hooks": {"pin-v1": {"type": "route", "version": "1"}}},
            "admin": admin,
        })
        sidecar, port, metrics_port = start_sidecar(directory, model_port, "--model-repository",
                                                    str(BUNDLED_REPOSITORY), "--device", "cpu", config=config)
        processes.append(sidecar)
        sidecar.wait_listening(admin_port)
        alertmanager, alertmanager_port = start_shipped_alertmanager(directory, admin_port, token_file, args.group_wait)
        processes.append(alertmanager)
        instance = f"127.0.0.1:{metrics_port}"
        # Written afresh in each run's directory: Prometheus offsets each rule group's evaluations by a hash
        # of its file and name, so a new path per run samples a new phase of the recording and alert groups.
        rule_files = bench_rules(directory)
        prometheus, prometheus_port = start_shipped_prometheus(directory, instance, alertmanager_port, rule_files,
                                                       args.scrape_interval_text, args.evaluation_interval_text)
        processes.append(prometheus)
        wait_for(lambda: prometheus_query(prometheus_port, f'up{{instance="{instance}"}} == 1'), 60,
                 "Prometheus's first scrape of the sidecar")

        result = drive(port, args.rate, args.benign_seconds["alertmanager"], args.timeout)
        first_wall = result.pop("_first_adversarial_wall")
        status, _, body = admin_request(admin_port, "GET", "/status", token)
        if status != 200:
            raise RuntimeError(f"the admin API answered {status}: {body}")
        incidents = [inc for inc in body["rollback"]["incidents"] if inc["alert"] == ALERT]
        if len(incidents) != 1 or incidents[0]["source"] != "alertmanager":
            raise RuntimeError(f"expected one incident from Alertmanager, the sidecar has {incidents}")
        (incident,) = incidents
        hook = incident["hooks"]["pin-v1"]
        finished = hook["finished_at"]
        result["after_first_adversarial_seconds"] = {
            # Prometheus's startsAt: the evaluation that found the expression true (for: 0s fires at once).
            "prometheus_alert_started": round(incident["started_at"] - first_wall, 3),
            "receiver_opened_incident": round(incident["opened_at"] - first_wall, 3),
            "route_hook_finished": round(finished - first_wall, 3) if finished else None,
        }
        result["hook_result"] = hook["result"]
        return result
    finally:
        for process in reversed(processes):
            process.stop()


# --- main ---------------------------------------------------------------------------------------------------

def summary(runs: list[dict]) -> dict:
    seconds = [run["rollback_seconds"] for run in runs]
    return {"rollback_seconds_median": statistics.median(seconds), "rollback_seconds_min": min(seconds),
            "rollback_seconds_max": max(seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", choices=("sidecar", "alertmanager", "both"), default="both")
    parser.add_argument("--runs", type=int, default=3, help="runs per path")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second (the demo's default: 50)")
    parser.add_argument("--benign-seconds", type=float, default=None,
                        help="benign traffic before the attack (default: sidecar 8, alertmanager 15)")
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="Prometheus's, in seconds")
    parser.add_argument("--evaluation-interval", type=float, default=1.0, help="Prometheus's, in seconds")
    parser.add_argument("--group-wait", default="0s", help="group_wait of Alertmanager's rollback route")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    paths = ["sidecar", "alertmanager"] if args.path == "both" else [args.path]
    args.benign_seconds = {path: args.benign_seconds if args.benign_seconds is not None else default
                           for path, default in DEFAULT_BENIGN_SECONDS.items()}
    args.scrape_interval_text = seconds_text(args.scrape_interval)
    args.evaluation_interval_text = seconds_text(args.evaluation_interval)

    result: dict = {"benchmark": "alert_rollback", "rate_per_second": args.rate, "runs_per_path": args.runs,
                    "goal_seconds": 5.0, "paths": {}}
    for path in paths:
        runs = []
        for number in range(args.runs):
            with tempfile.TemporaryDirectory(prefix=f"sidewatch-bench-rollback-{path}-") as directory:
                run = sidecar_run if path == "sidecar" else alertmanager_run
                runs.append(run(Path(directory), args))
            print(f"{path} run {number + 1}: {runs[-1]}", flush=True)
        entry = {"benign_seconds": args.benign_seconds[path], **summary(runs), "runs": runs}
        if path == "sidecar":
            entry = {"config": str(CONFIG.relative_to(ROOT)),
                     "alerting": "the sidecar's alert engine on its flagged-share flag (looks every "
                                 f"{RATE_ALARM['look_interval_seconds']} s, budget 1/30d), evaluated every 0.5 s",
                     **entry}
        else:
            entry = {"alerting": "Prometheus -> Alertmanager -> POST /alertmanager on the sidecar's admin API",
                     "intervals": {"scrape_interval": args.scrape_interval_text,
                                   "evaluation_interval": args.evaluation_interval_text,
                                   "alertmanager_group_wait": args.group_wait},
                     "rules": "deploy/prometheus/*.yml as shipped", "rate_alarm": RATE_ALARM,
                     "versions": {"prometheus": version_of("prometheus"),
                                  "alertmanager": version_of("prometheus-alertmanager")},
                     **entry}
        result["paths"][path] = entry
    result["machine"] = {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                         "cpus": len(os.sched_getaffinity(0))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({path: {k: entry[k] for k in ("rollback_seconds_median", "rollback_seconds_min",
                                                   "rollback_seconds_max")}
                      for path, entry in result["paths"].items()}))
    return 0


def version_of(binary: str) -> str | None:
    found = shutil.which(binary)
    if found is None:
        return None
    reply = subprocess.run([found, "--version"], capture_output=True, text=True)
    first = (reply.stdout or reply.stderr).splitlines()
    return first[0] if first else None


if __name__ == "__main__":
    sys.exit(main())
