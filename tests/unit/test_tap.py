"""The tap on its own: bounded, never blocking, decoding copies and isolating failing sinks."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.dataplane.tap import Tap
from agent.metrics import ProxyMetrics
from agent.protocol import oip_pb2
from tests.support.tap_records import tap_record


@pytest.fixture
def registry():
    return CollectorRegistry()


def _tap(registry, size=4) -> Tap:
    return Tap(ProxyMetrics(registry, max_models=8), size, poll_seconds=0.001)


def _value(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


def test_full_queue_drops_and_counts_without_blocking(registry):
    tap = _tap(registry, size=2)
    results = [tap.offer(tap_record()) for _ in range(5)]
    assert results == [True, True, False, False, False]
    assert _value(registry, "sidewatch_tap_dropped_total") == 3
    assert _value(registry, "sidewatch_tap_enqueued_total") == 2
    assert _value(registry, "sidewatch_tap_queue_depth") == 2


def test_a_queue_full_in_bytes_drops_copies_until_the_consumer_takes_them(registry):
    record = tap_record()
    size = len(record.request) + len(record.response)
    tap = Tap(ProxyMetrics(registry, max_models=8), 100, poll_seconds=0.001, max_queue_bytes=2 * size + size // 2)
    assert [tap.offer(record) for _ in range(4)] == [True, True, False, False]
    assert tap.queued_bytes == 2 * size
    assert _value(registry, "sidewatch_tap_dropped_total") == 2
    taken = []
    tap.add_sink("sink", taken.append)
    tap.start()
    try:
        deadline = time.monotonic() + 5
        while len(taken) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert tap.queued_bytes == 0
        assert tap.offer(record)
    finally:
        tap.stop()


def test_decode_unary_record(registry):
    inference = _tap(registry).decode(tap_record())
    np.testing.assert_array_equal(inference.inputs["x"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(inference.outputs["y"], [[0.25, 0.75]])
    assert (inference.model, inference.version) == ("m", "1")


def test_decode_streamed_record_unwraps_the_stream_response(registry):
    tap = _tap(registry)
    inference = tap.decode(tap_record(method="ModelStreamInfer"))
    np.testing.assert_array_equal(inference.outputs["y"], [[0.25, 0.75]])
    error = oip_pb2.ModelStreamInferResponse(error_message="model failed").SerializeToString()
    inference = tap.decode(tap_record(method="ModelStreamInfer", response=error))
    assert inference.outputs == {} and inference.inputs["x"].shape == (2, 3)


@pytest.mark.parametrize("part, record", [
    ("request", tap_record(request=b"\xff\xff\xff")),
    ("response", tap_record(response=b"\x0a\xff")),
    # Shape says 4 elements, the bytes hold 6 floats.
    ("request", tap_record(request=oip_pb2.ModelInferRequest(
        model_name="m", inputs=[oip_pb2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[4])],
        raw_input_contents=[np.zeros(6, np.float32).tobytes()]).SerializeToString())),
])
def test_malformed_copies_are_counted_not_raised(registry, part, record):
    assert _tap(registry).decode(record) is None
    assert _value(registry, "sidewatch_decode_errors_total", model="m", version="1", part=part) == 1


def test_consumer_delivers_to_every_sink_and_counts_a_failing_one(registry):
    tap = _tap(registry)
    delivered = []

    def broken(_):
        raise RuntimeError("detector bug")

    tap.add_sink("broken", broken)
    tap.add_sink("collector", delivered.append)
    tap.start()
    for _ in range(3):
        assert tap.offer(tap_record())
    deadline = time.monotonic() + 5
    while len(delivered) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    tap.stop()
    assert len(delivered) == 3
    assert _value(registry, "sidewatch_tap_sink_errors_total", sink="broken") == 3
    assert _value(registry, "sidewatch_tap_processed_total", model="m", version="1") == 3


def test_stop_drains_what_is_queued(registry):
    tap = _tap(registry, size=100)
    delivered = []
    tap.add_sink("collector", delivered.append)
    for _ in range(50):
        tap.offer(tap_record())
    tap.start()
    tap.stop()
    assert len(delivered) == 50
