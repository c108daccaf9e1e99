"""The Prometheus rules and the Prometheus and Alertmanager configurations in deploy/, checked by the real tools.

`promtool test rules` runs the unit tests in tests/prometheus_rules/ (each alert firing and not firing, each
recording rule's value); `promtool check` and `amtool check-config` validate the files as Prometheus and
Alertmanager would load them, and `amtool config routes test` says where each alert goes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.harness import REPO

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RECORDING_RULES = PROMETHEUS_DIR / "recording-rules.yml"
ALERT_RULES = PROMETHEUS_DIR / "alert-rules.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTMANAGER_CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
DEPLOY_README = REPO / "deploy" / "README.md"
UNIT_TESTS = sorted((REPO / "tests" / "prometheus_rules").glob("*.yml"))
ROLLBACK_RECEIVER = "sidewatch-rollback"
NOTIFY_RECEIVER = "sidewatch-notify"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: `make test` installs Debian's prometheus and prometheus-alertmanager")
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=60, cwd=REPO)


def _rules(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> list[dict]:
    return [rule for rule in _rules(ALERT_RULES) if "alert" in rule]


@pytest.mark.parametrize("test_file", UNIT_TESTS, ids=[path.name for path in UNIT_TESTS])
def test_promtool_unit_tests_pass(test_file):
    done = _run("promtool", "test", "rules", str(test_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_checks_the_rules_and_the_config():
    done = _run("promtool", "check", "rules", str(RECORDING_RULES), str(ALERT_RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    # prometheus.yml names both rule files; check config loads and checks them too.
    done = _run("promtool", "check", "config", str(PROMETHEUS_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 rule files found" in done.stdout
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert sorted(config["rule_files"]) == ["alert-rules.yml", "recording-rules.yml"]
    assert [job["job_name"] for job in config["scrape_configs"]][0] == "sidewatch"
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]


def test_amtool_checks_the_alertmanager_config():
    done = _run("amtool", "check-config", str(ALERTMANAGER_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    (rollback,) = [r for r in config["receivers"] if r["name"] == ROLLBACK_RECEIVER]
    (webhook,) = rollback["webhook_configs"]
    assert webhook["url"].endswith("/alertmanager")
    assert webhook["send_resolved"] is True
    assert webhook["http_config"]["authorization"]["credentials_file"]


def _receivers(labels: dict[str, str]) -> list[str]:
    done = _run("amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}",
                *(f"{name}={value}" for name, value in labels.items()))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().split(",")


def _static_labels(rule: dict) -> dict[str, str]:
    # Templated label values (the mirrored sidecar alert's severity) come from the series; any value routes.
    labels = {name: ("critical" if "{{" in value else value) for name, value in rule["labels"].items()}
    return {"alertname": rule["alert"], **labels}


@pytest.mark.parametrize("rule", _alerts(), ids=[rule["alert"] for rule in _alerts()])
def test_alertmanager_routes_each_alert(rule):
    """Alerts labelled rollback="true" reach the sidecar's receiver, and every sidewatch alert reaches people."""
    receivers = _receivers({**_static_labels(rule), "model": "m", "version": "2"})
    if rule["labels"].get("rollback") == "true":
        assert receivers == [ROLLBACK_RECEIVER, NOTIFY_RECEIVER]
    else:
        assert receivers == [NOTIFY_RECEIVER]


def test_routes_leave_other_alerts_and_a_missing_rollback_label_alone():
    assert _receivers({"alertname": "SomethingElse", "severity": "critical"}) == ["default"]
    assert _receivers({"alertname": "SidewatchAdversarialRateHigh", "service": "sidewatch", "rollback": "false"}) == [
        NOTIFY_RECEIVER]
    # The sidecar already ran its own rule's hooks: the mirrored alert must not trigger them again.
    assert "rollback" not in next(rule for rule in _alerts() if rule["alert"] == "SidewatchSidecarAlert")["labels"]


