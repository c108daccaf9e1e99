"""The alert engine: rules over the sidecar's own metrics, evaluated on a thread of their own.

Every ``evaluation_interval_seconds`` the engine collects the series its rules read from the
sidecar's Prometheus registry, keeps a short history of each counter (to take increases over a
window), computes each rule's value per group and moves each group's alert through

    inactive -> pending -> firing -> (condition clear for clear_for_seconds) -> resolved -> inactive

A firing alert goes to the rollback dispatcher (``firing``); a resolved one closes its incident
(``resolved``). States are exported as metrics (AlertMetrics) and listed by :meth:`AlertEngine.status`.
Reading the registry rather than the detectors keeps the engine decoupled from them.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from agent.alerts.incident import Alert, alert_key
from agent.config.alerts import AlertsConfig, Rule
from agent.metrics import AlertMetrics

if TYPE_CHECKING:
    from agent.alerts.dispatcher import RollbackDispatcher

log = logging.getLogger(__name__)

LabelSet = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: hashable labels of one series

INACTIVE, PENDING, FIRING = "inactive", "pending", "firing"


class CounterHistory:
    """(time, value) points of one counter series, enough to take its increase over a window.

    The increase over a window (now - window, now] runs from the last point at or before its start
    to the newest. Increases add up the positive steps between points; a value that goes down is a counter reset,
    after which the new value is the increase since the reset (as Prometheus's ``increase`` does).
    """

    def __init__(self) -> None:
        self.points: collections.deque[tuple[float, float]] = collections.deque()

    def add(self, now: float, value: float, keep_seconds: float) -> None:
        self.points.append((now, value))
        # Keep one point at or before the start of the longest window: the base of its increase.
        while len(self.points) > 2 and self.points[1][0] <= now - keep_seconds:
            self.points.popleft()

    def increase(self, now: float, window: float) -> float:
        start = now - window
        total = 0.0
        previous = None
        for when, value in self.points:
            if when <= start:
                previous = value  # the base: the last point at or before the window's start
                continue
            if previous is not None:
                total += value - previous if value >= previous else value
            previous = value
        return total


def _format(template: str, value: float | None, labels: dict[str, str]) -> str:
    """An annotation with {value} and {label} filled in; a template that does not format stays as written."""
    try:
        return template.format_map({**labels, "value": value if value is not None else math.nan})
    except (KeyError, ValueError, IndexError, AttributeError, TypeError):
        return template


@dataclass
class SeriesState:
    """One alert series: a rule and one group of its labels."""

    labels: dict[str, str]
    key: str
    state: str = INACTIVE
    since: float = 0.0              # wall clock, when the current state was entered
    pending_since: float = 0.0      # monotonic
    held: int = 0                   # consecutive evaluations with the condition true
    clear_since: float | None = None  # monotonic, while a firing alert's condition is clear
    value: float | None = None
    incident: str | None = None
    fired_at: float | None = None   # wall clock
    resolved_at: float | None = None


@dataclass
class RuleState:
    rule: Rule
    series: dict[tuple[str, ...], SeriesState] = field(default_factory=dict)


class AlertEngine:
    """Evaluates the configured rules against ``registry`` and hands firing alerts to ``dispatcher``."""

    def __init__(self, config: AlertsConfig, registry: CollectorRegistry, metrics: AlertMetrics,
                 dispatcher: "RollbackDispatcher | None" = None) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.dispatcher = dispatcher
        self.rules = [RuleState(rule) for rule in config.rules]
        # How far back each counter must be kept: the longest window of the rules that read it.
        self._keep: dict[str, float] = {}
        self._gauges: set[str] = set()
        for rule in config.rules:
            for name in rule.counter_names():
                self._keep[name] = max(self._keep.get(name, 0.0), rule.window_seconds)
            self._gauges.update(rule.gauge_names())
        self._history: dict[tuple[str, LabelSet], CounterHistory] = {}
        self._last_collect: float | None = None
        self._lock = threading.Lock()  # evaluate() and status() from different threads
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.evaluations = 0
        self.errors = 0
        # Every rule has its series from the start, so that dashboards and alerts on them have data.
        for rule in config.rules:
            metrics.active.labels(rule.name, rule.severity).set(0)
            metrics.pending.labels(rule.name, rule.severity).set(0)
            metrics.value.labels(rule.name).set(math.nan)
            for state in (PENDING, FIRING, "resolved", INACTIVE):
                metrics.transitions.labels(rule.name, state)

    # --- running ---------------------------------------------------------------------------------

    def start(self) -> None:
        if not self.rules:
            return
        self._thread = threading.Thread(target=self._run, name="sidewatch-alerts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        interval = self.config.evaluation_interval_seconds
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.evaluate()
            except Exception:  # a bug in one evaluation must not end alerting for good
                self.errors += 1
                log.exception("sidewatch: alert evaluation failed")
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a loaded machine): skip the missed ticks rather than burst
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    # --- evaluation --------------------------------------------------------------------------

    def evaluate(self, now: float | None = None, wall: float | None = None) -> None:
        """One evaluation of every rule; ``now`` (monotonic) and ``wall`` (unix) can be given by tests."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        with self._lock:
            counters, gauges = self._collect(now)
            for rule_state in self.rules:
                values = self._rule_values(rule_state.rule, counters, gauges, now)
                self._step(rule_state, values, now, wall)
            self.evaluations += 1

    def _collect(self, now: float) -> tuple[dict[str, dict[LabelSet, CounterHistory]], dict[str, dict[LabelSet, float]]]:
        names = set(self._keep) | self._gauges
        samples: dict[str, dict[LabelSet, float]] = collections.defaultdict(dict)
        for family in self.registry.restricted_registry(names).collect():
            for sample in family.samples:
                if sample.name in names:
                    samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
        counters: dict[str, dict[LabelSet, CounterHistory]] = {}
        seen: set[tuple[str, LabelSet]] = set()
        for name, keep in self._keep.items():
            counters[name] = {}
            for labels, value in samples.get(name, {}).items():
                key = (name, labels)
                history = self._history.get(key)
                if history is None:
                    history = self._history[key] = CounterHistory()
                    # A counter series that appears between two collections started at 0 after the
                    # first of them (prometheus_client creates a child on its first increment).
                    if self._last_collect is not None:
                        history.add(self._last_collect, 0.0, keep)
                history.add(now, value, keep)
                counters[name][labels] = history
                seen.add(key)
        for key in [key for key in self._history if key not in seen]:
            del self._history[key]  # the series is gone (removed from the registry)
        self._last_collect = now
        return counters, {name: samples.get(name, {}) for name in self._gauges}

    @staticmethod
    def _matches(matchers: dict[str, str], labels: LabelSet) -> bool:
        if not matchers:
            return True
        have = dict(labels)
        return all(have.get(name) == value for name, value in matchers.items())

    @staticmethod
    def _group(rule: Rule, labels: LabelSet) -> tuple[str, ...]:
        have = dict(labels)
        return tuple(have.get(name, "") for name in rule.group_by)

    def _rule_values(self, rule: Rule, counters, gauges, now: float) -> dict[tuple[str, ...], tuple[float | None, bool]]:
        """{group: (value, condition)} for every group the rule sees now."""
        if rule.kind == "gauge":
            return self._gauge_values(rule, gauges)
        window = rule.window_seconds

        def sums(name: str, extra: dict[str, str]) -> dict[tuple[str, ...], float]:
            """Increase over the window of the matching series of one counter, summed per group."""
            totals: dict[tuple[str, ...], float] = collections.defaultdict(float)
            for labels, history in counters[name].items():
                if self._matches(rule.matchers, labels) and self._matches(extra, labels):
                    totals[self._group(rule, labels)] += history.increase(now, window)
            return totals

        results: dict[tuple[str, ...], tuple[float | None, bool]] = {}
        if rule.kind == "rate":
            for group, increase in sums(rule.metric, {}).items():
                value = increase / window
                results[group] = (value, self._beyond(rule, value, rule.threshold))
            return results
        # ratio: the groups are the denominator's; a numerator series without one counts for nothing.
        numerators = sums(rule.numerator, rule.numerator_matchers)
        for group, denominator in sums(rule.denominator, {}).items():
            numerator = numerators.get(group, 0.0)
            value = numerator / denominator if denominator > 0 else None
            enough = denominator >= rule.min_denominator and value is not None
            results[group] = (value, enough and self._beyond(rule, value, rule.threshold))
        return results

    def _gauge_values(self, rule: Rule, gauges) -> dict[tuple[str, ...], tuple[float | None, bool]]:
        # Per series: by how much it is beyond its threshold; per group: the series furthest beyond.
        best: dict[tuple[str, ...], tuple[float, float]] = {}  # group -> (margin, value)
        thresholds = gauges.get(rule.threshold_metric, {}) if rule.threshold_metric else None
        for labels, value in gauges.get(rule.metric, {}).items():
            if not self._matches(rule.matchers, labels) or math.isnan(value):
                continue
            threshold = rule.threshold if thresholds is None else thresholds.get(labels)
            if threshold is None or math.isnan(threshold):
                continue  # no threshold series with the same labels: nothing to compare with
            margin = value - threshold if rule.direction == "above" else threshold - value
            group = self._group(rule, labels)
            if group not in best or margin > best[group][0]:
                best[group] = (margin, value)
        return {group: (value, margin > 0) for group, (margin, value) in best.items()}

    @staticmethod
    def _beyond(rule: Rule, value: float, threshold: float) -> bool:
        return value > threshold if rule.direction == "above" else value < threshold

    # --- states --------------------------------------------------------------------------------

    def _step(self, rule_state: RuleState, values, now: float, wall: float) -> None:
        rule = rule_state.rule
        for group in values.keys() - rule_state.series.keys():
            labels = {name: value for name, value in zip(rule.group_by, group) if value}
            labels.update(rule.labels)
            rule_state.series[group] = SeriesState(labels=labels, key=alert_key(rule.name, labels), since=wall)
        for group, series in list(rule_state.series.items()):
            # A group that has disappeared has no data: its condition does not hold.
            value, condition = values.get(group, (None, False))
            series.value = value
            self._advance(rule, series, condition, now, wall)
            if series.state == INACTIVE and group not in values:
                del rule_state.series[group]  # nothing to remember about it
        self._export(rule_state)

    def _advance(self, rule: Rule, series: SeriesState, condition: bool, now: float, wall: float) -> None:
        transitions = self.metrics.transitions
        if series.state == INACTIVE:
            if not condition:
                return
            series.state, series.since, series.pending_since, series.held = PENDING, wall, now, 0
            if rule.for_seconds > 0 or rule.for_evaluations > 1:
                transitions.labels(rule.name, PENDING).inc()
        if series.state == PENDING:
            if not condition:
                series.state, series.since, series.held = INACTIVE, wall, 0
                transitions.labels(rule.name, INACTIVE).inc()
                return
            series.held += 1
            if now - series.pending_since >= rule.for_seconds and series.held >= rule.for_evaluations:
                self._fire(rule, series, wall)
            return
        # FIRING
        if condition:
            series.clear_since = None
            return
        if series.clear_since is None:
            series.clear_since = now
        if now - series.clear_since >= rule.clear_for_seconds:
            self._resolve(rule, series, wall)

    def _fire(self, rule: Rule, series: SeriesState, wall: float) -> None:
        series.state, series.since, series.fired_at, series.clear_since = FIRING, wall, wall, None
        series.resolved_at = None
        self.metrics.transitions.labels(rule.name, FIRING).inc()
        log.warning("sidewatch: alert %s firing (value %s)", series.key, series.value)
        if self.dispatcher is None:
            return
        annotations = {name: _format(text, series.value, series.labels) for name, text in rule.annotations.items()}
        alert = Alert(name=rule.name, key=series.key, severity=rule.severity, labels=dict(series.labels),
                      annotations=annotations, source="sidecar", started_at=wall, value=_json_number(series.value),
                      hooks=tuple(rule.hooks))
        try:
            series.incident = self.dispatcher.firing(alert)
        except Exception:  # the alert stays firing; the dispatcher's failure is its own to report
            self.errors += 1
            log.exception("sidewatch: the rollback dispatcher refused alert %s", series.key)

    def _resolve(self, rule: Rule, series: SeriesState, wall: float) -> None:
        series.state, series.since, series.resolved_at, series.clear_since = INACTIVE, wall, wall, None
        series.held = 0
        self.metrics.transitions.labels(rule.name, "resolved").inc()
        log.warning("sidewatch: alert %s resolved", series.key)
        if self.dispatcher is None:
            return
        try:
            self.dispatcher.resolved(series.key)
        except Exception:
            self.errors += 1
            log.exception("sidewatch: the rollback dispatcher failed to resolve %s", series.key)

    def _export(self, rule_state: RuleState) -> None:
        rule = rule_state.rule
        states = [series.state for series in rule_state.series.values()]
        self.metrics.active.labels(rule.name, rule.severity).set(1 if FIRING in states else 0)
        self.metrics.pending.labels(rule.name, rule.severity).set(1 if PENDING in states else 0)
        # The worst group's value: the highest for an "above" rule, the lowest for a "below" one.
        known = [series.value for series in rule_state.series.values() if series.value is not None]
        worst = (max(known) if rule.direction == "above" else min(known)) if known else math.nan  # NaN: no data
        self.metrics.value.labels(rule.name).set(worst)

    # --- status ------------------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """Every rule with its alert series (JSON-serialisable), for the admin API."""
        with self._lock:
            rules = []
            for rule_state in self.rules:
                rule = rule_state.rule
                series = [{
                    "key": s.key, "labels": s.labels, "state": s.state, "since": s.since, "value": _json_number(s.value),
                    "clearing": s.clear_since is not None, "fired_at": s.fired_at, "resolved_at": s.resolved_at,
                    "incident": s.incident,
                } for s in rule_state.series.values()]
                states = {s["state"] for s in series}
                rules.append({
                    "name": rule.name, "kind": rule.kind, "severity": rule.severity, "hooks": list(rule.hooks),
                    "state": FIRING if FIRING in states else PENDING if PENDING in states else INACTIVE,
                    "series": series,
                })
            return rules


def _json_number(value: float | None) -> float | None:
    """JSON has no NaN or infinity."""
    return None if value is None or not math.isfinite(value) else value
