"""Alertmanager's webhook payload (version 4) -> alerts for the hooks: mapping, keys, and malformed bodies."""

from __future__ import annotations

import json

import pytest

from agent.alerts.receiver import MalformedPayload, parse_payload

HOOKS = {"pin-v1", "notify", "script"}
MAPPING = {"SidewatchAdversarialRateHigh": ["pin-v1"]}


def _alert(name: str, status: str = "firing", **labels: str) -> dict:
    # As Alertmanager 0.25 sends them (notify/webhook: template.Alert).
    return {
        "status": status,
        "labels": {"alertname": name, **labels},
        "annotations": {"summary": f"{name} on {labels.get('model', '?')}"},
        "startsAt": "2024-05-01T12:00:00.123456789Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2024-05-01T12:05:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
        "fingerprint": "c2a4e6b3f1d0a9b8",
    }


def _payload(*alerts: dict, **overrides) -> bytes:
    payload = {
        "version": "4", "groupKey": '{}/{rollback="true"}:{alertname="SidewatchAdversarialRateHigh"}',
        "truncatedAlerts": 0, "status": "firing", "receiver": "sidewatch-rollback",
        "groupLabels": {"alertname": "SidewatchAdversarialRateHigh"}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "alerts": list(alerts),
    }
    payload.update(overrides)
    return json.dumps(payload).encode()


def test_mapped_firing_alert_becomes_an_alert_for_its_hooks():
    body = _payload(_alert("SidewatchAdversarialRateHigh", model="mnist_cnn", version="2", severity="critical",
                           instance="10.0.0.7:9102"))
    delivery = parse_payload(body, MAPPING, HOOKS)
    [alert] = delivery.firing
    assert alert.name == "SidewatchAdversarialRateHigh"
    assert alert.key == "SidewatchAdversarialRateHigh{instance=10.0.0.7:9102,model=mnist_cnn,severity=critical,version=2}"
    assert alert.labels == {"model": "mnist_cnn", "version": "2", "severity": "critical", "instance": "10.0.0.7:9102"}
    assert alert.hooks == ("pin-v1",)
    assert alert.source == "alertmanager" and alert.severity == "critical" and alert.value is None
    assert alert.started_at == pytest.approx(1714564800.123456)
    assert alert.annotations == {"summary": "SidewatchAdversarialRateHigh on mnist_cnn"}
    assert delivery.resolved == [] and delivery.ignored == 0


def test_hooks_named_by_a_label_add_to_the_mapping_and_unknown_ones_are_dropped():
    body = _payload(_alert("SidewatchAdversarialRateHigh", model="m", sidewatch_hooks="notify, pin-v1,rm-rf"),
                    _alert("FleetDrift", sidewatch_hooks="script"),
                    _alert("Unrelated", model="m"),
                    _alert("OnlyUnknown", sidewatch_hooks="nope"))
    delivery = parse_payload(body, MAPPING, HOOKS)
    assert [(alert.name, alert.hooks) for alert in delivery.firing] == [
        ("SidewatchAdversarialRateHigh", ("pin-v1", "notify")), ("FleetDrift", ("script",))]
    assert delivery.ignored == 2  # no hooks: not ours to act on


def test_resolved_alert_gives_the_same_key_as_when_it_fired():
    labels = {"model": "mnist_cnn", "version": "2"}
    fired = parse_payload(_payload(_alert("SidewatchAdversarialRateHigh", **labels)), MAPPING, HOOKS)
    resolved = parse_payload(_payload(_alert("SidewatchAdversarialRateHigh", "resolved", **labels), status="resolved"),
                             MAPPING, HOOKS)
    assert resolved.firing == []
    assert resolved.resolved == [fired.firing[0].key]


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not JSON"),
    (b"[]", "JSON object"),
    (_payload(version="3"), "version must be"),
    (_payload(alerts={"a": 1}), "alerts must be a list"),
    (_payload("x"), "alerts[0] must be an object"),
    (_payload({**_alert("A"), "status": "pending"}), "alerts[0].status"),
    (_payload({**_alert("A"), "labels": {"alertname": "A", "n": 1}}), "alerts[0].labels"),
    (_payload({**_alert("A"), "labels": {"model": "m"}}), "no alertname"),
    (_payload({**_alert("A"), "annotations": ["x"]}), "alerts[0].annotations"),
    (_payload({**_alert("A"), "startsAt": "yesterday"}), "RFC 3339"),
    (_payload(_alert("SidewatchAdversarialRateHigh"), {**_alert("B"), "startsAt": 5}), "alerts[1].startsAt"),
    (b"\xff\xfe", "not JSON"),
])
def test_malformed_payloads_are_refused_whole(body, message):
    with pytest.raises(MalformedPayload) as raised:
        parse_payload(body, MAPPING, HOOKS)
    assert message in str(raised.value)
