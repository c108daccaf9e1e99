"""The verdict filter's share of Envoy's configuration (agent/dataplane/envoy/verdicts.py): which models it
routes, and the routes it writes around the tap's."""

from __future__ import annotations

import asyncio
import time

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2

from agent.config import load_config
from agent.dataplane.envoy import ext_proc, verdicts
from agent.protocol import paths


def _config(default: str, models: dict[str, str]):
    return load_config(overrides={"detection.adversarial_mode": default,
                                  **{f"models.{name}.adversarial_mode": mode for name, mode in models.items()}})


def test_no_inline_routing_without_a_detector_or_with_every_model_in_shadow_mode():
    assert verdicts.inline_routing(_config("flag", {}), detector=False) is None
    assert verdicts.inline_routing(_config("shadow", {"m": "shadow"}), detector=True) is None
    routing = verdicts.inline_routing(_config("shadow", {"m": "enforce"}), detector=True)
    assert (routing.default_mode, dict(routing.modes), routing.header) == ("shadow", {"m": "enforce"}, verdicts.HEADER)


def test_every_model_infer_route_gets_an_enforce_and_a_flag_twin_before_it():
    routes = verdicts.inline_routes(ext_proc.sampled_routes("upstream"), "upstream", 1024)
    infer = [route for route in routes if route["match"].get("path") == paths.MODEL_INFER]
    # sampled: enforce twin, flag twin, plain; then the same unsampled; twins matched on the Lua filter's header
    modes = [(route["match"].get("headers") or [{}])[0].get("string_match", {}).get("exact") for route in infer]
    assert modes == ["enforce", "flag", None, "enforce", "flag", None]
    for route, mode in zip(infer, modes):
        filters = route["typed_per_filter_config"]
        blocking, copies = filters[verdicts.FILTER]["config"], filters[verdicts.COPY_FILTER]["config"]
        assert blocking.get("disabled", False) is (mode is None)
        assert copies.get("disabled", False) is (mode != "flag")  # only flag calls are copied
        # Flag: the verdict filter sees the trailers alone, so nothing holds the request.
        overridden = blocking.get("overrides", {}).get("processing_mode")
        assert overridden == (verdicts.TRAILERS_ONLY if mode == "flag" else None)
        assert route["request_body_buffer_limit"] == 1024 + 5
    assert "runtime_fraction" in infer[0]["match"] and "runtime_fraction" not in infer[3]["match"]
    stream = [route for route in routes if route["match"].get("path") == paths.MODEL_STREAM_INFER]
    assert len(stream) == 1 and verdicts.FILTER not in stream[0]["typed_per_filter_config"]


def _message(**attributes) -> ext_proc_pb2.ProcessingRequest:
    message = ext_proc_pb2.ProcessingRequest()
    message.attributes["envoy.filters.http.ext_proc"].update(attributes)
    return message


def test_a_call_is_keyed_by_envoys_connection_and_request_ids():
    assert verdicts.call_key(_message(**{"connection.id": 7, "request.id": "abc"})) == ("7", "abc")
    assert verdicts.call_key(_message(**{"request.id": "abc"})) is None
    assert verdicts.call_key(ext_proc_pb2.ProcessingRequest()) is None


def test_pending_verdicts_are_bounded_and_forgotten_when_old(monkeypatch):
    async def run():
        pending = verdicts.PendingVerdicts(limit=3)
        first = pending.get(("1", "a"))
        assert pending.get(("1", "a")) is first  # whichever side comes second finds the first's entry
        for key in ("b", "c", "d"):
            pending.get(("1", key))
        assert len(pending) == 3 and pending.get(("1", "a")) is not first  # the oldest went first
        now = time.monotonic()
        monkeypatch.setattr(verdicts.time, "monotonic", lambda: now + verdicts.PENDING_SECONDS + 1)
        pending.get(("2", "z"))
        assert len(pending) == 1
        pending.pop(("2", "z"))
        assert len(pending) == 0

    asyncio.run(run())
