#!/usr/bin/env python3
"""What do per-model metrics cost on the Envoy data plane? The same ModelInfer load, four ways, one run.

    direct         client -> echo model
    envoy          client -> Envoy (sidewatch's bootstrap, no filter) -> echo model
    envoy-lua      client -> Envoy + the Lua model peek (model_peek.lua) -> echo model
    envoy-lua-stats  the same + the grpc_stats filter (per-call message counts into filter state)
    envoy-lua-als  client -> `sidewatch serve --data-plane envoy` (Lua peek + grpc_stats + the gRPC access
                   log into sidewatch's ALS, which records the metrics) -> echo model

Figures per path (bench/proxy.py's echo model and measurements): sequential latency (Python gRPC client,
one call at a time: p50, p99), calls/s with 32 calls in flight on one HTTP/2 connection (h2load), and
the CPU each server used per call; the median over rounds, the paths in rotated order each round. The
cost of the Lua peek is envoy-lua over envoy; of grpc_stats, envoy-lua-stats over envoy-lua; of the access
log (Envoy serialising and sending entries, sidewatch decoding and counting them), envoy-lua-als over
envoy-lua-stats. After the load, the
sidecar's sidewatch_requests_total must equal the calls it carried (less Envoy's dropped entries).

    PYTHONPATH=$PWD .venv/bin/python bench/envoy_metrics.py --out bench-results/envoy_metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for entry in (ROOT, ROOT / "bench"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from proxy import (  # noqa: E402  (bench/proxy.py, beside this file)
    Children,
    build_messages,
    check_call,
    free_port,
    grpc_frame,
    measure_latency,
    measure_throughput,
    process_tree,
    start_echo_upstream,
    start_sidewatch,
)

from agent.config import load_config  # noqa: E402
from agent.dataplane.envoy.access_log import grpc_stats_filter  # noqa: E402
from agent.dataplane.envoy.binary import find_envoy  # noqa: E402
from agent.dataplane.envoy.bootstrap import Loopback, build_bootstrap  # noqa: E402
from agent.dataplane.envoy.lua import model_peek_filter  # noqa: E402
from agent.dataplane.envoy.supervisor import EnvoyProcess  # noqa: E402

PATHS = ("direct", "envoy", "envoy-lua", "envoy-lua-stats", "envoy-lua-als")


def start_bare_envoy(tmp: Path, upstream: str, http_filters: list[dict], name: str) -> tuple[EnvoyProcess, str]:
    """Envoy with sidewatch's bootstrap and ``http_filters``, without sidewatch (no health service: the
    health route points at a closed port, and the benchmark never calls it)."""
    port = free_port()
    config = load_config(overrides={"listen": f"127.0.0.1:{port}", "upstream.address": upstream})
    work = tmp / name
    work.mkdir()
    bootstrap = work / "envoy.json"
    bootstrap.write_text(json.dumps(build_bootstrap(config, Loopback(admin_port=0, health_port=free_port()),
                                                    http_filters=http_filters)))
    envoy = EnvoyProcess(find_envoy(None), bootstrap, work, concurrency=1, log_level="warning")
    envoy.start()
    return envoy, f"127.0.0.1:{port}"


def calls_counted(metrics_address: str) -> tuple[float, float]:
    """(the sidecar's sidewatch_requests_total over every series, Envoy's dropped access-log entries)."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    total = dropped = 0.0
    for line in text.splitlines():
        if line.startswith("sidewatch_requests_total{"):
            total += float(line.rpartition(" ")[2])
        if line.startswith("sidewatch_envoy_access_logs_dropped_total "):
            dropped = float(line.rpartition(" ")[2])
    return total, dropped


def summary(rounds: list[dict], keys: tuple[str, ...]) -> dict:
    return {key: round(statistics.median(r[key] for r in rounds), 1) for key in keys}


