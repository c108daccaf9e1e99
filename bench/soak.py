#!/usr/bin/env python3
"""Soak: steady load through the sidecar, every detector on, for a long time. Does anything leak or break?

    .venv/bin/python bench/soak.py --duration 600 --out bench-results/soak.json
    .venv/bin/python bench/soak.py --duration 60 --out /tmp/soak.json          # a smoke run

The bundled model server and ``sidewatch serve`` run as subprocesses, the sidecar with every detector on:
feature squeezing in shadow mode, the drift detectors and the anomaly forest of the bundled calibration,
the time-window PSI, and checkpoints of the detector state. Client threads (one gRPC channel each) send
ModelInfer calls of batch 1 at a fixed total rate (``--rate``, paced; 0: as fast as they can), a mix of
held-out benign MNIST digits, the bundled adversarial examples (``--adversarial``, 5%) and brightened,
drifted digits (``--drifted``, 5%). Every ``--sample-seconds`` a sample records, over the last interval:
calls per second, client-side latency p50/p99/max, statuses by code, the tap's drops and queue depth (from
/metrics), the sidecar's and the model server's resident memory (VmRSS) and CPU, and how much the
detectors did (inputs scored, drift samples).

With ``--hostile`` (a fraction of the total rate, 10% by default; 0: none), hostile clients run beside the
good ones: every action of tests/support/hostile_traffic.py (1 MiB model names, junk and random-byte
names, garbage bodies, 5 MiB messages, lying tensors, huge metadata and parameters, unknown methods,
cancelled and garbage streams, dropped connections, junk requests to /metrics, and on the admin API:
no token, wrong token, oversized and nested bodies, 3,000-alert deliveries, half-sent heads, hang-ups),
picked at random, each a client of its own. Their outcomes are recorded apart from the good calls'.

Goals for a 10-minute run (issue 14's): no error on a good call that the upstream did not cause
(client-side non-OK statuses of the good calls minus the sidecar's sidewatch_upstream_errors_total of
the known model), and resident memory flat after warm-up: the sidecar's RSS (sidewatch and its Envoy) at
the end under 5% above its RSS at the end of warm-up (``--warmup``, default the first minute, or a fifth
of a shorter run). The size of ``/metrics`` at the end is reported.

The JSON at ``--out`` holds ``machine``, ``parameters``, ``samples`` (the time series), ``summary`` and
``goals`` (each with its value, target and verdict). Exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from proxy import Children, free_port, tail  # noqa: E402  (bench/proxy.py: child processes)

from tests.support.process_tree import envoy_child, rss_bytes  # noqa: E402

MODEL = "mnist_cnn"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_REPOSITORY = ROOT / "agent" / "demo" / "models"
GOOD_VERSION = "1"
MEMORY_GROWTH_GOAL_PCT = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


# --- the traffic ----------------------------------------------------------------------------------


def build_requests(version: str = GOOD_VERSION) -> dict[str, list[bytes]]:
    """Serialized ModelInfer requests of batch 1, by kind: benign, adversarial and drifted digits."""
    from agent.demo.data import BENIGN_STREAM, load_adversarial, load_images
    from agent.demo.run import drifted
    from agent.protocol import codec, oip_pb2

    benign = load_images(BENIGN_STREAM)[0]
    kinds = {"benign": benign, "adversarial": load_adversarial()[0], "drifted": drifted(benign[:500])}
    requests: dict[str, list[bytes]] = {}
    for kind, images in kinds.items():
        serialized = []
        for image in images:
            request = oip_pb2.ModelInferRequest(model_name=MODEL, model_version=version)
            codec.add_input(request, "input", image[None])
            serialized.append(request.SerializeToString())
        requests[kind] = serialized
    return requests


@dataclass
class Call:
    ended: float        # time.monotonic() when the answer came
    latency: float      # seconds, send to answer, client side
    code: str           # gRPC status name
    kind: str           # benign, adversarial, drifted


class ClientThreads:
    """Client threads that run until stopped."""

    join_seconds = 30.0

    def __init__(self, threads: int) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True) for index in range(threads)]

    def _run(self, index: int) -> None:
        raise NotImplementedError

    def start(self):
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.join_seconds)


class LoadGenerator(ClientThreads):
    """Client threads, one gRPC channel each, calling ModelInfer at a fixed total rate (0: as fast as
    they can). A thread that falls behind its schedule does not burst to catch up: the rate is a ceiling,
    and the calls made are what the samples count."""

    def __init__(self, address: str, requests: dict[str, list[bytes]], mix: dict[str, float], threads: int,
                 rate: float, deadline: float = 10.0, seed: int = 0) -> None:
        self.address = address
        self.requests = requests
        self.kinds = [kind for kind in mix if mix[kind] > 0]
        self.weights = [mix[kind] for kind in self.kinds]
        self.interval = threads / rate if rate > 0 else 0.0
        self.deadline = deadline
        self.join_seconds = deadline + 5
        self.seed = seed
        self.calls: list[list[Call]] = [[] for _ in range(threads)]
        super().__init__(threads)

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        record = self.calls[index].append
        with grpc.insecure_channel(self.address) as channel:
            infer = channel.unary_unary(MODEL_INFER)
            # Threads start spread over one interval, so the calls are spread too.
            next_at = time.monotonic() + self.interval * index / max(len(self._threads), 1)
            while not self._stop.is_set():
                if self.interval:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    next_at = max(next_at + self.interval, time.monotonic() - self.interval)
                kind = rng.choices(self.kinds, self.weights)[0]
                pool = self.requests[kind]
                request = pool[rng.randrange(len(pool))]
                started = time.monotonic()
                try:
                    infer(request, timeout=self.deadline)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                ended = time.monotonic()
                record(Call(ended, ended - started, code, kind))
                if code != "OK" and not self.interval:
                    self._stop.wait(0.005)   # unpaced and failing: do not spin

    def between(self, since: float, until: float) -> list[Call]:
        """Calls that ended in [since, until). Lists are only appended to, so reading them is safe."""
        return [call for calls in self.calls for call in list(calls) if since <= call.ended < until]


class HostileClients(ClientThreads):
    """Threads that each run one hostile action at a time (tests/support/hostile_traffic.py), at a fixed
    total rate, and record (when it ended, the action, its outcome)."""

    def __init__(self, target, threads: int, rate: float, seed: int = 0) -> None:
        from tests.support.hostile_traffic import actions_for

        self.target = target
        self.actions = actions_for(target)
        self.interval = threads / rate
        self.seed = seed
        self.outcomes: list[list[tuple[float, str, str]]] = [[] for _ in range(threads)]
        super().__init__(threads)

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + 500 + index)
        names = sorted(self.actions)
        next_at = time.monotonic() + self.interval * index / len(self._threads)
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            next_at = max(next_at + self.interval, time.monotonic() - self.interval)
            name = rng.choice(names)
            try:
                outcome = self.actions[name](self.target, rng)
            except Exception as err:  # noqa: BLE001 - a hostile client's own failure is an outcome too
                outcome = f"client error: {type(err).__name__}"
            self.outcomes[index].append((time.monotonic(), name, outcome))

    def summary(self) -> dict:
        counts: dict[str, dict[str, int]] = {}
        for outcomes in self.outcomes:
            for _, name, outcome in list(outcomes):
                by_outcome = counts.setdefault(name, {})
                by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
        return {"actions": sum(sum(by.values()) for by in counts.values()), "by_action": counts}


def latency_stats(calls: list[Call]) -> dict:
    if not calls:
        return {"calls": 0}
    latencies = np.array([call.latency for call in calls]) * 1000.0
    codes: dict[str, int] = {}
    for call in calls:
        codes[call.code] = codes.get(call.code, 0) + 1
    return {"calls": len(calls), "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "max_ms": float(latencies.max()), "codes": codes}


# --- the processes ----------------------------------------------------------------------------------


def sidewatch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def wait_port(port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[3:5]} exited with {proc.returncode}; its log:\n{tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout:.0f} s; log:\n{tail(log_path)}")


def start_model_server(children: Children, tmp: Path, port: int, name: str = "model-server") -> subprocess.Popen:
    log_path = tmp / f"{name}.log"
    proc = children.start(name, sidewatch_argv("model-server", "--listen", f"127.0.0.1:{port}", "--device", "cpu"),
                          log_path)
    wait_port(port, proc, log_path)
    return proc


def sidecar_config(tmp: Path, detectors: bool = True, data_plane: str | None = None,
                   admin: dict | None = None) -> Path:
    """Every detector on (when ``detectors``): squeezing in shadow mode, drift, anomaly, the time-window
    PSI, checkpoints of their state; the admin API when ``admin`` is given. JSON is YAML."""
    config: dict = {"drift": {"checkpoint_dir": str(tmp / "state"), "window_seconds": 300}}
    if data_plane is not None:
        config["data_plane"] = data_plane
    if admin is not None:
        config["admin"] = admin
    if detectors:
        config["detection"] = {"model_repository": str(MODEL_REPOSITORY), "device": "cpu",
                               "adversarial_mode": "shadow"}
    path = tmp / ("sidewatch.json" if detectors else "sidewatch-no-detectors.json")
    path.write_text(json.dumps(config, indent=1))
    return path


def start_sidecar(children: Children, tmp: Path, upstream_port: int, config: Path, name: str = "sidecar",
                  argv: list[str] | None = None) -> tuple[subprocess.Popen, int, int]:
    """``sidewatch serve`` (or ``argv`` + the same flags); returns it, its port and its metrics port."""
    port, metrics_port = free_port(), free_port()
    flags = ["--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream_port}",
             "--metrics-listen", f"127.0.0.1:{metrics_port}", "--config", str(config)]
    log_path = tmp / f"{name}.log"
    proc = children.start(name, (argv or sidewatch_argv("serve")) + flags, log_path)
    wait_port(port, proc, log_path)
    wait_port(metrics_port, proc, log_path)
    return proc, port, metrics_port


def wait_until_serving(address: str, request: bytes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        while True:
            try:
                infer(request, timeout=5)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def scrape(metrics_port: int) -> dict[str, float]:
    """Every sample of the sidecar's sidewatch_* series, summed over labels, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("sidewatch_") and not sample.name.endswith(("_bucket", "_created")):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def metrics_bytes(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        return len(reply.read())


