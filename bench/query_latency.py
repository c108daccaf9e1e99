#!/usr/bin/env python3
"""What does black-box query detection add to the calls, on each data plane?

The bundled model server (mnist_cnn) and, in the same run, four sidecars without adversarial detectors:
``python_off``, ``python_flag`` (the grpc.aio relay: the policy checks each request on the event loop) and
``envoy_off``, ``envoy_flag`` (Envoy: every ModelInfer of a watched model through the verdict filter, every
ModelStreamInfer message through the stream query checks: agent/dataplane/envoy/verdicts.py and
stream_queries.py), plus ``direct``. Query detection in flag mode for the model (``models.mnist_cnn.query_mode:
flag``, identity: the peer address), so that every call is checked and none refused.

* ``unary``: one Python sync gRPC client per path sends one ModelInfer of one benign MNIST image at a time, the
  paths interleaved call by call (bench/interleaved.py); p50 and p99 per path.
* ``stream``: one ModelStreamInfer stream per path, one message at a time (the next sent once the answer to the
  last is back), the paths interleaved message by message; p50 and p99 per message.

Per data plane, flag's added p50 and p99 over off. The images cycle through 256 distinct benign ones: exact
repeats count for nothing, and no client is flagged (checked).

    PYTHONPATH=$PWD .venv/bin/python bench/query_latency.py --out bench-results/query_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.demo.data import load_images  # noqa: E402
from agent.protocol import codec, oip_pb2, paths  # noqa: E402
from bench.interleaved import interleaved_latencies, percentiles  # noqa: E402
from tests.support.harness import http_get, metric_value, start_model_server, start_sidecar  # noqa: E402

MODEL = "mnist_cnn"
PLANES = ("python", "envoy")
MODES = ("off", "flag")


class PingPongStream:
    """One ModelStreamInfer stream that sends a message only when asked, and waits for its answer."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._requests: queue.Queue = queue.Queue()
        call = self.channel.stream_stream(paths.MODEL_STREAM_INFER,
                                          request_serializer=oip_pb2.ModelInferRequest.SerializeToString,
                                          response_deserializer=oip_pb2.ModelStreamInferResponse.FromString)
        self._responses = call(iter(self._requests.get, None))

    def ask(self, image: np.ndarray) -> float:
        request = oip_pb2.ModelInferRequest(model_name=MODEL, model_version="1")
        codec.add_input(request, "input", image)
        started = time.perf_counter()
        self._requests.put(request)
        response = next(self._responses)
        elapsed = time.perf_counter() - started
        if response.error_message:
            raise SystemExit(f"sidewatch: bench: the stream answered an error: {response.error_message}")
        return elapsed

    def close(self) -> None:
        self._requests.put(None)
        for _ in self._responses:
            pass
        self.channel.close()


def stream_latencies(ports: dict[str, int], images: np.ndarray, messages: int, warmup: int) -> dict[str, dict]:
    streams = {name: PingPongStream(port) for name, port in ports.items()}
    times: dict[str, list[float]] = {name: [] for name in streams}
    try:
        for stream in streams.values():
            for i in range(warmup):
                stream.ask(images[i % len(images)][None])
        for i in range(messages):
            image = images[i % len(images)][None]
            for name, stream in streams.items():
                times[name].append(stream.ask(image))
    finally:
        for stream in streams.values():
            stream.close()
    return {name: percentiles(values) for name, values in times.items()}


def added(result: dict[str, dict]) -> dict[str, dict]:
    for plane in PLANES:
        off, flag = result[f"{plane}_off"], result[f"{plane}_flag"]
        result[f"{plane}_flag_added"] = {key: round(flag[key] - off[key], 1) for key in ("p50_us", "p99_us")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1500, help="sequential calls (and stream messages) per path")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    images = load_images()[0][:256]
    processes = []
    with tempfile.TemporaryDirectory(prefix="sidewatch-bench-queries-") as directory:
        tmp = Path(directory)
        config = tmp / "queries.yaml"
        config.write_text(yaml.safe_dump({"models": {MODEL: {"query_mode": "flag"}}}))
        try:
            model, model_port = start_model_server(tmp)
            processes.append(model)
            ports, metrics_ports = {"direct": model_port}, {}
            for plane in PLANES:
                for mode in MODES:
                    extra = {"config": config} if mode == "flag" else {}
                    process, port, metrics_port = start_sidecar(tmp, model_port, "--data-plane", plane, **extra)
                    processes.append(process)
                    ports[f"{plane}_{mode}"], metrics_ports[f"{plane}_{mode}"] = port, metrics_port
            time.sleep(2)
            result = {"unary": added(interleaved_latencies(ports, MODEL, images, args.calls, args.warmup)),
                      "stream": added(stream_latencies(ports, images, args.calls, args.warmup))}
            checked = {}
            for plane in PLANES:
                text = http_get(f"http://127.0.0.1:{metrics_ports[f'{plane}_flag']}/metrics")
                checked[plane] = {"rows": metric_value(text, "sidewatch_query_rows_total", model=MODEL),
                                  "flags": metric_value(text, "sidewatch_query_flags_total", model=MODEL)}
                if checked[plane]["flags"]:
                    raise SystemExit(f"sidewatch: bench: the benign client was flagged on {plane}: {checked[plane]}")
            result["checked"] = checked
            result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "processor": platform.processor(), "load": os.getloadavg()}
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
