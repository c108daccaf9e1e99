"""The alert engine's rules and states, on a real Prometheus registry, with the clock stepped by the test."""

from __future__ import annotations

import math
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from agent.alerts.engine import AlertEngine, CounterHistory
from agent.config.alerts import AlertsConfig
from agent.metrics import AlertMetrics


class Dispatcher:
    """Stands in for the rollback dispatcher (tested on its own): records what the engine hands over."""

    def __init__(self) -> None:
        self.fired: list = []
        self.resolved_keys: list[str] = []

    def firing(self, alert) -> str:
        self.fired.append(alert)
        return f"inc-{len(self.fired)}"

    def resolved(self, key: str) -> None:
        self.resolved_keys.append(key)


def _sample(registry, name, **labels):
    return registry.get_sample_value(name, labels)


class Fixture:
    def __init__(self, rules: list[dict], interval: float = 1.0) -> None:
        self.registry = CollectorRegistry()
        self.inputs = Counter("sidewatch_adversarial_inputs_total", "", ["model", "version", "mode"],
                              registry=self.registry)
        self.detections = Counter("sidewatch_adversarial_detections_total", "", ["model", "version", "mode"],
                                  registry=self.registry)
        self.anomalies = Counter("sidewatch_anomalies_total", "", ["model", "version"], registry=self.registry)
        drift_labels = ["model", "version", "detector", "feature"]
        self.drift = Gauge("sidewatch_drift_detected", "", drift_labels, registry=self.registry)
        self.statistic = Gauge("sidewatch_drift_statistic", "", drift_labels, registry=self.registry)
        self.threshold = Gauge("sidewatch_drift_threshold", "", drift_labels, registry=self.registry)
        self.metrics = AlertMetrics(self.registry)
        self.dispatcher = Dispatcher()
        config = AlertsConfig.model_validate({"evaluation_interval_seconds": interval, "rules": rules})
        self.engine = AlertEngine(config, self.registry, self.metrics, self.dispatcher)
        self.now = 1000.0

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds
        self.engine.evaluate(now=self.now, wall=1.7e9 + self.now)

    def state(self, rule: str) -> dict[str, str]:
        for entry in self.engine.status():
            if entry["name"] == rule:
                return {series["key"]: series["state"] for series in entry["series"]}
        raise KeyError(rule)

    def value(self, name, **labels):
        return _sample(self.registry, name, **labels)


ADVERSARIAL = {
    "name": "AdversarialRateHigh", "kind": "ratio", "numerator": "sidewatch_adversarial_detections_total",
    "denominator": "sidewatch_adversarial_inputs_total", "window_seconds": 5, "min_denominator": 10,
    "above": 0.05, "for_seconds": 2, "clear_for_seconds": 3, "severity": "critical",
    "labels": {"team": "ml"}, "annotations": {"summary": "{value:.0%} of {model} v{version} inputs flagged"},
    "hooks": ["pin-v1"],
}
KEY = "AdversarialRateHigh{model=mnist_cnn,team=ml,version=2}"


def test_every_rule_is_exported_at_zero_from_the_start():
    f = Fixture([ADVERSARIAL])
    assert f.value("sidewatch_alert_active", alert="AdversarialRateHigh", severity="critical") == 0
    assert f.value("sidewatch_alert_pending", alert="AdversarialRateHigh", severity="critical") == 0
    for state in ("pending", "firing", "resolved", "inactive"):
        assert f.value("sidewatch_alert_transitions_total", alert="AdversarialRateHigh", state=state) == 0
    assert math.isnan(f.value("sidewatch_alert_value", alert="AdversarialRateHigh"))