def good_upstream_errors(metrics_port: int) -> float:
    """sidewatch_upstream_errors_total of the model and version the good calls name (hostile calls name the
    model too, but never version 1)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "sidewatch_upstream_errors_total" and sample.labels.get("model") == MODEL
               and sample.labels.get("version") == GOOD_VERSION)


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of a process, in MiB."""
    return rss_bytes(pid) / (1 << 20)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime, stime


def machine_info() -> dict:
    import grpc as grpc_module

    with open("/proc/loadavg") as loadavg:
        load = loadavg.read().split()[:3]
    return {"nproc": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc_module.__version__,
            "platform": platform.platform(), "loadavg_at_start": load}


# --- the run ----------------------------------------------------------------------------------------

METRICS = {  # sample key -> the sidecar's series (summed over labels)
    "tap_dropped": "sidewatch_tap_dropped_total",
    "tap_enqueued": "sidewatch_tap_enqueued_total",
    "tap_queue_depth": "sidewatch_tap_queue_depth",
    "upstream_errors": "sidewatch_upstream_errors_total",
    "adversarial_inputs": "sidewatch_adversarial_inputs_total",
    "adversarial_detections": "sidewatch_adversarial_detections_total",
    "drift_samples": "sidewatch_drift_samples_total",
    "detector_errors": "sidewatch_detector_errors_total",
    "sink_errors": "sidewatch_tap_sink_errors_total",
    "sink_timeouts": "sidewatch_tap_sink_timeouts_total",
    "in_flight": "sidewatch_requests_in_flight",
}


