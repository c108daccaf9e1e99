"""Envoy's bootstrap configuration, written from sidewatch's own (JSON, Envoy's v3 API).

One listener on ``listen`` with an HTTP connection manager (HTTP/2 and HTTP/1.1, gRPC being HTTP/2); one
route table: the standard gRPC health service (``/grpc.health.v1.Health/``) to sidewatch's own health
server on loopback, everything else to the ``upstream`` cluster (HTTP/2), with no route timeout, so
streams last as long as they need and a call's deadline is its ``grpc-timeout`` header. The admin API
listens on loopback only. The pieces that other parts of the data plane add (HTTP filters before the
router, clusters for sidewatch's loopback services, access logs) come in as arguments, so that each part
writes its own.

>>> from agent.config import load_config
>>> config = load_config(overrides={"listen": "127.0.0.1:9000", "upstream.address": "127.0.0.1:8001"})
>>> bootstrap = build_bootstrap(config, Loopback(admin_port=0, health_port=7001))
>>> [c["name"] for c in bootstrap["static_resources"]["clusters"]]
['upstream', 'sidewatch_health']
>>> routes = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
...     "route_config"]["virtual_hosts"][0]["routes"]
>>> [(r["match"]["prefix"], r["route"]["cluster"]) for r in routes]
[('/grpc.health.v1.Health/', 'sidewatch_health'), ('/', 'upstream')]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.config import ServeConfig, split_address

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
UPSTREAM = "upstream"
HEALTH = "sidewatch_health"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
# HTTP/2 flow-control windows: a reader that does not read holds at most this much per stream (and per
# connection) in Envoy, instead of an unbounded queue.
STREAM_WINDOW_BYTES = 1 << 20
CONNECTION_WINDOW_BYTES = 4 << 20


@dataclass(frozen=True)
class Loopback:
    """Ports on 127.0.0.1: Envoy's admin API (0: any) and sidewatch's services behind Envoy."""

    admin_port: int
    health_port: int


def socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def http2_cluster(name: str, host: str, port: int, connect_timeout: str = "5s") -> dict[str, Any]:
    """A cluster of one endpoint that speaks HTTP/2 (gRPC) in plain text; DNS names are resolved."""
    return {
        "name": name,
        "type": "STRICT_DNS",
        "connect_timeout": connect_timeout,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": socket_address(host, port)}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": {
                "initial_stream_window_size": STREAM_WINDOW_BYTES,
                "initial_connection_window_size": CONNECTION_WINDOW_BYTES}}}},
    }


def upstream_route(match: dict[str, Any], cluster: str) -> dict[str, Any]:
    """A route of the calls ``match`` picks to ``cluster``, with the deadlines of every route here."""
    # timeout 0: no route timeout (streams); grpc_timeout_header_max 0: the call's grpc-timeout is its deadline.
    return {"match": match, "route": {"cluster": cluster, "timeout": "0s",
                                      "max_stream_duration": {"grpc_timeout_header_max": "0s"}}}


def _route(prefix: str, cluster: str) -> dict[str, Any]:
    return upstream_route({"prefix": prefix}, cluster)


def build_bootstrap(config: ServeConfig, loopback: Loopback, http_filters: list[dict[str, Any]] = (),
                    clusters: list[dict[str, Any]] = (), access_logs: list[dict[str, Any]] = (),
                    routes: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The bootstrap for ``config`` (module docstring). ``http_filters`` run in order before the router;
    ``routes`` are matched before the health and upstream routes."""
    listen_host, listen_port = split_address(config.listen)
    upstream_host, upstream_port = split_address(config.upstream.address)
    manager = {
        "@type": HCM,
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "http2_protocol_options": {"initial_stream_window_size": STREAM_WINDOW_BYTES,
                                   "initial_connection_window_size": CONNECTION_WINDOW_BYTES},
        "route_config": {"name": "routes", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            *routes, _route(HEALTH_PREFIX, HEALTH), _route("/", UPSTREAM)]}]},
        "http_filters": [*http_filters, {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    if access_logs:
        manager["access_log"] = list(access_logs)
    return {
        "node": {"id": "sidewatch", "cluster": "sidewatch"},
        "admin": {"address": socket_address("127.0.0.1", loopback.admin_port)},
        # An admin layer, so that sidewatch can set runtime values (the tap's sampled share) with
        # POST /runtime_modify; without one Envoy refuses that call.
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {}},
                                       {"name": "admin", "admin_layer": {}}]},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": socket_address(listen_host, listen_port),
                "per_connection_buffer_limit_bytes": STREAM_WINDOW_BYTES,
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": manager}]}],
            }],
            "clusters": [http2_cluster(UPSTREAM, upstream_host, upstream_port),
                         http2_cluster(HEALTH, "127.0.0.1", loopback.health_port), *clusters],
        },
    }