def run(args: argparse.Namespace) -> dict:
    request, response = build_messages()
    children = Children()
    envoys: list[EnvoyProcess] = []
    tmp = Path(tempfile.mkdtemp(prefix="sidewatch-bench-envoy-"))
    try:
        data_file = tmp / "request.grpc"
        data_file.write_bytes(grpc_frame(request))
        echo, echo_procs = start_echo_upstream(children, tmp, response, request, "h2", 1)
        addresses = {"direct": echo}
        servers: dict[str, dict[str, list[int]]] = {"direct": {}}
        for name, filters in (("envoy", []), ("envoy-lua", [model_peek_filter()]),
                              ("envoy-lua-stats", [model_peek_filter(), grpc_stats_filter()])):
            envoy, addresses[name] = start_bare_envoy(tmp, echo, filters, name)
            envoys.append(envoy)
            servers[name] = {"envoy": [envoy.process.pid]}
        metrics_port = free_port()
        addresses["envoy-lua-als"], sidecar = start_sidewatch(
            children, tmp, echo, request, response,
            ["--data-plane", "envoy", "--metrics-listen", f"127.0.0.1:{metrics_port}"], {})
        servers["envoy-lua-als"] = {"sidewatch": [sidecar.pid],
                                    "envoy": [p for p in process_tree(sidecar.pid) if p != sidecar.pid]}
        echo_pids = [p.pid for p in echo_procs]
        results = {p: {"latency_rounds": [], "throughput_rounds": []} for p in PATHS}
        for rnd in range(args.rounds):
            order = PATHS[rnd % len(PATHS):] + PATHS[:rnd % len(PATHS)]
            for path in order:
                print(f"round {rnd + 1}/{args.rounds}: {path}", file=sys.stderr, flush=True)
                results[path]["latency_rounds"].append(
                    measure_latency(addresses[path], request, response, args.latency_calls, 200))
                results[path]["throughput_rounds"].append(
                    measure_throughput(args.h2load, addresses[path], data_file, args.concurrency, args.duration,
                                       1.0, {"echo": echo_pids, **servers[path]}, len(grpc_frame(response))))
        for path in PATHS:
            check_call(addresses[path], request, response)
        # Every call through the sidecar is in its metrics once the last batch of entries has arrived.
        time.sleep(1.5)
        carried = sum(r["calls"] + 200 for r in results["envoy-lua-als"]["latency_rounds"]) + sum(
            r["done"] for r in results["envoy-lua-als"]["throughput_rounds"])
        counted, dropped = calls_counted(f"127.0.0.1:{metrics_port}")
        report = {"benchmark": "bench/envoy_metrics.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "cpus": os.cpu_count(), "parameters": {**vars(args), "out": str(args.out)},
                  "paths": {}, "sidecar_metrics": {"calls_carried_at_least": carried, "calls_counted": counted,
                                                   "access_log_entries_dropped": dropped}}
        for path in PATHS:
            latency = summary(results[path]["latency_rounds"], ("p50_us", "p99_us"))
            rounds = results[path]["throughput_rounds"]
            report["paths"][path] = {
                **latency,
                "calls_per_s": round(statistics.median(r["calls_per_s"] for r in rounds)),
                "cpu_us_per_call": {name: round(statistics.median(r["cpu_us_per_call"][name] for r in rounds), 1)
                                    for name in rounds[0]["cpu_us_per_call"]},
                "all_ok": all(r["grpc_bodies_ok"] for r in rounds),
            }
        base = report["paths"]
        report["added"] = {path: {"p50_us_over_envoy": round(base[path]["p50_us"] - base["envoy"]["p50_us"], 1),
                                  "p99_us_over_envoy": round(base[path]["p99_us"] - base["envoy"]["p99_us"], 1),
                                  "calls_per_s_ratio_to_envoy": round(base[path]["calls_per_s"]
                                                                      / base["envoy"]["calls_per_s"], 3)}
                           for path in ("envoy-lua", "envoy-lua-stats", "envoy-lua-als")}
        return report
    finally:
        for envoy in envoys:
            envoy.stop()
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-calls", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight on one connection")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of h2load load per round")
    parser.add_argument("--h2load", default=shutil.which("h2load") or "/usr/bin/h2load")
    args = parser.parse_args()
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({"paths": report["paths"], "added": report["added"],
                      "sidecar_metrics": report["sidecar_metrics"]}, indent=1))


if __name__ == "__main__":
    main()
