"""The Envoy tap's parts without Envoy: gRPC frames out of body chunks (frames.py), the ExternalProcessor
service fed a copy's messages as Envoy sends them (ext_proc.py) and the sampling controller (sampling.py).
The whole, with a real Envoy, is tests/integration/test_envoy_tap_sidecar.py."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.dataplane.envoy.ext_proc import TapProcessor, ext_proc_cluster
from agent.dataplane.envoy.frames import Frames
from agent.dataplane.envoy.sampling import SamplingController
from agent.metrics import ProxyMetrics
from agent.protocol import oip_pb2, paths


def frame(message: bytes, compressed: bool = False) -> bytes:
    return bytes([int(compressed)]) + len(message).to_bytes(4, "big") + message


def test_frames_cut_anywhere_come_out_whole_and_in_order():
    messages = [b"", b"a" * 7, bytes(range(256)) * 3, b"z"]
    wire = b"".join(frame(m) for m in messages)
    for cut in (1, 2, 5, 6, 64, len(wire)):
        frames = Frames(max_message_bytes=1024, max_buffer_bytes=2048)
        out = []
        for start in range(0, len(wire), cut):
            out += frames.feed(wire[start:start + cut])
        assert out == messages, cut
        assert frames.buffered == 0 and frames.error is None


def test_a_frame_over_the_message_bound_is_refused_at_its_header():
    frames = Frames(max_message_bytes=100, max_buffer_bytes=1000)
    assert frames.feed(frame(b"x" * 100)) == [b"x" * 100]
    assert frames.feed(frame(b"x" * 101)[:5]) == []  # only the header: refused before the bytes come
    assert frames.error == "too_large" and frames.buffered == 0
    assert frames.feed(frame(b"y")) == []  # broken for good: the boundaries after it are unknown


def test_the_buffer_bound_holds_whatever_the_chunks():
    frames = Frames(max_message_bytes=1000, max_buffer_bytes=600)
    assert frames.feed(frame(b"x" * 1000)[:500]) == []
    assert frames.error is None
    frames.feed(b"x" * 200)
    assert frames.error == "buffer" and frames.buffered == 0


def test_a_compressed_message_is_not_copied():
    frames = Frames(max_message_bytes=1000, max_buffer_bytes=2000)
    assert frames.feed(frame(b"abc", compressed=True)) == []
    assert frames.error == "compressed"


def test_over_the_budget_the_share_falls_in_proportion():
    controller = SamplingController(budget_cores=1.0, headroom=0.8)
    assert controller.next_ratio(1.0, cpu_cores=1.6, queue_load=0.0) == pytest.approx(0.5)
    assert controller.next_ratio(0.5, cpu_cores=4.0, queue_load=0.0) == pytest.approx(0.1)


def test_under_the_aim_the_share_climbs_at_most_doubling():
    controller = SamplingController(budget_cores=1.0, headroom=0.8)
    assert controller.next_ratio(0.1, cpu_cores=0.01, queue_load=0.0) == pytest.approx(0.2)
    assert controller.next_ratio(0.1, cpu_cores=0.5, queue_load=0.0) == pytest.approx(0.16)
    assert controller.next_ratio(0.9, cpu_cores=0.0, queue_load=0.0) == 1.0


def test_between_the_aim_and_the_budget_the_share_holds():
    controller = SamplingController(budget_cores=1.0, headroom=0.8)
    assert controller.next_ratio(0.3, cpu_cores=0.9, queue_load=0.0) == pytest.approx(0.3)


def test_a_filling_queue_halves_the_share_whatever_the_cpu():
    controller = SamplingController(budget_cores=1.0)
    assert controller.next_ratio(0.8, cpu_cores=0.0, queue_load=0.6) == pytest.approx(0.4)
    assert controller.next_ratio(0.8, cpu_cores=0.0, queue_load=0.5) == 1.0


def test_the_share_never_falls_below_the_floor():
    controller = SamplingController(budget_cores=0.01, min_ratio=0.01)
    ratio = 1.0
    for _ in range(50):  # a budget that cannot hold: the floor, not zero
        ratio = controller.next_ratio(ratio, cpu_cores=0.5, queue_load=1.0)
    assert ratio == 0.01


def test_the_share_settles_where_the_budget_holds():
    """A sidecar whose CPU is 0.05 cores idle plus 2 cores at every call copied: the share settles where the
    CPU is between the aim and the budget."""
    controller = SamplingController(budget_cores=1.0, headroom=0.8)
    ratio = 1.0
    for _ in range(30):
        ratio = controller.next_ratio(ratio, cpu_cores=0.05 + 2.0 * ratio, queue_load=0.0)
    assert 0.8 * 1.0 - 0.02 <= 0.05 + 2.0 * ratio <= 1.0  # within a percent step of the aim


def test_copies_lost_between_envoy_and_the_tap_cut_the_share_whatever_the_cpu():
    """Envoy refusing ext_proc streams (sidewatch behind, the CPU short elsewhere) is a reason of its own."""
    controller = SamplingController(budget_cores=1.0, headroom=0.8)
    assert controller.next_ratio(1.0, cpu_cores=0.3, queue_load=0.0, lost_share=0.25) == pytest.approx(0.6)
    assert controller.next_ratio(1.0, cpu_cores=0.3, queue_load=0.0, lost_share=0.005) == 1.0  # noise: climbs


# --- TapProcessor: one copy's stream, as Envoy's ext_proc filter sends it -------------------------------

class Records:
    """The policy's side of the tap: the records it is handed."""

    def __init__(self) -> None:
        self.records = []

    def completed(self, record) -> None:
        self.records.append(record)