def test_ratio_rule_goes_pending_then_fires_then_resolves_after_the_clear_period():
    f = Fixture([ADVERSARIAL])
    f.inputs.labels("mnist_cnn", "2", "shadow").inc(0)
    f.tick()
    assert f.state("AdversarialRateHigh") == {KEY: "inactive"}  # no inputs yet: no value
    f.inputs.labels("mnist_cnn", "2", "shadow").inc(20)
    f.detections.labels("mnist_cnn", "2", "shadow").inc(10)  # a new series: counted from 0
    f.tick()
    assert f.state("AdversarialRateHigh") == {KEY: "pending"}
    assert f.value("sidewatch_alert_pending", alert="AdversarialRateHigh", severity="critical") == 1
    assert f.value("sidewatch_alert_value", alert="AdversarialRateHigh") == pytest.approx(0.5)
    f.tick()
    assert f.state("AdversarialRateHigh") == {KEY: "pending"}  # for_seconds=2 not yet passed
    f.tick()
    assert f.state("AdversarialRateHigh") == {KEY: "firing"}
    assert f.value("sidewatch_alert_active", alert="AdversarialRateHigh", severity="critical") == 1
    assert f.value("sidewatch_alert_pending", alert="AdversarialRateHigh", severity="critical") == 0
    [alert] = f.dispatcher.fired
    assert alert.key == KEY and alert.name == "AdversarialRateHigh" and alert.source == "sidecar"
    assert alert.labels == {"model": "mnist_cnn", "version": "2", "team": "ml"}
    assert alert.hooks == ("pin-v1",) and alert.severity == "critical"
    assert alert.value == pytest.approx(0.5)
    assert alert.annotations == {"summary": "50% of mnist_cnn v2 inputs flagged"}
    assert f.engine.status()[0]["series"][0]["incident"] == "inc-1"
    # Benign traffic from now on: the attack's increase leaves the 5 s window after 5 s.
    for _ in range(2):
        f.inputs.labels("mnist_cnn", "2", "shadow").inc(20)
        f.tick()
    assert f.state("AdversarialRateHigh") == {KEY: "firing"}  # still inside the window
    assert not f.engine.status()[0]["series"][0]["clearing"]
    f.inputs.labels("mnist_cnn", "2", "shadow").inc(20)
    f.tick()
    series = f.engine.status()[0]["series"][0]
    assert series["state"] == "firing" and series["clearing"]  # clear, but not for clear_for_seconds yet
    for _ in range(2):
        f.inputs.labels("mnist_cnn", "2", "shadow").inc(20)
        f.tick()
    assert f.state("AdversarialRateHigh") == {KEY: "firing"}
    assert f.dispatcher.resolved_keys == []
    f.inputs.labels("mnist_cnn", "2", "shadow").inc(20)
    f.tick()
    assert f.state("AdversarialRateHigh") == {KEY: "inactive"}
    assert f.dispatcher.resolved_keys == [KEY]
    assert len(f.dispatcher.fired) == 1  # it fired once over the whole incident
    assert f.value("sidewatch_alert_active", alert="AdversarialRateHigh", severity="critical") == 0
    transitions = {state: f.value("sidewatch_alert_transitions_total", alert="AdversarialRateHigh", state=state)
                   for state in ("pending", "firing", "resolved", "inactive")}
    assert transitions == {"pending": 1, "firing": 1, "resolved": 1, "inactive": 0}


def test_hysteresis_keeps_a_flapping_alert_firing():
    f = Fixture([{**ADVERSARIAL, "window_seconds": 1, "for_seconds": 0, "clear_for_seconds": 3}])
    inputs, detections = f.inputs.labels("mnist_cnn", "2", "shadow"), f.detections.labels("mnist_cnn", "2", "shadow")
    inputs.inc(0)
    detections.inc(0)
    f.tick()
    for attack in (True, False, False, True, False, False, True):
        inputs.inc(20)
        detections.inc(10 if attack else 0)
        f.tick()
        assert f.state("AdversarialRateHigh") == {KEY: "firing"}
    assert len(f.dispatcher.fired) == 1 and f.dispatcher.resolved_keys == []


def test_minimum_denominator_stops_one_of_one_from_firing_and_groups_are_separate():
    f = Fixture([{**ADVERSARIAL, "for_seconds": 0}])
    f.inputs.labels("mnist_cnn", "1", "shadow").inc(0)
    f.inputs.labels("mnist_cnn", "2", "shadow").inc(0)
    f.tick()
    f.inputs.labels("mnist_cnn", "1", "shadow").inc(1)
    f.detections.labels("mnist_cnn", "1", "shadow").inc(1)  # 100%, but of one input
    f.inputs.labels("mnist_cnn", "2", "flag").inc(30)  # another mode's series: summed into the same group
    f.detections.labels("mnist_cnn", "2", "flag").inc(2)  # 6.7%
    f.tick()
    states = f.state("AdversarialRateHigh")
    assert states["AdversarialRateHigh{model=mnist_cnn,team=ml,version=1}"] == "inactive"
    assert states[KEY] == "firing"
    assert [alert.key for alert in f.dispatcher.fired] == [KEY]


