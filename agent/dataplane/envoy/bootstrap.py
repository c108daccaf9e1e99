"""Envoy's bootstrap configuration, written from sidewatch's own (JSON, Envoy's v3 API).

One listener on ``listen`` with an HTTP connection manager (HTTP/2 and HTTP/1.1, gRPC being HTTP/2), with
TLS or mutual TLS from ``tls``; one route table: the standard gRPC health service (``/grpc.health.v1.Health/``)
to sidewatch's own health server on loopback, everything else to the ``upstream`` cluster (HTTP/2, TLS from
``upstream.tls``), with no route timeout, so streams last as long as they need and a call's deadline is its
``grpc-timeout`` header, which the client and the upstream enforce (route comment). Resource bounds: HTTP/2
windows on both sides (``stream_window_bytes`` a stream, 4 times that a connection) and a per-connection
buffer limit of one stream window (a reader that does not read holds a bounded amount in Envoy), and at
most ``max_connections`` client connections (the overload manager). The admin API listens on
loopback only. The pieces that other parts of the data plane add (HTTP filters before the
router, clusters for sidewatch's loopback services, access logs) come in as arguments, so that each part
writes its own.

Not enforced by Envoy: ``max_message_bytes`` (Envoy has no per-gRPC-message limit without buffering whole
requests; the windows bound memory and the upstream's own limit applies).

>>> from agent.config import load_config
>>> config = load_config(overrides={"listen": "127.0.0.1:9000", "upstream.address": "127.0.0.1:8001"})
>>> bootstrap = build_bootstrap(config, Loopback(admin_port=0, health_port=7001))
>>> [c["name"] for c in bootstrap["static_resources"]["clusters"]]
['upstream', 'sidewatch_health']
>>> [c.get("connection_pool_per_downstream_connection", False) for c in bootstrap["static_resources"]["clusters"]]
[True, False]
>>> routes = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
...     "route_config"]["virtual_hosts"][0]["routes"]
>>> [(r["match"]["prefix"], r["route"]["cluster"]) for r in routes]
[('/grpc.health.v1.Health/', 'sidewatch_health'), ('/', 'upstream')]
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import ConfigError, ListenerTLS, ServeConfig, UpstreamTLS, split_address

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
# The ext_proc filters sidewatch puts in the chain (the tap, verdicts, pin rewrites, stream query checks), and
# how a route turns one on or off.
EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
EXT_PROC_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
UPSTREAM = "upstream"
HEALTH = "sidewatch_health"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
TLS_SOCKET = "envoy.transport_sockets.tls"
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
CONNECTIONS_MONITOR = "envoy.resource_monitors.global_downstream_max_connections"
HEAP_MONITOR = "envoy.resource_monitors.fixed_heap"
HEAP_CONFIG = "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig"
CONNECTIONS_CONFIG = ("type.googleapis.com/"
                      "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig")
# HTTP/2 flow-control windows: a reader that does not read holds at most this much per stream (and per
# connection) in Envoy, instead of an unbounded queue. Toward clients and the upstream the stream's window is
# the config's stream_window_bytes (the default, as here); toward sidewatch's own loopback services, this.
STREAM_WINDOW_BYTES = 1 << 20
# How long a model server connection of one client's pool stays open without calls (http2_cluster).
POOL_IDLE_TIMEOUT = "5s"
CONNECTIONS_PER_STREAM_WINDOW = 4
# Envoy's bounds on HTTP/2 windows (and HTTP/2's own maximum).
MAX_WINDOW_BYTES = (1 << 31) - 1


def http2_windows(stream_window_bytes: int) -> dict[str, int]:
    """Envoy's http2_protocol_options for a stream window of ``stream_window_bytes``."""
    return {"initial_stream_window_size": stream_window_bytes,
            "initial_connection_window_size": min(CONNECTIONS_PER_STREAM_WINDOW * stream_window_bytes,
                                                  MAX_WINDOW_BYTES)}


@dataclass(frozen=True)
class Loopback:
    """Ports on 127.0.0.1: Envoy's admin API (0: any) and sidewatch's services behind Envoy."""

    admin_port: int
    health_port: int


def socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _file(path: Path, key: str) -> dict[str, str]:
    """Envoy's reference to a file, once sidewatch has checked it can be read (Envoy's own error names the
    path, not the configuration key)."""
    if not os.access(path, os.R_OK) or not Path(path).is_file():
        raise ConfigError(f"sidewatch: {key}: {path} is not a readable file")
    return {"filename": str(path)}


