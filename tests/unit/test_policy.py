"""The data plane's policy alone: what its before and after steps decide, with no gRPC around it.

The inline detector is the real adversarial watch on the bundled, calibrated model; the route table and
the tap are the sidecar's own.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.dataplane.call_log import CallLog
from agent.dataplane.policy import Policy, SidecarPolicy
from agent.dataplane.routes import Pin, RouteTable
from agent.dataplane.tap import Tap, TapRecord
from agent.detect.adversarial.watch import ERROR_KEY, SCORE_KEY, VERDICT_KEY, AdversarialWatch
from agent.detect.registry import DetectorRegistry
from agent.metrics import DetectionMetrics, ProxyMetrics
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol import codec, oip_pb2
from tests.support.adversarial_data import adversarial_and_benign

MODEL = "mnist_cnn"


class Context:
    """The one thing the after step reads of a call's server context: the caller's metadata."""

    def invocation_metadata(self):
        return (("x-request-id", "req-7"),)


@pytest.fixture(scope="module")
def watch():
    """The adversarial watch on the bundled repository, mnist_cnn in enforce mode."""
    config = load_config(overrides={"detection.model_repository": str(BUNDLED_REPOSITORY)})
    watch = AdversarialWatch(DetectorRegistry(BUNDLED_REPOSITORY, "cpu"), config.detection,
                             DetectionMetrics(CollectorRegistry()), ProxyMetrics(CollectorRegistry()).bounded,
                             modes={MODEL: "enforce"})
    yield watch
    watch.close()


def _request(rows: np.ndarray, version: str = "2") -> bytes:
    message = oip_pb2.ModelInferRequest(model_name=MODEL, model_version=version)
    codec.add_input(message, "input", rows)
    return message.SerializeToString()


def test_the_plain_policy_relays_everything_unchanged():
    policy = Policy()
    request = _request(adversarial_and_benign()[1][:1])
    assert policy.before(MODEL, "2", request, inference=True) is None
    assert policy.stream_request(request) is request
    assert policy.stream_upstream(request) is None
    assert not policy.steers_streams and not policy.keeps_copies


def test_nothing_pinned_and_shadow_mode_decide_nothing():
    policy = SidecarPolicy(RouteTable(), verdicts=None)
    assert policy.before(MODEL, "2", _request(adversarial_and_benign()[1][:1]), inference=True) is None


def test_a_version_pin_rewrites_inference_requests_only():
    routes = RouteTable()
    routes.pin(Pin(MODEL, "1", None))
    policy = SidecarPolicy(routes)
    request = _request(adversarial_and_benign()[1][:1], version="2")
    before = policy.before(MODEL, "2", request, inference=True)
    assert before.version == "1" and before.upstream is None and before.verdict is None
    assert oip_pb2.ModelInferRequest.FromString(before.request).model_version == "1"
    streamed = policy.stream_request(request)
    assert oip_pb2.ModelInferRequest.FromString(streamed).model_version == "1"
    # ModelMetadata and friends name the model too, but carry no version to rewrite.
    metadata_call = policy.before(MODEL, "2", b"metadata", inference=False)
    assert metadata_call.request == b"metadata" and metadata_call.version == "2"
    assert policy.before("other_model", "2", request, inference=True) is None


def test_an_upstream_pin_sends_calls_and_streams_to_the_fallback_channel():
    opened = []

    def open_channel(address):
        opened.append(address)
        return f"channel to {address}"

    routes = RouteTable(open_channel)
    policy = SidecarPolicy(routes)
    assert not policy.steers_streams
    routes.pin(Pin(MODEL, None, "127.0.0.1:9999"))
    request = _request(adversarial_and_benign()[1][:1])
    before = policy.before(MODEL, "2", request, inference=True)
    assert before.upstream == "channel to 127.0.0.1:9999" and before.request is request
    assert policy.steers_streams
    assert policy.stream_upstream(request) == "channel to 127.0.0.1:9999"
    assert opened == ["127.0.0.1:9999"]  # opened once, then reused


def test_enforce_mode_waits_for_a_verdict_that_refuses_an_adversarial_input(watch):
    adversarial, benign = adversarial_and_benign()
    policy = SidecarPolicy(RouteTable(), verdicts=watch)

    async def judge(rows):
        before = policy.before(MODEL, "1", _request(rows, version="1"), inference=True)
        assert before.enforce and before.verdict is not None
        return await before.verdict

    refused = asyncio.run(judge(adversarial[:1]))
    assert refused.rejection().startswith("sidewatch: input rejected as adversarial")
    assert dict(refused.metadata())[VERDICT_KEY] == "true"
    passed = asyncio.run(judge(benign[:1]))
    assert passed.rejection() is None and dict(passed.metadata())[VERDICT_KEY] == "false"
    assert float(dict(passed.metadata())[SCORE_KEY]) <= watch.registry.get(MODEL, "1").threshold


def test_a_request_the_detector_cannot_judge_goes_on_with_the_reason_in_its_trailers(watch):
    policy = SidecarPolicy(RouteTable(), verdicts=watch)
    # FP64 for an FP32 input: the model server refuses it, so the detector must not judge it.
    request = _request(adversarial_and_benign()[0][:1].astype(np.float64), version="1")
    assert oip_pb2.ModelInferRequest.FromString(request).inputs[0].datatype == "FP64"

    async def judge():
        return await policy.before(MODEL, "1", request, inference=True).verdict

    verdict = asyncio.run(judge())
    assert verdict.rejection() is None and dict(verdict.metadata()) == {ERROR_KEY: "wrong_datatype"}


def test_the_after_steps_copy_answered_inferences_to_the_tap_and_log_failed_calls(caplog):
    registry = CollectorRegistry()
    tap = Tap(ProxyMetrics(registry), queue_size=4)
    policy = SidecarPolicy(RouteTable(), tap, CallLog())
    assert policy.keeps_copies
    policy.completed(TapRecord("ModelInfer", MODEL, "2", b"request", b"response", 0.0, 0.001))
    assert registry.get_sample_value("sidewatch_tap_enqueued_total") == 1
    with caplog.at_level(logging.INFO, logger="sidewatch.calls"):
        policy.finished(Context(), (MODEL, "2", "ModelInfer"), grpc.StatusCode.OK, 0.001)
        assert not caplog.records  # an answered call is not logged without log_requests
        policy.finished(Context(), (MODEL, "2", "ModelInfer"), grpc.StatusCode.UNAVAILABLE, 0.001)
    [line] = caplog.records
    assert line.request_id == "req-7" and line.code == "UNAVAILABLE"


class QueryChecksSeen:
    """A query detector that refuses the clients it is told to, and remembers what it was asked."""

    def __init__(self, refused: set[str]) -> None:
        self.refused = refused
        self.asked: list[tuple[str, str]] = []

    def watches(self, model: str) -> bool:
        return model == MODEL

    def check(self, model: str, client: str, request: bytes) -> str | None:
        self.asked.append((model, client))
        return "sidewatch: client refused" if client in self.refused else None


class PeerContext(Context):
    def __init__(self, peer: str, metadata=(), auth=None) -> None:
        self._peer, self._metadata, self._auth = peer, metadata, auth or {}

    def peer(self):
        return self._peer

    def invocation_metadata(self):
        return self._metadata

    def auth_context(self):
        return self._auth


def test_query_checks_come_first_and_a_refused_client_starts_no_verdict(watch):
    from agent.dataplane.identity import relay_identity

    queries = QueryChecksSeen({"metadata:mallory"})
    policy = SidecarPolicy(RouteTable(), verdicts=watch, queries=queries,
                           identity=relay_identity("metadata", "x-client-id"))
    request = _request(adversarial_and_benign()[1][:1])

    async def before(model: str, inference: bool, context: PeerContext):
        decided = policy.before(model, "2", request, inference=inference, context=context)
        if decided is not None and decided.verdict is not None:
            await decided.verdict
        return decided

    refused = asyncio.run(before(MODEL, True, PeerContext("ipv4:10.0.0.9:5555", (("x-client-id", "mallory"),))))
    assert refused.refusal == "sidewatch: client refused" and refused.verdict is None
    # Without the key, the client is its peer address; it goes on to the verdict (enforce mode).
    allowed = asyncio.run(before(MODEL, True, PeerContext("ipv6:%5B::1%5D:5555")))
    assert allowed.refusal is None and allowed.enforce
    # Other models, and calls that are not inferences, are not handed over.
    asyncio.run(before("other", True, PeerContext("ipv4:10.0.0.9:5555")))
    asyncio.run(before(MODEL, False, PeerContext("ipv4:10.0.0.9:5555")))
    assert queries.asked == [(MODEL, "metadata:mallory"), (MODEL, "peer:[::1]")]


def test_identities_by_peer_certificate_or_metadata():
    from agent.dataplane.identity import relay_identity

    context = PeerContext("ipv4:10.0.0.9:5555", (("x-client-id", "alice"), ("x-id-bin", b"\x01\x02")),
                          {"x509_subject": [b"CN=alice,O=example"], "x509_common_name": [b"alice"]})
    assert relay_identity("peer", "")(context) == "peer:10.0.0.9"
    assert relay_identity("certificate", "")(context) == "certificate:CN=alice,O=example"
    assert relay_identity("certificate", "")(PeerContext("ipv4:10.0.0.9:1")) == "peer:10.0.0.9"
    assert relay_identity("metadata", "x-client-id")(context) == "metadata:alice"
    assert relay_identity("metadata", "x-id-bin")(context) == "metadata:0102"
    assert relay_identity("metadata", "x-absent")(context) == "peer:10.0.0.9"