def test_ratio_of_one_counter_with_numerator_matchers():
    f = Fixture([{"name": "ErrorRatioHigh", "kind": "ratio", "numerator": "sidewatch_requests_total",
                  "denominator": "sidewatch_requests_total", "numerator_matchers": {"code": "UNAVAILABLE"},
                  "matchers": {"method": "ModelInfer"}, "window_seconds": 10, "above": 0.1, "min_denominator": 1}])
    requests = Counter("sidewatch_requests_total", "", ["model", "version", "method", "code"], registry=f.registry)
    requests.labels("m", "1", "ModelInfer", "OK").inc(0)
    requests.labels("m", "1", "ServerReady", "UNAVAILABLE").inc(0)
    f.tick()
    requests.labels("m", "1", "ModelInfer", "OK").inc(90)
    requests.labels("m", "1", "ServerReady", "UNAVAILABLE").inc(50)  # another method: not matched
    requests.labels("m", "1", "ModelInfer", "UNAVAILABLE").inc(10)
    f.tick()
    assert f.value("sidewatch_alert_value", alert="ErrorRatioHigh") == pytest.approx(0.1)  # 10 of 100
    assert f.state("ErrorRatioHigh") == {"ErrorRatioHigh{model=m,version=1}": "inactive"}
    requests.labels("m", "1", "ModelInfer", "UNAVAILABLE").inc(10)
    f.tick()
    assert f.state("ErrorRatioHigh") == {"ErrorRatioHigh{model=m,version=1}": "firing"}  # 20 of 110


def test_pending_alert_whose_condition_clears_goes_back_to_inactive_without_firing():
    f = Fixture([{**ADVERSARIAL, "window_seconds": 1, "for_seconds": 5}])
    inputs = f.inputs.labels("mnist_cnn", "2", "shadow")
    inputs.inc(0)
    f.tick()
    inputs.inc(20)
    f.detections.labels("mnist_cnn", "2", "shadow").inc(5)
    f.tick()
    assert f.state("AdversarialRateHigh") == {KEY: "pending"}
    inputs.inc(20)
    f.tick()
    assert f.state("AdversarialRateHigh") == {KEY: "inactive"}
    assert f.dispatcher.fired == []
    assert f.value("sidewatch_alert_transitions_total", alert="AdversarialRateHigh", state="inactive") == 1


def test_rate_rule_over_a_counter():
    f = Fixture([{"name": "AnomalyRateHigh", "kind": "rate", "metric": "sidewatch_anomalies_total",
                  "window_seconds": 4, "above": 2.0, "clear_for_seconds": 0}])
    anomalies = f.anomalies.labels("mnist_cnn", "1")
    anomalies.inc(0)
    f.tick()
    anomalies.inc(8)  # 8 over a 4 s window: 2 per second, not above 2
    f.tick()
    assert f.state("AnomalyRateHigh") == {"AnomalyRateHigh{model=mnist_cnn,version=1}": "inactive"}
    assert f.value("sidewatch_alert_value", alert="AnomalyRateHigh") == pytest.approx(2.0)
    anomalies.inc(1)
    f.tick()
    assert f.state("AnomalyRateHigh") == {"AnomalyRateHigh{model=mnist_cnn,version=1}": "firing"}
    for _ in range(4):
        f.tick()  # no more anomalies: the window empties and, with clear_for_seconds 0, it resolves at once
    assert f.state("AnomalyRateHigh") == {"AnomalyRateHigh{model=mnist_cnn,version=1}": "inactive"}
    assert f.dispatcher.resolved_keys == ["AnomalyRateHigh{model=mnist_cnn,version=1}"]


def test_gauge_rule_needs_consecutive_evaluations():
    f = Fixture([{"name": "InputDrift", "kind": "gauge", "metric": "sidewatch_drift_detected",
                  "matchers": {"detector": "inputs_mmd", "feature": "all"}, "above": 0.5, "for_evaluations": 3}])
    mmd = f.drift.labels("mnist_cnn", "1", "inputs_mmd", "all")
    f.drift.labels("mnist_cnn", "1", "class_mix", "all").set(1)  # another detector: not matched
    key = "InputDrift{model=mnist_cnn,version=1}"
    for drifting in (1, 1, 0, 1, 1):
        mmd.set(drifting)
        f.tick()
        assert f.state("InputDrift")[key] != "firing"
    mmd.set(1)
    f.tick()  # the third consecutive evaluation over the threshold
    assert f.state("InputDrift")[key] == "firing"


