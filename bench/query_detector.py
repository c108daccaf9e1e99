#!/usr/bin/env python3
"""What black-box query detection costs: time per request on the request path, and memory per 1,000 clients.

    PYTHONPATH=$PWD .venv/bin/python bench/query_detector.py --out bench-results/query_detector.json [--quick]

In process, at the defaults of ``detection.queries`` (agent/config/queries.py), with the same QueryWatch the data
planes call (agent/detect/queries/watch.py), on serialized ModelInferRequests as they arrive:

* **Time per request** (``QueryWatch.check``: peek, decode, fingerprint every row, the client's history): the
  median and p99 over ``--calls`` requests, each kind in a warm watch:

  - ``mnist_benign``: [1, 1, 28, 28] FP32, held-out MNIST images from 1,000 clients in turn (a new image each time);
  - ``mnist_attack``: the same shape, one client sending noisy copies of one image (a black-box attack's queries;
    it is flagged, and in enforce mode refused: the refused calls are timed separately, ``mnist_refused``);
  - ``mnist_batch64``: 64 rows per request ([64, 1, 28, 28]), benign;
  - ``imagenet_224``: one [1, 3, 224, 224] FP32 image (150,528 values), benign-like noise;
  - ``fingerprint_row``: one MNIST row's fingerprint alone (agent/detect/queries/fingerprint.py).

* **Memory per 1,000 clients**: tracemalloc's growth while 1,000 clients each send ``fingerprints_per_client``
  (32) distinct MNIST rows (every client at its full ring), and while 1,000 clients each send one (a client seen
  once); the table's arrays alone too (``ClientHistory.nbytes``). Python objects included: the table's dict, the
  keys, the histories and their arrays.

The machine and its load are recorded; on a shared 2-core machine the times move with the neighbours' load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from agent.config import load_config  # noqa: E402
from agent.demo.data import BENIGN_STREAM, REFERENCE, load_images  # noqa: E402
from agent.detect.queries.fingerprint import Fingerprinter  # noqa: E402
from agent.detect.queries.watch import QueryWatch  # noqa: E402
from agent.metrics import BoundedModels, QueryMetrics  # noqa: E402
from agent.protocol import codec, oip_pb2  # noqa: E402

MODEL = "mnist_cnn"


def log(message: str) -> None:
    print(f"[query_detector] {message}", file=sys.stderr, flush=True)


def request(rows: np.ndarray) -> bytes:
    message = oip_pb2.ModelInferRequest(model_name=MODEL, model_version="1")
    codec.add_input(message, "input", np.ascontiguousarray(rows, dtype=np.float32))
    return message.SerializeToString()


def new_watch(mode: str = "enforce") -> QueryWatch:
    settings = load_config(overrides={"detection.queries.mode": mode}).detection.queries
    return QueryWatch(settings, QueryMetrics(CollectorRegistry()), BoundedModels(8, [(MODEL, "")]))


def timed(calls: list[tuple[str, bytes]], watch: QueryWatch) -> tuple[list[float], list[bool]]:
    """Microseconds per call of ``watch.check`` (client, request), and whether each was refused."""
    times, refused = [], []
    for client, body in calls:
        started = time.perf_counter()
        refusal = watch.check(MODEL, client, body)
        times.append((time.perf_counter() - started) * 1e6)
        refused.append(refusal is not None)
    return times, refused


def summary(times: list[float]) -> dict:
    values = np.asarray(times)
    return {"calls": len(values), "p50_us": round(float(np.percentile(values, 50)), 1),
            "p90_us": round(float(np.percentile(values, 90)), 1), "p99_us": round(float(np.percentile(values, 99)), 1),
            "mean_us": round(float(values.mean()), 1)}


def costs(images: np.ndarray, calls: int) -> dict:
    result = {}
    rng = np.random.default_rng(0)
    # Benign: 1,000 clients in turn, each request a held-out image (the pool cycles when calls exceed it).
    watch = new_watch()
    benign = [(f"peer:10.0.{i // 250}.{i % 250}", request(images[i % len(images)][None])) for i in range(calls)]
    timed(benign[:200], watch)  # warm-up
    times, refused = timed(benign, watch)
    assert not any(refused), "a benign client was refused"
    result["mnist_benign"] = summary(times)
    # An attack: one client, noisy copies of one image; flagged after about 11, then refused.
    watch = new_watch()
    noisy = np.clip(images[7][None] + rng.normal(0, 0.02, (calls, *images[7].shape)), 0, 1)
    times, refused = timed([("peer:10.9.9.9", request(row[None])) for row in noisy], watch)
    first = refused.index(True)
    result["mnist_attack"] = {**summary(times[:first]), "refused_from_call": first + 1}
    result["mnist_refused"] = summary(times[first:])
    # Batches of 64 benign rows.
    watch = new_watch()
    batches = [(f"peer:10.1.0.{i}", request(images[(64 * i) % (len(images) - 64):][:64])) for i in range(calls // 20)]
    times, _ = timed(batches, watch)
    result["mnist_batch64"] = {**summary(times), "per_row_p50_us": round(float(np.percentile(times, 50)) / 64, 1)}
    # A large image: 3 x 224 x 224.
    watch = new_watch()
    large = [(f"peer:10.2.0.{i}", request(rng.random((1, 3, 224, 224)))) for i in range(max(calls // 50, 20))]
    times, _ = timed(large, watch)
    result["imagenet_224"] = summary(times)
    # One fingerprint alone.
    fingerprinter = Fingerprinter(50, 50)
    rows = images[:calls].reshape(len(images[:calls]), -1)
    times = []
    for row in rows:
        started = time.perf_counter()
        fingerprinter(row, 0.2)
        times.append((time.perf_counter() - started) * 1e6)
    result["fingerprint_row"] = summary(times)
    return result


def memory(images: np.ndarray, clients: int = 1000) -> dict:
    result = {}
    per_client = load_config().detection.queries.fingerprints_per_client
    for rows_each in (per_client, 1):
        watch = new_watch("flag")
        bodies = [request(images[i % len(images)][None]) for i in range(clients * rows_each)]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for index, body in enumerate(bodies):
            watch.check(MODEL, f"peer:10.{index // rows_each // 250}.{index // rows_each % 250}.1", body)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        arrays = sum(watch.clients._histories[key].nbytes() for key in list(watch.clients._histories))
        assert len(watch.clients) == clients
        result[f"rows_per_client_{rows_each}"] = {
            "clients": clients, "bytes_per_1000_clients": round((after - before) * 1000 / clients),
            "mib_per_1000_clients": round((after - before) * 1000 / clients / 2**20, 2),
            "array_bytes_per_client": round(arrays / clients)}
    return result


def run(args: argparse.Namespace) -> dict:
    images = np.concatenate([load_images(BENIGN_STREAM)[0], load_images(REFERENCE)[0]])
    defaults = load_config().detection.queries
    log(f"timing {args.calls} calls per kind")
    started_load = list(os.getloadavg())
    result = {
        "benchmark": "query_detector",
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "load_average_start": started_load},
        "settings": defaults.model_dump(),
        "time_per_request": costs(images, args.calls),
        "memory": memory(images),
    }
    result["machine"]["load_average_end"] = list(os.getloadavg())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="write the results here (JSON)")
    parser.add_argument("--calls", type=int, default=5000, help="requests timed per kind (default 5000)")
    parser.add_argument("--quick", action="store_true", help="500 calls per kind")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls = 500
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"time_per_request": result["time_per_request"], "memory": result["memory"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
