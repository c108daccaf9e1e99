"""Detector faults, the tap on its own (real threads, sinks that misbehave): a sink that raises, hangs or is
slow is counted, logged once per interval, and the tap's worker recovers; and the throttled log behind it.

A whole sidecar with real detectors broken on purpose: tests/integration/test_reliability_detectors_sidecar.py;
raising detectors in every mode: tests/integration/test_detector_faults.py; timings (p99 with a failing
detector against without) are in bench/faults.py.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry

from agent.dataplane.tap import Tap
from agent.logs import ThrottledLog
from agent.metrics import ProxyMetrics
from tests.support.polling import wait_for
from tests.support.tap_records import tap_record


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
