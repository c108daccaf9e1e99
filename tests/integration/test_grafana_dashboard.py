"""The Grafana dashboard (grafana/), checked without Grafana: its JSON's structure, and every query it makes
run against a real Prometheus scraping a real sidecar.

The stack: the bundled model server; a sidecar detecting on the bundled model (its looks at the evidence every
2 s instead of every minute), with an alert rule of its own that pins the model to version 1 when its
adversarial-rate flag rises; a real Prometheus loading
deploy/prometheus/prometheus.yml and its rules; a real Alertmanager loading deploy/alertmanager/alertmanager.yml,
whose rollback route posts to the sidecar's receiver. Only what cannot stay as shipped is changed: addresses,
the token file, intervals of 1 s instead of 15 s, and `for: 0s` on the alert rules so that they fire within
the test (promtool's unit tests in tests/prometheus_rules/ check each rule's `for`). Benign, drifted,
malformed and adversarial traffic goes through the sidecar, paced, the drifted traffic until a drift flag rises
and the adversarial until the pin. Versions 1 and 2 both serve, version 2 the canary: the benign traffic goes to
both until their comparison watches, the drifted traffic to version 2 only (version 1's stays benign) until a
canary.* flag rises too, so that the "Canary against stable" panels and SidewatchCanaryDiverged have a
comparison to show. Then every panel's, annotation's and variable's query, with Grafana's variables filled in
as Grafana would, must bring data back.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest
import yaml

from agent.demo.data import BENIGN_STREAM, load_adversarial, load_images
from agent.demo.run import drifted
from agent.modelserver.repository import BUNDLED_REPOSITORY
from agent.protocol.client import InferenceClient
from tests.support.alert_harness import admin_config, metric, wait_until, write_config, write_token
from tests.support.harness import (
    REPO,
    Process,
    http_get,
    shipped_alertmanager_config,
    start_alertmanager,
    start_model_server,
    start_shipped_prometheus,
    start_sidecar,
)
from tests.support.pacing import send_paced

DASHBOARD = REPO / "grafana" / "dashboards" / "sidewatch.json"
DATASOURCES = REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = REPO / "grafana" / "provisioning" / "dashboards" / "sidewatch.yml"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
MODEL = "mnist_cnn"
PANEL_TYPES = {"row", "timeseries", "stat", "heatmap", "table"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
ROLLBACK_ALERT = "SidewatchAdversarialRateHigh"
# Labelled rollback="true" too, but mapped to no hook here: the receiver gets it and ignores it.
CANARY_ALERT = "SidewatchCanaryDiverged"
# Variable references in Grafana's three syntaxes: $name, ${name} or ${name:format}, [[name]].
VARIABLE_REF = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
SCRAPE_SECONDS = 1


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, those nested in collapsed rows included."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def _variables(dashboard: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def _variable_query(variable: dict) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [text for value in node.values() for text in _strings(value)]
    if isinstance(node, list):
        return [text for value in node for text in _strings(value)]
    return []


def _references(text: str) -> set[str]:
    return {next(group for group in match.groups() if group) for match in VARIABLE_REF.finditer(text)}


# --- structure ------------------------------------------------------------------------------------------------

def test_dashboard_structure():
    dashboard = _dashboard()
    assert dashboard["uid"] == "sidewatch" and dashboard["schemaVersion"] >= 36
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    occupied: dict[tuple[int, int], str] = {}
    for panel in panels:
        title = panel["title"]
        assert panel["type"] in PANEL_TYPES, title
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("h", "w", "x", "y")), title
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, title
        for cell in ((x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])):
            assert cell not in occupied, f"{title} overlaps {occupied[cell]}"
            occupied[cell] = title
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE_REF, title
        assert panel["targets"], title
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE_REF) == DATASOURCE_REF, title
            assert target["expr"].strip(), title
    for annotation in dashboard["annotations"]["list"]:
        assert annotation["datasource"] == DATASOURCE_REF, annotation["name"]
        assert annotation["expr"].strip() and annotation["enable"], annotation["name"]
    # The panels are there.
    types = {panel["type"] for panel in panels}
    assert {"timeseries", "stat", "heatmap", "table"} <= types
    titles = " ".join(panel["title"] for panel in panels)
    for needed in ("Requests", "latency", "Adversarial score", "Drift statistic / threshold", "Fleet PSI",
                   "Anomaly score", "alert", "Rollback",
                   # The false-alarm budget (issue 11): the budget, the time since the last alarm, the evidence and
                   # the effect against their thresholds, the held flags, the looks, the adversarial-rate test.
                   "Drift false-alarm budget", "Since the last drift alarm", "Drift effect / min effect",
                   "Held drift flags", "Drift looks", "Adversarial rate test: statistic / threshold",
                   "Adversarial rate flag",
                   # Baselines learned from traffic (issue 12).
                   "Drift baselines",
                   # Canary against stable.
                   "Canary against stable", "Canary against stable: held flags",
                   # Issue 15: each adversarial detector, and black-box query detection.
                   "Flagged by each detector", "Detector score / its threshold", "Queries checked",
                   "Clients flagged and refused"):
        assert needed in titles, needed
    assert {annotation["name"] for annotation in dashboard["annotations"]["list"]} >= {"Rollbacks",
                                                                                        "Prometheus alerts firing"}


# Series the dashboard must not read any more: the ERT calibration's expected run time, and the share of 5 minutes
# over threshold that worked around its flickering flags (issue 11).
REMOVED = {"sidewatch_drift_expected_run_time_samples", "sidewatch:drift_detected:avg5m"}
METRIC_NAME = re.compile(r"\bsidewatch[_:][A-Za-z0-9_][A-Za-z0-9_:]*")


def _exported() -> set[str]:
    """The sample names the sidecar can export (every metric name quoted in agent/, with the suffixes counters and
    histograms add) and those the recording rules in deploy/prometheus/ record."""
    names = set()
    for path in (REPO / "agent").rglob("*.py"):
        names |= set(re.findall(r"[\"'](sidewatch_[a-z0-9_]+)[\"']", path.read_text()))
    names |= {name + suffix for name in names for suffix in ("_total", "_bucket", "_count", "_sum")}
    rules = yaml.safe_load((PROMETHEUS_DIR / "recording-rules.yml").read_text())
    return names | {rule["record"] for group in rules["groups"] for rule in group["rules"]}


def _all_exprs(dashboard: dict) -> list[str]:
    exprs = [_variable_query(v) for v in _variables(dashboard).values() if v["type"] == "query"]
    exprs += [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in dashboard["annotations"]["list"]]


def test_every_query_reads_series_the_sidecar_or_the_rules_make():
    """Without the stack: a metric renamed or removed in agent/ (or a recording rule removed) leaves no panel reading
    nothing."""
    exported = _exported()
    read = {name for expr in _all_exprs(_dashboard()) for name in METRIC_NAME.findall(expr)}
    assert read & REMOVED == set()
    assert read - exported == set(), "series neither exported by the sidecar nor recorded by a rule"


def test_every_query_parses(tmp_path):
    """promtool parses each query, with the variables filled in, as a recording rule's expression."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: `make test` installs Debian's prometheus"
    fill = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
    exprs = [VARIABLE_REF.sub(lambda m: fill.get(next(g for g in m.groups() if g), ".+"), expr)
             for expr in _all_exprs(_dashboard()) if not expr.startswith("label_values(")]
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_variables_are_defined_and_used():
    dashboard = _dashboard()
    variables = _variables(dashboard)
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "version", "instance"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"] == DATASOURCE_REF, name
        assert _variable_query(variables[name]).startswith("label_values("), name
    # Used anywhere but in its own definition (another variable's query counts: the chain model -> version).
    used: set[str] = set()
    for name, variable in variables.items():
        used |= {ref for text in _strings({k: v for k, v in variable.items() if k != "current"}) for ref in _references(text)
                 if ref != name}
    used |= {ref for text in _strings(dashboard["panels"]) + _strings(dashboard["annotations"]) for ref in _references(text)}
    grafana_globals = {ref for ref in used if ref.startswith("__")}
    assert grafana_globals <= {"__rate_interval", "__interval", "__range"}, grafana_globals
    assert used - grafana_globals == set(variables), "variables used but not defined, or defined but not used"
    # Multi-value variables become regular expressions: every query matches them with =~.
    exprs = [_variable_query(v) for v in variables.values() if v["type"] == "query"]
    exprs += [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    for expr in exprs:
        for match in re.finditer(r"\$(model|version|instance|detector)\b", expr):
            assert expr[:match.start()].endswith('=~"'), f"${match.group(1)} not matched with =~ in {expr}"


def test_provisioning_points_at_the_dashboards_and_the_prometheus():
    datasources = yaml.safe_load(DATASOURCES.read_text())
    assert datasources["apiVersion"] == 1
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"
    # The dashboard's datasource variable defaults to the provisioned data source.
    assert _variables(_dashboard())["datasource"]["current"]["value"] == prometheus["uid"]
    providers = yaml.safe_load(PROVIDERS.read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    readme = (REPO / "grafana" / "README.md").read_text()
    assert provider["options"]["path"] in readme, "grafana/README.md says where to mount the dashboards"


# --- Grafana's variable interpolation -------------------------------------------------------------------------

def _regex_escape(value: str) -> str:
    """A value as Grafana writes a multi-value variable into PromQL: regex characters escaped, and the escaping
    backslash doubled for PromQL's string literal."""
    return re.sub(r"([$^*{}\[\]+?.()|\\])", r"\\\\\1", value)


def _format(variable: dict, value: list[str] | str) -> str:
    if value == "$__all":
        return variable["allValue"]
    values = [value] if isinstance(value, str) else value
    escaped = [_regex_escape(v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def _interpolate(text: str, variables: dict[str, dict], selected: dict[str, str | list[str]],
                 grafana_globals: dict[str, str]) -> str:
    def replace(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        if name.startswith("__"):
            return grafana_globals[name]
        return _format(variables[name], selected[name])

    return VARIABLE_REF.sub(replace, text)


# --- the stack --------------------------------------------------------------------------------------------------

def _fast_rules(tmp_path) -> list:
    """The shipped rule files, evaluated every second, with alerts firing as soon as their condition holds."""
    paths = []
    for name in ("recording-rules.yml", "alert-rules.yml"):
        rules = yaml.safe_load((PROMETHEUS_DIR / name).read_text())
        for group in rules["groups"]:
            group["interval"] = f"{SCRAPE_SECONDS}s"
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = "0s"
        path = tmp_path / name
        path.write_text(yaml.safe_dump(rules, sort_keys=False))
        paths.append(path)
    return paths


def _start_prometheus(tmp_path, sidecar_metrics: str, alertmanager_port: int) -> tuple[Process, int]:
    """deploy/prometheus/prometheus.yml with this test's addresses and 1 s intervals."""
    interval = f"{SCRAPE_SECONDS}s"
    return start_shipped_prometheus(tmp_path, sidecar_metrics, alertmanager_port, _fast_rules(tmp_path),
                                    interval, interval)


def _start_alertmanager(tmp_path, admin_port: int, token_file) -> tuple[Process, int]:
    """deploy/alertmanager/alertmanager.yml with the sidecar's receiver address and this test's token file."""
    return start_alertmanager(tmp_path, shipped_alertmanager_config(admin_port, token_file))


SIDECAR_ALERT = "AdversarialRateHigh"
RATE = 50.0  # requests per second while traffic is paced


def _sidecar_config(tmp_path, token_file) -> tuple[dict, int]:
    admin, admin_port = admin_config(tmp_path, token_file, alertmanager_hooks={ROLLBACK_ALERT: ["pin-v1"]})
    return {
        # Looks every 2 s instead of every minute (drift) or 10 s (the adversarial rate), so that the flags can
        # rise within the test; the budgets are the defaults.
        "drift": {"look_interval_seconds": 2, "slot_seconds": 0.25, "export_interval_seconds": 0.5,
                  "cluster_rows": 10, "min_clusters": 10,
                  # The comparison of version 2 with version 1 fits on fewer rows, and outlasts the pin to
                  # version 1 (after which version 2 answers nothing) until the test's last query.
                  "canary": {"fit_rows": 50, "active_seconds": 600}},
        "detection": {"rate_alarm": {"look_interval_seconds": 2, "slot_seconds": 0.2, "cluster_rows": 10,
                                     "min_clusters": 10}},
        # Black-box query detection watches the model (flag mode: counted, never refused) for its panels.
        "models": {MODEL: {"query_mode": "flag"}},
        "alerts": {"evaluation_interval_seconds": 0.5, "rules": [{
            # The shipped form (deploy/k8s/base/sidewatch.yaml): the budgeted adversarial-rate flag.
            "name": SIDECAR_ALERT, "kind": "gauge", "metric": "sidewatch_adversarial_rate_detected", "above": 0.5,
            "clear_for_seconds": 60, "severity": "critical", "hooks": ["pin-v1"],
        }]},
        "rollback": {"audit_log": str(tmp_path / "audit.jsonl"), "cooldown_seconds": 0, "max_per_hour": 100,
                     "hooks": {"pin-v1": {"type": "route", "model": MODEL, "version": "1"}}},
        "admin": admin,
    }, admin_port


def _drift_flag_up(metrics_port: int, canary: bool = False) -> bool:
    """A held flag of version 2's own drift tests is up (``canary``: of its comparison with version 1)."""
    text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    return any(line.startswith("sidewatch_drift_detected{") and 'feature="all"' in line and 'version="2"' in line
               and ('detector="canary.' in line) == canary and float(line.split()[-1]) == 1
               for line in text.splitlines())


def _canary_watching(metrics_port: int) -> bool:
    return metric(metrics_port, "sidewatch_drift_canary_state", model=MODEL, version="2", stable_version="1",
                  state="watching") == 1


def _paced(client: InferenceClient, images: np.ndarray, seconds: float, until=None,
           stable: np.ndarray | None = None) -> None:
    """One request every 1/RATE s, for ``seconds`` or until ``until()`` holds: to version 2, or with ``stable``,
    every other one to version 1 with those inputs."""
    def send(i: int) -> None:
        version, inputs = ("1", stable) if stable is not None and i % 2 else ("2", images)
        j = i % len(inputs)
        client.infer(MODEL, {"input": inputs[j:j + 1]}, version=version, timeout=10)

    send_paced(send, RATE, seconds, until)


def _send_traffic(port: int, metrics_port: int) -> None:
    client = InferenceClient(f"127.0.0.1:{port}")
    try:
        benign = load_images(BENIGN_STREAM)[0]
        # Both versions serve: version 2's comparison with version 1 fits, then watches.
        _paced(client, benign, 5, stable=benign)
        _paced(client, benign, 30, until=lambda: _canary_watching(metrics_port), stable=benign)
        assert _canary_watching(metrics_port), "the comparison of version 2 with version 1 does not watch"
        # Drifted inputs to version 2 (benign to version 1) until a drift flag of its own rises (the drift
        # alarm's panels need one) and one of its comparison with version 1 (the canary panels').
        both = lambda: _drift_flag_up(metrics_port) and _drift_flag_up(metrics_port, canary=True)  # noqa: E731
        _paced(client, drifted(benign), 60, until=both, stable=benign)
        assert _drift_flag_up(metrics_port), "no drift flag after 60 s of drifted traffic"
        assert _drift_flag_up(metrics_port, canary=True), "no canary flag after 60 s of drifted traffic"
        # Inputs of the wrong shape: the model server refuses them (calls not OK), the detectors skip them.
        for _ in range(5):
            with pytest.raises(grpc.RpcError):
                client.infer(MODEL, {"input": np.zeros((1, 3), np.float32)}, version="2", timeout=10)
        # A black-box attack's walk: near-copies of one image, each a little different (exact copies would be
        # repeats), until the query detector flags this client (its panels need a flag).
        flagged = lambda: metric(metrics_port, "sidewatch_query_flags_total", model=MODEL) >= 1  # noqa: E731
        walk = np.clip(benign[:1] + np.random.default_rng(0).uniform(-0.02, 0.02, (200,) + benign.shape[1:]), 0, 1)
        _paced(client, walk.astype(np.float32), 10, until=flagged)
        assert flagged(), "the query detector did not flag 200 near-copies of one image"
        # Adversarial examples until the adversarial-rate flag rises and the sidecar's rule pins version 1.
        pinned = lambda: metric(metrics_port, "sidewatch_route_pinned", model=MODEL, version="1") == 1  # noqa: E731
        _paced(client, load_adversarial()[0], 40, until=pinned)
    finally:
        client.close()


def _api(port: int, path: str, **params: str) -> list | dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.loads(reply.read())
    except urllib.error.HTTPError as err:
        raise AssertionError(f"Prometheus refused {params}: {err.read().decode()}") from None
    assert body["status"] == "success", body
    return body["data"]


def _query(port: int, query: str) -> list[dict]:
    return _api(port, "query", query=query)["result"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("stack")
    processes = []
    try:
        model_server, model_port = start_model_server(tmp_path)
        processes.append(model_server)
        _, token_file = write_token(tmp_path)
        config, admin_port = _sidecar_config(tmp_path, token_file)
        sidecar, port, metrics_port = start_sidecar(tmp_path, model_port, "--model-repository", str(BUNDLED_REPOSITORY),
                                                    config=write_config(tmp_path, config))
        processes.append(sidecar)
        sidecar.wait_listening(admin_port)
        alertmanager, alertmanager_port = _start_alertmanager(tmp_path, admin_port, token_file)
        processes.append(alertmanager)
        instance = f"127.0.0.1:{metrics_port}"
        prometheus, prometheus_port = _start_prometheus(tmp_path, instance, alertmanager_port)
        processes.append(prometheus)
        wait_until(lambda: _query(prometheus_port, f'up{{instance="{instance}"}} == 1'), 30,
                   "Prometheus's first scrape of the sidecar", interval=0.2)
        started = time.time()
        _send_traffic(port, metrics_port)
        # The sidecar's own rule pins the model to version 1 ...
        wait_until(lambda: metric(metrics_port, "sidewatch_route_pinned", model=MODEL, version="1") == 1, 30,
                   "the sidecar's rule to pin the route")
        # ... Prometheus's alert fires, and Alertmanager delivers it to the sidecar's receiver.
        for alert in (ROLLBACK_ALERT, CANARY_ALERT):
            wait_until(lambda: _query(prometheus_port, f'ALERTS{{alertname="{alert}",alertstate="firing"}}'), 30,
                       f"Prometheus to fire {alert}", interval=0.5)
        incident = f'sidewatch_incidents_total{{alert="{ROLLBACK_ALERT}",source="alertmanager"}}'
        wait_until(lambda: _query(prometheus_port, incident), 40,
                   "the alert to reach the sidecar through Alertmanager, and Prometheus to scrape the incident",
                   interval=0.5)
        yield {"prometheus_port": prometheus_port, "alertmanager_port": alertmanager_port, "metrics_port": metrics_port,
               "instance": instance, "started": started}
    finally:
        for process in reversed(processes):
            process.stop()


# --- every query against the real Prometheus ---------------------------------------------------------------------

def _label_values(port: int, query: str, start: float, end: float) -> list[str]:
    """Grafana's label_values(selector, label) and label_values(label), through Prometheus's HTTP API."""
    match = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", query.strip())
    assert match, f"a variable query this test cannot run: {query}"
    selector, label = match.groups()
    if selector is None:
        return _api(port, f"label/{label}/values", start=str(start), end=str(end))
    series = _api(port, "series", **{"match[]": selector, "start": str(start), "end": str(end)})
    return sorted({s[label] for s in series if s.get(label)})


def _has_finite_data(result: list[dict]) -> bool:
    values = [float(v[1]) for series in result for v in series.get("values", [series.get("value")]) if v]
    return any(math.isfinite(v) for v in values)


def _selections(stack, variables: dict[str, dict], start: float, end: float) -> list[tuple[dict, dict]]:
    """Two ways a user picks: this test's sidecar, model and version, each detector in turn; and All."""
    port = stack["prometheus_port"]
    picked: dict[str, str | list[str]] = {"datasource": "prometheus"}
    globals_ = {"__rate_interval": f"{4 * SCRAPE_SECONDS}s", "__interval": f"{SCRAPE_SECONDS}s",
                "__range": f"{int(end - start)}s"}
    wanted = {"instance": stack["instance"], "model": MODEL, "version": "2"}
    detectors: list[str] = []
    for name, variable in variables.items():
        if variable["type"] != "query":
            continue
        values = _label_values(port, _interpolate(_variable_query(variable), variables, picked, globals_), start, end)
        assert values, f"variable {name} has no values"
        if name in wanted:
            assert wanted[name] in values, f"{wanted[name]} not among variable {name}'s values {values}"
            picked[name] = [wanted[name]]
        else:
            detectors = values
            picked[name] = values
    assert {"inputs_mean", "inputs_shape", "class_mix"} <= set(detectors)
    everything = {name: ("$__all" if variables[name]["type"] == "query" else value) for name, value in picked.items()}
    one_by_one = [{**picked, "detector": [detector]} for detector in detectors]
    return [(selection, globals_) for selection in one_by_one + [everything]]


def _queries(dashboard: dict) -> list[tuple[str, list[tuple[str, bool]]]]:
    """(what, [(PromQL, instant), ...]) for every panel and every annotation."""
    queries = []
    for panel in _panels(dashboard):
        if panel.get("targets"):
            queries.append((f"panel {panel['title']!r}", [(t["expr"], t.get("instant", False)) for t in panel["targets"]]))
    for annotation in dashboard["annotations"]["list"]:
        queries.append((f"annotation {annotation['name']!r}", [(annotation["expr"], False)]))
    return queries


def test_every_panel_annotation_and_variable_query_returns_data(stack):
    """Every query brings series back, and every panel some finite value (ADWIN's threshold, for one, is NaN:
    it has none, and its panel shows the statistic alone)."""
    dashboard = _dashboard()
    variables = _variables(dashboard)
    port = stack["prometheus_port"]
    start, end = stack["started"] - 5, time.time()
    results: dict[tuple[str, bool], list[dict]] = {}
    empty: dict[str, None] = {}  # ordered, each failure once (most panels do not depend on the detector)
    for selected, globals_ in _selections(stack, variables, start, end):
        for what, targets in _queries(dashboard):
            finite = False
            for expr, instant in targets:
                query = _interpolate(expr, variables, selected, globals_)
                if (query, instant) not in results:
                    if instant:
                        results[query, instant] = _api(port, "query", query=query, time=str(end))["result"]
                    else:
                        results[query, instant] = _api(port, "query_range", query=query, start=str(start),
                                                       end=str(end), step=f"{SCRAPE_SECONDS}s")["result"]
                result = results[query, instant]
                if not result:
                    empty[f"{what}: {query}"] = None
                finite = finite or _has_finite_data(result)
            if not finite:
                empty[f"{what} with {selected}: no finite value"] = None
    assert len(results) > 50
    assert list(empty) == [], "queries without data:\n" + "\n".join(empty)


def test_rollbacks_and_alert_firings_show_as_annotations(stack):
    dashboard = _dashboard()
    variables = _variables(dashboard)
    annotations = {annotation["name"]: annotation["expr"] for annotation in dashboard["annotations"]["list"]}
    selected = {"instance": "$__all"}
    start, end = stack["started"] - 5, time.time()

    def series(name: str) -> list[dict]:
        query = _interpolate(annotations[name], variables, selected, {})
        return _api(stack["prometheus_port"], "query_range", query=query, start=str(start), end=str(end),
                    step="1s")["result"]

    rollbacks = series("Rollbacks")
    assert {s["metric"]["hook"] for s in rollbacks} == {"pin-v1"}
    # The sidecar rule's rollback is marked from the first scrape after the hook ran, not before.
    (marked,) = [s for s in rollbacks if s["metric"]["alert"] == SIDECAR_ALERT]
    ran_at = metric(stack["metrics_port"], "sidewatch_rollback_last_timestamp_seconds", alert=SIDECAR_ALERT,
                    hook="pin-v1")
    assert ran_at - 0.5 <= marked["values"][0][0] <= ran_at + 2 * SCRAPE_SECONDS + 2
    assert ROLLBACK_ALERT in {s["metric"]["alertname"] for s in series("Prometheus alerts firing")}
    assert {s["metric"]["alert"] for s in series("Sidecar alerts firing")} == {SIDECAR_ALERT}


def test_prometheus_alert_reaches_the_sidecar_through_alertmanager(stack):
    """The shipped routes: the rollback alert goes to the sidecar's receiver with the token, and only it."""
    am = f"http://127.0.0.1:{stack['alertmanager_port']}/api/v2/alerts"
    with urllib.request.urlopen(am, timeout=10) as reply:
        alerts = json.loads(reply.read())
    routed = {alert["labels"]["alertname"]: sorted(r["name"] for r in alert["receivers"]) for alert in alerts}
    rollback = {ROLLBACK_ALERT, CANARY_ALERT}
    assert all(routed[name] == ["sidewatch-notify", "sidewatch-rollback"] for name in rollback)
    assert all(receivers == ["sidewatch-notify"] for name, receivers in routed.items() if name not in rollback)
    metrics_port = stack["metrics_port"]
    assert metric(metrics_port, "sidewatch_alertmanager_requests_total", result="ok") >= 1
    assert metric(metrics_port, "sidewatch_alertmanager_requests_total", result="unauthorized") == 0
    assert metric(metrics_port, "sidewatch_incidents_total", alert=ROLLBACK_ALERT, source="alertmanager") == 1
    # Alerts without rollback="true" never reached the receiver; the canary's, mapped to no hook, was ignored.
    for name in routed:
        if name != ROLLBACK_ALERT:
            assert metric(metrics_port, "sidewatch_incidents_total", alert=name, source="alertmanager") == 0