def _headers(**fields: str) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in fields.items()])


def request_headers(path: str) -> ext_proc_pb2.ProcessingRequest:
    return ext_proc_pb2.ProcessingRequest(request_headers=ext_proc_pb2.HttpHeaders(headers=_headers(**{":path": path})))


def request_body(*messages: bytes) -> ext_proc_pb2.ProcessingRequest:
    return ext_proc_pb2.ProcessingRequest(request_body=ext_proc_pb2.HttpBody(body=b"".join(frame(m) for m in messages)))


def response_headers(end_of_stream: bool = False, **fields: str) -> ext_proc_pb2.ProcessingRequest:
    return ext_proc_pb2.ProcessingRequest(response_headers=ext_proc_pb2.HttpHeaders(
        headers=_headers(**{":status": "200", **fields}), end_of_stream=end_of_stream))


def response_body(*messages: bytes) -> ext_proc_pb2.ProcessingRequest:
    return ext_proc_pb2.ProcessingRequest(response_body=ext_proc_pb2.HttpBody(body=b"".join(frame(m) for m in messages)))


def response_trailers(status: str) -> ext_proc_pb2.ProcessingRequest:
    return ext_proc_pb2.ProcessingRequest(response_trailers=ext_proc_pb2.HttpTrailers(
        trailers=_headers(**{"grpc-status": status})))


INFER = oip_pb2.ModelInferRequest(model_name="m", model_version="1").SerializeToString()
ANSWER = oip_pb2.ModelInferResponse(model_name="m", model_version="1").SerializeToString()
STREAM_ANSWER = oip_pb2.ModelStreamInferResponse(
    infer_response=oip_pb2.ModelInferResponse(model_name="m")).SerializeToString()


def process(messages, then: type[BaseException] | None = None) -> tuple[TapProcessor, Records, CollectorRegistry]:
    """Runs one copy's stream of ``messages`` through a TapProcessor; ``then``: the stream ends with that
    exception after them (asyncio.CancelledError: Envoy reset it) instead of ending plainly."""
    registry, records = CollectorRegistry(), Records()
    processor = TapProcessor(load_config(), ProxyMetrics(registry), records)

    async def stream():
        for message in messages:
            yield message
        if then is not None:
            raise then()

    async def run():
        await processor.Process(stream(), None)

    if then is None:
        asyncio.run(run())
    else:
        with pytest.raises(then):
            asyncio.run(run())
    return processor, records, registry