def sample(load: LoadGenerator, since: float, now: float, started: float, metrics_port: int,
           previous: dict, pids: dict[str, int]) -> dict:
    calls = load.between(since, now)
    stats = latency_stats(calls)
    scraped = scrape(metrics_port)
    point = {"t": round(now - started, 1), "throughput": round(len(calls) / (now - since), 1), **stats}
    for key, name in METRICS.items():
        point[key] = scraped.get(name, 0.0)
    point["metrics_bytes"] = metrics_bytes(metrics_port)
    for name, pid in pids.items():
        point[f"{name}_rss_mb"] = round(rss_mb(pid), 1)
        cpu = cpu_seconds(pid)
        point[f"{name}_cpu_pct"] = round(100 * (cpu - previous.get(f"{name}_cpu", cpu)) / (now - since), 1)
        previous[f"{name}_cpu"] = cpu
    # The sidecar is sidewatch and, on the Envoy data plane, its Envoy.
    point["sidecar_rss_mb"] = round(point["sidewatch_rss_mb"] + point.get("envoy_rss_mb", 0.0), 1)
    point["sidecar_cpu_pct"] = round(point["sidewatch_cpu_pct"] + point.get("envoy_cpu_pct", 0.0), 1)
    return point


def summarize(samples: list[dict], load: LoadGenerator, warmup: float, started: float, ended: float,
              final: dict[str, float], hostile: "HostileClients | None") -> dict:
    calls = load.between(started, ended + 60)
    after = [s for s in samples if s["t"] >= warmup] or samples[-1:]
    base, last = after[0], samples[-1]
    codes: dict[str, int] = {}
    for call in calls:
        codes[call.code] = codes.get(call.code, 0) + 1
    errors = sum(count for code, count in codes.items() if code != "OK")
    # The upstream's errors on the good calls (the known model's series; hostile calls name other models).
    upstream_errors = final.get("good_upstream_errors", 0.0)
    rss = np.array([s["sidecar_rss_mb"] for s in after])
    times = np.array([s["t"] for s in after])
    slope = float(np.polyfit(times, rss, 1)[0]) * 3600 if len(after) >= 3 else 0.0
    overall = latency_stats(calls)
    return {
        "duration_s": round(ended - started, 1),
        "calls": len(calls),
        "throughput_calls_per_s": round(len(calls) / (ended - started), 1),
        "latency_ms": {k: round(v, 3) for k, v in overall.items() if k.endswith("_ms")},
        "p99_ms_worst_sample": max(s.get("p99_ms", 0.0) for s in samples),
        "codes": codes,
        "errors": errors,
        "upstream_errors": upstream_errors,
        "errors_not_from_upstream": errors - upstream_errors,
        "tap_dropped": final.get("sidewatch_tap_dropped_total", 0.0),
        "tap_dropped_pct": round(100 * final.get("sidewatch_tap_dropped_total", 0.0)
                                 / max(final.get("sidewatch_tap_dropped_total", 0.0)
                                       + final.get("sidewatch_tap_enqueued_total", 0.0), 1), 3),
        "adversarial_inputs_scored": final.get("sidewatch_adversarial_inputs_total", 0.0),
        "adversarial_detections": final.get("sidewatch_adversarial_detections_total", 0.0),
        "drift_samples": final.get("sidewatch_drift_samples_total", 0.0),
        "sink_errors": final.get("sidewatch_tap_sink_errors_total", 0.0),
        "sink_timeouts": final.get("sidewatch_tap_sink_timeouts_total", 0.0),
        "in_flight_at_end": final.get("sidewatch_requests_in_flight", 0.0),
        "warmup_s": warmup,
        "sidecar_rss_mb": {"after_warmup": base["sidecar_rss_mb"], "end": last["sidecar_rss_mb"],
                           "max_after_warmup": float(rss.max()), "first_sample": samples[0]["sidecar_rss_mb"]},
        "sidecar_rss_growth_pct": round(100 * (last["sidecar_rss_mb"] - base["sidecar_rss_mb"]) / base["sidecar_rss_mb"], 2),
        "sidecar_rss_slope_mb_per_hour": round(slope, 2),
        "model_server_rss_mb": {"after_warmup": base["model_server_rss_mb"], "end": last["model_server_rss_mb"]},
        "sidecar_cpu_pct_mean": round(float(np.mean([s["sidecar_cpu_pct"] for s in after])), 1),
        "metrics_bytes": {"after_warmup": base["metrics_bytes"], "end": last["metrics_bytes"],
                          "max": max(s["metrics_bytes"] for s in samples)},
        "hostile": hostile.summary() if hostile is not None else None,
    }


