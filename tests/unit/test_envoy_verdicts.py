"""The verdict filter's share of Envoy's configuration (agent/dataplane/envoy/verdicts.py): which models it
routes, and the routes it writes around the tap's."""

from __future__ import annotations

from agent.config import load_config
from agent.dataplane.envoy import ext_proc, stream_queries, verdicts
from agent.dataplane.envoy.lua import lua_string, model_peek_filter
from agent.protocol import paths


def _config(default: str, models: dict[str, str]):
    return load_config(overrides={"detection.adversarial_mode": default,
                                  **{f"models.{name}.adversarial_mode": mode for name, mode in models.items()}})


def test_no_inline_routing_without_a_detector_or_with_every_model_in_shadow_mode():
    assert verdicts.inline_routing(_config("flag", {}), detector=False) is None
    assert verdicts.inline_routing(_config("shadow", {"m": "shadow"}), detector=True) is None
    routing = verdicts.inline_routing(_config("shadow", {"m": "enforce"}), detector=True)
    assert (routing.default_mode, dict(routing.modes), routing.header) == ("shadow", {"m": "enforce"}, verdicts.HEADER)


def test_query_detection_routes_its_models_inline_without_an_adversarial_detector():
    config = load_config(overrides={"detection.queries.identity": "certificate", "models.q.query_mode": "enforce",
                                    "models.a.adversarial_mode": "flag"})
    routing = verdicts.inline_routing(config, detector=False)
    assert (routing.default_mode, dict(routing.modes)) == ("shadow", {"q": "queries", "a": "shadow"})
    assert (routing.identity, routing.identity_key) == ("certificate", "x-client-id")
    # With a detector, a model in flag mode keeps its mode; the default of every other model follows queries.
    config = load_config(overrides={"detection.queries.mode": "flag", "models.a.adversarial_mode": "enforce",
                                    "models.o.query_mode": "off"})
    routing = verdicts.inline_routing(config, detector=True)
    assert (routing.default_mode, dict(routing.modes)) == ("queries", {"a": "enforce", "o": "shadow"})
    # Without query detection the Lua filter is told no identity to read.
    assert verdicts.inline_routing(_config("flag", {}), detector=True).identity == ""
    script = model_peek_filter(inline=routing)["typed_config"]["default_source_code"]["inline_string"]
    assert "__IDENTITY" not in script and f"local IDENTITY = {lua_string('peer')}" in script
    assert verdicts.verdict_filter()["typed_config"]["metadata_options"] == {
        "forwarding_namespaces": {"untyped": ["sidewatch"]}}


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


def test_every_model_stream_infer_route_turns_the_stream_query_checks_on_and_no_other_route_does():
    routes = stream_queries.stream_routes(verdicts.inline_routes(ext_proc.sampled_routes("upstream"), "upstream", 1024),
                                          "upstream")
    stream = [route for route in routes if route["match"].get("path") == paths.MODEL_STREAM_INFER]
    # The tap's sampled route takes a share of the streams: a plain route is added for the rest.
    assert ["runtime_fraction" in route["match"] for route in stream] == [True, False]
    for route in routes:
        enabled = stream_queries.FILTER in route.get("typed_per_filter_config", {})
        assert enabled == (route in stream), route["match"]
    # Off in the chain: only those routes turn it on; it reads the client's identity the Lua filter leaves.
    chain = stream_queries.stream_queries_filter()
    assert chain["disabled"] and chain["typed_config"]["processing_mode"]["request_body_mode"] == "STREAMED"
    assert chain["typed_config"]["metadata_options"] == verdicts.verdict_filter()["typed_config"]["metadata_options"]
