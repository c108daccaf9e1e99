"""Access-log entries into today's metrics, and Envoy's counters into sidewatch's (no Envoy started: the
entries are the protobufs Envoy sends; the Envoy end is in tests/integration/test_envoy_metrics.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.dataplane.envoy.access_log import GRPC_STATS_STATE, AccessLogMetrics, call_code
from agent.dataplane.envoy.envoy_stats import (
    ACTIVE,
    DROPPED,
    HEALTH_ACTIVE,
    TAP_FAILED,
    TAP_STARTED,
    WRITTEN,
    EnvoyStats,
)
from agent.dataplane.envoy.ext_proc import TapProcessor
from agent.dataplane.envoy.plane import tap_copies
from agent.dataplane.envoy.supervisor import EnvoyProcess
from agent.metrics import EnvoyMetrics, ProxyMetrics
from agent.protocol import paths


def _entry(path: str, model: dict[str, str] | None = None, trailers: dict[str, str] | None = None,
           headers: dict[str, str] | None = None, http_status: int = 200) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.path = path
    entry.response.response_code.value = http_status
    entry.response.response_trailers.update(trailers or {})
    entry.response.response_headers.update(headers or {})
    entry.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(3)
    if model is not None:
        entry.common_properties.metadata.filter_metadata["sidewatch"].update(model)
    return entry


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_status_from_trailers_headers_http_or_the_caller_gone():
    assert call_code(_entry(paths.MODEL_INFER, trailers={"grpc-status": "0"})) == ("OK", False)
    assert call_code(_entry(paths.MODEL_INFER, headers={"grpc-status": "5"})) == ("NOT_FOUND", False)
    assert call_code(_entry(paths.MODEL_INFER, trailers={"grpc-status": "99"})) == ("UNKNOWN", False)
    assert call_code(_entry(paths.MODEL_INFER, trailers={"grpc-status": "x"})) == ("UNKNOWN", False)
    assert call_code(_entry(paths.MODEL_INFER, http_status=503)) == ("UNAVAILABLE", False)
    assert call_code(_entry(paths.MODEL_INFER, http_status=0)) == ("CANCELLED", True)
    # The upstream went away mid-answer: Envoy resets the stream, which a gRPC client reads as INTERNAL.
    reset = _entry(paths.MODEL_STREAM_INFER)
    reset.common_properties.response_flags.upstream_remote_reset = True
    assert call_code(reset) == ("INTERNAL", False)
    assert call_code(_entry(paths.MODEL_STREAM_INFER)) == ("UNKNOWN", False)   # no status, no reset: unknown


def test_entries_become_todays_series_with_bounded_labels():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, max_models=2)  # ("m", "1"), ("nï", ""); ("", "") (no model) takes none
    als = AccessLogMetrics(metrics)
    als.record(_entry(paths.MODEL_INFER, {"model": "m", "version": "1"}, {"grpc-status": "0"}))
    als.record(_entry(paths.MODEL_INFER, {"model_hex": "6ec3af"}, {"grpc-status": "0"}))  # "nï"
    als.record(_entry(paths.MODEL_INFER, {"model_hex": "6ec3af"}, {"grpc-status": "5"}))
    als.record(_entry(paths.SERVER_READY, {"model": "ignored"}, {"grpc-status": "0"}))  # not model-scoped
    als.record(_entry(paths.MODEL_INFER, {"model": "unknown"}, {"grpc-status": "5"}))  # refused: no label
    als.record(_entry(paths.MODEL_READY, {"model": "any"}, {"grpc-status": "0"}))  # OK for any name: no label
    als.record(_entry(paths.MODEL_INFER, {"model": "fourth"}, {"grpc-status": "0"}))  # over max_models
    als.record(_entry("/grpc.health.v1.Health/Check", None, {"grpc-status": "0"}))  # not a relayed call
    assert _value(registry, "sidewatch_requests_total", model="m", version="1", method="ModelInfer", code="OK") == 1
    assert _value(registry, "sidewatch_requests_total", model="nï", version="", method="ModelInfer",
                  code="NOT_FOUND") == 1
    assert _value(registry, "sidewatch_upstream_errors_total", model="nï", version="", method="ModelInfer",
                  code="NOT_FOUND") == 1
    assert _value(registry, "sidewatch_requests_total", model="_other", version="_other", method="ModelInfer",
                  code="NOT_FOUND") == 1
    assert _value(registry, "sidewatch_requests_total", model="_other", version="_other", method="ModelReady",
                  code="OK") == 1
    assert _value(registry, "sidewatch_requests_total", model="_other", version="_other", method="ModelInfer",
                  code="OK") == 1
    assert _value(registry, "sidewatch_requests_total", model="", version="", method="ServerReady", code="OK") == 1
    assert _value(registry, "sidewatch_request_duration_seconds_sum", model="m", version="1",
                  method="ModelInfer") == 0.003
    assert als.entries == 7


def test_stream_messages_from_grpc_stats_filter_state():
    registry = CollectorRegistry()
    als = AccessLogMetrics(ProxyMetrics(registry))
    entry = _entry(paths.MODEL_STREAM_INFER, {"model": "m"}, {"grpc-status": "0"})
    entry.common_properties.filter_state_objects[GRPC_STATS_STATE].Pack(
        grpc_stats_pb2.FilterObject(request_message_count=3, response_message_count=2))
    als.record(entry)
    assert _value(registry, "sidewatch_stream_messages_total", method="ModelStreamInfer", direction="request") == 3
    assert _value(registry, "sidewatch_stream_messages_total", method="ModelStreamInfer", direction="response") == 2


def test_envoy_counters_survive_an_envoy_restart_and_in_flight_leaves_out_health_checks(tmp_path: Path):
    registry = CollectorRegistry()
    metrics, envoy_metrics = ProxyMetrics(registry), EnvoyMetrics(registry)
    stats = EnvoyStats(EnvoyProcess(Path("/nonexistent/envoy"), tmp_path / "envoy.json", tmp_path), metrics,
                       envoy_metrics)
    stats.update({ACTIVE: 5, HEALTH_ACTIVE: 1, DROPPED: 4, WRITTEN: 10})
    stats.update({ACTIVE: 2, HEALTH_ACTIVE: 0, DROPPED: 6, WRITTEN: 30})
    stats.update({ACTIVE: 0, DROPPED: 1, WRITTEN: 3})  # Envoy restarted: its counters began again
    assert _value(registry, "sidewatch_envoy_access_logs_dropped_total") == 7
    assert _value(registry, "sidewatch_envoy_access_logs_written_total") == 33
    assert _value(registry, "sidewatch_requests_in_flight") == 0
    stats.update({ACTIVE: 5, HEALTH_ACTIVE: 1, DROPPED: 1, WRITTEN: 3})
    assert _value(registry, "sidewatch_requests_in_flight") == 4


def test_tap_copies_envoy_could_not_send_are_counted_as_dropped(tmp_path: Path):
    """Under load Envoy refuses ext_proc streams (the tap cluster's circuit breaker) and lets the calls go on:
    those copies never reach sidewatch, and are counted here, over Envoy's restarts."""
    registry = CollectorRegistry()
    metrics, envoy_metrics = ProxyMetrics(registry), EnvoyMetrics(registry)
    stats = EnvoyStats(EnvoyProcess(Path("/nonexistent/envoy"), tmp_path / "envoy.json", tmp_path), metrics,
                       envoy_metrics)
    stats.update({TAP_STARTED: 90, TAP_FAILED: 10})
    stats.update({TAP_STARTED: 150, TAP_FAILED: 50})
    stats.update({TAP_STARTED: 5, TAP_FAILED: 2})  # Envoy restarted
    assert _value(registry, "sidewatch_tap_copies_dropped_total", reason="envoy") == 52
    assert stats.tap_copies() == (155 + 52, 52)


def test_the_sampler_counts_copies_whose_streams_closed_early_with_those_envoy_refused(tmp_path: Path):
    """Copies lost because Envoy closed their ext_proc stream before sidewatch had read the call's end
    (ext_proc.py, reason closed) are lost copies to the sampler too, beside those Envoy refused."""
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    stats = EnvoyStats(EnvoyProcess(Path("/nonexistent/envoy"), tmp_path / "envoy.json", tmp_path), metrics,
                       EnvoyMetrics(registry))
    tap = TapProcessor(load_config(), metrics, policy=None)

    async def reset_before_anything_read():
        raise asyncio.CancelledError()
        yield

    for _ in range(3):
        try:
            asyncio.run(tap.Process(reset_before_anything_read(), None))
        except asyncio.CancelledError:
            pass
    stats.update({TAP_STARTED: 90, TAP_FAILED: 10})
    assert tap_copies(stats, tap) == (100, 13)
    assert _value(registry, "sidewatch_tap_copies_dropped_total", reason="closed") == 3
