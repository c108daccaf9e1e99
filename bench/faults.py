#!/usr/bin/env python3
"""Faults under load: what a broken detector costs the forwarded calls, and how fast service resumes
after the model server restarts. Same machine, same run, same load.

    .venv/bin/python bench/faults.py --out bench-results/faults.json
    .venv/bin/python bench/faults.py --quick --out /tmp/faults.json

1. Detector faults in shadow mode. The same steady load (bench/soak.py's: batch-1 ModelInfer calls at a
   fixed rate from client threads, mostly benign digits) goes through a fresh sidecar per variant:

   * ``off``: no detectors at all (no model repository);
   * ``healthy``: every detector on (squeezing in shadow mode, drift, anomaly);
   * ``raising``: the squeezing detector raises on every batch;
   * ``hanging``: it never returns (the tap's watchdog gives up on it after tap.sink_timeout_seconds);
   * ``slow``: it sleeps 50 ms per batch (off the GIL, as I/O or a native library would);
   * ``busy``: it spins 20 ms of pure Python per batch (holding the GIL, as a slow Python detector would).

   The fault is injected by running the real ``sidewatch serve`` with FeatureSqueezingDetector.score
   replaced (``bench/faults.py _sidecar FAULT ...``). Each variant runs ``--rounds`` times, in a rotated
   order; the figure is the median over rounds of each round's client-side p50 and p99, next to the
   ratio to ``off`` and to ``healthy``, the statuses, and what the sidecar counted (tap drops, detector
   errors, sink timeouts).

2. Upstream restarts. Under the same load through a sidecar with every detector on, the model server is
   killed (SIGKILL) and started again on the same port, ``--restarts`` times, down ``--down-seconds``
   each. Figures: the time from the model server's port accepting connections again to the first call
   through the sidecar answered OK (goal: under 1 s), the statuses while it was down, and the longest
   call (no call may hang: UNAVAILABLE comes back at once).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import soak  # noqa: E402  (bench/soak.py: the load, the processes, the metrics)
from proxy import Children, free_port, stop_process  # noqa: E402

VARIANTS = ("off", "healthy", "raising", "hanging", "slow", "busy")
RECOVERY_GOAL_SECONDS = 1.0


def log(message: str) -> None:
    print(f"[faults] {message}", file=sys.stderr, flush=True)


# --- the faulty sidecar (runs in its own process) -----------------------------------------------------


def faulty_sidecar_main(fault: str, serve_args: list[str]) -> int:
    """``sidewatch serve`` with the squeezing detector's score replaced by a faulty one."""
    import threading

    from agent import cli
    from agent.detect.adversarial.graph import FeatureSqueezingDetector

    healthy = FeatureSqueezingDetector.score
    never = threading.Event()

    def raising(self, batch):
        raise RuntimeError("injected detector failure")

    def hanging(self, batch):
        never.wait()

    def slow(self, batch):
        time.sleep(0.05)
        return healthy(self, batch)

    def busy(self, batch):
        until = time.perf_counter() + 0.02
        while time.perf_counter() < until:
            pass
        return healthy(self, batch)

    faults = {"healthy": healthy, "raising": raising, "hanging": hanging, "slow": slow, "busy": busy}
    FeatureSqueezingDetector.score = faults[fault]
    return cli.main(["serve", *serve_args])


def start_variant(children: Children, tmp: Path, variant: str, model_port: int, name: str):
    # Each sidecar its own config and state directory: no run restores another's detector state.
    run_dir = tmp / name
    run_dir.mkdir()
    config = soak.sidecar_config(run_dir, detectors=variant != "off")
    argv = [sys.executable, str(Path(__file__).resolve()), "_sidecar", "healthy" if variant == "off" else variant]
    return soak.start_sidecar(children, tmp, model_port, config, name=name, argv=argv)


# --- 1. detector faults -----------------------------------------------------------------------------


