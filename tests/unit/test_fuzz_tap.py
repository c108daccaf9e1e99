"""Fuzzing the tap consumer: bad copies of inference calls through a real Tap whose sinks are the real
detectors of the bundled model (feature squeezing in shadow mode, drift and anomaly).

Properties, for every input hypothesis makes (tests/support/fuzz_inputs.py): ``offer`` never raises; each copy is
accounted for exactly once (decoded, or counted as a decode error); no detector raises (what a detector
cannot take is counted by reason, never thrown); the consumer thread stays alive; and after the fuzzing a
good copy is still decoded, scored and watched for drift.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.dataplane.tap import Tap, TapRecord
from agent.detect.adversarial.watch import AdversarialWatch
from agent.detect.drift.watch import DriftWatch
from agent.detect.registry import DetectorRegistry
from agent.metrics import DetectionMetrics, DriftMetrics, ProxyMetrics
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol import oip_pb2
from tests.support.fuzz_inputs import MODEL, requests, responses, valid_request, valid_response

EXAMPLES = 1000


class Consumer:
    """A started Tap with the real detectors as sinks, and its counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Micro-batches of one row: each copy is scored while it is delivered, so a failure shows on
        # the input that caused it.
        config = load_config(overrides={"detection.model_repository": str(BUNDLED_REPOSITORY),
                                        "detection.device": "cpu", "detection.max_batch_size": 1})
        self.metrics = ProxyMetrics(self.registry, max_models=8)
        detectors = DetectorRegistry(BUNDLED_REPOSITORY, "cpu")
        self.watch = AdversarialWatch(detectors, config.detection, DetectionMetrics(self.registry), self.metrics.bounded,
                                      config.adversarial_modes())
        self.drift = DriftWatch(detectors, config.drift, DriftMetrics(self.registry), self.metrics.bounded)
        self.watch.score_listeners.append(self.drift.observe_scores)
        self.tap = Tap(self.metrics, 1024, poll_seconds=0.001)
        self.tap.add_sink("adversarial", self.watch)
        self.tap.add_sink("drift", self.drift)
        self.delivered = 0
        self.tap.add_sink("marker", self._delivered)   # last: the detectors are done with the copy
        self.offered = 0

    def _delivered(self, inference) -> None:
        self.delivered += 1

    def total(self, name: str) -> float:
        return sum(sample.value for metric in self.registry.collect() for sample in metric.samples
                   if sample.name == name)

    def accounted(self) -> float:
        return self.delivered + self.total("sidewatch_decode_errors_total")

    def feed(self, record: TapRecord) -> None:
        assert self.tap.offer(record)
        self.offered += 1
        deadline = time.monotonic() + 10
        while self.accounted() < self.offered:
            assert time.monotonic() < deadline, "the tap consumer stopped taking copies"
            time.sleep(0.0005)
        assert self.accounted() == self.offered
        assert self.total("sidewatch_tap_processed_total") == self.delivered


@pytest.fixture(scope="module")
def consumer():
    running = Consumer()
    running.tap.start()
    yield running
    running.tap.stop()
    running.watch.close()


def _record(method: str, request: bytes, response: bytes) -> TapRecord:
    if method == "ModelStreamInfer":
        try:
            inner = oip_pb2.ModelInferResponse.FromString(response)
            response = oip_pb2.ModelStreamInferResponse(infer_response=inner).SerializeToString()
        except Exception:  # noqa: BLE001 - a mutated response that does not parse goes as it is
            pass
    # The hot path labels copies with the model it peeked; the fuzzed bytes may say otherwise.
    return TapRecord(method, MODEL, "1", request, response, time.time(), 0.001)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(method=st.sampled_from(["ModelInfer", "ModelInfer", "ModelStreamInfer"]), request=requests(),
       response=responses())
def test_bad_copies_never_break_the_tap_or_a_detector(consumer, method, request, response):
    consumer.feed(_record(method, request, response))
    assert consumer.total("sidewatch_tap_sink_errors_total") == 0
    assert consumer.tap._thread.is_alive()


def test_after_the_fuzzing_a_good_copy_is_still_scored_and_watched(consumer):
    scored = consumer.total("sidewatch_adversarial_inputs_total")
    watched = consumer.total("sidewatch_drift_samples_total")
    for _ in range(70):   # more than a drift micro-batch
        consumer.feed(_record("ModelInfer", valid_request().SerializeToString(), valid_response().SerializeToString()))
    deadline = time.monotonic() + 10
    while consumer.total("sidewatch_drift_samples_total") < watched + 64:
        assert time.monotonic() < deadline, "good copies were not watched for drift"
        time.sleep(0.01)
    assert consumer.total("sidewatch_adversarial_inputs_total") >= scored + 70
    assert consumer.total("sidewatch_tap_sink_errors_total") == 0
