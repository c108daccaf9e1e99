"""Sequential ModelInfer latency of several paths to one model, the paths interleaved call by call (so that a
shared, noisy machine slows them alike): what bench/envoy_tap.py and bench/inline_modes.py compare."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from agent.protocol.client import InferenceClient


def percentiles(values: list[float]) -> dict:
    """p50, p99 and mean of durations in seconds, in microseconds."""
    micros = np.array(values) * 1e6
    return {"p50_us": round(float(np.percentile(micros, 50)), 1), "p99_us": round(float(np.percentile(micros, 99)), 1),
            "mean_us": round(float(micros.mean()), 1)}


def interleaved_latencies(ports: dict[str, int], model: str, images: np.ndarray, calls: int, warmup: int,
                          check_warmup: Callable[[str, tuple], None] | None = None) -> dict[str, dict]:
    """``calls`` sequential calls of one image each to ``model`` version 1 through each path (name -> port),
    after ``warmup`` calls per path (``check_warmup(name, trailers)`` sees each warm-up answer); percentiles
    per path."""
    clients = {name: InferenceClient(f"127.0.0.1:{port}") for name, port in ports.items()}
    times: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for name, client in clients.items():
            for i in range(warmup):
                _, _, trailers = client.infer(model, {"input": images[i % len(images)][None]}, version="1")
                if check_warmup is not None:
                    check_warmup(name, trailers)
        for i in range(calls):
            image = images[i % len(images)][None]
            for name, client in clients.items():
                started = time.perf_counter()
                client.infer(model, {"input": image}, version="1")
                times[name].append(time.perf_counter() - started)
    finally:
        for client in clients.values():
            client.close()
    return {name: percentiles(values) for name, values in times.items()}