def measure_variant(args, children: Children, tmp: Path, variant: str, model_port: int, requests: dict,
                    mix: dict, round_index: int) -> dict:
    sidecar, port, metrics_port = start_variant(children, tmp, variant, model_port, f"sidecar-{variant}-{round_index}")
    try:
        soak.wait_until_serving(f"127.0.0.1:{port}", requests["benign"][0])
        load = soak.LoadGenerator(f"127.0.0.1:{port}", requests, mix, args.threads, args.rate,
                                  seed=round_index).start()
        time.sleep(args.warmup_seconds)
        before = soak.scrape(metrics_port)
        since = time.monotonic()
        time.sleep(args.phase_seconds)
        until = time.monotonic()
        after = soak.scrape(metrics_port)
        load.stop()
        stats = soak.latency_stats(load.between(since, until))
    finally:
        stop_process(sidecar)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    return {**stats, "throughput": round(stats["calls"] / (until - since), 1),
            "tap_dropped": delta("sidewatch_tap_dropped_total"),
            "adversarial_inputs_scored": delta("sidewatch_adversarial_inputs_total"),
            "detector_errors": delta("sidewatch_detector_errors_total"),
            "sink_errors": delta("sidewatch_tap_sink_errors_total"),
            "sink_timeouts": after.get("sidewatch_tap_sink_timeouts_total", 0.0),
            "drift_samples": delta("sidewatch_drift_samples_total"),
            "upstream_errors": delta("sidewatch_upstream_errors_total")}


def detector_faults(args, children: Children, tmp: Path, model_port: int, requests: dict, mix: dict) -> dict:
    rounds: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    for round_index in range(args.rounds):
        order = list(args.variants[round_index % len(args.variants):]) + list(args.variants[:round_index % len(args.variants)])
        for variant in order:
            result = measure_variant(args, children, tmp, variant, model_port, requests, mix, round_index)
            rounds[variant].append(result)
            log(f"round {round_index + 1} {variant:8s} {result['throughput']:7.1f}/s p50 {result['p50_ms']:6.2f} ms "
                f"p99 {result['p99_ms']:7.2f} ms codes {result['codes']} dropped {result['tap_dropped']:.0f} "
                f"errors {result['detector_errors']:.0f}/{result['sink_errors']:.0f} timeouts {result['sink_timeouts']:.0f}")
    summary = {}
    for variant, results in rounds.items():
        summary[variant] = {
            "p50_ms": round(statistics.median(r["p50_ms"] for r in results), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in results), 3),
            "max_ms": round(max(r["max_ms"] for r in results), 3),
            "throughput": round(statistics.median(r["throughput"] for r in results), 1),
            "non_ok_calls": sum(n for r in results for code, n in r["codes"].items() if code != "OK"),
            "tap_dropped": sum(r["tap_dropped"] for r in results),
            "detector_errors": sum(r["detector_errors"] for r in results),
            "sink_timeouts": sum(r["sink_timeouts"] for r in results),
        }
    for variant, figures in summary.items():
        for base in ("off", "healthy"):
            if base in summary and summary[base]["p99_ms"] > 0:
                figures[f"p99_over_{base}"] = round(figures["p99_ms"] / summary[base]["p99_ms"], 2)
    return {"rounds": rounds, "summary": summary}


# --- 2. upstream restarts ---------------------------------------------------------------------------


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.05):
            return True
    except OSError:
        return False


def upstream_restarts(args, children: Children, tmp: Path, requests: dict, mix: dict) -> dict:
    model_port = free_port()
    model_server = soak.start_model_server(children, tmp, model_port, name="model-server-restarts-0")
    sidecar, port, metrics_port = start_variant(children, tmp, "healthy", model_port, "sidecar-restarts")
    soak.wait_until_serving(f"127.0.0.1:{port}", requests["benign"][0])
    load = soak.LoadGenerator(f"127.0.0.1:{port}", requests, mix, args.threads, args.rate, seed=99).start()
    restarts = []
    try:
        time.sleep(args.warmup_seconds)
        for index in range(args.restarts):
            model_server.kill()
            model_server.wait()
            killed = time.monotonic()
            time.sleep(args.down_seconds)
            name = f"model-server-restarts-{index + 1}"
            model_server = children.start(name, soak.sidewatch_argv("model-server", "--listen", f"127.0.0.1:{model_port}",
                                                                    "--device", "cpu"), tmp / f"{name}.log")
            while not port_open(model_port):
                if model_server.poll() is not None:
                    raise RuntimeError(f"the model server exited:\n{soak.tail(tmp / f'{name}.log')}")
                time.sleep(0.002)
            back = time.monotonic()
            first_ok = None
            while first_ok is None and time.monotonic() - back < 30:
                ok = [call.ended for call in load.between(back, time.monotonic() + 1) if call.code == "OK"]
                first_ok = min(ok) if ok else None
                time.sleep(0.01)
            if first_ok is None:
                raise RuntimeError("no call succeeded within 30 s of the model server's return")
            down = load.between(killed, back)
            codes: dict[str, int] = {}
            for call in down:
                codes[call.code] = codes.get(call.code, 0) + 1
            restarts.append({"recovery_s": round(first_ok - back, 4), "down_s": round(back - killed, 2),
                             "codes_while_down": codes,
                             "longest_call_while_down_ms": round(max((c.latency for c in down), default=0) * 1000, 1)})
            log(f"restart {index + 1}: first OK {first_ok - back:.3f} s after the port opened; while down {codes}")
            time.sleep(args.warmup_seconds)
        alive = sidecar.poll() is None
    finally:
        load.stop()
        stop_process(sidecar)
    recovery = [r["recovery_s"] for r in restarts]
    return {"restarts": restarts, "sidecar_alive_throughout": alive,
            "recovery_s": {"median": round(statistics.median(recovery), 4), "max": round(max(recovery), 4)},
            "non_unavailable_while_down": sum(n for r in restarts for code, n in r["codes_while_down"].items()
                                              if code not in ("UNAVAILABLE", "OK"))}


