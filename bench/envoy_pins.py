#!/usr/bin/env python3
"""Route pins under load, on both data planes: how soon a pin takes effect, and how many calls fail meanwhile.

The bundled model server (mnist_cnn versions 1 and 2) and a fallback model server (the same network as
version 7); ``sidewatch serve --data-plane python`` and ``--data-plane envoy`` in turn, each with two route
hooks (``pin-v1``: version 1; ``fallback``: the fallback server) fired through the admin API's Alertmanager
receiver. ``--clients`` threads send ModelInfer calls of one MNIST image back to back (naming no version)
for the whole run. Each round fires an alert (a pin), then undoes the pin with ``POST /routes/undo`` and
resolves the alert, alternating the two hooks.

Per switch: seconds from the admin call (the Alertmanager POST, or the undo) to the first call *started
after it* that is answered by the target version (1 or 7 for a pin, 2 for an undo); over the run: calls
that failed (goal: none) and calls answered by a version other than expected once a switch has taken
effect are not counted (a call in flight at the switch legitimately ends on either side).

    PYTHONPATH=$PWD .venv/bin/python bench/envoy_pins.py --out bench-results/envoy_pins.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.demo.data import load_images  # noqa: E402
from agent.protocol.client import InferenceClient  # noqa: E402
from tests.support.alert_harness import admin_config, admin_request, write_config, write_token  # noqa: E402
from tests.support.harness import start_model_server, start_sidecar  # noqa: E402

MODEL = "mnist_cnn"


class Load:
    """Client threads calling back to back; every call's (start, end, version or None when it failed)."""

    def __init__(self, port: int, clients: int) -> None:
        self.image = load_images()[0][:1]
        self.calls: list[tuple[float, float, str | None, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(port,), daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, port: int) -> None:
        client = InferenceClient(f"127.0.0.1:{port}")
        calls = []
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                _, response, _ = client.infer(MODEL, {"input": self.image}, timeout=10)
                calls.append((started, time.monotonic(), response.model_version, ""))
            except Exception as err:  # noqa: BLE001 - every failure is counted, whatever it is
                calls.append((started, time.monotonic(), None, str(err)[:200]))
        client.close()
        self.calls.extend(calls)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def first_answer(calls, since: float, version: str) -> float | None:
    """Seconds from ``since`` to the end of the first call started after it and answered by ``version``."""
    ends = [end for start, end, answered, _ in calls if start >= since and answered == version]
    return min(ends) - since if ends else None


def run_plane(data_plane: str, work: Path, model_port: int, fallback_port: int, rounds: int, clients: int) -> dict:
    token, token_file = write_token(work)
    admin, admin_port = admin_config(work, token_file, alertmanager_hooks={"ModelBroken": ["pin-v1"],
                                                                          "ModelGone": ["fallback"]})
    config = write_config(work, {"admin": admin, "rollback": {
        "audit_log": str(work / "audit.jsonl"), "cooldown_seconds": 0, "max_per_hour": 1000, "hooks": {
            "pin-v1": {"type": "route", "model": MODEL, "version": "1"},
            "fallback": {"type": "route", "model": MODEL, "upstream": f"127.0.0.1:{fallback_port}"}}}})
    process, port, _ = start_sidecar(work, model_port, "--data-plane", data_plane, config=config)
    process.wait_listening(admin_port)

    def alert(name: str, status: str, round_: int) -> None:
        # A new startsAt each round: Alertmanager's identity of a new firing, so a new incident.
        payload = {"version": "4", "status": status, "receiver": "sidewatch", "groupKey": "{}:{}", "alerts": [{
            "status": status, "labels": {"alertname": name, "model": MODEL, "version": "2", "round": str(round_)},
            "annotations": {}, "startsAt": f"2024-05-01T12:{round_:02d}:00Z", "endsAt": "0001-01-01T00:00:00Z"}]}
        code, _, reply = admin_request(admin_port, "POST", "/alertmanager", token, body=payload)
        assert code == 200, reply

    def status() -> dict:
        code, _, body = admin_request(admin_port, "GET", "/status", token)
        assert code == 200, body
        return body["rollback"]

    def wait(predicate, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.02)

    switches = []
    try:
        load = Load(port, clients)
        time.sleep(1.0)
        for round_ in range(rounds):
            name, target = ("ModelBroken", "1") if round_ % 2 == 0 else ("ModelGone", "7")
            fired = time.monotonic()
            alert(name, "firing", round_)
            wait(lambda: status()["routes"], f"the pin of round {round_}")
            time.sleep(1.0)
            undone = time.monotonic()
            code, _, reply = admin_request(admin_port, "POST", "/routes/undo", token, body={"model": MODEL})
            assert code == 200, reply
            alert(name, "resolved", round_)
            wait(lambda: status()["open_incidents"] == 0, f"the incident of round {round_} to close")
            time.sleep(1.0)
            switches.append((name, target, fired, undone))
        load.stop()
    finally:
        process.stop()
    calls = load.calls
    pins = [first_answer(calls, fired, target) for _, target, fired, _ in switches]
    undos = [first_answer(calls, undone, "2") for _, _, _, undone in switches]
    failed = [error for _, _, version, error in calls if version is None]

    def summary(values):
        known = [v for v in values if v is not None]
        return {"median_seconds": round(statistics.median(known), 4) if known else None,
                "max_seconds": round(max(known), 4) if known else None,
                "never": len(values) - len(known), "all_seconds": [None if v is None else round(v, 4) for v in values]}

    duration = max(end for _, end, _, _ in calls) - min(start for start, _, _, _ in calls)
    return {"calls": len(calls), "calls_per_second": round(len(calls) / duration, 1), "failed": len(failed),
            "failures": sorted(set(failed))[:5],
            "pin_to_first_pinned_answer": summary(pins), "undo_to_first_unpinned_answer": summary(undos),
            "version_pins": summary(pins[0::2]), "fallback_pins": summary(pins[1::2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sidewatch-bench-pins-") as directory:
        work = Path(directory)
        fallback_repo = work / "fallback-repo"
        (fallback_repo / MODEL).mkdir(parents=True)
        (fallback_repo / MODEL / "7").symlink_to(ROOT / "agent/demo/models" / MODEL / "1", target_is_directory=True)
        (work / "models").mkdir()
        (work / "fallback").mkdir()
        model, model_port = start_model_server(work / "models")
        fallback, fallback_port = start_model_server(work / "fallback", fallback_repo)
        results = {}
        try:
            for data_plane in ("python", "envoy"):
                (work / data_plane).mkdir()
                results[data_plane] = run_plane(data_plane, work / data_plane, model_port, fallback_port,
                                                args.rounds, args.clients)
                print(data_plane, json.dumps(results[data_plane]), flush=True)
        finally:
            model.stop()
            fallback.stop()
    report = {"bench": "envoy_pins", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "rounds": args.rounds, "clients": args.clients, "results": results}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