def downstream_tls(tls: ListenerTLS) -> dict[str, Any]:
    """TLS on the listener, as the grpc.aio listener has it (agent/tls.py): with a client CA, a client
    certificate is verified when given, and required with ``require_client_cert``."""
    if tls.require_client_cert and tls.client_ca_file is None:
        raise ConfigError("sidewatch: tls.require_client_cert needs tls.client_ca_file")
    common: dict[str, Any] = {
        "tls_certificates": [{"certificate_chain": _file(tls.cert_file, "tls.cert_file"),
                              "private_key": _file(tls.key_file, "tls.key_file")}],
        "alpn_protocols": ["h2", "http/1.1"]}
    if tls.client_ca_file is not None:
        common["validation_context"] = {"trusted_ca": _file(tls.client_ca_file, "tls.client_ca_file")}
    return {"name": TLS_SOCKET, "typed_config": {
        "@type": DOWNSTREAM_TLS, "common_tls_context": common,
        "require_client_certificate": tls.require_client_cert}}


def system_ca_bundle() -> str:
    """The system's root certificates as one file (what gRPC trusts without ``ca_file``); Envoy's own
    ``system_root_certs`` is refused with a subject-alt-name match on Linux."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ConfigError("sidewatch: upstream.tls: no ca_file and no system CA bundle found; set upstream.tls.ca_file")


def upstream_tls(tls: UpstreamTLS, host: str) -> dict[str, Any]:
    """TLS toward the upstream, checked as gRPC checks it: the certificate chains to ``ca_file`` (the
    system's roots without one) and names ``server_name`` (else the address's host); Envoy checks no name
    unless told, hence the subject-alt-name match."""
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("sidewatch: upstream.tls.cert_file and upstream.tls.key_file go together")
    name = tls.server_name or host
    try:
        ipaddress.ip_address(name)
        san = {"san_type": "IP_ADDRESS", "matcher": {"exact": name}}
    except ValueError:
        san = {"san_type": "DNS", "matcher": {"exact": name}}
    validation: dict[str, Any] = {"match_typed_subject_alt_names": [san]}
    validation["trusted_ca"] = _file(tls.ca_file or Path(system_ca_bundle()), "upstream.tls.ca_file")
    common: dict[str, Any] = {"validation_context": validation, "alpn_protocols": ["h2"]}
    if tls.cert_file is not None:
        common["tls_certificates"] = [{"certificate_chain": _file(tls.cert_file, "upstream.tls.cert_file"),
                                       "private_key": _file(tls.key_file, "upstream.tls.key_file")}]
    context = {"@type": UPSTREAM_TLS, "common_tls_context": common, "sni": name}
    return {"name": TLS_SOCKET, "typed_config": context}


def http2_cluster(name: str, host: str, port: int, connect_timeout: str = "5s",
                  transport_socket: dict[str, Any] | None = None, max_requests: int | None = None,
                  pool_per_client_connection: bool = False, max_connections: int | None = None,
                  stream_window_bytes: int = STREAM_WINDOW_BYTES) -> dict[str, Any]:
    """A cluster of one endpoint that speaks HTTP/2 (gRPC), in plain text or over ``transport_socket``
    (TLS); DNS names are resolved. With ``max_requests``, Envoy's circuit breaker holds at most that many
    requests (HTTP/2 streams) open to it and that many waiting for a connection, and refuses the ones beyond
    (Envoy's default: 1,024 of each).

    ``pool_per_client_connection``: each client connection gets its own connections to this cluster, so
    one client cannot break another's calls. A model server's answer can repeat what the client sent (a
    NOT_FOUND naming a 1 MiB model name, in its grpc-message trailer); a header field that large is an HPACK
    error for Envoy's HTTP/2 codec, which closes the whole upstream connection, and with a shared pool every
    call in flight on it, from every client, failed with UNAVAILABLE (the hostile property suite's probe).
    The model servers' own clusters (the upstream, fallbacks) need it; sidewatch's loopback services do not
    (Envoy is their only client). Such a pool's connections close after POOL_IDLE_TIMEOUT without calls:
    Envoy keeps them when their client goes away, and a client per second would otherwise leave 3,600
    connections open to the model server an hour later (its default idle timeout). A client that pauses
    longer pays one new connection to the model server. ``max_connections`` bounds them in all, as the
    clients' connections are bounded (circuit breaker)."""
    cluster = {
        "name": name,
        "type": "STRICT_DNS",
        "connect_timeout": connect_timeout,
        # A name with IPv4 and IPv6 addresses (localhost) is reached over IPv4 first, as model servers
        # listening on 0.0.0.0 expect; Envoy's default tries only IPv6 when the name has an IPv6 address.
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": socket_address(host, port)}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": http2_windows(stream_window_bytes)}}},
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    thresholds: dict[str, Any] = {}
    if pool_per_client_connection:
        cluster["connection_pool_per_downstream_connection"] = True
        cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
            "common_http_protocol_options"] = {"idle_timeout": POOL_IDLE_TIMEOUT}
    if max_requests is not None:
        thresholds.update(max_requests=max_requests, max_pending_requests=max_requests)
    if max_connections is not None:
        thresholds["max_connections"] = max_connections
    if thresholds:
        cluster["circuit_breakers"] = {"thresholds": [{"priority": "DEFAULT", **thresholds}]}
    return cluster


