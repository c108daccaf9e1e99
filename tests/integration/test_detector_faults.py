"""A failing detector never affects the forwarded call: the sidecar runs in-process so the test can
break its detector, and real gRPC calls go through it to the bundled model server."""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent.app import Sidecar
from agent.demo.data import load_images
from agent.detect.adversarial.watch import ERROR_KEY, VERDICT_KEY
from agent.protocol.client import InferenceClient
from tests.support.in_process import MODEL, InProcessSidecar, sidecar_config


def _break_detectors(sidecar: Sidecar) -> None:
    def broken(batch):
        raise RuntimeError("injected detector failure")

    for calibrated in sidecar.watch.registry:
        calibrated.detector.score = broken


@pytest.mark.parametrize("mode", ["shadow", "flag", "enforce"])
def test_broken_detector_leaves_calls_untouched(model_server, mode):
    config = sidecar_config(model_server, mode)
    images = load_images()[0][:20]
    direct = InferenceClient(f"127.0.0.1:{model_server}")
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
