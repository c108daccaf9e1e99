#!/usr/bin/env python3
"""How fast does an attack roll a model back? The demo's alerting (agent/demo/sidewatch-demo.yaml), end to end.

Each run starts the bundled model server and a sidecar with the demo's alert rule (adversarial
detections over inputs, 5 s window, pending 1 s, evaluated every 0.5 s) and its route hook (pin the
model to version 1). A client sends unversioned requests at a steady rate (the demo's 50/s): benign
MNIST digits for ``--benign-seconds``, then adversarial ones. The model server answers unversioned
requests with its latest version, 2, until the hook pins the model to version 1. Measured per run:
the time from the first adversarial request to the first response from version 1, and how many
adversarial requests version 2 answered before that.

    .venv/bin/python bench/alert_rollback.py --out bench-results/alert_rollback.json
    .venv/bin/python bench/alert_rollback.py --runs 1 --out /tmp/alert_rollback.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.client import InferenceClient  # noqa: E402
from agent.demo.data import BENIGN_STREAM, load_adversarial, load_images  # noqa: E402
from agent.modelserver.repository import BUNDLED_REPOSITORY  # noqa: E402
from tests.harness import start_model_server, start_sidecar  # noqa: E402

CONFIG = ROOT / "agent" / "demo" / "sidewatch-demo.yaml"
MODEL = "mnist_cnn"


def one_run(directory: Path, rate: float, benign_seconds: float, timeout: float) -> dict:
    model_server, model_port = start_model_server(directory)
    sidecar, port, _ = start_sidecar(directory, model_port, "--model-repository", str(BUNDLED_REPOSITORY),
                                     "--device", "cpu", config=CONFIG)
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
                "adversarial_answered_by_bad_version": answered_by_2, "benign_requests": sent - index}
    finally:
        client.close()
        sidecar.stop()
        model_server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second (the demo's default: 50)")
    parser.add_argument("--benign-seconds", type=float, default=8.0, help="benign traffic before the attack")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = []
    for number in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="sidewatch-bench-rollback-") as directory:
            runs.append(one_run(Path(directory), args.rate, args.benign_seconds, args.timeout))
        print(f"run {number + 1}: {runs[-1]}", flush=True)
    seconds = [run["rollback_seconds"] for run in runs]
    result = {
        "benchmark": "alert_rollback",
        "config": str(CONFIG.relative_to(ROOT)),
        "rate_per_second": args.rate,
        "benign_seconds": args.benign_seconds,
        "runs": runs,
        "rollback_seconds_median": statistics.median(seconds),
        "rollback_seconds_max": max(seconds),
        "goal_seconds": 5.0,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("rollback_seconds_median", "rollback_seconds_max", "goal_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
