#!/usr/bin/env python3
"""What does flag mode add over shadow mode, on each data plane?

The bundled model server (mnist_cnn) and, in the same run, four sidecars with the bundled model's
detectors: ``python_shadow``, ``python_flag`` (the grpc.aio relay) and ``envoy_shadow``, ``envoy_flag``
(Envoy, flag mode through its verdict filter: agent/dataplane/envoy/verdicts.py), plus ``direct``.
One Python sync gRPC client per path sends one ModelInfer of one benign MNIST image at a time, the paths
interleaved call by call (so they see the same machine load); the figures are p50 and p99 per path and,
per data plane, flag mode's added p50 and p99 over shadow mode. Flag-mode answers are checked to carry the
verdict trailers.

    PYTHONPATH=$PWD .venv/bin/python bench/inline_modes.py --out bench-results/inline_modes.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.demo.data import load_images  # noqa: E402
from agent.modelserver.repository import BUNDLED_REPOSITORY  # noqa: E402
from bench.interleaved import interleaved_latencies  # noqa: E402
from tests.support.harness import start_model_server, start_sidecar  # noqa: E402

MODEL = "mnist_cnn"
PLANES = ("python", "envoy")
MODES = ("shadow", "flag")


def _verdict_trailers(name: str, trailers: tuple) -> None:
    if name.endswith("_flag") and "sidewatch-adversarial" not in dict(trailers):
        raise SystemExit(f"sidewatch: bench: {name} answered without the verdict trailers")


def sequential(ports: dict[str, int], images: np.ndarray, calls: int, warmup: int) -> dict:
    result = interleaved_latencies(ports, MODEL, images, calls, warmup, check_warmup=_verdict_trailers)
    for plane in PLANES:
        shadow, flag = result[f"{plane}_shadow"], result[f"{plane}_flag"]
        result[f"{plane}_flag_added"] = {"p50_us": round(flag["p50_us"] - shadow["p50_us"], 1),
                                         "p99_us": round(flag["p99_us"] - shadow["p99_us"], 1)}
    result["calls_per_path"] = calls
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1500, help="sequential calls per path")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    images = load_images()[0][:256]
    processes = []
    with tempfile.TemporaryDirectory(prefix="sidewatch-bench-inline-") as directory:
        tmp = Path(directory)
        try:
            model, model_port = start_model_server(tmp)
            processes.append(model)
            ports = {"direct": model_port}
            for plane in PLANES:
                for mode in MODES:
                    process, port, _ = start_sidecar(tmp, model_port, "--data-plane", plane, "--model-repository",
                                                     str(BUNDLED_REPOSITORY), "--adversarial-mode", mode)
                    processes.append(process)
                    ports[f"{plane}_{mode}"] = port
            time.sleep(2)
            result = {"sequential": sequential(ports, images, args.calls, args.warmup),
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "processor": platform.processor()}}
        finally:
            for process in reversed(processes):
                process.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
