"""A failing detector never affects the forwarded call: the sidecar runs in-process so the test can
break its detector, and real gRPC calls go through it to the bundled model server."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.app import Sidecar, limit_native_threads
from agent.config import load_config
from agent.demo.data import load_images
from agent.detect.adversarial.watch import ERROR_KEY, VERDICT_KEY
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol.client import InferenceClient
from tests.support.harness import free_port, start_model_server

MODEL = "mnist_cnn"


class InProcessSidecar:
    """A Sidecar on its own event loop in a thread."""

    def __init__(self, config) -> None:
        limit_native_threads()  # as `sidewatch serve` does for its process
        self.registry = CollectorRegistry()
        self.sidecar = Sidecar(config, self.registry)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "InProcessSidecar":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sidecar.start(), self.loop).result(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.sidecar.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def value(self, name, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def model_port(tmp_path_factory):
    process, port = start_model_server(tmp_path_factory.mktemp("models"))
    yield port
    process.stop()


def _config(model_port, mode):
    return load_config(overrides={
        "listen": f"127.0.0.1:{free_port()}", "upstream.address": f"127.0.0.1:{model_port}",
        "metrics.listen": f"127.0.0.1:{free_port()}",
        "detection.model_repository": str(BUNDLED_REPOSITORY), "detection.adversarial_mode": mode,
    })


def _break_detectors(sidecar: Sidecar) -> None:
    def broken(batch):
        raise RuntimeError("injected detector failure")

    for calibrated in sidecar.watch.registry:
        calibrated.detector.score = broken


@pytest.mark.parametrize("mode", ["shadow", "flag", "enforce"])
def test_broken_detector_leaves_calls_untouched(model_port, mode):
    config = _config(model_port, mode)
    images = load_images()[0][:20]
    direct = InferenceClient(f"127.0.0.1:{model_port}")
    expected = direct.infer(MODEL, {"input": images}, version="1")[0]["probabilities"]
    direct.close()
    with InProcessSidecar(config) as running:
        _break_detectors(running.sidecar)
        client = InferenceClient(config.listen)
        rows = []
        for index in range(len(images)):
            outputs, _, trailers = client.infer(MODEL, {"input": images[index:index + 1]}, version="1", timeout=10)
            rows.append(outputs["probabilities"][0])
            trailers = dict(trailers)
            assert VERDICT_KEY not in trailers
            if mode != "shadow":
                assert trailers[ERROR_KEY] == "detector_failed"
        client.close()
        np.testing.assert_array_equal(np.stack(rows), expected)
        deadline = time.monotonic() + 5
        labels = {"model": MODEL, "version": "1", "detector": "feature_squeezing", "reason": "detector_failed"}
        while running.value("sidewatch_detector_errors_total", **labels) < (1 if mode == "shadow" else 20):
            assert time.monotonic() < deadline, "detector failures were not counted"
            time.sleep(0.05)
        assert running.value("sidewatch_requests_total", model=MODEL, version="1", method="ModelInfer",
                             code="OK") == 20
