"""Every metric sidewatch exports, declared once.

Conventions: prefix ``sidewatch_``, units in the name, labels ``model`` and ``version``.
Label values that a client controls (model names, method names) are bounded by
:class:`BoundedModels` so that a hostile or buggy client cannot blow up the series count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 100 microseconds to 10 seconds: a proxy hop is sub-millisecond,
# a model call can take seconds.
LATENCY_BUCKETS_SECONDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

OTHER = "_other"
NO_MODEL = ("", "")  # the labels of calls that name no model
# Why a copy of a call never reached the tap queue (sidewatch_tap_copies_dropped_total's reason label). Both
# data planes: "unpaired", a streamed request's copy with no room to wait for its response (the bounds of
# agent/dataplane/pending.py). The Envoy data plane's (agent/dataplane/envoy): "too_large", "buffer" and
# "compressed", a copy its reassembly refused (frames.py); "envoy", a copy Envoy could not send (its ext_proc
# stream refused); "closed", a copy whose stream Envoy closed (deferred_close_timeout after the call) before
# sidewatch had read the end of the call.
TAP_DROP_REASONS = ("too_large", "buffer", "compressed", "unpaired", "envoy", "closed")


# Model names and versions become label values (and words in log lines): longer values are cut to this
# many bytes, on both data planes (the Envoy plane's Lua filter cuts them to the same, lua.py). The default;
# `metrics.max_label_bytes` sets it for the process at start (set_max_label_bytes): one sidecar a process.
MAX_LABEL_BYTES = 128
_label_limit = [MAX_LABEL_BYTES]


def max_label_bytes() -> int:
    """The bytes a label value is cut to, in this process."""
    return _label_limit[0]


def set_max_label_bytes(limit: int) -> None:
    _label_limit[0] = int(limit)


def label_bytes(raw: bytes) -> str:
    """A model name or version as read from a request, cut to ``max_label_bytes()`` and decoded as both data
    planes decode it (invalid UTF-8 replaced), so that the same call gets the same label on either.

    >>> label_bytes(b"m" * 1000) == "m" * MAX_LABEL_BYTES
    True
    >>> label_bytes(b"n\\xc3")
    'n\ufffd'
    """
    limit = _label_limit[0]
    return raw[:limit].decode("utf-8", "replace")[:limit]


def bound_label(value: str) -> str:
    """``value`` (a model name or version, for a label or a log line) cut to ``max_label_bytes()`` bytes.

    >>> len(bound_label("x" * 10**6)), bound_label("mnist_cnn")
    (128, 'mnist_cnn')
    """
    if len(value) <= _label_limit[0] // 4:  # at most 4 bytes a character: short enough whatever it holds
        return value
    return label_bytes(value.encode("utf-8", "surrogatepass"))


class BoundedModels:
    """Maps client-supplied (model, version) pairs onto at most ``limit`` distinct label pairs.

    Model names and versions come from requests, so a hostile or buggy client could otherwise create
    series without end (or without end in length). The rule (``metrics.max_models``):

    - every value is cut to ``max_label_bytes()`` bytes;
    - the pairs the sidecar knows (``known``: its model repository's models and versions, its config's
      ``models:``, each with the empty version too) always have their own labels, whatever arrives, and
      so has ("", ""), the calls that name no model (ServerReady, ...) or whose name could not be read,
      which takes no slot;
    - an unknown pair gets its own labels only once it is *admitted*, by :meth:`admit`, which the callers
      call only for a call the upstream answered (OK, or a copy of a response): a name the upstream does
      not serve (NOT_FOUND, INVALID_ARGUMENT, random bytes) never takes a slot. Admitted pairs take the
      slots the known ones leave, up to ``limit`` pairs in all; the rest are ("_other", "_other").

    Calling the object looks a pair up and never admits it.

    >>> bounded = BoundedModels(2, known=[("m", "")])
    >>> bounded("junk", ""), bounded.admit("real", "1"), bounded.admit("more", "1"), bounded("m", "")
    (('_other', '_other'), ('real', '1'), ('_other', '_other'), ('m', ''))
    """

    def __init__(self, limit: int, known: Iterable[tuple[str, str]] = ()) -> None:
        self._limit = limit
        self._seen: set[tuple[str, str]] = {(bound_label(model), bound_label(version)) for model, version in known}
        self._lock = threading.Lock()

    def __call__(self, model: str, version: str) -> tuple[str, str]:
        pair = (bound_label(model), bound_label(version))
        return pair if pair in self._seen or pair == NO_MODEL else (OTHER, OTHER)

    def admit(self, model: str, version: str) -> tuple[str, str]:
        """The labels of a pair the upstream answered: its own while there is room, else ("_other", "_other")."""
        pair = (bound_label(model), bound_label(version))
        if pair in self._seen or pair == NO_MODEL:
            return pair
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(pair)
                return pair
        return OTHER, OTHER


class BoundedNames:
    """Maps names a client supplies (Alertmanager's alert names) onto at most ``limit`` label values besides the
    ``known`` ones (``metrics.max_alert_names``):

    - every value is cut to ``max_label_bytes()`` bytes;
    - a known name (one the config gives) always has its own value, whatever arrives;
    - another name takes one of the ``limit`` values the first time it is looked up (the callers look up only
      the names of incidents that opened), and keeps it; once they are taken, the others are "_other".

    >>> names = BoundedNames(1, known=["ModelBroken"])
    >>> names("Junk1"), names("Junk2"), names("ModelBroken"), names("Junk1")
    ('Junk1', '_other', 'ModelBroken', 'Junk1')
    """

    def __init__(self, limit: int, known: Iterable[str] = ()) -> None:
        self._limit = limit
        self._known = {bound_label(name) for name in known}
        self._admitted: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, name: str) -> str:
        name = bound_label(name)
        if name in self._known or name in self._admitted:
            return name
        with self._lock:
            if len(self._admitted) < self._limit:
                self._admitted.add(name)
                return name
        return OTHER


class CallSeries:
    """The series one (model, version, method) touches on every call, resolved once."""

    __slots__ = ("labels", "ok", "latency")

    def __init__(self, metrics: "ProxyMetrics", model: str, version: str, method: str) -> None:
        self.labels = (model, version, method)
        self.ok = metrics.requests.labels(model, version, method, "OK")
        self.latency = metrics.latency.labels(model, version, method)


class ProxyMetrics:
    """The data plane's metrics: traffic, latency, errors and the tap."""

    def __init__(self, registry: CollectorRegistry, max_models: int = 64,
                 known_models: Iterable[tuple[str, str]] = ()) -> None:
        self.registry = registry  # for a data plane's own metrics (EnvoyMetrics)
        self.bounded = BoundedModels(max_models, known_models)
        self._series: dict[tuple[str, str, str], CallSeries] = {}
        self.requests = Counter(
            "sidewatch_requests_total",
            "Calls forwarded, by model, version, method and final gRPC status code.",
            ["model", "version", "method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "sidewatch_request_duration_seconds",
            "Time from receiving a call to sending its response, upstream time included.",
            ["model", "version", "method"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "sidewatch_requests_in_flight",
            "Calls received and not yet answered.",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "sidewatch_upstream_errors_total",
            "Calls that the upstream answered with a non-OK status (or that failed to reach it), by status code.",
            ["model", "version", "method", "code"],
            registry=registry,
        )
        self.stream_messages = Counter(
            "sidewatch_stream_messages_total",
            "Messages relayed on streaming calls, by direction (request or response).",
            ["method", "direction"],
            registry=registry,
        )
        self.tap_queue_depth = Gauge(
            "sidewatch_tap_queue_depth",
            "Copies of calls waiting in the tap queue for the detectors.",
            registry=registry,
        )
        self.tap_queue_capacity = Gauge(
            "sidewatch_tap_queue_capacity",
            "Size of the tap queue; when it is full, copies are dropped.",
            registry=registry,
        )
        self.tap_enqueued = Counter(
            "sidewatch_tap_enqueued_total",
            "Copies of inference calls put on the tap queue.",
            registry=registry,
        )
        self.tap_dropped = Counter(
            "sidewatch_tap_dropped_total",
            "Copies of inference calls dropped because the tap queue was full (the call itself was forwarded).",
            registry=registry,
        )
        # The Envoy data plane's tap (agent/dataplane/envoy): copies from Envoy, and the share sampled.
        self.tap_copies_received = Counter(
            "sidewatch_tap_copies_received_total",
            "Copies of inference calls received from the data plane's tap (Envoy's ext_proc filter) and offered "
            "to the tap queue.",
            registry=registry,
        )
        self.tap_copies_dropped = Counter(
            "sidewatch_tap_copies_dropped_total",
            "Copies of inference calls dropped before the tap queue, by reason (too_large: a message over "
            "tap.max_message_bytes; buffer: a call over its buffer bounds; compressed; unpaired: a streamed "
            "request with no room to wait for its response, past tap.max_pending_stream_requests or "
            "tap.max_pending_stream_bytes; envoy: a copy Envoy could not send, its ext_proc "
            "stream refused or failed, as when the tap's streams are all taken while sidewatch is behind; closed: a "
            "copy whose stream Envoy closed before sidewatch had read the end of its call, sidewatch being behind).",
            ["reason"],
            registry=registry,
        )
        for reason in TAP_DROP_REASONS:  # every reason has a series from the start, 0 until it happens
            self.tap_copies_dropped.labels(reason)
        self.tap_sampled_ratio = Gauge(
            "sidewatch_tap_sampled_ratio",
            "Share of inference calls the data plane copies to the tap (1: every call; lower when sampling "
            "keeps the detectors within tap.cpu_budget_cores).",
            registry=registry,
        )
        self.tap_sampled_ratio.set(1.0)
        self.tap_cpu_cores = Gauge(
            "sidewatch_tap_cpu_cores",
            "CPU the sidecar process used, in cores, over the last sampling interval (Envoy data plane: the tap "
            "and the detectors).",
            registry=registry,
        )
        self.tap_cpu_budget_cores = Gauge(
            "sidewatch_tap_cpu_budget_cores",
            "Cores the tap may use over the next sampling interval: tap.cpu_budget_cores, or less when the CPU "
            "left idle around the sidecar, less tap.reserve_cores, is less (the calls come first).",
            registry=registry,
        )
        self.tap_processed = Counter(
            "sidewatch_tap_processed_total",
            "Copies of inference calls decoded by the tap consumer, by model and version.",
            ["model", "version"],
            registry=registry,
        )
        self.decode_errors = Counter(
            "sidewatch_decode_errors_total",
            "Tapped calls whose tensors could not be decoded, by model, version and part (request or response).",
            ["model", "version", "part"],
            registry=registry,
        )
        self.sink_errors = Counter(
            "sidewatch_tap_sink_errors_total",
            "Exceptions raised by a consumer of tapped calls (a detector), by sink.",
            ["sink"],
            registry=registry,
        )
        self.sink_timeouts = Counter(
            "sidewatch_tap_sink_timeouts_total",
            "Calls into a consumer of tapped calls that ran past tap.sink_timeout_seconds (a hung detector); "
            "the sink gets no copies until the call returns.",
            ["sink"],
            registry=registry,
        )

    def call_series(self, model: str, version: str, method: str, answered: bool = False) -> CallSeries:
        """The cached series of a call, resolved once its answer is known: ``answered`` when the upstream
        answered it OK and that admits the model (BoundedModels); label lookups cost more than the
        increments themselves."""
        key = (bound_label(model), bound_label(version), method)
        series = self._series.get(key)
        if series is None:
            bounded = self.bounded.admit if answered else self.bounded
            series = CallSeries(self, *bounded(model, version), method)
            # Keys are client-supplied too: cache only the series of known or admitted pairs (bounded).
            if series.labels[0] != OTHER:
                self._series[key] = series
        return series


# The squeezing score is an L1 distance in [0, 2]; the combined score (a detector's score over its threshold,
# flagged above 1) runs higher, hence the buckets past 2.
SCORE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)
# A detector's score over its own threshold: finest around 1, where the verdict turns.
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DETECTOR_LATENCY_BUCKETS_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class DetectionMetrics:
    """The adversarial detector's metrics, by model and version (bounded like the proxy's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.score = Histogram(
            "sidewatch_adversarial_score",
            "Adversarial score per input, the verdict's: with feature squeezing alone, the largest L1 distance "
            "between the softmax on the input and on a squeezed copy; with the autoencoder beside it, the largest "
            "detector score over its own threshold (flagged above 1).",
            ["model", "version"], buckets=SCORE_BUCKETS, registry=registry,
        )
        self.detector_score = Histogram(
            "sidewatch_adversarial_detector_score",
            "Each detector's own score per input over its calibrated threshold: above 1, that detector flags "
            "the input.",
            ["model", "version", "detector"], buckets=RATIO_BUCKETS, registry=registry,
        )
        self.detector_detections = Counter(
            "sidewatch_adversarial_detector_detections_total",
            "Inputs over a detector's own threshold (an input any detector flags is adversarial).",
            ["model", "version", "detector", "mode"], registry=registry,
        )
        self.detector_threshold = Gauge(
            "sidewatch_adversarial_detector_threshold",
            "Each detector's own threshold on its score, set jointly so that flagging an input when any detector "
            "is over its threshold keeps the target false-positive rate.",
            ["model", "version", "detector"], registry=registry,
        )
        self.inputs = Counter(
            "sidewatch_adversarial_inputs_total",
            "Inputs (rows) scored by the adversarial detector.",
            ["model", "version", "mode"], registry=registry,
        )
        self.detections = Counter(
            "sidewatch_adversarial_detections_total",
            "Inputs whose score was over the calibrated threshold.",
            ["model", "version", "mode"], registry=registry,
        )
        self.rejected = Counter(
            "sidewatch_adversarial_rejected_total",
            "Requests answered INVALID_ARGUMENT in enforce mode without reaching the model server.",
            ["model", "version"], registry=registry,
        )
        self.threshold = Gauge(
            "sidewatch_adversarial_threshold",
            "The calibrated score threshold in force.",
            ["model", "version"], registry=registry,
        )
        self.target_fpr = Gauge(
            "sidewatch_adversarial_target_false_positive_ratio",
            "The false-positive rate on benign data that the threshold was calibrated for.",
            ["model", "version"], registry=registry,
        )
        # The alarm on the share of flagged inputs (a one-sided test against target_fpr, under a budget).
        self.rate_statistic = Gauge(
            "sidewatch_adversarial_rate_statistic",
            "Evidence that more inputs are flagged than the calibrated false-positive rate: t at the last look.",
            ["model", "version"], registry=registry,
        )
        self.rate_threshold = Gauge(
            "sidewatch_adversarial_rate_threshold",
            "The t the evidence must pass at the false-alarm budget's level.",
            ["model", "version"], registry=registry,
        )
        self.rate_share = Gauge(
            "sidewatch_adversarial_rate_flagged_ratio",
            "Share of inputs flagged in the last tested look's window.",
            ["model", "version"], registry=registry,
        )
        self.rate_detected = Gauge(
            "sidewatch_adversarial_rate_detected",
            "1 while the flagged share is above the calibrated false-positive rate (held until it is back).",
            ["model", "version"], registry=registry,
        )
        self.rate_alarms = Counter(
            "sidewatch_adversarial_rate_alarms_total",
            "Rises of sidewatch_adversarial_rate_detected.",
            ["model", "version"], registry=registry,
        )
        self.batch_size = Histogram(
            "sidewatch_detector_batch_size",
            "Inputs per detector call (micro-batches in shadow mode, one request inline).",
            ["model", "version", "detector"], buckets=BATCH_BUCKETS, registry=registry,
        )
        self.duration = Histogram(
            "sidewatch_detector_duration_seconds",
            "Time of one detector call.",
            ["model", "version", "detector"], buckets=DETECTOR_LATENCY_BUCKETS_SECONDS, registry=registry,
        )
        self.errors = Counter(
            "sidewatch_detector_errors_total",
            "Detector failures and inputs the detector could not take, by reason; the calls themselves were "
            "forwarded.",
            ["model", "version", "detector", "reason"], registry=registry,
        )


# The query detector's cost per request on the hot path: tens of microseconds for a small image.
QUERY_CHECK_BUCKETS_SECONDS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
# Why a request (or some of its rows) was not fingerprinted (sidewatch_query_skipped_total's reason label).
QUERY_SKIP_REASONS = ("undecodable", "no_numeric_input", "rows_over_limit")


class QueryMetrics:
    """Black-box query detection (agent/detect/queries/), by model only: never by client, whose identities are
    unbounded."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows = Counter("sidewatch_query_rows_total",
                            "Input rows fingerprinted by the query detector (repeats included).",
                            ["model"], registry=registry)
        self.repeats = Counter("sidewatch_query_repeats_total",
                               "Rows identical to one of the same client's recent rows (retries): counted for "
                               "nothing.", ["model"], registry=registry)
        self.near_duplicates = Counter("sidewatch_query_near_duplicates_total",
                                       "Rows that were near-duplicates of one of the same client's recent rows.",
                                       ["model"], registry=registry)
        self.flags = Counter("sidewatch_query_flags_total",
                             "Times a client was flagged: enough of its recent rows were near-duplicates of its "
                             "earlier ones, as a black-box attack's are.", ["model"], registry=registry)
        self.refused = Counter("sidewatch_query_refused_total",
                               "Requests refused with PERMISSION_DENIED in enforce mode (a flagged client, while "
                               "blocked).", ["model"], registry=registry)
        self.skipped = Counter("sidewatch_query_skipped_total",
                               "Requests or rows not fingerprinted, by reason (undecodable, no_numeric_input: requests; "
                               "rows_over_limit: rows past detection.queries.max_rows_per_request).",
                               ["model", "reason"], registry=registry)
        self.clients = Gauge("sidewatch_query_clients",
                             "Client histories held (one per client and model), at most detection.queries.max_clients.",
                             registry=registry)
        self.evicted = Counter("sidewatch_query_clients_evicted_total",
                               "Client histories dropped for room (detection.queries.max_clients) before they were "
                               "idle for client_idle_seconds.", registry=registry)
        self.duration = Histogram("sidewatch_query_check_seconds",
                                  "Time the query detector takes per request, on the request path.",
                                  buckets=QUERY_CHECK_BUCKETS_SECONDS, registry=registry)


class DriftMetrics:
    """The drift and anomaly detectors' metrics.

    ``feature`` is "all" for a detector with one statistic; per-feature series exist only for a
    bounded set (the top-k features by statistic, re-chosen as they change, and the configured
    fleet features).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version", "detector", "feature"]
        version = ["model", "version"]
        self.statistic = Gauge("sidewatch_drift_statistic",
                               "The evidence of drift at the last tested look: |t| of the feature's mean test.",
                               labels, registry=registry)
        self.threshold = Gauge("sidewatch_drift_threshold",
                               "The |t| the evidence must pass at the false-alarm budget's level per test.",
                               labels, registry=registry)
        self.p_value = Gauge("sidewatch_drift_p_value", "The statistic's p-value at the last tested look.",
                             labels, registry=registry)
        self.effect = Gauge("sidewatch_drift_effect",
                            "The drift's size at the last tested look, in reference standard deviations.",
                            labels, registry=registry)
        self.drift = Gauge("sidewatch_drift_detected",
                           "1 while the drift flag is up: raised when the budgeted test finds evidence and an "
                           "effect of at least sidewatch_drift_min_effect, held until the evidence clears.",
                           labels, registry=registry)
        self.alarms = Counter("sidewatch_drift_alarms_total", "Rises of the drift flag (0 -> 1 transitions).",
                              ["model", "version", "detector"], registry=registry)
        self.min_effect = Gauge("sidewatch_drift_min_effect",
                                "The smallest effect (reference standard deviations) that may raise the flag.",
                                version, registry=registry)
        self.budget = Gauge("sidewatch_drift_false_alarm_budget_seconds",
                            "Seconds of benign traffic per false drift alarm allowed (the false-alarm budget).",
                            version, registry=registry)
        self.alpha = Gauge("sidewatch_drift_alpha", "Each test's level at a look: the budget shared by every test "
                           "and look.", version, registry=registry)
        self.looks = Counter("sidewatch_drift_looks_total",
                             "Looks at the evidence; untested: too few requests, carried to the next look.",
                             ["model", "version", "result"], registry=registry)
        self.last_alarm = Gauge("sidewatch_drift_last_alarm_timestamp_seconds",
                                "Unix time of the last rise of a drift flag of the version (absent: none yet).",
                                version, registry=registry)
        self.baseline_state = Gauge("sidewatch_drift_baseline_state",
                                    "1 for the state of a baseline learned from traffic: collecting, calibrating "
                                    "or watching.", ["model", "version", "state"], registry=registry)
        self.canary_state = Gauge("sidewatch_drift_canary_state",
                                  "1 for the state of a canary's comparison with the stable version that serves "
                                  "beside it: collecting (the stable version's rows to fit on) or watching.",
                                  ["model", "version", "stable_version", "state"], registry=registry)
        # source: metadata (the upstream's ModelMetadata) or traffic (the first request's tensors); reason:
        # answered, or why not (no_lookup, unavailable, unusable). Both bounded.
        self.specs = Counter("sidewatch_drift_specs_total",
                             "Tensor kinds chosen for a baseline learned from traffic, by where they came from.",
                             ["model", "version", "source", "reason"], registry=registry)
        self.watching_since = Gauge("sidewatch_drift_watching_since_timestamp_seconds",
                                    "Unix time drift watching of the version began (kept across restarts).",
                                    version, registry=registry)
        self.samples = Counter("sidewatch_drift_samples_total", "Samples fed to the drift detectors.",
                               ["model", "version"], registry=registry)
        self.skipped = Counter("sidewatch_drift_skipped_total",
                               "Samples the drift detectors skipped, by reason (e.g. NaN or Inf).",
                               ["model", "version", "reason"], registry=registry)
        self.anomaly_score = Histogram("sidewatch_anomaly_score",
                                       "Per-request anomaly score (higher is more anomalous).",
                                       ["model", "version"],
                                       buckets=(0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 1.0),
                                       registry=registry)
        self.anomalies = Counter("sidewatch_anomalies_total", "Requests over the calibrated anomaly threshold.",
                                 ["model", "version"], registry=registry)
        self.anomaly_threshold = Gauge("sidewatch_anomaly_threshold", "The calibrated anomaly-score threshold.",
                                       ["model", "version"], registry=registry)
        # Fleet-wide drift: counters per reference-decile bin merge across replicas by sum, and a
        # Prometheus recording rule turns them into a PSI (deploy/prometheus/).
        self.bins = Counter("sidewatch_drift_bin_total",
                            "Values of a watched feature, counted into bins cut at the feature's reference deciles.",
                            ["model", "version", "feature", "bin"], registry=registry)
        self.bin_reference = Gauge("sidewatch_drift_bin_reference_ratio",
                                   "Share of the reference data in each bin of sidewatch_drift_bin_total.",
                                   ["model", "version", "feature", "bin"], registry=registry)


# Why a firing alert opened no incident (sidewatch_alert_firings_ignored_total's reason label).
FIRING_REFUSALS = ("stale", "future", "max_open_incidents", "truncated")


class AlertMetrics:
    """The alert engine's and the rollback hooks' metrics.

    ``alert`` values are rule names from the config (bounded by the config), or Alertmanager alert
    names, which the caller passes through :meth:`alert_label`: the names the config gives
    (``known_alerts``: admin.alertmanager_hooks, alerts.rules) keep their own, at most ``max_alert_names``
    others get theirs, and the rest are "_other" (:class:`BoundedNames`).
    """

    def __init__(self, registry: CollectorRegistry, known_alerts: Iterable[str] = (), max_alert_names: int = 32) -> None:
        self.alert_label = BoundedNames(max_alert_names, known_alerts)
        self.active = Gauge("sidewatch_alert_active", "1 while the alert is firing, else 0.",
                            ["alert", "severity"], registry=registry)
        self.pending = Gauge("sidewatch_alert_pending", "1 while the alert's condition holds but its `for` has not passed.",
                             ["alert", "severity"], registry=registry)
        self.transitions = Counter("sidewatch_alert_transitions_total",
                                   "Alert state changes, by the state entered (pending, firing, resolved, inactive).",
                                   ["alert", "state"], registry=registry)
        self.value = Gauge("sidewatch_alert_value", "The value the alert's condition was last evaluated on.",
                           ["alert"], registry=registry)
        self.hook_runs = Counter("sidewatch_rollback_hook_runs_total",
                                 "Rollback hook outcomes (success, failure, dry_run, skipped), one per incident and hook.",
                                 ["alert", "hook", "result"], registry=registry)
        self.hook_attempts = Counter("sidewatch_rollback_hook_attempts_total",
                                     "Rollback hook attempts, retries included.", ["alert", "hook"], registry=registry)
        self.hook_last_timestamp = Gauge("sidewatch_rollback_last_timestamp_seconds",
                                         "Unix time of the hook's last successful rollback.", ["alert", "hook"],
                                         registry=registry)
        self.route_pinned = Gauge("sidewatch_route_pinned",
                                  "1 while ModelInfer requests for the model are pinned to this version by a route hook.",
                                  ["model", "version"], registry=registry)
        self.incidents = Counter("sidewatch_incidents_total", "Incidents opened, by where the alert came from.",
                                 ["alert", "source"], registry=registry)
        self.firings_ignored = Counter("sidewatch_alert_firings_ignored_total",
                                       "Firing alerts that opened no incident, by source (sidecar, alertmanager) and "
                                       "reason (stale: it started no later than the same alert's last resolution; "
                                       "future: it starts later than the sidecar's clock allows, "
                                       "rollback.max_clock_skew_seconds; max_open_incidents: "
                                       "rollback.max_open_alertmanager_incidents were open; truncated: beyond "
                                       "admin.max_alerts_per_delivery in its delivery).",
                                       ["source", "reason"], registry=registry)
        self.receiver_requests = Counter("sidewatch_alertmanager_requests_total",
                                         "Alertmanager webhook deliveries to the receiver, by result.",
                                         ["result"], registry=registry)
        self.admin_requests = Counter("sidewatch_admin_requests_total",
                                      "Requests to the admin API, by endpoint (status, routes_undo, alertmanager, "
                                      "other) and HTTP status code.",
                                      ["endpoint", "code"], registry=registry)


# Why an HTTP listener (the admin API, /metrics) cut a connection (agent/httpd/guard.py).
CONNECTION_CUT_REASONS = ("deadline", "evicted", "full")


class ListenerMetrics:
    """The HTTP listeners' (admin, metrics) connections cut by their bounds: a slowloris shows here."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections_cut = Counter(
            "sidewatch_http_connections_cut_total",
            "Connections an HTTP listener (admin, metrics) closed, by reason: deadline (a request not done "
            "within request_timeout_seconds: a slow client, or a kept-alive connection left idle), evicted (not "
            "yet authenticated when a new connection needed its slot), full (no slot for a new connection).",
            ["listener", "reason"], registry=registry)

    def count_cut(self, listener: str) -> Callable[[str], None]:
        """The function that counts ``listener``'s cut connections, given the reason (its series start at 0)."""
        for reason in CONNECTION_CUT_REASONS:
            self.connections_cut.labels(listener, reason)
        return lambda reason: self.connections_cut.labels(listener, reason).inc()


class EnvoyMetrics:
    """The Envoy data plane's own state (agent/dataplane/envoy): restarts of the supervised Envoy and
    its readiness, so that an Envoy that keeps crashing shows on the dashboard and in alerts, and the
    access-log entries (one per call) it sent or dropped."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.restarts = Counter(
            "sidewatch_envoy_restarts_total",
            "Times the supervised Envoy exited on its own and was started again.",
            registry=registry,
        )
        self.ready = Gauge(
            "sidewatch_envoy_ready",
            "1 while the supervised Envoy is up and answers ready on its admin API, else 0.",
            registry=registry,
        )
        self.access_logs_dropped = Counter(
            "sidewatch_envoy_access_logs_dropped_total",
            "Access-log entries (one per call) that Envoy dropped because sidewatch read them too slowly: "
            "those calls are missing from sidewatch_requests_total and the latency histogram.",
            registry=registry,
        )
        self.access_logs_written = Counter(
            "sidewatch_envoy_access_logs_written_total",
            "Access-log entries (one per call) that Envoy sent to sidewatch.",
            registry=registry,
        )
