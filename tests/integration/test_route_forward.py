"""Route pins on both data planes: a real model server (mnist_cnn versions 1 and 2) behind a data plane with a
RouteTable, run in-process so the test can pin and unpin directly (the grpc.aio Forwarder, or the Envoy data
plane with a real Envoy, which learns of each change from the route files it watches); a second real model
server (serving the same network as version 7) as the fallback upstream."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
from grpc import aio
from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.dataplane.envoy.plane import EnvoyDataPlane
from agent.dataplane.policy import SidecarPolicy
from agent.dataplane.relay import Forwarder
from agent.dataplane.routes import Pin, RouteTable, rewrite_version
from agent.dataplane.tap import Tap
from agent.metrics import ProxyMetrics
from agent.protocol import codec, oip_pb2, paths
from tests.support.harness import free_port

MODEL = "mnist_cnn"


class InProcessProxy:
    """A data plane (``python``: a Forwarder on an aio server; ``envoy``: EnvoyDataPlane) with a RouteTable and
    the tap, on an event loop thread of its own."""

    def __init__(self, upstream_port: int, data_plane: str = "python") -> None:
        self.data_plane = data_plane
        self.plane = None
        self.routes = RouteTable(open_channel=lambda address: aio.insecure_channel(address))
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(upstream_port,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self, upstream_port: int) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start(upstream_port))
        self._ready.set()
        self.loop.run_forever()

    async def _start(self, upstream_port: int) -> None:
        metrics = ProxyMetrics(CollectorRegistry())
        self.tap = Tap(metrics, 1024)
        self.channel = aio.insecure_channel(f"127.0.0.1:{upstream_port}")
        self.server = aio.server()
        # The versions that served, for pins to the last known-good version (as the sidecar wires it).
        self.tap.add_sink("routes", self.routes.observe_inference)
        policy = SidecarPolicy(self.routes, self.tap)
        self.tap.start()
        if self.data_plane == "envoy":
            # A route hook in the config: Envoy's data plane makes room for pins only where one can pin.
            config = load_config(overrides={"listen": f"127.0.0.1:{self.port}", "data_plane": "envoy",
                                            "upstream.address": f"127.0.0.1:{upstream_port}",
                                            "rollback": {"hooks": {"pin": {"type": "route"}}}})
            self.plane = EnvoyDataPlane(config, metrics, policy)
            await self.plane.start()
            return
        self.server.add_generic_rpc_handlers([Forwarder(self.channel, metrics, policy)])
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    def settle(self, timeout: float = 5.0) -> float:
        """Wait until the data plane routes by the pins in force (at once on the python plane, which reads
        the table per call; Envoy within a second); returns the seconds waited."""
        started = time.monotonic()
        while self.plane is not None and not self.plane.pins.in_effect():
            assert time.monotonic() - started < timeout, "envoy has not applied the pins"
            time.sleep(0.01)
        return time.monotonic() - started

    def stop(self) -> None:
        async def shutdown():
            if self.plane is not None:
                await self.plane.stop()  # closes the policy (and the route table's channels) too
            await self.server.stop(0)
            await self.channel.close()
            await self.routes.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.tap.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def upstream(model_server):
    return model_server


@pytest.fixture(scope="module")
def fallback(fallback_server):
    return fallback_server


@pytest.fixture(scope="module", params=["python", "envoy"])
def proxy(request, upstream):
    proxy = InProcessProxy(upstream, request.param)
    yield proxy
    proxy.stop()


class SettlingRoutes:
    """The proxy's RouteTable, whose pin and unpin return once the data plane routes by them."""

    def __init__(self, proxy: InProcessProxy) -> None:
        self._proxy = proxy
        self._routes = proxy.routes

    def __getattr__(self, name):
        return getattr(self._routes, name)

    def pin(self, pin: Pin) -> Pin | None:
        previous = self._routes.pin(pin)
        assert self._proxy.settle() < 1.0, "a pin takes effect within a second"
        return previous

    def unpin(self, model: str) -> Pin | None:
        previous = self._routes.unpin(model)
        assert self._proxy.settle() < 1.0, "an unpin takes effect within a second"
        return previous


@pytest.fixture
def routes(proxy):
    yield SettlingRoutes(proxy)
    for model in list(proxy.routes.pins):
        proxy.routes.unpin(model)
    proxy.settle()


@pytest.fixture(scope="module")
def channel(proxy):
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
        yield channel


def _request(version: str = "", model: str = MODEL) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name=model, model_version=version, id="r1")
    codec.add_input(request, "input", np.full((1, 1, 28, 28), 0.5, np.float32))
    return request


def _infer(channel, request: oip_pb2.ModelInferRequest) -> oip_pb2.ModelInferResponse:
    call = channel.unary_unary(paths.MODEL_INFER, request_serializer=oip_pb2.ModelInferRequest.SerializeToString,
                               response_deserializer=oip_pb2.ModelInferResponse.FromString)
    return call(request, timeout=10)


def _stream(channel, requests: list[oip_pb2.ModelInferRequest]) -> list[oip_pb2.ModelStreamInferResponse]:
    call = channel.stream_stream(paths.MODEL_STREAM_INFER,
                                 request_serializer=oip_pb2.ModelInferRequest.SerializeToString,
                                 response_deserializer=oip_pb2.ModelStreamInferResponse.FromString)
    return list(call(iter(requests), timeout=10))