def max_client_connections(config: ServeConfig) -> int:
    """Envoy's bound on client connections: ``max_connections``, or ``envoy.max_connections`` where set."""
    return config.envoy.max_connections or config.max_connections


def upstream_route(match: dict[str, Any], cluster: str) -> dict[str, Any]:
    """A route of the calls ``match`` picks to ``cluster``, with the deadlines of every route here."""
    # timeout 0: no route timeout (streams last as long as they need). The call's deadline is its grpc-timeout
    # header, passed on to the upstream, which ends the call with its own DEADLINE_EXCEEDED, as the client's
    # timer does. Envoy does not enforce the header itself (max_stream_duration.grpc_timeout_header_max):
    # once the upstream has sent its headers, Envoy's timer resets the stream, and a client whose own timer
    # is a moment late sees INTERNAL instead of DEADLINE_EXCEEDED.
    return {"match": match, "route": {"cluster": cluster, "timeout": "0s"}}


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
        "http2_protocol_options": {**http2_windows(config.stream_window_bytes),
                                   "max_concurrent_streams": config.max_streams_per_connection},
        # Envoy resets a stream idle for 5 minutes by default; the grpc.aio data plane keeps a quiet
        # ModelStreamInfer open as long as both ends want it, and so does this one.
        "stream_idle_timeout": "0s",
        # On drain, Envoy first tells HTTP/2 clients to go away while still taking their new streams, and
        # only after drain_timeout (5 s by default) refuses them; 0.1 s makes a drain refuse new calls on
        # open connections almost at once, as the grpc.aio data plane does (calls in flight go on).
        "drain_timeout": "0.1s",
        "route_config": {"name": "routes", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            *routes, _route(HEALTH_PREFIX, HEALTH), _route("/", UPSTREAM)]}]},
        "http_filters": [*http_filters, {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    if access_logs:
        manager["access_log"] = list(access_logs)
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                          "typed_config": manager}]}
    if config.tls is not None:
        chain["transport_socket"] = downstream_tls(config.tls)
    upstream_socket = None if config.upstream.tls is None else upstream_tls(config.upstream.tls, upstream_host)
    return {
        "node": {"id": "sidewatch", "cluster": "sidewatch"},
        # The admin API is how sidewatch supervises Envoy: it stays reachable when clients hold every connection.
        "admin": {"address": socket_address("127.0.0.1", loopback.admin_port), "ignore_global_conn_limit": True},
        "overload_manager": overload_manager(max_client_connections(config),
                                             config.envoy.max_heap_bytes),
        # An admin layer, so that sidewatch can set runtime values (the tap's sampled share) with
        # POST /runtime_modify; without one Envoy refuses that call.
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {}},
                                       {"name": "admin", "admin_layer": {}}]},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": socket_address(listen_host, listen_port),
                "per_connection_buffer_limit_bytes": config.stream_window_bytes,
                "filter_chains": [chain],
            }],
            "clusters": [http2_cluster(UPSTREAM, upstream_host, upstream_port, transport_socket=upstream_socket,
                                       pool_per_client_connection=True, max_requests=config.max_concurrent_calls,
                                       max_connections=max_client_connections(config),
                                       stream_window_bytes=config.stream_window_bytes),
                         http2_cluster(HEALTH, "127.0.0.1", loopback.health_port), *clusters],
        },
    }


def overload_manager(max_connections: int, max_heap_bytes: int | None = None) -> dict[str, Any]:
    """At most ``max_connections`` client connections at once (``max_connections``): Envoy closes
    the ones beyond it as it accepts them, so a flood of connections cannot exhaust memory or descriptors.
    With ``max_heap_bytes`` (``envoy.max_heap_bytes``), Envoy sheds load as its heap nears the cap: free
    memory goes back to the system from 90%, new calls get 503 (UNAVAILABLE to gRPC) and new connections
    are refused from 95%."""
    manager: dict[str, Any] = {"resource_monitors": [{"name": CONNECTIONS_MONITOR, "typed_config": {
        "@type": CONNECTIONS_CONFIG, "max_active_downstream_connections": max_connections}}]}
    if max_heap_bytes is not None:
        manager["refresh_interval"] = "0.25s"
        manager["resource_monitors"].append({"name": HEAP_MONITOR, "typed_config": {
            "@type": HEAP_CONFIG, "max_heap_size_bytes": max_heap_bytes}})

        def trigger(value: float) -> list[dict[str, Any]]:
            return [{"name": HEAP_MONITOR, "threshold": {"value": value}}]

        manager["actions"] = [{"name": "envoy.overload_actions.shrink_heap", "triggers": trigger(0.90)},
                              {"name": "envoy.overload_actions.stop_accepting_requests", "triggers": trigger(0.95)}]
        manager["loadshed_points"] = [{"name": "envoy.load_shed_points.tcp_listener_accept",
                                       "triggers": trigger(0.95)}]
    return manager
