"""Detector faults in a whole sidecar: in shadow mode with the bundled model server and its real detectors,
one of them broken on purpose (hanging, slow, raising), the forwarded calls are untouched; the failure is
counted, logged once per interval, and the tap's worker recovers.

The tap and the throttled log on their own: tests/unit/test_reliability_detectors.py. Raising detectors in
every mode are covered by test_detector_faults.py; timings (p99 with a failing detector against without)
are in bench/faults.py.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from agent.demo.data import load_images
from agent.protocol.client import InferenceClient
from tests.support.in_process import MODEL, InProcessSidecar, sidecar_config
from tests.support.polling import wait_for


def _lines(caplog, fragment: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if fragment in record.getMessage()]


def _shadow_sidecar(model_server, queue_size=8):
    config = sidecar_config(model_server, "shadow")
    config.tap.queue_size = queue_size
    config.tap.sink_timeout_seconds = 1.0
    return config


def _call_many(client, images, expected, count: int) -> None:
    """Calls through the sidecar; each must come back OK with the model server's own answer."""
    for index in range(count):
        row = index % len(images)
        outputs, _, _ = client.infer(MODEL, {"input": images[row:row + 1]}, version="1", timeout=10)
        np.testing.assert_array_equal(outputs["probabilities"][0], expected[row])


@pytest.fixture(scope="module")
def traffic(model_server):
    images = load_images()[0][:50]
    direct = InferenceClient(f"127.0.0.1:{model_server}")
    expected = direct.infer(MODEL, {"input": images}, version="1")[0]["probabilities"]
    direct.close()
    return images, expected


def test_hanging_detector_leaves_calls_and_the_drift_detectors_untouched_and_resumes(model_server, traffic, caplog):
    images, expected = traffic
    release = threading.Event()
    with caplog.at_level(logging.WARNING), InProcessSidecar(_shadow_sidecar(model_server)) as running:
        for calibrated in running.sidecar.watch.registry:
            healthy = calibrated.detector.score

            def hangs(batch, healthy=healthy):
                release.wait(60)
                return healthy(batch)

            calibrated.detector.score = hangs
        client = InferenceClient(running.sidecar.config.listen)
        labels = {"model": MODEL, "version": "1"}
        _call_many(client, images, expected, 100)
        # The adversarial sink hangs: given up on after a second, counted and logged once; copies
        # beyond the queue are dropped; the drift detectors keep receiving copies meanwhile.
        wait_for(lambda: running.value("sidewatch_tap_sink_timeouts_total", sink="adversarial") == 1, "the timeout")
        drift_before = running.value("sidewatch_drift_samples_total", **labels)
        _call_many(client, images, expected, 200)
        assert running.value("sidewatch_tap_dropped_total") > 0
        wait_for(lambda: running.value("sidewatch_drift_samples_total", **labels) > drift_before,
                 "drift samples while the adversarial detector hangs")
        assert running.value("sidewatch_adversarial_inputs_total", mode="shadow", **labels) == 0
        assert len(_lines(caplog, "tap sink adversarial has not returned")) == 1
        assert running.value("sidewatch_requests_total", method="ModelInfer", code="OK", **labels) == 300

        release.set()                        # the detector answers again: it is fed and scores again
        wait_for(lambda: _lines(caplog, "tap sink adversarial returned"), "the hung call to return")
        scored = running.value("sidewatch_adversarial_inputs_total", mode="shadow", **labels)
        _call_many(client, images, expected, 100)
        wait_for(lambda: running.value("sidewatch_adversarial_inputs_total", mode="shadow", **labels) > scored,
                 "adversarial scores after the detector came back")
        client.close()
    assert running.value("sidewatch_tap_sink_errors_total", sink="adversarial") == 0


def test_slow_detector_drops_copies_not_calls_and_catches_up(model_server, traffic, caplog):
    images, expected = traffic
    slow = threading.Event()
    slow.set()
    with caplog.at_level(logging.WARNING), InProcessSidecar(_shadow_sidecar(model_server)) as running:
        for calibrated in running.sidecar.watch.registry:
            healthy = calibrated.detector.score

            def slow_score(batch, healthy=healthy):
                if slow.is_set():
                    time.sleep(0.2)          # far slower than the traffic, yet under the sink timeout
                return healthy(batch)

            calibrated.detector.score = slow_score
        client = InferenceClient(running.sidecar.config.listen)
        _call_many(client, images, expected, 300)
        assert running.value("sidewatch_tap_dropped_total") > 0
        assert len(_lines(caplog, "tap queue full")) == 1
        slow.clear()
        wait_for(lambda: running.value("sidewatch_tap_queue_depth") == 0, "the queue to drain")
        dropped = running.value("sidewatch_tap_dropped_total")
        scored = running.value("sidewatch_adversarial_inputs_total", model=MODEL, version="1", mode="shadow")
        for _ in range(5):                   # a pace the detector keeps up with: nothing dropped any more
            _call_many(client, images, expected, 4)
            time.sleep(0.05)
        wait_for(lambda: running.value("sidewatch_adversarial_inputs_total", model=MODEL, version="1",
                                       mode="shadow") >= scored + 20, "every new copy scored")
        assert running.value("sidewatch_tap_dropped_total") == dropped
        client.close()
    assert running.value("sidewatch_tap_sink_timeouts_total", sink="adversarial") == 0
    assert running.value("sidewatch_requests_total", model=MODEL, version="1", method="ModelInfer", code="OK") == 320


def test_raising_drift_sink_is_counted_logged_once_and_the_adversarial_detector_goes_on(model_server, traffic, caplog):
    images, expected = traffic
    with caplog.at_level(logging.WARNING), InProcessSidecar(_shadow_sidecar(model_server, queue_size=1024)) as running:
        for drift in running.sidecar.drift.models.values():
            def broken(inference):
                raise RuntimeError("injected drift failure")

            drift.observe = broken
        client = InferenceClient(running.sidecar.config.listen)
        _call_many(client, images, expected, 100)
        client.close()
        wait_for(lambda: running.value("sidewatch_tap_sink_errors_total", sink="drift") == 100, "100 drift failures")
        wait_for(lambda: running.value("sidewatch_adversarial_inputs_total", model=MODEL, version="1",
                                       mode="shadow") == 100, "every input scored for adversarial examples")
        assert len(_lines(caplog, "tap sink drift failed")) == 1


def test_shutdown_with_a_hung_detector_finishes(model_server, traffic):
    """SIGTERM while the drift sink hangs: the sidecar stops (calls drained, the adversarial detector's
    last batch scored) instead of hanging in that sink's final flush."""
    images, expected = traffic
    release = threading.Event()
    running = InProcessSidecar(_shadow_sidecar(model_server))
    with running:
        for drift in running.sidecar.drift.models.values():
            drift.flush = lambda: release.wait(120)      # the next micro-batch of 64 rows never returns
        client = InferenceClient(running.sidecar.config.listen)
        _call_many(client, images, expected, 100)
        client.close()
        wait_for(lambda: running.value("sidewatch_tap_sink_timeouts_total", sink="drift") == 1, "the timeout")
        stopping = time.monotonic()
    # __exit__ stopped the sidecar within its 30 s, although the drift sink never returned.
    assert time.monotonic() - stopping < 30
    release.set()
    # Copies beyond the queue were dropped while the drift sink blocked the consumer; the rest were scored.
    scored = running.value("sidewatch_adversarial_inputs_total", model=MODEL, version="1", mode="shadow")
    assert scored > 0 and scored + running.value("sidewatch_tap_dropped_total") == 100
