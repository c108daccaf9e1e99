"""Alert rules: the ``alerts:`` section of the configuration.

A rule reads series from the sidecar's own Prometheus registry, so any exported series can be its
input. Three kinds keep it small:

- ``ratio``: the increase of one counter over the increase of another, over ``window_seconds``
  (adversarial detections / inputs scored). No alert below ``min_denominator``, so 1 of 1 does not fire.
- ``rate``: the increase of a counter per second over ``window_seconds`` (anomalies per second).
- ``gauge``: a gauge's latest value, compared with a constant or with another gauge of the same
  labels (``sidewatch_drift_statistic`` above ``sidewatch_drift_threshold``).

The condition is ``above`` or ``below`` a constant (``above_metric`` / ``below_metric``: another
gauge, for ``gauge`` rules). Series are grouped by ``group_by``: one alert per group, firing when any
series of the group meets the condition (for ratio and rate rules, the group's series are summed first).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from agent.config.base import Strict

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"



class Rule(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["ratio", "rate", "gauge"]
    # rate and gauge: the series read. Sample names as exported: counters end in _total.
    metric: str | None = Field(None, pattern=NAME_PATTERN)
    # ratio: numerator and denominator counters.
    numerator: str | None = Field(None, pattern=NAME_PATTERN)
    denominator: str | None = Field(None, pattern=NAME_PATTERN)
    # Exact label values every series read by the rule must have (e.g. {detector: inputs_mmd}).
    matchers: dict[str, str] = {}
    # ratio: more label values for the numerator only (errors over all calls: {code: UNAVAILABLE}).
    numerator_matchers: dict[str, str] = {}
    # One alert per distinct combination of these labels; a series without one of them has "" there.
    group_by: list[str] = ["model", "version"]
    # ratio and rate: the counters' increase over this window.
    window_seconds: float = Field(30.0, gt=0)
    # ratio: no alert unless the denominator grew by at least this much over the window.
    min_denominator: float = Field(10.0, ge=0)
    above: float | None = None
    below: float | None = None
    # gauge: compare with another gauge of exactly the same labels instead of a constant.
    above_metric: str | None = Field(None, pattern=NAME_PATTERN)
    below_metric: str | None = Field(None, pattern=NAME_PATTERN)
    # The condition must hold this long, and on this many consecutive evaluations, before the
    # alert fires (until then it is pending).
    for_seconds: float = Field(0.0, ge=0)
    for_evaluations: int = Field(1, ge=1)
    # Hysteresis: a firing alert resolves only after its condition has been clear this long.
    clear_for_seconds: float = Field(60.0, ge=0)
    severity: str = "warning"
    labels: dict[str, str] = {}
    # Values may use {value} (format specs allowed: {value:.1%}) and {label} for any label of the alert.
    annotations: dict[str, str] = {}
    # Names of hooks under rollback.hooks, run when the alert fires.
    hooks: list[str] = []

    @model_validator(mode="after")
    def _check_kind(self) -> "Rule":
        if self.kind == "ratio":
            if self.numerator is None or self.denominator is None:
                raise ValueError("a ratio rule needs numerator and denominator")
            if self.metric is not None:
                raise ValueError("a ratio rule takes numerator and denominator, not metric")
        elif self.numerator_matchers:
            raise ValueError("numerator_matchers: only for ratio rules")
        if self.kind != "ratio":
            if self.metric is None:
                raise ValueError(f"a {self.kind} rule needs metric")
            if self.numerator is not None or self.denominator is not None:
                raise ValueError(f"a {self.kind} rule takes metric, not numerator/denominator")
        given = [key for key in ("above", "below", "above_metric", "below_metric") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of above, below, above_metric, below_metric (got {given or 'none'})")
        if given[0].endswith("_metric") and self.kind != "gauge":
            raise ValueError(f"{given[0]} compares two gauges: only for gauge rules")
        if "alertname" in self.labels:
            raise ValueError("labels: alertname is the rule's name")
        return self

    @property
    def direction(self) -> str:
        """'above' or 'below'."""
        return "above" if self.above is not None or self.above_metric is not None else "below"

    @property
    def threshold_metric(self) -> str | None:
        return self.above_metric or self.below_metric

    @property
    def threshold(self) -> float | None:
        return self.above if self.above is not None else self.below

    def counter_names(self) -> list[str]:
        """The sample names this rule reads as counters (their increase over a window)."""
        if self.kind == "ratio":
            return [self.numerator, self.denominator]
        return [self.metric] if self.kind == "rate" else []

    def gauge_names(self) -> list[str]:
        if self.kind != "gauge":
            return []
        return [self.metric] + ([self.threshold_metric] if self.threshold_metric else [])


class AlertsConfig(Strict):
    # How often every rule is evaluated (on the engine's own thread).
    evaluation_interval_seconds: float = Field(1.0, gt=0)
    rules: list[Rule] = []

    @model_validator(mode="after")
    def _unique_names(self) -> "AlertsConfig":
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}")
            seen.add(rule.name)
        return self
