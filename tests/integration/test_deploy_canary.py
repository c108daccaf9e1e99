"""The canary analysis (deploy/k8s/overlays/triton-canary/analysistemplate.yaml) on a real Prometheus.

A sidecar in front of the bundled model server is scraped as the Prometheus Operator would scrape a
canary pod: job "sidewatch", and the pod's namespace and rollouts-pod-template-hash as target labels.
Each metric's query, with the arguments Argo Rollouts would pass, gives one value that meets its
success condition under benign traffic; under an attack the adversarial metric fails its condition;
and another pod template's series are not counted.
"""

from __future__ import annotations

import json
import operator
import re
import subprocess
import sys
import time

import yaml

from tests.support.deploy_kustomize import load_all
from tests.support.harness import REPO, Process, free_port, prometheus_query, start_model_server, start_sidecar, wait_for_http

TEMPLATE = REPO / "deploy" / "k8s" / "overlays" / "triton-canary" / "analysistemplate.yaml"
TRAFFIC = REPO / "deploy" / "compose" / "traffic.py"
NAMESPACE, CANARY_HASH = "models", "6f7d9c8b5"
CONDITION = re.compile(r"result\[0\] (<=|<|>=|>) ([0-9.]+)")
OPERATORS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


def _start_prometheus(tmp_path, target: str) -> tuple[Process, int]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "sidewatch",
            "static_configs": [{"targets": [target],
                                # What the ServiceMonitor's discovery and podTargetLabels attach to a canary pod.
                                "labels": {"namespace": NAMESPACE, "rollouts_pod_template_hash": CANARY_HASH}}],
        }],
    }))
    process = Process(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "prometheus.log")
    wait_for_http(f"http://127.0.0.1:{port}/-/ready")
    return process, port


def _metrics(args: dict[str, str]) -> dict[str, tuple[str, str]]:
    """metric name -> (query with the arguments filled in, success condition)."""
    (template,) = load_all(TEMPLATE.read_text())
    values = {arg["name"]: arg.get("value") for arg in template["spec"]["args"]} | args
    metrics = {}
    for metric in template["spec"]["metrics"]:
        query = metric["provider"]["prometheus"]["query"]
        query = re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", lambda m: values[m[1]], query)
        metrics[metric["name"]] = (query, metric["successCondition"])
    return metrics


def _measure(port: int, args: dict[str, str]) -> dict[str, tuple[float, bool]]:
    """Each metric's value and whether it meets its condition, as Argo Rollouts' Prometheus provider reads
    a vector result (one sample: ``result[0]``)."""
    measured = {}
    for name, (query, condition) in _metrics(args).items():
        result = prometheus_query(port, query)
        assert len(result) == 1, (name, result)
        value = float(result[0]["value"][1])
        op, threshold = CONDITION.fullmatch(condition).groups()
        measured[name] = (value, OPERATORS[op](value, float(threshold)))
    return measured


def _send(target: str, phase: str, seconds: float) -> None:
    phases = {"benign": 0.0, "drift": 0.0, "attack": 0.0} | {phase: seconds}
    done = subprocess.run([sys.executable, str(TRAFFIC), "--target", target, "--rate", "25", "--cycles", "1",
                           *[arg for name, value in phases.items() for arg in (f"--{name}-seconds", str(value))]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _wait_for(port: int, query: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not prometheus_query(port, query):
        assert time.monotonic() < deadline, query
        time.sleep(0.5)


def test_the_canary_analysis_passes_benign_traffic_and_fails_an_attack(tmp_path):
    args = {"namespace": NAMESPACE, "canary-hash": CANARY_HASH}
    model_server, model_port = start_model_server(tmp_path)
    with model_server:
        sidecar, port, metrics_port = start_sidecar(tmp_path, model_port, "--model-repository",
                                                    str(REPO / "agent" / "demo" / "models"), "--device", "cpu")
        with sidecar:
            prometheus, prometheus_port = _start_prometheus(tmp_path, f"127.0.0.1:{metrics_port}")
            with prometheus:
                # Prometheus applies new targets a few seconds after it starts: scrape before the traffic.
                _wait_for(prometheus_port, 'up{job="sidewatch"} == 1')
                _send(f"127.0.0.1:{port}", "benign", 6)
                # rate() needs two samples of a series after the traffic.
                _wait_for(prometheus_port, 'increase(sidewatch_adversarial_inputs_total{job="sidewatch"}[1m]) > 100')
                healthy = _measure(prometheus_port, args)
                assert set(healthy) == {"adversarial-ratio", "error-ratio", "input-drift", "anomaly-ratio"}
                assert all(ok for _, ok in healthy.values()), healthy
                # Benign inputs are flagged at about the calibrated rate, well under three times it. (Prometheus
                # does not count a counter series' value at its first sample, so this may read lower.)
                assert 0 <= healthy["adversarial-ratio"][0] < 3
                # Another pod template's series are not the canary's: nothing to measure, nothing failed.
                other = _measure(prometheus_port, args | {"canary-hash": "0000000000"})
                assert all(value == 0 and ok for value, ok in other.values()), other

                _send(f"127.0.0.1:{port}", "attack", 8)
                _wait_for(prometheus_port, 'increase(sidewatch_adversarial_detections_total{job="sidewatch"}[1m]) > 100')
                attacked = _measure(prometheus_port, args)
                value, ok = attacked["adversarial-ratio"]
                assert value > 3 and not ok, attacked
                assert attacked["error-ratio"][1], attacked


def test_the_template_is_the_one_kustomize_ships():
    kustomization = yaml.safe_load(TEMPLATE.with_name("kustomization.yaml").read_text())
    assert TEMPLATE.name in kustomization["resources"]
