"""The alerts:, rollback: and admin: configuration: hooks named by rules must exist; tokens are checked at start."""

from __future__ import annotations

import pytest

from agent.admin.server import TOKEN_ENV, admin_token
from agent.config import ConfigError, load_config

RULE = """
alerts:
  rules:
    - name: AdversarialRateHigh
      kind: ratio
      numerator: sidewatch_adversarial_detections_total
      denominator: sidewatch_adversarial_inputs_total
      above: 0.05
      hooks: [pin-v1]
"""
HOOKS = """
rollback:
  hooks:
    pin-v1: {type: route, version: "1"}
"""


def _load(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path)


def test_rule_with_configured_hooks_is_accepted(tmp_path):
    config = _load(tmp_path, RULE + HOOKS)
    assert config.alerts.rules[0].hooks == ["pin-v1"]
    assert config.alerts.rules[0].group_by == ["model", "version"]
    assert config.admin.listen == "127.0.0.1:9103"  # loopback unless told otherwise


@pytest.mark.parametrize("text, key", [
    (RULE, "alerts.rules.0.hooks: unknown hook(s) pin-v1"),
    (HOOKS + "admin:\n  alertmanager_hooks:\n    FleetDrift: [pin-v2]\n", "admin.alertmanager_hooks.FleetDrift"),
    ("alerts:\n  rules:\n    - {name: R, kind: rate, metric: m_total}\n", "alerts.rules.0"),
    ("alerts:\n  evaluation_interval_seconds: 0\n", "alerts.evaluation_interval_seconds"),
    ("admin:\n  listen: everywhere\n", "admin.listen"),
    ("admin:\n  tokenfile: /x\n", "admin.tokenfile"),
])
def test_bad_alert_config_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as raised:
        _load(tmp_path, text)
    assert key in str(raised.value)


def test_admin_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert admin_token(load_config().admin) is None  # no token: the admin API stays off
    monkeypatch.setenv(TOKEN_ENV, "e" * 20)
    assert admin_token(load_config().admin) == "e" * 20
    token_file = tmp_path / "token"
    token_file.write_text("f" * 24 + "\n")
    config = load_config(overrides={"admin.token_file": str(token_file)})
    assert admin_token(config.admin) == "f" * 24  # the file wins over the environment
    token_file.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 16"):
        admin_token(config.admin)
    assert admin_token(load_config(overrides={"admin.enabled": False}).admin) is None


def test_alertmanager_hooks_without_a_token_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    config = _load(tmp_path, HOOKS + "admin:\n  alertmanager_hooks:\n    FleetDrift: [pin-v1]\n")
    with pytest.raises(ValueError, match="needs a token"):
        admin_token(config.admin)


def test_commented_examples_in_the_shipped_config_are_valid():
    import yaml

    from agent.config import ServeConfig
    from tests.support.harness import REPO

    text = (REPO / "deploy" / "sidewatch.yaml").read_text()
    start = text.index("# --- Alerts and rollback")
    # Commented configuration starts with "# "; prose in that part of the file with "## ".
    uncommented = "\n".join(line[2:] for line in text[start:].splitlines() if line.startswith("# ") and "---" not in line)
    config = ServeConfig.model_validate(yaml.safe_load(text[:start]) | yaml.safe_load(uncommented))
    assert [rule.name for rule in config.alerts.rules] == [
        "AdversarialRateHigh", "InputDrift", "DriftStatisticOverThreshold", "AnomalyRateHigh"]
    assert set(config.rollback.hooks) >= {"pin-last-good", "notify", "script", "undo-deployment", "abort-canary"}
    assert config.admin.alertmanager_hooks["SidewatchAdversarialRateHigh"] == ["pin-last-good"]
    assert config.admin.alertmanager_hooks["SidewatchCanaryDiverged"] == ["pin-last-good", "notify"]
    assert config.admin.token_file is not None


def test_demo_alerting_config_is_valid():
    from tests.support.harness import REPO

    config = load_config(REPO / "agent" / "demo" / "sidewatch-demo.yaml")
    rules = {rule.name: rule for rule in config.alerts.rules}
    adversarial, drift = rules["AdversarialRateHigh"], rules["DriftDetected"]
    # Rolls back within 5 s of the first adversarial request: the flagged-share flag rises at the first
    # look after an attack outweighs benign traffic in a look's window, then one evaluation sees it.
    assert adversarial.metric == "sidewatch_adversarial_rate_detected" and adversarial.for_seconds == 0
    assert config.detection.rate_alarm.look_interval_seconds + 2 * config.alerts.evaluation_interval_seconds <= 5
    assert config.rollback.hooks[adversarial.hooks[0]].type == "route"
    # Both flags spend the default budget; only the looks are short.
    assert config.drift.false_alarm_budget == config.detection.rate_alarm.false_alarm_budget == "1/30d"
    assert drift.metric == "sidewatch_drift_detected" and drift.matchers == {"feature": "all"} and not drift.hooks
