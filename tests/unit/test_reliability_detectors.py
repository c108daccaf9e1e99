"""Detector faults: a detector that raises, hangs or is slow never touches the forwarded calls; the failure
is counted, logged once per interval, and the tap's worker recovers.

First the tap on its own (real threads, sinks that misbehave), then a whole sidecar in shadow mode with
the bundled model server and its real detectors, one of them broken on purpose. Raising detectors in
every mode are covered by test_detector_faults.py; timings (p99 with a failing detector against
without) are in bench/faults.py.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.dataplane.tap import Tap
from agent.demo.data import load_images
from agent.logs import ThrottledLog
from agent.metrics import ProxyMetrics
from agent.protocol.client import InferenceClient
from tests.support.in_process import MODEL, InProcessSidecar, sidecar_config
from tests.support.tap_records import tap_record


def wait_for(condition, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _value(registry, name, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _lines(caplog, fragment: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if fragment in record.getMessage()]


# --- the throttle ----------------------------------------------------------------------------------


def test_throttled_log_writes_once_per_interval_and_says_how_many_it_left_out(caplog):
    now = [100.0]
    throttled = ThrottledLog(logging.getLogger("test.throttle"), interval_seconds=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        logged = []
        for second in range(0, 150):          # one failure a second for 150 s
            now[0] = 100.0 + second
            logged.append(throttled.warning("sink-a", "sink %s failed", "a"))
        assert throttled.warning("sink-b", "sink %s failed", "b")   # another key has its own interval
    assert [second for second, done in enumerate(logged) if done] == [0, 60, 120]
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["sink a failed", "sink a failed (59 more like this in the last 60 s, not logged)",
                        "sink a failed (59 more like this in the last 60 s, not logged)", "sink b failed"]


# --- the tap on its own ----------------------------------------------------------------------------


def _tap(registry, size=1024, timeout=0.5) -> Tap:
    return Tap(ProxyMetrics(registry, max_models=8), size, poll_seconds=0.001, sink_timeout_seconds=timeout)


def test_raising_sink_is_counted_every_time_and_logged_once(caplog):
    registry = CollectorRegistry()
    tap = _tap(registry)
    delivered = []

    def broken(_):
        raise RuntimeError("detector bug")

    tap.add_sink("broken", broken)
    tap.add_sink("collector", delivered.append)
    with caplog.at_level(logging.ERROR, logger="agent.dataplane.tap"):
        tap.start()
        for _ in range(200):
            assert tap.offer(tap_record())
        wait_for(lambda: len(delivered) == 200, "every copy at the healthy sink")
        tap.stop()
    assert _value(registry, "sidewatch_tap_sink_errors_total", sink="broken") == 200
    failures = _lines(caplog, "tap sink broken failed")
    assert len(failures) == 1 and failures[0].exc_info is not None   # with its traceback, once


def test_hung_sink_is_given_up_on_the_others_go_on_and_it_resumes_when_it_returns(caplog):
    registry = CollectorRegistry()
    tap = _tap(registry, timeout=0.5)
    release = threading.Event()
    hung_calls, delivered = [], []

    def hangs(inference):
        hung_calls.append(inference)
        if len(hung_calls) == 1:
            release.wait(60)                  # the first call hangs until the test lets it go

    tap.add_sink("hangs", hangs)
    tap.add_sink("collector", delivered.append)
    with caplog.at_level(logging.WARNING, logger="agent.dataplane.tap"):
        tap.start()
        assert tap.offer(tap_record())
        wait_for(lambda: hung_calls, "the first call into the hanging sink")
        # Given up on after the timeout: the collector gets copies again, the hung sink none.
        wait_for(lambda: _value(registry, "sidewatch_tap_sink_timeouts_total", sink="hangs") == 1, "the timeout")
        for _ in range(20):
            assert tap.offer(tap_record())
        wait_for(lambda: len(delivered) == 20, "copies at the healthy sink while the other hangs")
        assert len(hung_calls) == 1
        assert len(_lines(caplog, "tap sink hangs has not returned")) == 1

        release.set()                         # the hung call returns: the sink gets copies again
        wait_for(lambda: _lines(caplog, "tap sink hangs returned"), "the hung call to return")
        for _ in range(5):
            assert tap.offer(tap_record())
        wait_for(lambda: len(delivered) == 25 and len(hung_calls) == 6, "both sinks fed again")
        tap.stop()
    assert _value(registry, "sidewatch_tap_sink_timeouts_total", sink="hangs") == 1
    assert _value(registry, "sidewatch_tap_sink_errors_total", sink="hangs") == 0


def test_slow_sink_fills_the_queue_drops_are_counted_and_logged_once_then_it_catches_up(caplog):
    registry = CollectorRegistry()
    tap = _tap(registry, size=8)
    slow = threading.Event()
    slow.set()
    seen = []

    def sink(inference):
        seen.append(inference)
        if slow.is_set():
            time.sleep(0.05)

    tap.add_sink("slow", sink)
    with caplog.at_level(logging.WARNING, logger="agent.dataplane.tap"):
        tap.start()
        offered = [tap.offer(tap_record()) for _ in range(100)]     # faster than 20 copies a second
        assert not all(offered)                                   # the queue filled: offer never waited
        dropped = _value(registry, "sidewatch_tap_dropped_total")
        assert dropped == offered.count(False) > 0
        assert len(_lines(caplog, "tap queue full")) == 1
        slow.clear()                                              # the detector is fast again
        wait_for(lambda: len(seen) == offered.count(True), "the queue to drain")
        assert all(tap.offer(tap_record()) for _ in range(8))
        wait_for(lambda: len(seen) == offered.count(True) + 8, "new copies processed")
        tap.stop()
    assert _value(registry, "sidewatch_tap_sink_timeouts_total", sink="slow") == 0


# --- a whole sidecar in shadow mode, one real detector broken ----------------------------------------


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