def goals(summary: dict) -> dict:
    growth = summary["sidecar_rss_growth_pct"]
    return {
        "no_error_not_caused_by_upstream": {"value": summary["errors_not_from_upstream"], "target": 0,
                                            "met": summary["errors_not_from_upstream"] == 0},
        "memory_flat_after_warmup": {"value_pct": growth, "target_pct": f"< {MEMORY_GROWTH_GOAL_PCT}",
                                     "met": growth < MEMORY_GROWTH_GOAL_PCT},
        "detectors_never_raised_or_hung": {"value": summary["sink_errors"] + summary["sink_timeouts"], "target": 0,
                                           "met": summary["sink_errors"] + summary["sink_timeouts"] == 0},
    }


def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="sidewatch-soak-"))
    children = Children()
    log(f"logs in {tmp}")
    requests = build_requests()
    mix = {"benign": 1.0 - args.adversarial - args.drifted, "adversarial": args.adversarial, "drifted": args.drifted}
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 5)
    hostile = None
    try:
        model_port = free_port()
        model_server = start_model_server(children, tmp, model_port)
        token = secrets.token_urlsafe(24)
        (tmp / "admin-token").write_text(token + "\n")
        admin_port = free_port()
        admin = {"listen": f"127.0.0.1:{admin_port}", "token_file": str(tmp / "admin-token")}
        sidecar, port, metrics_port = start_sidecar(children, tmp, model_port,
                                                    sidecar_config(tmp, data_plane=args.data_plane, admin=admin))
        wait_until_serving(f"127.0.0.1:{port}", requests["benign"][0])
        pids = {"sidewatch": sidecar.pid, "model_server": model_server.pid}
        envoy = envoy_child(sidecar.pid)
        if envoy is not None:
            pids["envoy"] = envoy
        good_rate = args.rate * (1.0 - args.hostile)
        load = LoadGenerator(f"127.0.0.1:{port}", requests, mix, args.threads, good_rate, seed=args.seed)
        if args.hostile > 0:
            from tests.support.hostile_traffic import Target

            target = Target(f"127.0.0.1:{port}", metrics_port, admin_port, token, MODEL)
            hostile = HostileClients(target, args.hostile_threads, args.rate * args.hostile, seed=args.seed)
        started = time.monotonic()
        load.start()
        if hostile is not None:
            hostile.start()
        samples: list[dict] = []
        previous = {f"{name}_cpu": cpu_seconds(pid) for name, pid in pids.items()}
        since = started
        log(f"{args.duration:.0f} s at {args.rate or 'max'} calls/s from {args.threads} threads; warm-up {warmup:.0f} s")
        while True:
            time.sleep(max(0.0, min(since + args.sample_seconds, started + args.duration) - time.monotonic()))
            now = time.monotonic()
            if sidecar.poll() is not None:
                raise RuntimeError(f"the sidecar exited with {sidecar.returncode}:\n{tail(tmp / 'sidecar.log')}")
            point = sample(load, since, now, started, metrics_port, previous, pids)
            samples.append(point)
            log(f"t={point['t']:6.0f}s {point['throughput']:7.1f}/s p99 {point.get('p99_ms', 0):7.2f} ms "
                f"rss {point['sidecar_rss_mb']:6.1f} MB cpu {point['sidecar_cpu_pct']:5.1f}% "
                f"/metrics {point['metrics_bytes']} B "
                f"dropped {point['tap_dropped']:.0f} codes {point.get('codes', {})}")
            since = now
            if now - started >= args.duration:
                break
        ended = time.monotonic()
        load.stop()
        if hostile is not None:
            hostile.stop()
        time.sleep(2.0)   # the detectors finish what is queued
        final = scrape(metrics_port)
        final["good_upstream_errors"] = good_upstream_errors(metrics_port)
        summary = summarize(samples, load, warmup, started, ended, final, hostile)
        verdicts = goals(summary)
    finally:
        children.stop_all()
    return {"benchmark": "soak", "machine": machine_info(),
            "parameters": {"duration_s": args.duration, "rate": args.rate, "threads": args.threads, "mix": mix,
                           "hostile": args.hostile, "hostile_threads": args.hostile_threads,
                           "data_plane": args.data_plane,
                           "sample_seconds": args.sample_seconds, "warmup_s": warmup, "deadline_s": 10.0,
                           "detectors": "feature squeezing (shadow), drift (cvm, mmd, class mix, confidence, "
                                        "entropy, score and confidence change), anomaly forest, PSI over 300 s, "
                                        "checkpoints every 30 s"},
            "samples": samples, "summary": summary, "goals": verdicts, "logs": str(tmp)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second in all (0: unpaced)")
    parser.add_argument("--threads", type=int, default=8, help="client threads, one channel each")
    parser.add_argument("--adversarial", type=float, default=0.05, help="fraction of adversarial examples")
    parser.add_argument("--drifted", type=float, default=0.05, help="fraction of drifted (brightened) digits")
    parser.add_argument("--hostile", type=float, default=0.1,
                        help="fraction of the rate that is hostile actions, from clients of their own (0: none)")
    parser.add_argument("--hostile-threads", type=int, default=4)
    parser.add_argument("--data-plane", choices=["auto", "python", "envoy"], default="auto")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before memory is the baseline (default 60, or a fifth of a shorter run)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    summary = result["summary"]
    print(f"soak {summary['duration_s']:.0f} s: {summary['throughput_calls_per_s']} calls/s, "
          f"p50 {summary['latency_ms']['p50_ms']:.2f} ms, p99 {summary['latency_ms']['p99_ms']:.2f} ms; "
          f"errors {summary['errors']} ({summary['errors_not_from_upstream']} not from the upstream); "
          f"tap dropped {summary['tap_dropped']:.0f} ({summary['tap_dropped_pct']}%); sidecar RSS "
          f"{summary['sidecar_rss_mb']['after_warmup']:.1f} -> {summary['sidecar_rss_mb']['end']:.1f} MB "
          f"({summary['sidecar_rss_growth_pct']:+.2f}%); /metrics {summary['metrics_bytes']['end']} bytes at the end")
    for name, goal in result["goals"].items():
        print(f"  {name}: {'met' if goal['met'] else 'MISSED'} ({goal})")
    return 0 if all(goal["met"] for goal in result["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
