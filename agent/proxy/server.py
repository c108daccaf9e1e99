"""``sidewatch serve``: the listener, the upstream channel, the tap, metrics and shutdown, wired together."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from grpc import aio
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from agent.alerts.admin import AdminServer, admin_token
from agent.alerts.engine import AlertEngine
from agent.alerts.receiver import AlertmanagerReceiver
from agent.alerts.rollback import RollbackDispatcher
from agent.config import ServeConfig, split_address
from agent.metrics import AlertMetrics, DetectionMetrics, DriftMetrics, ProxyMetrics
from agent.proxy import tls
from agent.proxy.call_log import CallLog
from agent.proxy.forward import Forwarder
from agent.proxy.health import UpstreamHealth
from agent.proxy.route import RouteTable, channel_opener
from agent.proxy.tap import Tap

log = logging.getLogger(__name__)


def _message_size_options(config: ServeConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]


# gRPC's reconnect backoff grows to 120 s while the upstream is down, so a model server that comes
# back would wait for the next attempt. A retry every half second at most (a refused connection
# costs next to nothing) resumes service within a second of its return.
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


def open_upstream_channel(config: ServeConfig) -> aio.Channel:
    options = _message_size_options(config) + _RECONNECT_OPTIONS
    upstream = config.upstream
    if upstream.tls is None:
        return aio.insecure_channel(upstream.address, options=options)
    if upstream.tls.server_name:
        options.append(("grpc.ssl_target_name_override", upstream.tls.server_name))
    return aio.secure_channel(upstream.address, tls.channel_credentials(upstream.tls), options=options)


class Sidecar:
    """One running data plane. ``start`` binds; ``stop`` drains in-flight calls, then closes."""

    def __init__(self, config: ServeConfig, registry: CollectorRegistry = REGISTRY) -> None:
        self.config = config
        self.registry = registry
        self.metrics = ProxyMetrics(registry, config.metrics.max_models)
        self.tap = Tap(self.metrics, config.tap.queue_size, sink_timeout_seconds=config.tap.sink_timeout_seconds)
        self.watch = None
        self.drift = None
        if config.detection.model_repository is not None:
            # Imported here: without a repository the sidecar needs neither onnx nor the detectors.
            from agent.detect.adversarial import AdversarialWatch
            from agent.detect.registry import DetectorRegistry

            detectors = DetectorRegistry(config.detection.model_repository, config.detection.device)
            self.watch = AdversarialWatch(detectors, config, DetectionMetrics(self.registry),
                                          self.metrics.bounded)
            self.tap.add_sink("adversarial", self.watch)
            if config.drift.enabled:
                from threadpoolctl import threadpool_limits

                from agent.detect.drift.watch import DriftWatch

                # The drift detectors' matrix products are small: a multi-threaded BLAS only adds
                # hand-overs between threads (measured up to 30x slower on a loaded 2-core machine).
                threadpool_limits(1)

                self.drift = DriftWatch(detectors, config, DriftMetrics(self.registry), self.metrics.bounded)
                self.tap.add_sink("drift", self.drift)
                self.watch.score_listeners.append(self.drift.observe_scores)
        self._init_alerts()
        self.server: aio.Server | None = None
        self.channel: aio.Channel | None = None
        self.health: UpstreamHealth | None = None
        self.port: int | None = None
        self._metrics_server = None

    def _init_alerts(self) -> None:
        """The alert engine, the rollback dispatcher and its route table, and the admin API."""
        config = self.config
        self.alert_metrics = AlertMetrics(self.registry)
        # Consulted by the forwarder (which also feeds it the versions seen serving, from the tap).
        self.routes = RouteTable(channel_opener(config), max_models=config.metrics.max_models)
        self.dispatcher = RollbackDispatcher(config.rollback, self.alert_metrics, self.routes)
        self.engine = AlertEngine(config.alerts, self.registry, self.alert_metrics, self.dispatcher)
        self.admin: AdminServer | None = None
        token = admin_token(config.admin)
        if token is not None:
            receiver = AlertmanagerReceiver(config.admin.alertmanager_hooks, config.rollback.hooks, self.dispatcher,
                                            self.alert_metrics)
            self.admin = AdminServer(config.admin, token, self.dispatcher, self.engine, receiver, self.alert_metrics)
        elif config.admin.enabled:
            log.warning("sidewatch: admin API off: no token (set admin.token_file or SIDEWATCH_ADMIN_TOKEN)")

    async def start(self) -> None:
        config = self.config
        rollback = config.rollback
        if rollback.hooks or rollback.audit_log is not None or config.alerts.rules:
            # Replays the audit log first: route pins are in force before the first call is forwarded.
            # (Without any alerting configured there is nothing to replay or run.)
            self.dispatcher.start()
        self.channel = open_upstream_channel(config)
        self.server = aio.server(options=_message_size_options(config))
        # The health service is registered first so that it answers before the catch-all forwarder.
        self.health = UpstreamHealth(self.server, self.channel, config.upstream_health_interval_seconds)
        self.server.add_generic_rpc_handlers([
            Forwarder(self.channel, self.metrics, self.tap, config.tap.max_pending_stream_requests, self.watch,
                      routes=self.routes, call_log=CallLog(config.log_requests))
        ])
        if config.tls is None:
            self.port = self.server.add_insecure_port(config.listen)
        else:
            self.port = self.server.add_secure_port(config.listen, tls.server_credentials(config.tls))
        if self.port == 0:
            raise OSError(f"sidewatch: cannot listen on {config.listen}")
        self.tap.start()
        await self.server.start()
        await self.health.start()
        if config.metrics.listen:
            host, port = split_address(config.metrics.listen)
            metrics_tls = config.metrics.tls
            tls_options = {} if metrics_tls is None else {
                "certfile": str(metrics_tls.cert_file), "keyfile": str(metrics_tls.key_file),
                "client_cafile": None if metrics_tls.client_ca_file is None else str(metrics_tls.client_ca_file),
                "client_auth_required": metrics_tls.require_client_cert}
            self._metrics_server, _ = start_http_server(port, addr=host, registry=self.registry, **tls_options)
        self.engine.start()
        if self.admin is not None:
            self.admin.start()
        log.info("sidewatch: listening on %s, forwarding to %s, metrics on %s",
                 config.listen, config.upstream.address, config.metrics.listen)

    async def stop(self) -> None:
        """Graceful shutdown: stop taking calls, let in-flight calls finish within the grace period."""
        if self.health is not None:
            await self.health.shutting_down()
        # No new alerts and no admin requests while the rest shuts down.
        self.engine.stop()
        if self.admin is not None:
            self.admin.stop()
        if self.server is not None:
            await self.server.stop(self.config.shutdown_grace_seconds)
        if self.channel is not None:
            await self.channel.close()
        await self.routes.close()  # fallback upstreams' channels
        # A sink stuck in a call (a hung detector) is not called again: that would hang the shutdown too.
        stuck = self.tap.stop()
        if self.watch is not None:
            if "adversarial" not in stuck:
                self.watch.flush()
            self.watch.close()
        if self.drift is not None and "drift" not in stuck:
            self.drift.tick()  # the last scores
            self.drift.close()  # and the last checkpoint
        # Lets a hook that is running finish (or stop at its timeout) and flushes the audit log.
        self.dispatcher.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        log.info("sidewatch: stopped")


async def serve(config: ServeConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    sidecar = Sidecar(config)
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("sidewatch: shutting down, draining in-flight calls for up to %.1f s", config.shutdown_grace_seconds)
    await sidecar.stop()


def run_event_loop(main) -> None:
    """Run a coroutine on uvloop when it is installed, else on asyncio's default loop.

    SIDEWATCH_EVENT_LOOP=asyncio forces the default loop (the benchmark compares the two).
    """
    if os.environ.get("SIDEWATCH_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)
