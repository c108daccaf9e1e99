#!/usr/bin/env python3
"""What the feature-squeezing detector costs, on this machine's CPU.

    .venv/bin/python bench/detector.py --out bench-results/detector.json [--quick]

Throughput (inputs per second), measured in one run on the same 2,000 MNIST test images:

* fused, micro-batched: the sidecar's shadow path. Each image arrives as its own tapped request
  (batch 1) at agent.detect.adversarial.watch.AdversarialWatch, which gathers micro-batches of
  --batch rows and scores each with one call of the fused ONNX graph.
* fused at --batch: the fused graph alone, on ready-made batches (no gathering).
* naive: per request, numpy squeezes each copy and ONNX Runtime runs the plain model once on the
  input and once per squeezed copy (1 + S calls per request).
* bound: the plain model's batched throughput at --batch divided by (1 + S): what S squeezed copies
  cost if squeezing and scoring were free.

Goals: fused micro-batched >= 5x naive, and >= 80% of the bound.

Latency: flag mode puts the detector on the hot path. The same sequential ModelInfer calls (batch 1)
go through two sidecars in front of one bundled model server, one in shadow mode and one in flag
mode; the report gives p50 and p99 of each and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.demo.data import load_images  # noqa: E402
from agent.detect.calibration.artifact import load_artifact  # noqa: E402
from agent.modelserver.repository import BUNDLED_REPOSITORY  # noqa: E402

MODEL = "mnist_cnn"


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def timed(run, repeats: int) -> float:
    """Best of ``repeats`` wall times: the machine is shared, the minimum is the least disturbed."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def throughput(version: str, images: np.ndarray, batch: int, repeats: int) -> dict:
    import onnxruntime as ort
    from prometheus_client import CollectorRegistry

    from agent.config import load_config
    from agent.dataplane.tap import TappedInference
    from agent.detect.adversarial.watch import AdversarialWatch
    from agent.detect.registry import DetectorRegistry
    from agent.metrics import BoundedModels, DetectionMetrics

    model_file = BUNDLED_REPOSITORY / MODEL / version / "model.onnx"
    artifact = load_artifact(model_file.with_name("sidewatch-calibration.json"), model_file)
    detector = artifact.make_detector(model_file, device="cpu")
    squeezers = detector.squeezers
    plain = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    n = len(images)
    batches = [images[i:i + batch] for i in range(0, n, batch)]
    detector.score(batches[0])  # warm-up: builds the graph and session

    def fused_batches():
        for part in batches:
            detector.score(part)

    def plain_batches():
        for part in batches:
            plain.run(None, {"input": part})

    def naive():
        for i in range(n):
            x = images[i:i + 1]
            plain.run(None, {"input": x})
            for squeeze in squeezers:
                plain.run(None, {"input": squeeze(x).astype(np.float32)})

    config = load_config(overrides={"detection.model_repository": str(BUNDLED_REPOSITORY),
                                    "detection.max_batch_size": batch, "detection.device": "cpu"})
    registry = DetectorRegistry(BUNDLED_REPOSITORY, "cpu")
    watch = AdversarialWatch(registry, config.detection, DetectionMetrics(CollectorRegistry()), BoundedModels(8))
    tapped = [TappedInference(MODEL, version, {"input": images[i:i + 1]}, {}, None, None, 0.0, 0.0)
              for i in range(n)]

    def micro_batched():
        for inference in tapped:
            watch(inference)
        watch.flush()  # the last, partial batch

    seconds = {
        "fused_micro_batched": timed(micro_batched, repeats),
        "fused_batched": timed(fused_batches, repeats),
        "plain_batched": timed(plain_batches, repeats),
        "naive": timed(naive, max(1, repeats // 2)),
    }
    watch.close()
    result = {name: rate(n, s) for name, s in seconds.items()}
    result["bound"] = round(result["plain_batched"] / (1 + len(squeezers)), 1)
    result["fused_micro_batched_over_naive"] = round(result["fused_micro_batched"] / result["naive"], 2)
    result["fused_micro_batched_over_bound"] = round(result["fused_micro_batched"] / result["bound"], 3)
    result["fused_batched_over_bound"] = round(result["fused_batched"] / result["bound"], 3)
    result["squeezers"] = list(artifact.squeezers)
    return result


def latency(images: np.ndarray, calls: int, tmp: Path) -> dict:
    from agent.protocol.client import InferenceClient
    from tests.support.harness import start_model_server, start_sidecar

    model_server, model_port = start_model_server(tmp)
    sidecars = {}
    try:
        for mode in ("shadow", "flag"):
            process, port, _ = start_sidecar(tmp, model_port, "--model-repository", str(BUNDLED_REPOSITORY),
                                             "--adversarial-mode", mode)
            sidecars[mode] = (process, InferenceClient(f"127.0.0.1:{port}"))
        times = {mode: [] for mode in sidecars}
        for mode, (_, client) in sidecars.items():  # warm-up
            for i in range(50):
                client.infer(MODEL, {"input": images[i:i + 1]}, version="1")
        # Interleaved, so both modes see the same machine load.
        for i in range(calls):
            for mode, (_, client) in sidecars.items():
                started = time.perf_counter()
                client.infer(MODEL, {"input": images[i % len(images):i % len(images) + 1]}, version="1")
                times[mode].append(time.perf_counter() - started)
        result = {}
        for mode, values in times.items():
            values = np.array(values) * 1e6
            result[mode] = {"p50_us": round(float(np.percentile(values, 50)), 1),
                            "p99_us": round(float(np.percentile(values, 99)), 1)}
        result["flag_added_p50_us"] = round(result["flag"]["p50_us"] - result["shadow"]["p50_us"], 1)
        result["flag_added_p99_us"] = round(result["flag"]["p99_us"] - result["shadow"]["p99_us"], 1)
        result["calls_per_mode"] = calls
        return result
    finally:
        for process, client in sidecars.values():
            client.close()
            process.stop()
        model_server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--version", default="1")
    parser.add_argument("--batch", type=int, default=64, help="micro-batch size (default 64, the sidecar's)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import tempfile

    images = load_images()[0]
    repeats, calls = (2, 300) if args.quick else (5, 2000)
    report = {
        "benchmark": "bench/detector.py",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), "loadavg": os.getloadavg()},
        "parameters": {"version": args.version, "batch": args.batch, "images": len(images), "repeats": repeats,
                       "device": "cpu"},
        "throughput_inputs_per_s": throughput(args.version, images, args.batch, repeats),
    }
    with tempfile.TemporaryDirectory(prefix="sidewatch-bench-detector-") as tmp:
        report["latency"] = latency(images, calls, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    t = report["throughput_inputs_per_s"]
    print(f"throughput (inputs/s, batch {args.batch}): fused micro-batched {t['fused_micro_batched']}, "
          f"fused batched {t['fused_batched']}, naive {t['naive']}, bound {t['bound']}")
    print(f"  fused micro-batched / naive x{t['fused_micro_batched_over_naive']} (goal >= 5), "
          f"/ bound {t['fused_micro_batched_over_bound']:.0%} (goal >= 80%)")
    lat = report["latency"]
    print(f"latency (us): shadow p50 {lat['shadow']['p50_us']} p99 {lat['shadow']['p99_us']}; "
          f"flag p50 {lat['flag']['p50_us']} p99 {lat['flag']['p99_us']}; "
          f"flag adds p50 {lat['flag_added_p50_us']} p99 {lat['flag_added_p99_us']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