def test_gauge_rule_compares_with_another_gauge_of_the_same_labels():
    f = Fixture([{"name": "DriftOverThreshold", "kind": "gauge", "metric": "sidewatch_drift_statistic",
                  "above_metric": "sidewatch_drift_threshold", "group_by": ["model", "version", "detector"]}])
    f.statistic.labels("mnist_cnn", "1", "class_mix", "all").set(5.0)
    f.threshold.labels("mnist_cnn", "1", "class_mix", "all").set(9.0)
    f.statistic.labels("mnist_cnn", "1", "entropy", "all").set(3.0)
    f.threshold.labels("mnist_cnn", "1", "entropy", "all").set(2.0)
    f.statistic.labels("mnist_cnn", "1", "inputs_cvm", "all").set(50.0)  # no threshold with these labels
    f.tick()
    assert f.state("DriftOverThreshold") == {
        "DriftOverThreshold{detector=class_mix,model=mnist_cnn,version=1}": "inactive",
        "DriftOverThreshold{detector=entropy,model=mnist_cnn,version=1}": "firing",
    }
    assert f.value("sidewatch_alert_value", alert="DriftOverThreshold") == 5.0  # the highest statistic


def test_a_group_that_disappears_resolves():
    f = Fixture([{"name": "InputDrift", "kind": "gauge", "metric": "sidewatch_drift_detected", "above": 0.5,
                  "clear_for_seconds": 1}])
    f.drift.labels("mnist_cnn", "1", "inputs_mmd", "all").set(1)
    f.tick()
    assert f.state("InputDrift") == {"InputDrift{model=mnist_cnn,version=1}": "firing"}
    f.drift.remove("mnist_cnn", "1", "inputs_mmd", "all")
    f.tick()
    f.tick()
    assert f.state("InputDrift") == {}
    assert f.dispatcher.resolved_keys == ["InputDrift{model=mnist_cnn,version=1}"]
    assert math.isnan(f.value("sidewatch_alert_value", alert="InputDrift"))  # no data


def test_counter_history_handles_resets_and_windows():
    history = CounterHistory()
    for when, value in ((0, 0), (1, 10), (2, 15), (3, 4), (4, 6)):  # reset between 2 and 3
        history.add(when, value, keep_seconds=10)
    assert history.increase(4, 10) == 15 + 4 + 2
    assert history.increase(4, 1.5) == 4 + 2  # base: the point at t=2
    history.add(20, 6, keep_seconds=3)
    assert [when for when, _ in history.points] == [4, 20]  # the base of the window and the newest point
    assert history.increase(20, 3) == 0


def test_a_dispatcher_that_raises_does_not_stop_the_engine():
    f = Fixture([{**ADVERSARIAL, "for_seconds": 0}])

    def refuse(alert):
        raise RuntimeError("boom")

    f.dispatcher.firing = refuse
    f.inputs.labels("mnist_cnn", "2", "shadow").inc(0)
    f.tick()
    f.inputs.labels("mnist_cnn", "2", "shadow").inc(20)
    f.detections.labels("mnist_cnn", "2", "shadow").inc(20)
    f.tick()
    assert f.state("AdversarialRateHigh") == {KEY: "firing"}
    assert f.engine.errors == 1


def test_engine_thread_evaluates_and_stops():
    f = Fixture([{**ADVERSARIAL, "for_seconds": 0}], interval=0.05)
    f.inputs.labels("mnist_cnn", "2", "shadow").inc(0)
    f.engine.start()
    try:
        deadline = time.monotonic() + 10
        while f.engine.evaluations < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        f.inputs.labels("mnist_cnn", "2", "shadow").inc(20)
        f.detections.labels("mnist_cnn", "2", "shadow").inc(20)
        while not f.dispatcher.fired:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        f.engine.stop()
    assert f.engine._thread is None
    evaluations = f.engine.evaluations
    time.sleep(0.2)
    assert f.engine.evaluations == evaluations  # stopped means stopped


@pytest.mark.parametrize("rule, message", [
    ({"kind": "ratio", "numerator": "a_total", "above": 1}, "numerator and denominator"),
    ({"kind": "rate", "metric": "a_total"}, "exactly one of"),
    ({"kind": "rate", "metric": "a_total", "above": 1, "below": 0}, "exactly one of"),
    ({"kind": "rate", "metric": "a_total", "above_metric": "b"}, "only for gauge rules"),
    ({"kind": "gauge", "numerator": "a", "metric": "b", "above": 1}, "takes metric"),
    ({"kind": "gauge", "metric": "bad-name", "above": 1}, "pattern"),
    ({"kind": "rate", "metric": "a_total", "above": 1, "numerator_matchers": {"code": "x"}}, "only for ratio rules"),
])
def test_bad_rules_are_refused(rule, message):
    with pytest.raises(ValidationError) as raised:
        AlertsConfig.model_validate({"rules": [{"name": "R", **rule}]})
    assert message in str(raised.value)


def test_rule_names_are_unique():
    rule = {"name": "R", "kind": "rate", "metric": "a_total", "above": 1}
    with pytest.raises(ValidationError, match="two rules are named 'R'"):
        AlertsConfig.model_validate({"rules": [rule, rule]})
