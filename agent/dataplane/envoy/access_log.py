"""Today's call metrics from Envoy's gRPC access log service (ALS), served by sidewatch on loopback.

Envoy sends one entry per call (``envoy.access_loggers.http_grpc``) over one long-lived gRPC stream to
:class:`AccessLogMetrics`, a grpc.aio servicer of ``envoy.service.accesslog.v3.AccessLogService`` in the
sidewatch process. Each entry becomes the series the Python data plane records, with the same names and
labels: ``sidewatch_requests_total{model,version,method,code}``, ``sidewatch_request_duration_seconds``,
``sidewatch_upstream_errors_total`` and ``sidewatch_stream_messages_total``. The model and version come
from the Lua filter's dynamic metadata (lua.py), the status from ``grpc-status`` in the response trailers
(or headers, for trailers-only answers), the duration from Envoy's time to the last byte sent downstream,
and the messages of a streaming call from the grpc_stats filter's per-call filter state.

Buffering is bounded on Envoy's side: entries are batched up to ``BUFFER_BYTES`` or ``FLUSH_INTERVAL``;
when sidewatch reads too slowly the stream's HTTP/2 window fills and Envoy drops entries rather than
queueing them (its ``access_logs.grpc_access_log.logs_dropped`` counter, exported by envoy_stats.py as
``sidewatch_envoy_access_logs_dropped_total``); the calls themselves are never held up.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from grpc import aio

from agent.dataplane.envoy.lua import METADATA_NAMESPACE
from agent.dataplane.relay import OTHER_METHOD
from agent.metrics import ProxyMetrics, bound_label, label_bytes
from agent.protocol import paths

log = logging.getLogger(__name__)

HTTP_GRPC = "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
GRPC_STATS = "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
GRPC_STATS_STATE = "envoy.filters.http.grpc_stats"
CLUSTER = "sidewatch_access_log"
LOG_NAME = "sidewatch"
# Envoy sends a batch when it holds this many bytes of entries or this long has passed: /metrics lags by
# at most the interval, and Envoy holds at most this much (plus the stream's HTTP/2 window) for sidewatch.
BUFFER_BYTES = 16384
FLUSH_INTERVAL = "0.5s"

METHOD_LABELS = {path: path.rsplit("/", 1)[-1] for path in paths.ALL_METHODS}
# The health route is answered by sidewatch's own health service: not a relayed call, not counted (as in
# the Python data plane, which serves it beside the relay).
NOT_RELAYED_PREFIX = "/grpc.health.v1.Health/"
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# gRPC's mapping of an HTTP status without grpc-status (doc/http-grpc-status-mapping.md).
HTTP_CODES = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
              429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}


def grpc_stats_filter() -> dict[str, Any]:
    """grpc_stats: counts each call's messages both ways into filter state, which the access log carries.
    Per-method Envoy stats stay off (method names come from clients: unbounded)."""
    return {"name": "envoy.filters.http.grpc_stats",
            "typed_config": {"@type": GRPC_STATS, "emit_filter_state": True, "stats_for_all_methods": False}}


def access_log_config() -> dict[str, Any]:
    """The http_grpc access log to sidewatch's ALS (cluster ``CLUSTER``)."""
    return {"name": "envoy.access_loggers.http_grpc", "typed_config": {
        "@type": HTTP_GRPC,
        "common_config": {"log_name": LOG_NAME, "transport_api_version": "V3",
                          "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}},
                          "buffer_size_bytes": BUFFER_BYTES, "buffer_flush_interval": FLUSH_INTERVAL,
                          "filter_state_objects_to_log": [GRPC_STATS_STATE]},
        "additional_response_headers_to_log": ["grpc-status"],
        "additional_response_trailers_to_log": ["grpc-status"]}}


def _label(fields, key: str) -> str:
    """A model or version from the Lua filter's metadata, decoded as peek.py decodes it, bounded."""
    if key in fields:
        return bound_label(fields[key].string_value)
    if f"{key}_hex" in fields:
        try:
            return label_bytes(bytes.fromhex(fields[f"{key}_hex"].string_value))
        except ValueError:
            return ""
    return ""


def call_code(entry: accesslog_pb2.HTTPAccessLogEntry) -> tuple[str, bool]:
    """(the call's final gRPC status name, whether the caller ended it: cancelled or gone)."""
    response = entry.response
    status = response.response_trailers.get("grpc-status") or response.response_headers.get("grpc-status")
    if status is not None:
        return (CODE_NAMES.get(int(status), "UNKNOWN") if status.isdigit() else "UNKNOWN"), False
    if entry.common_properties.response_flags.downstream_connection_termination or \
            response.response_code.value == 0:
        return "CANCELLED", True  # no answer reached the caller: it reset the stream or went away
    flags = entry.common_properties.response_flags
    if response.response_code.value == 200 and (flags.upstream_remote_reset or flags.upstream_connection_termination):
        # The upstream went away after answering headers: Envoy resets the call, which a gRPC client reads
        # as INTERNAL (README.md, "The Envoy data plane").
        return "INTERNAL", False
    return HTTP_CODES.get(response.response_code.value, "UNKNOWN"), False


class AccessLogMetrics(als_pb2_grpc.AccessLogServiceServicer):
    """The ALS servicer (module docstring): Envoy's entries into ProxyMetrics."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics
        self.entries = 0
        # The Python data plane declares the known streaming methods' message series up front: so do we.
        for method in paths.STREAM_METHODS:
            for direction in ("request", "response"):
                metrics.stream_messages.labels(METHOD_LABELS[method], direction)

    def add_to(self, server: aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self, server)

    async def StreamAccessLogs(self, request_iterator, context: aio.ServicerContext):  # noqa: N802 (gRPC's name)
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                try:
                    self.record(entry)
                except Exception:  # one odd entry must not end the stream (Envoy would drop the rest)
                    log.exception("sidewatch: cannot record an access log entry")
        return als_pb2.StreamAccessLogsResponse()

    def record(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        path = entry.request.path
        if path.startswith(NOT_RELAYED_PREFIX):
            return
        self.entries += 1
        metrics = self.metrics
        method = METHOD_LABELS.get(path, OTHER_METHOD)
        model = version = ""
        if path in paths.MODEL_SCOPED_METHODS:
            found = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
            if found is not None:
                model, version = _label(found.fields, "model"), _label(found.fields, "version")
        code, caller_ended = call_code(entry)
        # Resolved after the answer: an unknown model takes a label of its own only once the upstream
        # answered it OK (agent.metrics.BoundedModels), as on the python plane.
        series = metrics.call_series(model, version, method, code == "OK" and path in paths.ADMITTING_METHODS)
        if code == "OK":
            series.ok.inc()
        else:
            metrics.requests.labels(*series.labels, code).inc()
            if not caller_ended:
                metrics.upstream_errors.labels(*series.labels, code).inc()
        properties = entry.common_properties
        elapsed = (properties.time_to_last_downstream_tx_byte if properties.HasField("time_to_last_downstream_tx_byte")
                   else properties.duration)
        series.latency.observe(elapsed.ToTimedelta().total_seconds())
        if path not in paths.UNARY_METHODS:
            state = properties.filter_state_objects.get(GRPC_STATS_STATE)
            counts = grpc_stats_pb2.FilterObject()
            if state is not None and state.Unpack(counts):
                metrics.stream_messages.labels(method, "request").inc(counts.request_message_count)
                metrics.stream_messages.labels(method, "response").inc(counts.response_message_count)