def dropped(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("sidewatch_tap_copies_dropped_total", {"reason": reason})


def test_a_whole_model_infer_copy_is_handed_on_and_nothing_is_lost():
    processor, records, registry = process([request_headers(paths.MODEL_INFER), request_body(INFER),
                                            response_headers(), response_body(ANSWER), response_trailers("0")])
    assert [(r.method, r.model, r.request, r.response) for r in records.records] == [
        ("ModelInfer", "m", INFER, ANSWER)]
    assert dropped(registry, "closed") == 0 and processor.closed == 0


@pytest.mark.parametrize("then", [None, asyncio.CancelledError])
@pytest.mark.parametrize("before", ["request", "response"])
def test_a_model_infer_stream_closed_before_its_trailers_counts_the_copy_as_lost(then, before):
    """Envoy closes the copy's stream deferred_close_timeout after the call, read or not: when sidewatch is
    behind, the stream ends (or is reset: cancelled) before the trailers are read, and the copy is lost."""
    messages = [request_headers(paths.MODEL_INFER), request_body(INFER)]
    if before == "response":
        messages += [response_headers(), response_body(ANSWER)]
    processor, records, registry = process(messages, then)
    assert records.records == []
    assert dropped(registry, "closed") == 1 and processor.closed == 1
    assert processor.holdings.held == 0


def test_a_stream_reset_before_anything_was_read_is_a_lost_copy():
    processor, _, registry = process([], asyncio.CancelledError)
    assert dropped(registry, "closed") == 1 and processor.closed == 1


def test_a_trailers_only_error_ends_the_copy_without_a_loss():
    """An error answered trailers-only (its status in the response headers) is no copy, and no lost one; the
    stream ends there, not when Envoy closes it."""
    processor, records, registry = process([request_headers(paths.MODEL_INFER), request_body(INFER),
                                            response_headers(end_of_stream=True, **{"grpc-status": "5"})])
    assert records.records == []
    assert dropped(registry, "closed") == 0 and processor.closed == 0


def test_a_copy_dropped_for_its_size_is_not_counted_again_when_its_stream_closes():
    registry, records = CollectorRegistry(), Records()
    processor = TapProcessor(load_config(overrides={"tap.max_message_bytes": 1024}), ProxyMetrics(registry), records)

    async def stream():
        yield request_headers(paths.MODEL_INFER)
        yield request_body(b"x" * 2048)
        raise asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(processor.Process(stream(), None))
    assert dropped(registry, "too_large") == 1 and dropped(registry, "closed") == 0


def test_a_model_stream_infer_closed_early_loses_the_requests_left_without_their_response():
    processor, records, registry = process([request_headers(paths.MODEL_STREAM_INFER), request_body(INFER, INFER, INFER),
                                            response_body(STREAM_ANSWER)], asyncio.CancelledError)
    assert len(records.records) == 1
    assert dropped(registry, "closed") == 2 and processor.closed == 2


def test_a_model_stream_infer_that_ends_loses_nothing():
    processor, records, registry = process([request_headers(paths.MODEL_STREAM_INFER), request_body(INFER, INFER),
                                            response_headers(), response_body(STREAM_ANSWER, STREAM_ANSWER),
                                            response_trailers("0")])
    assert len(records.records) == 2
    assert dropped(registry, "closed") == 0 and processor.closed == 0


def test_envoys_circuit_breaker_bounds_the_tap_streams_to_max_streams():
    """Envoy refuses a copy beyond tap.max_streams (counted as reason envoy) rather than holding up to its
    default of 1,024 streams."""
    cluster = ext_proc_cluster(7000, max_streams=8)
    assert cluster["circuit_breakers"]["thresholds"] == [
        {"priority": "DEFAULT", "max_requests": 8, "max_pending_requests": 8}]


def test_a_stream_past_its_pending_bytes_loses_those_copies_not_the_stream_and_pairs_the_rest_rightly():
    """tap.max_pending_stream_bytes: the copies past it are dropped one by one (reason unpaired); the
    responses of the dropped requests are passed over, and the copies after them pair with their own."""
    registry, records = CollectorRegistry(), Records()
    requests = [oip_pb2.ModelInferRequest(model_name="m", id=str(number), raw_input_contents=[bytes(600)])
                .SerializeToString() for number in range(4)]
    config = load_config(overrides={"tap.max_pending_stream_bytes": 2 * len(requests[0]) + 1})
    processor = TapProcessor(config, ProxyMetrics(registry), records)
    answers = [oip_pb2.ModelStreamInferResponse(infer_response=oip_pb2.ModelInferResponse(
        model_name="m", id=str(number))).SerializeToString() for number in range(4)]

    async def stream():
        yield request_headers(paths.MODEL_STREAM_INFER)
        yield request_body(*requests[:3])  # the third has no room
        yield response_headers()
        yield response_body(*answers[:3])
        yield request_body(requests[3])  # room again
        yield response_body(answers[3])
        yield response_trailers("0")

    asyncio.run(processor.Process(stream(), None))
    assert [(r.request, r.response) for r in records.records] == [
        (requests[0], answers[0]), (requests[1], answers[1]), (requests[3], answers[3])]
    assert dropped(registry, "unpaired") == 1 and dropped(registry, "buffer") == 0
    assert processor.holdings.held == 0
