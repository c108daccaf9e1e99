"""The verdict filter's share of Envoy's configuration (agent/dataplane/envoy/verdicts.py): which models it
routes, and the routes it writes around the tap's."""

from __future__ import annotations

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


def test_every_model_infer_route_gets_a_twin_that_enables_the_verdict_filter_before_it():
    routes = verdicts.inline_routes(ext_proc.sampled_routes("upstream"), "upstream", 1024)
    infer = [route for route in routes if route["match"].get("path") == paths.MODEL_INFER]
    # sampled twin, sampled, unsampled twin, unsampled: the twins first, matched on the Lua filter's header
    assert [bool(route["match"].get("headers")) for route in infer] == [True, False, True, False]
    for route in infer:
        twin = bool(route["match"].get("headers"))
        assert route["typed_per_filter_config"][verdicts.FILTER]["config"].get("disabled", False) is not twin
        assert route["request_body_buffer_limit"] == 1024 + 5
    assert "runtime_fraction" in infer[0]["match"] and "runtime_fraction" not in infer[2]["match"]
    stream = [route for route in routes if route["match"].get("path") == paths.MODEL_STREAM_INFER]
    assert len(stream) == 1 and verdicts.FILTER not in stream[0]["typed_per_filter_config"]
