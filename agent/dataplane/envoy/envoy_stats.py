"""Numbers only Envoy knows, read from its admin API once a second: calls in flight, access-log entries
sent and dropped, and the tap's copies Envoy could not send.

The access log reports a call when it ends, so the calls in flight come from Envoy's gauges: the
listener's active requests less those on the health route (served by sidewatch's health service, which
the Python data plane does not count either). Envoy's counters restart at zero when Envoy restarts; a
value lower than the last one read is taken as a fresh start.

The tap's copies (ext_proc.py) travel on one ext_proc stream per call. When sidewatch falls behind, streams
pile up until the tap cluster's circuit breaker (``max_requests``, set from ``tap.max_streams``) refuses new
ones; in observability mode Envoy lets the call go on and counts the stream as failed (``streams_failed``),
and the copy never reaches sidewatch. Those are exported as
``sidewatch_tap_copies_dropped_total{reason="envoy"}``, and the streams started and failed are kept as
running totals for the sampler (sampling.py), which copies fewer calls while copies are being lost (with
the copies whose streams Envoy closed before sidewatch had read them, ext_proc.py's ``closed``).
"""

from __future__ import annotations

import asyncio
import json
import logging

from agent.dataplane.envoy.supervisor import EnvoyError, EnvoyProcess
from agent.metrics import EnvoyMetrics, ProxyMetrics

log = logging.getLogger(__name__)

ACTIVE = "http.ingress.downstream_rq_active"
HEALTH_ACTIVE = "cluster.sidewatch_health.upstream_rq_active"
DROPPED = "access_logs.grpc_access_log.logs_dropped"
WRITTEN = "access_logs.grpc_access_log.logs_written"
TAP_STARTED = "http.ingress.ext_proc.sidewatch_tap.streams_started"
TAP_FAILED = "http.ingress.ext_proc.sidewatch_tap.streams_failed"
STATS_PATH = "/stats?format=json&filter=" + "|".join(
    f"^{name.replace('.', '[.]')}$" for name in (ACTIVE, HEALTH_ACTIVE, DROPPED, WRITTEN, TAP_STARTED, TAP_FAILED))


def read_stats(envoy: EnvoyProcess) -> dict[str, int]:
    """The stats of STATS_PATH by name (absent ones are left out)."""
    stats = json.loads(envoy.admin(STATS_PATH))["stats"]
    return {stat["name"]: int(stat["value"]) for stat in stats if "value" in stat}


class EnvoyStats:
    """Copies Envoy's numbers into the metrics every ``interval`` seconds (module docstring)."""

    def __init__(self, envoy: EnvoyProcess, metrics: ProxyMetrics, envoy_metrics: EnvoyMetrics,
                 interval: float = 1.0) -> None:
        self.envoy = envoy
        self.metrics = metrics
        self.envoy_metrics = envoy_metrics
        self.interval = interval
        self._last = {DROPPED: 0, WRITTEN: 0, TAP_STARTED: 0, TAP_FAILED: 0}
        # Running totals over Envoy's restarts: the tap's streams started, and failed (copies lost).
        self.tap_streams = {TAP_STARTED: 0, TAP_FAILED: 0}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                self.update(await asyncio.to_thread(read_stats, self.envoy))
            except (EnvoyError, OSError, ValueError, KeyError) as err:
                log.debug("sidewatch: envoy stats not read: %s", err)
            await asyncio.sleep(self.interval)

    def update(self, stats: dict[str, int]) -> None:
        self.metrics.in_flight.set(max(0, stats.get(ACTIVE, 0) - stats.get(HEALTH_ACTIVE, 0)))
        for name in self._last:
            value = stats.get(name, 0)
            increase = value - self._last[name] if value >= self._last[name] else value
            self._last[name] = value
            if name in self.tap_streams:
                self.tap_streams[name] += increase
            counter = {DROPPED: self.envoy_metrics.access_logs_dropped, WRITTEN: self.envoy_metrics.access_logs_written,
                       TAP_FAILED: self.metrics.tap_copies_dropped.labels("envoy")}.get(name)
            if counter is not None:
                counter.inc(increase)

    def tap_copies(self) -> tuple[int, int]:
        """(copies Envoy sent or tried to send, copies it could not send), running totals."""
        return self.tap_streams[TAP_STARTED] + self.tap_streams[TAP_FAILED], self.tap_streams[TAP_FAILED]
