#!/usr/bin/env python3
"""What do the shadow detectors cost the calls when Envoy carries them and the tap is ext_proc?

The bundled model server (mnist_cnn), and in the same run:

    direct                 client -> model server
    envoy_detectors_off    client -> sidewatch serve --data-plane envoy (no model repository, drift off) -> model
    envoy_detectors_on     the same with the bundled model's detectors in shadow mode (tap.cpu_budget_cores 1)
    python_detectors_off   client -> sidewatch serve (the grpc.aio relay), no model repository, drift off
    python_detectors_on    the grpc.aio relay with the bundled model's detectors in shadow mode

1. Sequential latency: one Python sync gRPC client per path, one ModelInfer of one MNIST image at a time,
   interleaved across the paths (so they see the same machine load): p50 and p99.
2. Throughput with the tap watching every call (tap.cpu_budget_cores unset: sampling off) and with
   sampling on (budget 1 core): a grpc.aio client with ``--in-flight`` calls in flight on one channel for
   ``--seconds``; calls/s, copies received from Envoy, copies the adversarial detector scored, and their
   share of the calls; the sampled ratio at the end.

    PYTHONPATH=$PWD .venv/bin/python bench/envoy_tap.py --out bench-results/envoy_tap.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.demo.data import BENIGN_STREAM, load_images  # noqa: E402
from agent.modelserver.repository import BUNDLED_REPOSITORY  # noqa: E402
from agent.protocol import paths  # noqa: E402
from agent.protocol.client import InferenceClient  # noqa: E402
from bench.interleaved import interleaved_latencies  # noqa: E402
from tests.support.harness import http_get, metric_value, start_model_server, start_sidecar  # noqa: E402

MODEL = "mnist_cnn"


def sidecar(tmp: Path, model_port: int, data_plane: str, detectors: bool, tap: dict | None = None):
    config = tmp / f"{data_plane}-{detectors}-{len(list(tmp.iterdir()))}.yml"
    settings: dict = {"tap": tap or {}}
    extra = ["--data-plane", data_plane]
    if detectors:
        extra += ["--model-repository", str(BUNDLED_REPOSITORY)]
    else:
        settings["drift"] = {"enabled": False}
    config.write_text(yaml.safe_dump(settings))
    return start_sidecar(tmp, model_port, *extra, config=config)


def value(text: str, name: str, **labels: str) -> float:
    try:
        return metric_value(text, name, **labels)
    except KeyError:
        return 0.0


def sequential(ports: dict[str, int], images: np.ndarray, calls: int, warmup: int) -> dict:
    result = interleaved_latencies(ports, MODEL, images, calls, warmup)
    for plane in ("envoy", "python"):
        off, on = result[f"{plane}_detectors_off"]["p50_us"], result[f"{plane}_detectors_on"]["p50_us"]
        result[f"{plane}_detectors_added_p50_share"] = round(on / off - 1, 3)
    result["calls_per_path"] = calls
    return result


async def drive(port: int, request: bytes, seconds: float, in_flight: int) -> int:
    from grpc import aio

    done = 0
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary(paths.MODEL_INFER)
        deadline = time.monotonic() + seconds

        async def worker():
            nonlocal done
            while time.monotonic() < deadline:
                await infer(request, timeout=10)
                done += 1

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done


def throughput(tmp: Path, model_port: int, images: np.ndarray, seconds: float, in_flight: int, tap: dict) -> dict:
    process, port, metrics_port = sidecar(tmp, model_port, "envoy", True, tap)
    try:
        request = InferenceClient.request(MODEL, {"input": images[0][None]}, version="1").SerializeToString()
        asyncio.run(drive(port, request, 1.0, in_flight))  # warm-up
        time.sleep(2)
        before = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        started = time.monotonic()
        calls = asyncio.run(drive(port, request, seconds, in_flight))
        elapsed = time.monotonic() - started
        time.sleep(3)  # the detectors finish what was queued
        after = http_get(f"http://127.0.0.1:{metrics_port}/metrics")

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        received = delta("sidewatch_tap_copies_received_total")
        scored = delta("sidewatch_adversarial_inputs_total", model=MODEL, version="1")
        return {"calls": calls, "calls_per_s": round(calls / elapsed, 1), "in_flight": in_flight,
                "copies_received": int(received), "copies_scored": int(scored),
                "queue_dropped": int(delta("sidewatch_tap_dropped_total")),
                "share_received": round(received / calls, 3), "share_scored": round(scored / calls, 3),
                "sampled_ratio_at_end": value(after, "sidewatch_tap_sampled_ratio"),
                "sidecar_cpu_cores_at_end": value(after, "sidewatch_tap_cpu_cores")}
    finally:
        process.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    images = load_images(BENIGN_STREAM)[0][:200]
    tmp = Path(tempfile.mkdtemp(prefix="bench-envoy-tap-"))
    model, model_port = start_model_server(tmp)
    processes = []
    try:
        ports = {"direct": model_port}
        for name, plane, detectors in (("envoy_detectors_off", "envoy", False), ("envoy_detectors_on", "envoy", True),
                                       ("python_detectors_off", "python", False),
                                       ("python_detectors_on", "python", True)):
            process, port, _ = sidecar(tmp, model_port, plane, detectors)
            processes.append(process)
            ports[name] = port
        result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                  "sequential": sequential(ports, images, args.calls, args.warmup)}
        for process in processes:
            process.stop()
        processes = []
        result["throughput_sampling_off"] = throughput(tmp, model_port, images, args.seconds, args.in_flight,
                                                       {"cpu_budget_cores": None})
        result["throughput_sampling_on_1_core"] = throughput(tmp, model_port, images, args.seconds, args.in_flight,
                                                             {"cpu_budget_cores": 1.0})
    finally:
        for process in processes:
            process.stop()
        model.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
