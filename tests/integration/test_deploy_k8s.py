"""The Kubernetes manifests (deploy/k8s/), built and checked offline.

Each overlay is built by tests/support/deploy_kustomize.py (checked against `kubectl kustomize` where kubectl is
installed) on a copy of deploy/k8s/ whose secret material comes from deploy/k8s/make-dev-secrets.sh. Then:
every built-in object validates against the Kubernetes schemas (kubernetes-validate, oldest and newest
supported version, strict); the custom resources have what their operators require (written down below
from the operators' CRD schemas) and the PrometheusRule passes `promtool check rules`; the ConfigMap's
configuration passes `sidewatch serve --check-config` with the pod's files in place (Envoy's `--mode validate`
included: it selects the Envoy data plane), and its TLS files load; the pod is wired consistently (ports,
paths, probes, hooks, Alertmanager's route, the ServiceMonitor's TLS material), with Envoy's work directory on
a writable emptyDir and resources that count Envoy; the RBAC is exercised by the real rollback hooks against
a stand-in API server that enforces the built Roles; and the base's sidecar runs with its pod configuration,
Envoy holding its listener, answering its exec probes over mutual TLS, its admin API over TLS, and a real
Prometheus scraping /metrics with the ServiceMonitor's mutual TLS (plain HTTP and HTTPS without a client
certificate get nothing).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.alerts.hooks import HookCall, HookFailed
from agent.alerts.hooks import argo_rollouts as argo_hook
from agent.alerts.hooks import kubernetes as kubernetes_hook
from agent.config import ServeConfig, split_address
from tests.support import kube_api
from tests.support.deploy_dockerfile import parse_dockerfile
from tests.support.deploy_kustomize import MERGE_KEYS, build, load_all
from tests.support.harness import (
    REPO,
    Process,
    free_port,
    http_get,
    prometheus_query,
    sidewatch,
    start_model_server,
    wait_for_http,
)
from tests.support.kube_api import KubeAPI, status_object
from tests.support.process_tree import envoy_child, listening
from tests.support.webhook import make_incident

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/triton", "overlays/mlserver", "overlays/triton-canary"]
NAMESPACE = "models"
# The oldest Kubernetes the manifests support (the kustomization says so), and the newest with schemas here.
KUBERNETES_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig", "AnalysisTemplate", "Rollout"}
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
BUNDLED_MODELS = REPO / "agent" / "demo" / "models"
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"


# --- building -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s(tmp_path_factory) -> Path:
    """A copy of deploy/k8s/ with fresh secret material from make-dev-secrets.sh, as a user would have it."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("secrets"))
    done = subprocess.run(["sh", str(root / "make-dev-secrets.sh"), NAMESPACE, str(root / "base" / "secrets")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def built(k8s) -> dict[str, list[dict]]:
    return {overlay: build(k8s / overlay) for overlay in OVERLAYS}


def _find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def _all(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def _pod(objects: list[dict]) -> dict:
    return _find(objects, "Deployment")["spec"]["template"]["spec"]


def _container(objects: list[dict], name: str) -> dict:
    return next(c for c in _pod(objects)["containers"] if c["name"] == name)


def _config_text(objects: list[dict]) -> str:
    volume = next(v for v in _pod(objects)["volumes"] if v["name"] == "config")
    return _find(objects, "ConfigMap", volume["configMap"]["name"])["data"]["sidewatch.yaml"]


def _config(objects: list[dict]) -> ServeConfig:
    return ServeConfig.model_validate(yaml.safe_load(_config_text(objects)))


def _normalized(obj: dict) -> dict:
    """For comparing with kubectl: Secret data as decoded bytes (kubectl wraps base64), and merge-keyed lists
    in key order (kustomize may move a patched item; the order of containers, volumes and mounts is not meant)."""
    obj = copy.deepcopy(obj)
    if obj["kind"] == "Secret":
        obj["data"] = {key: base64.b64decode("".join(value.split())) for key, value in obj.get("data", {}).items()}

    def walk(value, field=None):
        if isinstance(value, dict):
            return {key: walk(item, key) for key, item in value.items()}
        if isinstance(value, list):
            items = [walk(item) for item in value]
            if field in MERGE_KEYS and all(isinstance(item, dict) for item in items):
                items.sort(key=lambda item: str(item.get(MERGE_KEYS[field])))
            return items
        return value
    return walk(obj)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: nothing to compare with")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_builder_gives_what_kubectl_kustomize_gives(k8s, built, overlay):
    done = subprocess.run(["kubectl", "kustomize", str(k8s / overlay)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    theirs = {(o["kind"], o["metadata"]["name"]): _normalized(o) for o in load_all(done.stdout)}
    ours = {(o["kind"], o["metadata"]["name"]): _normalized(o) for o in built[overlay]}
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key] == theirs[key], key


# --- schemas and operators' requirements ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_builtin_object_validates_against_the_kubernetes_schemas(built, overlay):
    kinds = set()
    for obj in built[overlay]:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kinds.add(obj["kind"])
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    assert {"Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "NetworkPolicy"} <= kinds


def test_the_schema_validation_refuses_a_broken_deployment(built):
    """The validator is live: an unknown field and a wrong type are refused."""
    deployment = copy.deepcopy(_find(built["base"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][1]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    deployment = copy.deepcopy(_find(built["base"], "Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def _secret_key_exists(objects: list[dict], name: str, key: str) -> bool:
    return any(obj["metadata"]["name"] == name and key in obj.get("data", {}) for obj in _all(objects, "Secret"))


def _selected(objects: list[dict], selector: dict) -> bytes:
    """What a Prometheus Operator selector picks: SecretOrConfigMap ({secret|configMap: {name, key}}) or
    SecretKeySelector ({name, key}); the object must be in the build, in the selector's (namespace's) scope."""
    if set(selector) <= {"secret", "configMap"}:
        assert len(selector) == 1, f"exactly one of secret and configMap: {selector}"
        (kind, reference), = selector.items()
    else:
        kind, reference = "secret", selector
    assert reference["name"] and reference["key"]
    if kind == "secret":
        assert _secret_key_exists(objects, reference["name"], reference["key"]), reference
        return base64.b64decode(_find(objects, "Secret", reference["name"])["data"][reference["key"]])
    return _find(objects, "ConfigMap", reference["name"])["data"][reference["key"]].encode()


def _mounted(objects: list[dict], path: Path) -> bytes:
    """The bytes the kubelet puts at ``path`` in the sidewatch container, from the Secret mounted above it."""
    volumes = {volume["name"]: volume for volume in _pod(objects)["volumes"]}
    mount = next(m for m in _container(objects, "sidewatch")["volumeMounts"] if str(path.parent) == m["mountPath"])
    return _selected(objects, {"name": volumes[mount["name"]]["secret"]["secretName"], "key": path.name})


# The endpoint's tlsConfig (SafeTLSConfig and file paths): ca and cert are SecretOrConfigMap, keySecret a
# SecretKeySelector (key required); the operator refuses a client certificate without its key and the reverse.
TLS_CONFIG_FIELDS = {"ca", "caFile", "cert", "certFile", "keySecret", "keyFile", "serverName", "insecureSkipVerify",
                     "minVersion", "maxVersion"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_has_what_the_prometheus_operator_requires(built, overlay):
    # monitoring.coreos.com/v1 ServiceMonitor: spec required [endpoints, selector]; endpoint.interval a duration,
    # scheme one of http, https.
    objects = built[overlay]
    monitor = _find(objects, "ServiceMonitor")
    service = _find(objects, "Service", "sidewatch")
    spec = monitor["spec"]
    assert spec["endpoints"] and spec["selector"]["matchLabels"]
    labels = service["metadata"]["labels"]
    assert all(labels.get(key) == value for key, value in spec["selector"]["matchLabels"].items())
    # The job label comes from the Service's label: the alert rules select job="sidewatch".
    assert labels[spec["jobLabel"]] == "sidewatch"
    ports = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in ports
        assert DURATION.match(endpoint["interval"])
        assert endpoint["scheme"] == "https" and endpoint["path"] == "/metrics"
    metrics_port = next(p for p in service["spec"]["ports"] if p["name"] == spec["endpoints"][0]["port"])["targetPort"]
    container_port = next(p["containerPort"] for p in _container(objects, "sidewatch")["ports"] if p["name"] == metrics_port)
    metrics = _config(objects).metrics
    assert split_address(metrics.listen)[1] == container_port
    # Mutual TLS on /metrics: the ServiceMonitor verifies the pods' certificate and presents a client certificate
    # that the sidecar's client CA accepts, all from Secrets of this build.
    assert metrics.tls is not None and metrics.tls.require_client_cert
    endpoint, = spec["endpoints"]
    tls = endpoint["tlsConfig"]
    assert set(tls) <= TLS_CONFIG_FIELDS and not tls.get("insecureSkipVerify")
    assert {"ca", "cert", "keySecret", "serverName"} <= set(tls)
    server = x509.load_pem_x509_certificate(_mounted(objects, metrics.tls.cert_file))
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(_selected(objects, tls["ca"])))
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert tls["serverName"] in names
    client = x509.load_pem_x509_certificate(_selected(objects, tls["cert"]))
    client.verify_directly_issued_by(x509.load_pem_x509_certificate(_mounted(objects, metrics.tls.client_ca_file)))
    assert x509.ExtendedKeyUsageOID.CLIENT_AUTH in client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    key = serialization.load_pem_private_key(_selected(objects, tls["keySecret"]), password=None)
    assert key.public_key() == client.public_key()
    # Prometheus has a certificate of its own, not the key the sidecars serve with.
    assert client.public_key() != server.public_key()


def test_prometheus_rule_has_what_the_operator_requires_and_passes_promtool(built, tmp_path):
    # monitoring.coreos.com/v1 PrometheusRule: spec required; groups[] required [name] (minLength 1, a map
    # keyed by name); rules[] required [expr], one of record and alert; for/interval durations.
    rule = _find(built["base"], "PrometheusRule")
    groups = rule["spec"]["groups"]
    names = [group["name"] for group in groups]
    assert all(names) and len(names) == len(set(names))
    for group in groups:
        assert DURATION.match(group.get("interval", "0"))
        for item in group["rules"]:
            assert item["expr"]
            assert ("record" in item) != ("alert" in item)
            assert DURATION.match(item.get("for", "0"))
            assert all(isinstance(v, str) for v in {**item.get("labels", {}), **item.get("annotations", {})}.values())
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_rule_carries_exactly_the_rules_of_deploy_prometheus(built):
    done = subprocess.run([sys.executable, str(K8S / "sync-prometheus-rules.py"), "--check"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    expected = []
    for name in ("recording-rules.yml", "alert-rules.yml"):
        expected += yaml.safe_load((REPO / "deploy" / "prometheus" / name).read_text())["groups"]
    for overlay in OVERLAYS:
        assert _find(built[overlay], "PrometheusRule")["spec"]["groups"] == expected


def _rollback_alerts(objects: list[dict]) -> set[str]:
    return {rule["alert"] for group in _find(objects, "PrometheusRule")["spec"]["groups"] for rule in group["rules"]
            if rule.get("labels", {}).get("rollback") == "true"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alertmanager_config_reaches_the_receiver_as_the_compose_alertmanager_does(built, k8s, overlay):
    # monitoring.coreos.com/v1alpha1 AlertmanagerConfig: receivers[] required [name]; matchers[] required
    # [name]; secret key selectors required [key]; the route's receiver must be one of the receivers.
    objects = built[overlay]
    spec = _find(objects, "AlertmanagerConfig")["spec"]
    receivers = {receiver["name"]: receiver for receiver in spec["receivers"]}
    assert len(receivers) == len(spec["receivers"])
    route = spec["route"]
    assert route["receiver"] in receivers
    assert {(m["name"], m["value"], m["matchType"]) for m in route["matchers"]} == \
        {("service", "sidewatch", "="), ("rollback", "true", "=")}
    # The same grouping and timing as the rollback route of deploy/alertmanager/alertmanager.yml.
    compose = yaml.safe_load((REPO / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    upstream = next(r for r in compose["route"]["routes"] if r["receiver"] == "sidewatch-rollback")
    assert route["groupBy"] == upstream["group_by"]
    assert (route["groupWait"], route["groupInterval"], route["repeatInterval"]) == \
        (upstream["group_wait"], upstream["group_interval"], upstream["repeat_interval"])
    webhook, = receivers[route["receiver"]]["webhookConfigs"]
    assert webhook["sendResolved"] is True
    # Alertmanager truncates a group to what the sidecar acts on, and counts the rest (truncatedAlerts).
    config = _config(objects)
    compose_webhook, = next(r for r in compose["receivers"] if r["name"] == "sidewatch-rollback")["webhook_configs"]
    assert webhook["maxAlerts"] == compose_webhook["max_alerts"] == config.admin.max_alerts_per_delivery
    url = re.fullmatch(r"https://([^:/]+):(\d+)(/.*)", webhook["url"])
    service = _find(objects, "Service", "sidewatch")
    assert url[1] == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    admin_port = next(p for p in service["spec"]["ports"] if p["port"] == int(url[2]))
    assert admin_port["name"] == "admin" and url[3] == "/alertmanager"
    assert split_address(config.admin.listen) == ("0.0.0.0", int(url[2])) and config.admin.tls is not None
    credentials = webhook["httpConfig"]["authorization"]["credentials"]
    assert _secret_key_exists(objects, credentials["name"], credentials["key"])
    ca = webhook["httpConfig"]["tlsConfig"]["ca"]["secret"]
    assert _secret_key_exists(objects, ca["name"], ca["key"])
    # The sidecar's certificate (make-dev-secrets.sh) carries the name Alertmanager checks, and the CA signed it.
    tls = _find(objects, "Secret", ca["name"])["data"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(tls["tls.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert webhook["httpConfig"]["tlsConfig"]["serverName"] == url[1] and url[1] in names
    authority = x509.load_pem_x509_certificate(base64.b64decode(tls["ca.crt"]))
    cert.verify_directly_issued_by(authority)
    # Every alert that asks for a rollback is mapped to hooks by the receiver.
    assert _rollback_alerts(objects) <= set(config.admin.alertmanager_hooks)


def test_canary_custom_resources_have_what_argo_rollouts_requires(built):
    # argoproj.io/v1alpha1 AnalysisTemplate: spec required [metrics]; metrics[] required [name, provider];
    # args[] required [name]. Rollout: analysis templates[] required [templateName]; workloadRef names a
    # workload; its selector must select that workload's pods.
    objects = built["overlays/triton-canary"]
    template = _find(objects, "AnalysisTemplate")
    spec = template["spec"]
    declared = {arg["name"] for arg in spec["args"]}
    assert len(declared) == len(spec["args"])
    assert spec["metrics"]
    for metric in spec["metrics"]:
        assert metric["name"] and len(metric["provider"]) == 1
        prometheus = metric["provider"]["prometheus"]
        used = set(re.findall(r"\{\{\s*args\.([\w-]+)\s*\}\}", prometheus["address"] + prometheus["query"]))
        assert used <= declared, used - declared
        assert DURATION.match(metric["interval"])
        assert re.fullmatch(r"result\[0\] (<=|<|>=|>) [0-9.]+", metric["successCondition"])
    rollout = _find(objects, "Rollout")
    deployment = _find(objects, "Deployment")
    reference = rollout["spec"]["workloadRef"]
    assert (reference["apiVersion"], reference["kind"], reference["name"]) == \
        ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert rollout["spec"]["selector"] == deployment["spec"]["selector"]
    analysis = rollout["spec"]["strategy"]["canary"]["analysis"]
    assert [t["templateName"] for t in analysis["templates"]] == [template["metadata"]["name"]]
    given = {arg["name"] for arg in analysis["args"]}
    assert given <= declared
    # Arguments without a default must come from the Rollout.
    assert {arg["name"] for arg in spec["args"] if "value" not in arg} <= given
    assert all(len(step) == 1 and set(step) <= {"setWeight", "pause", "analysis"}
               for step in rollout["spec"]["strategy"]["canary"]["steps"])


# --- the pod ------------------------------------------------------------------------------------------


def _upstream_port(objects: list[dict]) -> int:
    """The gRPC port the model-server container listens on, as its own flags or environment say."""
    container = _container(objects, "model-server")
    words = container.get("command", []) + container.get("args", [])
    env = {item["name"]: item.get("value") for item in container.get("env", [])}
    if words[:2] == ["sidewatch", "model-server"]:
        return split_address(words[words.index("--listen") + 1])[1]
    if words[0] == "tritonserver":
        return int(next(w.split("=", 1)[1] for w in words if w.startswith("--grpc-port=")))
    if words[:2] == ["mlserver", "start"]:
        return int(env["MLSERVER_GRPC_PORT"])
    raise AssertionError(f"unknown model server {words}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_is_wired_consistently(built, overlay):
    objects = built[overlay]
    config = _config(objects)
    pod = _pod(objects)
    side = _container(objects, "sidewatch")
    assert split_address(config.upstream.address) == ("127.0.0.1", _upstream_port(objects))
    # Listener, metrics and admin ports: container ports, Service target ports and the NetworkPolicy.
    ports = {p["name"]: p["containerPort"] for p in side["ports"]}
    assert ports == {"grpc": split_address(config.listen)[1], "metrics": split_address(config.metrics.listen)[1],
                     "admin": split_address(config.admin.listen)[1]}
    service = _find(objects, "Service", "sidewatch")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert service["spec"]["selector"] == _find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    policy = _find(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"] == {"matchLabels": service["spec"]["selector"]}
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == set(ports.values())
    # The configuration is the mounted ConfigMap's file, and every path it names is inside a mount.
    mounts = {m["mountPath"]: m for m in side["volumeMounts"]}
    assert side["args"] == ["--config", "/etc/sidewatch/sidewatch.yaml"] and "/etc/sidewatch" in mounts
    paths = [value for value in _strings(yaml.safe_load(_config_text(objects))) if value.startswith("/")]
    assert paths
    for path in paths:
        assert any(path == mount or path.startswith(mount + "/") for mount in mounts), path
    # TLS on the gRPC listener and on /metrics (both mutual, with the pod's certificate) and on the admin API;
    # probes on the health service through the listener.
    assert config.tls is not None and config.tls.require_client_cert and config.admin.tls is not None
    assert config.metrics.tls == config.tls
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = side[probe]["exec"]["command"]
        assert command[:4] == ["python", "/opt/sidewatch/healthcheck.py", "--config", "/etc/sidewatch/sidewatch.yaml"]
    assert "--service" not in side["livenessProbe"]["exec"]["command"]
    assert side["readinessProbe"]["exec"]["command"][-2:] == ["--service", "inference.GRPCInferenceService"]
    # Rollback hooks name objects of this build, in the pod's own namespace.
    for name, hook in config.rollback.hooks.items():
        if hook.type == "kubernetes":
            assert hook.namespace is None and _find(objects, "Deployment", hook.deployment)
        if hook.type == "argo-rollouts":
            assert hook.namespace is None and _find(objects, "Rollout", hook.rollout)
    assert pod["serviceAccountName"] == _find(objects, "ServiceAccount")["metadata"]["name"]
    assert _rollback_alerts(objects) <= set(config.admin.alertmanager_hooks)


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_unprivileged_and_bounded(built, overlay):
    pod = _pod(built[overlay])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod.get("initContainers", []) + pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
        assert context["runAsUser"] >= 1000
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    side = next(c for c in pod["containers"] if c["name"] == "sidewatch")
    assert side["securityContext"]["readOnlyRootFilesystem"] is True
    assert side["securityContext"]["runAsUser"] == 10001   # the image's user (deploy/Dockerfile)


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?$")
_UNITS = {None: 1, "m": 0.001, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
# What sidewatch on Envoy was measured to take with the bundled detectors (bench/README.md, bench/proxy.py,
# sidewatch and its Envoy together): resident memory at the peak under load; and the memory limit sidewatch had
# alone on the python data plane (210 MiB measured), which Envoy's heap cap comes on top of.
MEASURED_PEAK_BYTES = 356 << 20
SIDEWATCH_ALONE_LIMIT_BYTES = 1 << 30


def _quantity(value) -> float:
    """A Kubernetes resource quantity (the forms these manifests use) as a number: cores or bytes."""
    match = _QUANTITY.match(str(value))
    assert match, value
    return float(match[1]) * _UNITS[match[2]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_sidecar_runs_envoy_in_its_container_within_its_resources(built, overlay):
    """Envoy carries the calls as sidewatch's child in the sidewatch container (data_plane envoy, the image's
    envoy extra): its work directory is on a writable emptyDir (the root file system is read-only), and the
    container's requests and limits count Envoy's workers and heap beside sidewatch's detectors."""
    objects = built[overlay]
    config = _config(objects)
    assert config.data_plane == "envoy"
    side = _container(objects, "sidewatch")
    assert side["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {volume["name"]: volume for volume in _pod(objects)["volumes"]}
    work_dir = config.envoy.work_dir
    assert work_dir is not None
    (mount,) = [m for m in side["volumeMounts"] if work_dir.is_relative_to(m["mountPath"])]
    assert "emptyDir" in volumes[mount["name"]] and not mount.get("readOnly", False), mount
    # No Envoy container beside it: one process tree, drained by sidewatch.
    assert not [c["name"] for c in _pod(objects)["containers"] if "envoy" in c["image"]]
    requests, limits = side["resources"]["requests"], side["resources"]["limits"]
    # CPU: Envoy's workers and the detectors' budget (the tap samples to keep sidewatch within it).
    assert config.tap.cpu_budget_cores is not None
    assert _quantity(limits["cpu"]) >= config.envoy.concurrency + config.tap.cpu_budget_cores
    # Memory: Envoy's heap is capped, on top of what sidewatch alone was given; the request covers the
    # measured peak of both.
    assert config.envoy.max_heap_bytes is not None
    assert _quantity(limits["memory"]) >= SIDEWATCH_ALONE_LIMIT_BYTES + config.envoy.max_heap_bytes
    assert _quantity(requests["memory"]) >= MEASURED_PEAK_BYTES


def test_images_are_this_version_of_sidewatch(built):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for overlay in OVERLAYS:
        pod = _pod(built[overlay])
        images = {c["name"]: c["image"] for c in pod.get("initContainers", []) + pod["containers"]}
        assert images["sidewatch"] == f"sidewatch:{version}"
    assert _container(built["base"], "model-server")["image"] == f"sidewatch:{version}"
    assert _container(built["overlays/triton"], "model-server")["image"].startswith("nvcr.io/nvidia/tritonserver:")
    mlserver = (REPO / "tests" / "requirements-mlserver.txt").read_text()
    tag = re.search(r"^mlserver==([\d.]+)$", mlserver, re.M)[1]
    assert _container(built["overlays/mlserver"], "model-server")["image"] == f"seldonio/mlserver:{tag}"


def test_namespace_and_labels_reach_every_object(built):
    for overlay in OVERLAYS:
        for obj in built[overlay]:
            assert obj["metadata"]["namespace"] == NAMESPACE, (overlay, obj["kind"])
            assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sidewatch"


# --- the pod's files: --check-config, and the sidecar itself --------------------------------------------


def _pod_files(objects: list[dict], root: Path) -> dict[str, Path]:
    """mountPath -> a local folder holding what the kubelet mounts there for the sidewatch container."""
    volumes = {volume["name"]: volume for volume in _pod(objects)["volumes"]}
    mounts = {}
    for mount in _container(objects, "sidewatch")["volumeMounts"]:
        volume = volumes[mount["name"]]
        folder = root / mount["name"]
        folder.mkdir(parents=True)
        if "configMap" in volume:
            for key, value in _find(objects, "ConfigMap", volume["configMap"]["name"])["data"].items():
                (folder / key).write_text(value)
        elif "secret" in volume:
            for key, value in _find(objects, "Secret", volume["secret"]["secretName"])["data"].items():
                (folder / key).write_bytes(base64.b64decode(value))
        elif mount["name"] == "models":
            # The demo models the base's init container copies, or a model repository laid out the same way.
            folder.rmdir()
            folder = BUNDLED_MODELS
        mounts[mount["mountPath"]] = folder
    return mounts


def _localized(text: str, mounts: dict[str, Path]) -> str:
    """``text`` with every path under a mount moved to the mount's local folder (one pass, longest mount first)."""
    alternatives = "|".join(re.escape(path) for path in sorted(mounts, key=len, reverse=True))
    return re.sub(rf"(?<![\w/])({alternatives})(?=/|\s|$)", lambda m: str(mounts[m[1]]), text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmap_passes_check_config_with_the_pods_files(built, overlay, tmp_path):
    mounts = _pod_files(built[overlay], tmp_path)
    config = tmp_path / "sidewatch.yaml"
    config.write_text(_localized(_config_text(built[overlay]), mounts))
    done = subprocess.run(sidewatch("serve", "--config", str(config), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configuration is valid" in done.stdout
    # --check-config does not open the certificates: every listener's TLS files load here, from the pod's mounts.
    loaded = ServeConfig.model_validate(yaml.safe_load(config.read_text()))
    listeners = [loaded.tls, loaded.metrics.tls, loaded.admin.tls]
    assert all(listeners)
    for tls in listeners:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file is not None:
            context.load_verify_locations(tls.client_ca_file)


def test_check_config_has_envoy_validate_the_pods_listener(built, tmp_path):
    """On the Envoy data plane --check-config runs `envoy --mode validate` on the bootstrap written from the
    ConfigMap: a listener certificate in the pod that Envoy cannot load fails it, named by its path."""
    objects = built["base"]
    assert _config(objects).data_plane == "envoy"
    mounts = _pod_files(objects, tmp_path)
    config = tmp_path / "sidewatch.yaml"
    config.write_text(_localized(_config_text(objects), mounts))
    certificate = mounts["/var/run/secrets/sidewatch/tls"] / "tls.crt"
    certificate.write_text("not a certificate\n")
    done = subprocess.run(sidewatch("serve", "--config", str(config), "--check-config"), capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "envoy refuses the configuration" in done.stderr and str(certificate) in done.stderr, done.stderr


def _https_get(url: str, token: str, ca_file: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca_file))
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def _start_operator_prometheus(objects: list[dict], target: str, directory: Path) -> tuple[Process, int]:
    """A real Prometheus scraping ``target`` with the job the Prometheus Operator makes of the ServiceMonitor's
    endpoint: its scheme and path, and its tlsConfig's Secrets written out as files (the operator's TLS assets)."""
    endpoint, = _find(objects, "ServiceMonitor")["spec"]["endpoints"]
    tls = endpoint["tlsConfig"]
    directory.mkdir(parents=True)
    files = {}
    for field, selector in (("ca_file", tls["ca"]), ("cert_file", tls["cert"]), ("key_file", tls["keySecret"])):
        files[field] = directory / field
        files[field].write_bytes(_selected(objects, selector))
    port = free_port()
    config = directory / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{
            "job_name": "sidewatch", "scheme": endpoint["scheme"], "metrics_path": endpoint["path"],
            "tls_config": {**{field: str(path) for field, path in files.items()}, "server_name": tls["serverName"],
                           "insecure_skip_verify": bool(tls.get("insecureSkipVerify"))},
            "static_configs": [{"targets": [target]}],
        }],
    }))
    process = Process(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{port}"], directory / "prometheus.log")
    wait_for_http(f"http://127.0.0.1:{port}/-/ready")
    return process, port


def test_the_base_pod_runs_and_answers_its_probes_and_alertmanager_over_tls(built, tmp_path):
    """The base's sidecar with its own configuration (ports moved to free loopback ones), its model server,
    the exec probes' exact commands, an HTTPS call to the admin API as Alertmanager makes it, and a real
    Prometheus scraping /metrics over mutual TLS as the ServiceMonitor tells the operator to. Envoy, sidewatch's
    child, holds the listener the probes reach, writes only to the pod's emptyDir, and every port of the
    container beyond the NetworkPolicy's is on loopback."""
    objects = built["base"]
    mounts = _pod_files(objects, tmp_path / "pod")
    model_server, model_port = start_model_server(tmp_path)
    with model_server:
        data = yaml.safe_load(_localized(_config_text(objects), mounts))
        ports = {"listen": free_port(), "metrics": free_port(), "admin": free_port()}
        data["listen"] = f"127.0.0.1:{ports['listen']}"
        data["metrics"]["listen"] = f"127.0.0.1:{ports['metrics']}"
        data["admin"]["listen"] = f"127.0.0.1:{ports['admin']}"
        data["upstream"]["address"] = f"127.0.0.1:{model_port}"
        config_dir = mounts["/etc/sidewatch"]
        (config_dir / "sidewatch.yaml").write_text(yaml.safe_dump(data))
        side = _container(objects, "sidewatch")
        # The container's args follow the image's entry point, `sidewatch serve`.
        entrypoint = parse_dockerfile(REPO / "deploy" / "Dockerfile").stages[-1].last("ENTRYPOINT").exec_form()
        assert entrypoint[0] == "sidewatch" and "command" not in side
        args = [arg.replace("/etc/sidewatch", str(config_dir)) for arg in side["args"]]
        sidecar = Process(sidewatch(*entrypoint[1:], *args), tmp_path / "sidecar.log")
        with sidecar:
            sidecar.wait_listening(ports["listen"])
            # The listener is Envoy's, a child of sidewatch; its configuration is in the emptyDir mounted at /tmp.
            envoy = envoy_child(sidecar.popen.pid)
            assert envoy is not None, sidecar.log()[-3000:]
            assert ("127.0.0.1", ports["listen"]) in listening(envoy)
            work_dir = Path(data["envoy"]["work_dir"])
            assert work_dir.is_relative_to(mounts["/tmp"]) and (work_dir / "envoy.json").is_file()
            # The NetworkPolicy admits the listener, metrics and admin ports; every other port sidewatch and its
            # Envoy listen on (Envoy's admin API, the health, access-log and tap services behind Envoy) is bound
            # to loopback, out of other pods' reach.
            sidecar.wait_listening(ports["metrics"])
            sidecar.wait_listening(ports["admin"])
            bound = listening(sidecar.popen.pid) | listening(envoy)
            assert {port for _, port in bound} >= set(ports.values())
            assert {(host, port) for host, port in bound if port not in ports.values() and host != "127.0.0.1"} == set()
            assert len(bound) > len(ports)

            def probe(name: str) -> subprocess.CompletedProcess:
                command = [arg.replace("/opt/sidewatch/healthcheck.py", str(HEALTHCHECK))
                           .replace("/etc/sidewatch", str(config_dir)) for arg in side[name]["exec"]["command"]]
                assert command[0] == "python"
                return subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True,
                                      timeout=side[name]["timeoutSeconds"] + 5)

            assert probe("startupProbe").returncode == 0, sidecar.log()
            assert probe("livenessProbe").returncode == 0
            deadline = time.monotonic() + 30
            while (ready := probe("readinessProbe")).returncode != 0 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert ready.returncode == 0, ready.stderr
            assert "SERVING" in ready.stdout
            # A client without a certificate is refused by the listener's mutual TLS.
            bare = subprocess.run([sys.executable, str(HEALTHCHECK), "--address", f"127.0.0.1:{ports['listen']}"],
                                  capture_output=True, text=True, timeout=15)
            assert bare.returncode == 1
            # The admin API over TLS, checked with the CA Alertmanager is given, with and without the token.
            tls = mounts["/var/run/secrets/sidewatch/tls"]
            token = (mounts["/var/run/secrets/sidewatch/admin-token"] / "token").read_text()
            assert _https_get(f"https://127.0.0.1:{ports['admin']}/status", token, tls / "ca.crt") == 200
            assert _https_get(f"https://127.0.0.1:{ports['admin']}/status", "x" * 64, tls / "ca.crt") == 401
            # /metrics: Prometheus with the ServiceMonitor's CA, client certificate and server name scrapes it.
            prometheus, prometheus_port = _start_operator_prometheus(objects, f"127.0.0.1:{ports['metrics']}",
                                                                     tmp_path / "prometheus")
            with prometheus:
                deadline = time.monotonic() + 30
                while not (up := prometheus_query(prometheus_port, 'up{job="sidewatch"} == 1')) \
                        and time.monotonic() < deadline:
                    time.sleep(0.5)
                targets = json.loads(http_get(f"http://127.0.0.1:{prometheus_port}/api/v1/targets"))
                assert up, [target["lastError"] for target in targets["data"]["activeTargets"]]
                assert prometheus_query(prometheus_port, 'sidewatch_requests_in_flight{job="sidewatch"}')
            # Plain HTTP gets nothing, and neither does HTTPS without a client certificate.
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).read()
            anonymous = ssl.create_default_context(cafile=str(tls / "ca.crt"))
            anonymous.check_hostname = False
            with pytest.raises(OSError):
                urllib.request.urlopen(f"https://127.0.0.1:{ports['metrics']}/metrics", timeout=5,
                                       context=anonymous).read()
            # The model server goes away: readiness fails, liveness still passes (the sidecar is fine).
            model_server.stop()
            deadline = time.monotonic() + 30
            while probe("readinessProbe").returncode == 0 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert probe("readinessProbe").returncode == 1
            assert probe("livenessProbe").returncode == 0


# --- RBAC: the real hooks against an API server that enforces the built Roles -----------------------------


class EnforcingKubeAPI(KubeAPI):
    """tests/support/kube_api.py's stand-in, with RBAC: a request is allowed only by a rule of a Role bound to the
    service account (apiGroups, resources with subresource, verbs, resourceNames, namespace), as the
    RBAC authorizer decides; otherwise 403 with the real message. Records which rule allowed what."""

    def __init__(self, directory: Path, token: str, roles: list[dict], bindings: list[dict], account: str) -> None:
        super().__init__(directory, tokens=(token,))
        self.user = f"system:serviceaccount:{NAMESPACE}:{account}"
        bound = {b["roleRef"]["name"] for b in bindings if b["roleRef"]["kind"] == "Role" and any(
            s["kind"] == "ServiceAccount" and s["name"] == account and s["namespace"] == NAMESPACE
            for s in b["subjects"])}
        self.rules = [(role["metadata"]["namespace"], rule) for role in roles if role["metadata"]["name"] in bound
                      for rule in role["rules"]]
        self.used: set[tuple[int, str, str]] = set()

    def _route(self, method, path, query, content_type, body):
        match = kube_api._PATH.match(path)
        if match:
            group = match["prefix"].split("/")[2]
            resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
            verb = {"GET": "get" if match["name"] else "list", "PATCH": "patch", "PUT": "update",
                    "POST": "create"}[method]
            for index, (namespace, rule) in enumerate(self.rules):
                if (namespace == match["ns"] and group in rule["apiGroups"] and resource in rule["resources"]
                        and verb in rule["verbs"]
                        and (not rule.get("resourceNames") or match["name"] in rule["resourceNames"])):
                    self.used.add((index, verb, resource))
                    break
            else:
                what = f'{match["resource"]}.{group} "{match["name"]}" ' if match["name"] else f"{match['resource']}.{group} "
                message = (f'{what}is forbidden: User "{self.user}" cannot {verb} resource "{match["resource"]}"'
                           + (f' with subresource "{match["sub"]}"' if match["sub"] else "")
                           + f' in API group "{group}" in the namespace "{match["ns"]}"')
                return 403, status_object(403, "Forbidden", message)
        return super()._route(method, path, query, content_type, body)

    def granted(self) -> set[tuple[int, str, str]]:
        return {(index, verb, resource) for index, (_, rule) in enumerate(self.rules)
                for verb in rule["verbs"] for resource in rule["resources"]}


def _enforcing_api(objects: list[dict], directory: Path) -> EnforcingKubeAPI:
    account = _pod(objects)["serviceAccountName"]
    return EnforcingKubeAPI(directory, "pod-token", _all(objects, "Role"), _all(objects, "RoleBinding"), account)


@pytest.fixture
def service_account(tmp_path, monkeypatch):
    """The pod's view of the API server: KUBERNETES_SERVICE_HOST/PORT and its service account's files."""
    account = tmp_path / "serviceaccount"
    account.mkdir()

    def point_at(api: KubeAPI) -> Path:
        (account / "token").write_text("pod-token\n")
        (account / "ca.crt").write_bytes(api.ca.cert_file.read_bytes())
        (account / "namespace").write_text(NAMESPACE)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
        return account
    return point_at


def _call(hook: str) -> HookCall:
    return HookCall(make_incident(hooks=(hook,)), hook, 1, "model-server-pod")


def _deployment_with_history(api: KubeAPI, objects: list[dict]) -> dict:
    """The built Deployment at revision 2, and its ReplicaSets of revisions 1 (an older sidewatch) and 2."""
    deployment = copy.deepcopy(_find(objects, "Deployment"))
    deployment["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": "2"}
    deployment = api.put("deployments", deployment)
    for revision, image, pod_hash in ((1, "sidewatch:0.0.9", "6d4b8c9f7a"), (2, None, "7f8c9d6b5e")):
        template = copy.deepcopy(deployment["spec"]["template"])
        template["metadata"]["labels"]["pod-template-hash"] = pod_hash
        if image:
            next(c for c in template["spec"]["containers"] if c["name"] == "sidewatch")["image"] = image
        api.put("replicasets", {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{deployment['metadata']['name']}-{pod_hash}", "namespace": NAMESPACE,
                         "labels": template["metadata"]["labels"],
                         "annotations": {"deployment.kubernetes.io/revision": str(revision)},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "controller": True,
                                              "name": deployment["metadata"]["name"],
                                              "uid": deployment["metadata"]["uid"]}]},
            "spec": {"replicas": 0, "selector": {"matchLabels": template["metadata"]["labels"]}, "template": template},
        })
    return deployment


def test_the_kubernetes_hook_needs_exactly_the_base_role(built, tmp_path, service_account):
    objects = built["base"]
    config = _config(objects)
    hook_name, hook = next((name, hook) for name, hook in config.rollback.hooks.items() if hook.type == "kubernetes")
    with _enforcing_api(objects, tmp_path) as api:
        hook = hook.model_copy(update={"service_account_dir": service_account(api), "retries": 0})
        deployment = _deployment_with_history(api, objects)
        result = kubernetes_hook.run(hook, _call(hook_name))
        assert "rolled back to revision 1" in result
        patched = api.get("deployments", NAMESPACE, deployment["metadata"]["name"])
        images = {c["name"]: c["image"] for c in patched["spec"]["template"]["spec"]["containers"]}
        assert images["sidewatch"] == "sidewatch:0.0.9"
        # Every verb on every resource the Role grants was needed: nothing more is granted.
        assert api.used == api.granted()
        # resourceNames holds: another Deployment of the namespace is out of reach.
        other = hook.model_copy(update={"deployment": "another-model"})
        with pytest.raises(HookFailed, match="403 Forbidden.*cannot get resource \"deployments\""):
            kubernetes_hook.run(other, _call(hook_name))


def test_the_argo_rollouts_hook_needs_exactly_the_canary_role_and_nothing_else_is_left(built, tmp_path, service_account):
    objects = built["overlays/triton-canary"]
    config = _config(objects)
    hook_name, hook = next((name, hook) for name, hook in config.rollback.hooks.items() if hook.type == "argo-rollouts")
    assert not [h for h in config.rollback.hooks.values() if h.type == "kubernetes"]
    with _enforcing_api(objects, tmp_path) as api:
        hook = hook.model_copy(update={"service_account_dir": service_account(api), "retries": 0})
        rollout = copy.deepcopy(_find(objects, "Rollout"))
        rollout["status"] = {"phase": "Paused", "currentStepIndex": 1}
        api.put("rollouts", rollout)
        assert "aborted" in argo_hook.run(hook, _call(hook_name))
        assert api.get("rollouts", NAMESPACE, rollout["metadata"]["name"])["status"]["abort"] is True
        assert api.used == api.granted()
        # The base's Deployment rights are gone in this overlay: a kubernetes hook would be refused.
        _deployment_with_history(api, objects)
        undo = kubernetes_hook.KubernetesHook(type="kubernetes", deployment=rollout["spec"]["workloadRef"]["name"],
                                              service_account_dir=hook.service_account_dir, retries=0)
        with pytest.raises(HookFailed, match="403 Forbidden"):
            kubernetes_hook.run(undo, _call("undo"))


def test_make_dev_secrets_keeps_what_is_there(tmp_path):
    script = K8S / "make-dev-secrets.sh"
    subprocess.run(["sh", str(script), "staging", str(tmp_path)], check=True, capture_output=True)
    first = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert set(first) == {"admin-token", "webhook-secret", "ca.crt", "ca.key", "tls.crt", "tls.key",
                          "prometheus-client.crt", "prometheus-client.key"}
    assert re.fullmatch(rb"[0-9a-f]{64}", first["admin-token"]), "64 hex characters, no newline"
    subprocess.run(["sh", str(script), "staging", str(tmp_path)], check=True, capture_output=True)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == first
    cert = x509.load_pem_x509_certificate(first["tls.crt"])
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "sidewatch.staging.svc" in names.get_values_for_type(x509.DNSName)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u._name for u in usages} >= {"serverAuth", "clientAuth"}
    # Prometheus's certificate authenticates a client only: it cannot serve as a sidecar.
    client = x509.load_pem_x509_certificate(first["prometheus-client.crt"])
    client.verify_directly_issued_by(x509.load_pem_x509_certificate(first["ca.crt"]))
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [x509.ExtendedKeyUsageOID.CLIENT_AUTH]
    assert all((path.stat().st_mode & 0o077) == 0 for path in tmp_path.iterdir())