def test_every_alert_has_for_severity_and_annotations():
    anchors = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in DEPLOY_README.read_text().splitlines() if line.startswith("#")}
    for rule in _alerts():
        name = rule["alert"]
        assert "for" in rule, name
        assert rule["labels"]["service"] == "sidewatch", name
        assert rule["labels"]["severity"] in {"critical", "warning", "info", "{{ $labels.severity }}"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        # The runbook hint points at a section of deploy/README.md that exists.
        anchor = re.search(r"deploy/README\.md#([a-z0-9-]+)", rule["annotations"]["runbook"]).group(1)
        assert anchor in anchors, f"{name}: no section #{anchor} in deploy/README.md"


# Series no rule may read any more: the ERT calibration's expected run time, and the share of 5 minutes over
# threshold that worked around its flickering flags (issue 11).
REMOVED = {"sidewatch_drift_expected_run_time_samples", "sidewatch:drift_detected:avg5m"}


def _exported() -> set[str]:
    """The sample names the sidecar can export: every metric name quoted in agent/, with the suffixes counters and
    histograms add."""
    names = set()
    for path in (REPO / "agent").rglob("*.py"):
        names |= set(re.findall(r"[\"'](sidewatch_[a-z0-9_]+)[\"']", path.read_text()))
    return names | {name + suffix for name in names for suffix in ("_total", "_bucket", "_count", "_sum")}


def test_every_rule_reads_series_the_sidecar_or_the_rules_make():
    """Expressions and the queries in annotations: a metric renamed or removed in agent/ (or a recording rule
    removed) leaves no rule reading nothing, which promtool's tests, fed by hand-written series, cannot see."""
    rules = _rules(RECORDING_RULES) + _rules(ALERT_RULES)
    made = _exported() | {rule["record"] for rule in rules if "record" in rule}
    read = {name for rule in rules for text in [rule["expr"], *rule.get("annotations", {}).values()]
            for name in re.findall(r"\bsidewatch[_:][A-Za-z0-9_][A-Za-z0-9_:]*", text)}
    assert read & REMOVED == set()
    assert read - made == set(), "series neither exported by the sidecar nor recorded by a rule"


def _unit_tests() -> list[dict]:
    return [case for path in UNIT_TESTS for case in yaml.safe_load(path.read_text())["tests"]]


def test_unit_tests_evaluate_every_group_in_a_fixed_order():
    """promtool evaluates unordered groups in a random order, which moves an alert over a recording rule by
    one evaluation from run to run: every test file names the order of all its groups."""
    for path in UNIT_TESTS:
        tests = yaml.safe_load(path.read_text())
        groups = [group["name"] for rules in tests["rule_files"]
                  for group in yaml.safe_load((path.parent / rules).read_text())["groups"]]
        assert sorted(tests.get("group_eval_order", [])) == sorted(groups), path.name


def test_every_alert_is_unit_tested_firing_and_not_firing():
    firing, quiet = set(), set()
    for case in _unit_tests():
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - firing == set(), "alerts without a unit test where they fire"
    assert names - quiet == set(), "alerts without a unit test where they do not fire"


def test_every_recording_rule_is_unit_tested():
    exprs = " ".join(check["expr"] for case in _unit_tests() for check in case.get("promql_expr_test", []))
    untested = [rule["record"] for rule in _rules(RECORDING_RULES) if not re.search(re.escape(rule["record"]) + r"\b", exprs)]
    assert untested == []


# Each mutation moves one threshold, minimum, matcher, aggregation or `for`/`keep_firing_for` past the unit
# tests' boundary case; the unit tests must then fail. (alert, field of its rule, text in it, replacement,
# unit-test file)
MUTATIONS = [
    ("SidewatchAdversarialRateHigh", "expr", "== 1", ">= 0", "detection_alerts_test.yml"),
    ("SidewatchAdversarialRateHigh", "expr", "max by", "min by", "detection_alerts_test.yml"),
    ("SidewatchAdversarialRateHigh", "keep_firing_for", "2m", "1m", "detection_alerts_test.yml"),
    ("SidewatchAdversarialRateHigh", "for", "0s", "1m", "detection_alerts_test.yml"),
    ("SidewatchAnomalyRateHigh", "expr", "> 0.1", "> 0.08", "detection_alerts_test.yml"),
    ("SidewatchBlackBoxAttack", "expr", "[10m]", "[20m]", "detection_alerts_test.yml"),
    ("SidewatchBlackBoxAttack", "expr", "offset 10m", "offset 1m", "detection_alerts_test.yml"),
    ("SidewatchDriftDetected", "expr", "== 1", ">= 0", "detection_alerts_test.yml"),
    ("SidewatchDriftDetected", "expr", "max by", "min by", "detection_alerts_test.yml"),
    ("SidewatchDriftDetected", "expr", 'feature="all"', 'feature=~".+"', "detection_alerts_test.yml"),
    ("SidewatchDriftDetected", "keep_firing_for", "2m", "1m", "detection_alerts_test.yml"),
    ("SidewatchDriftDetected", "for", "0s", "1m", "detection_alerts_test.yml"),
    ("SidewatchDriftDetected", "expr", r',detector!~"canary\\..*"', "", "detection_alerts_test.yml"),
    ("SidewatchCanaryDiverged", "expr", "== 1", ">= 0", "detection_alerts_test.yml"),
    ("SidewatchCanaryDiverged", "expr", "max by", "min by", "detection_alerts_test.yml"),
    ("SidewatchCanaryDiverged", "expr", 'feature="all"', 'feature=~".+"', "detection_alerts_test.yml"),
    ("SidewatchCanaryDiverged", "expr", r'detector=~"canary\\..*"', 'detector=~".+"', "detection_alerts_test.yml"),
    ("SidewatchCanaryDiverged", "keep_firing_for", "2m", "1m", "detection_alerts_test.yml"),
    ("SidewatchCanaryDiverged", "for", "0s", "1m", "detection_alerts_test.yml"),
    ("SidewatchFleetPSIHigh", "expr", ">= 100", ">= 50", "detection_alerts_test.yml"),
    ("SidewatchDriftBaselineNotLearned", "expr", 'state!="watching"', 'state=~".+"', "detection_alerts_test.yml"),
    ("SidewatchDriftBaselineNotLearned", "expr", "max by", "min by", "detection_alerts_test.yml"),
    ("SidewatchDriftBaselineNotLearned", "expr", "[5m]", "[30s]", "detection_alerts_test.yml"),
    ("SidewatchDriftBaselineNotLearned", "for", "1h", "50m", "detection_alerts_test.yml"),
    ("SidewatchErrorRateHigh", "expr", "> 0.05", "> 0.03", "traffic_alerts_test.yml"),
    ("SidewatchErrorRateHigh", "expr", '{model!=""}', "", "traffic_alerts_test.yml"),
    ("SidewatchLatencyP99High", "expr", "> 0.5", "> 0.45", "traffic_alerts_test.yml"),
    ("SidewatchTapDropping", "expr", "> 0.01", "> 0.008", "traffic_alerts_test.yml"),
    ("SidewatchDown", "expr", 'job="sidewatch"', 'job=~".+"', "traffic_alerts_test.yml"),
    ("SidewatchRollbackFailed", "expr", "offset 15m", "offset 1m", "sidecar_alerts_test.yml"),
    ("SidewatchReceiverRefusing", "expr", 'result!="ok"', 'result=~".+"', "sidecar_alerts_test.yml"),
]


@pytest.mark.parametrize("alert, field, old, new, test_file", MUTATIONS,
                         ids=[f"{m[0]}:{m[1]}:{m[3]}" for m in MUTATIONS])
def test_unit_tests_catch_a_moved_threshold(tmp_path, alert, field, old, new, test_file):
    rules = yaml.safe_load(ALERT_RULES.read_text())
    (rule,) = [r for group in rules["groups"] for r in group["rules"] if r.get("alert") == alert]
    assert old in rule[field]
    copied = tmp_path / "alert-rules.yml"
    tests = yaml.safe_load((REPO / "tests" / "prometheus_rules" / test_file).read_text())
    tests["rule_files"] = [str(RECORDING_RULES), str(copied)]
    unit_tests = tmp_path / test_file
    unit_tests.write_text(yaml.safe_dump(tests, sort_keys=False))
    # The copies pass as they are ...
    copied.write_text(yaml.safe_dump(rules, sort_keys=False))
    done = _run("promtool", "test", "rules", str(unit_tests))
    assert done.returncode == 0, done.stdout + done.stderr
    # ... and fail with the rule changed.
    rule[field] = rule[field].replace(old, new)
    copied.write_text(yaml.safe_dump(rules, sort_keys=False))
    done = _run("promtool", "test", "rules", str(unit_tests))
    assert done.returncode != 0, f"the unit tests still pass with {alert}'s {field} {old!r} changed to {new!r}"
    assert alert in done.stdout + done.stderr