def _metadata_versions(channel) -> list[str]:
    call = channel.unary_unary(paths.MODEL_METADATA, request_serializer=oip_pb2.ModelMetadataRequest.SerializeToString,
                               response_deserializer=oip_pb2.ModelMetadataResponse.FromString)
    return list(call(oip_pb2.ModelMetadataRequest(name=MODEL), timeout=10).versions)


def test_nothing_pinned_requests_reach_the_version_they_name(channel, routes):
    assert not routes.active
    assert _infer(channel, _request()).model_version == "2"      # the latest
    assert _infer(channel, _request("1")).model_version == "1"


def test_version_pin_rewrites_unary_and_streamed_requests_until_unpinned(channel, routes):
    routes.pin(Pin(MODEL, "1", None))
    assert routes.active
    assert _infer(channel, _request()).model_version == "1"
    assert _infer(channel, _request("2")).model_version == "1"     # a request naming the bad version too
    replies = _stream(channel, [_request(), _request("2"), _request()])
    assert [reply.infer_response.model_version for reply in replies] == ["1", "1", "1"]
    assert routes.unpin(MODEL) is not None
    assert not routes.active
    assert _infer(channel, _request()).model_version == "2"
    assert [r.infer_response.model_version for r in _stream(channel, [_request()])] == ["2"]


def test_pin_of_another_model_leaves_this_one_alone(channel, routes):
    routes.pin(Pin("some_other_model", "1", None))
    assert routes.active
    assert _infer(channel, _request()).model_version == "2"


def test_upstream_pin_sends_the_models_calls_to_the_fallback(channel, routes, fallback):
    routes.pin(Pin(MODEL, None, f"127.0.0.1:{fallback}"))
    assert _infer(channel, _request()).model_version == "7"
    assert _metadata_versions(channel) == ["7"]
    replies = _stream(channel, [_request(), _request()])
    assert [reply.infer_response.model_version for reply in replies] == ["7", "7"]
    routes.unpin(MODEL)
    assert _infer(channel, _request()).model_version == "2"
    assert _metadata_versions(channel) == ["1", "2"]


def test_upstream_pin_of_another_model_leaves_streams_of_this_one_on_the_main_upstream(proxy, channel, routes,
                                                                                      fallback):
    routes.pin(Pin("some_other_model", None, f"127.0.0.1:{fallback}"))
    assert routes.upstream_pins
    replies = _stream(channel, [_request(), _request("1")])
    assert [reply.infer_response.model_version for reply in replies] == ["2", "1"]
    if proxy.data_plane == "python":
        assert _stream(channel, []) == []
    else:
        # Envoy's gRPC field extraction filter (agent/dataplane/envoy/model_routing.py) refuses a stream that
        # ends before its first message.
        with pytest.raises(grpc.RpcError) as error:
            _stream(channel, [])
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_a_first_message_over_a_mebibyte_is_carried_pinned_or_not(channel, routes):
    """Under Envoy the field extraction filter holds each model-scoped call's first message whole; its
    route lets it hold up to max_message_bytes, not the listener's 1 MiB (a 2.1 MB request was refused
    FAILED_PRECONDITION before)."""
    big = oip_pb2.ModelInferRequest(model_name=MODEL, id="big")
    codec.add_input(big, "input", np.full((700, 1, 28, 28), 0.5, np.float32))
    assert big.ByteSize() > 2 << 20
    reply = _infer(channel, big)
    assert reply.model_version == "2" and reply.outputs[0].shape[0] == 700
    routes.pin(Pin(MODEL, "1", None))
    assert _infer(channel, big).model_version == "1"


def test_malformed_request_while_pinned_gets_the_upstreams_error(channel, routes):
    routes.pin(Pin(MODEL, "1", None))
    call = channel.unary_unary(paths.MODEL_INFER)
    # Field 1 (model name) then a length prefix that runs past the end.
    with pytest.raises(grpc.RpcError) as error:
        call(b"\x0a\x09mnist_cnn\x22\xff\x01", timeout=10)
    assert error.value.code() is not grpc.StatusCode.OK
    assert _infer(channel, _request()).model_version == "1"   # the proxy is still there


def test_the_tap_records_which_versions_served(channel, routes):
    _infer(channel, _request())
    routes.pin(Pin(MODEL, "1", None))
    _infer(channel, _request())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not {"1", "2"} <= set(routes.served_versions(MODEL)):
        time.sleep(0.05)
    assert {"1", "2"} <= set(routes.served_versions(MODEL))
    assert routes.last_known_good(MODEL, "2") == "1"
    assert routes.last_known_good(MODEL, "1") == "2"


def test_rewrite_version_keeps_everything_else():
    request = _request("2")
    request.parameters["priority"].int64_param = 3
    rewritten = oip_pb2.ModelInferRequest.FromString(rewrite_version(request.SerializeToString(), "1"))
    assert rewritten.model_version == "1"
    request.model_version = "1"
    assert rewritten == request


def test_pin_to_an_upstream_needs_a_channel_opener():
    with pytest.raises(ValueError, match="fallback upstream"):
        RouteTable().pin(Pin(MODEL, None, "127.0.0.1:1"))