# --- the run ----------------------------------------------------------------------------------------


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="sidewatch-faults-"))
    log(f"logs in {tmp}")
    children = Children()
    requests = soak.build_requests()
    mix = {"benign": 0.9, "adversarial": 0.05, "drifted": 0.05}
    try:
        model_port = free_port()
        soak.start_model_server(children, tmp, model_port)
        faults = detector_faults(args, children, tmp, model_port, requests, mix) if args.variants else None
        restarts = upstream_restarts(args, children, tmp, requests, mix) if args.restarts else None
    finally:
        children.stop_all()
    goals = {}
    if restarts is not None:
        worst = restarts["recovery_s"]["max"]
        goals["service_resumes_within_1s"] = {"value_s": worst, "target_s": RECOVERY_GOAL_SECONDS,
                                              "met": worst < RECOVERY_GOAL_SECONDS}
        goals["unavailable_not_hang_while_down"] = {"value": restarts["non_unavailable_while_down"], "target": 0,
                                                    "met": restarts["non_unavailable_while_down"] == 0
                                                    and restarts["sidecar_alive_throughout"]}
    if faults is not None:
        broken = sum(figures["non_ok_calls"] for figures in faults["summary"].values())
        goals["faulty_detectors_fail_no_call"] = {"value": broken, "target": 0, "met": broken == 0}
    return {"benchmark": "faults", "machine": soak.machine_info(),
            "parameters": {"rate": args.rate, "threads": args.threads, "mix": mix, "rounds": args.rounds,
                           "phase_seconds": args.phase_seconds, "warmup_seconds": args.warmup_seconds,
                           "variants": list(args.variants), "restarts": args.restarts,
                           "down_seconds": args.down_seconds},
            "detector_faults": faults, "upstream_restarts": restarts, "goals": goals, "logs": str(tmp)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second in all")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phase-seconds", type=float, default=15.0, help="measured load per variant and round")
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; empty: none")
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--down-seconds", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="1 round of 6 s per variant, 2 restarts")
    args = parser.parse_args(argv)
    args.variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.quick:
        args.rounds, args.phase_seconds, args.restarts = 1, 6.0, min(args.restarts, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_sidecar"]:
        return faulty_sidecar_main(argv[1], argv[2:])
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if result["detector_faults"]:
        print(f"{'variant':10s} {'p50 ms':>8s} {'p99 ms':>8s} {'p99/off':>8s} {'p99/healthy':>12s} {'non-OK':>7s} "
              f"{'dropped':>8s} {'det.err':>8s} {'timeouts':>8s}")
        for variant, f in result["detector_faults"]["summary"].items():
            print(f"{variant:10s} {f['p50_ms']:8.2f} {f['p99_ms']:8.2f} {f.get('p99_over_off', 0):8.2f} "
                  f"{f.get('p99_over_healthy', 0):12.2f} {f['non_ok_calls']:7d} {f['tap_dropped']:8.0f} "
                  f"{f['detector_errors']:8.0f} {f['sink_timeouts']:8.0f}")
    if result["upstream_restarts"]:
        r = result["upstream_restarts"]
        print(f"upstream restarts: recovery median {r['recovery_s']['median']:.3f} s, max {r['recovery_s']['max']:.3f} s")
    for name, goal in result["goals"].items():
        print(f"  {name}: {'met' if goal['met'] else 'MISSED'} ({goal})")
    return 0 if all(goal["met"] for goal in result["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
