"""The kubernetes and argo-rollouts hooks against the stand-in API server (tests/support/kube_api.py), over HTTPS,
in-cluster (service-account files and KUBERNETES_SERVICE_* pointed at temporary ones) and by kubeconfig."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from agent.alerts.hooks import HookCall, HookFailed, argo_rollouts, kubernetes
from agent.config.rollback import ArgoRolloutsHook, KubernetesHook
from tests.support import kube_api
from tests.support.kube_api import KubeAPI
from tests.support.webhook import make_incident

NS = "models"
TOKEN = "sidewatch-token"


@pytest.fixture
def api(tmp_path):
    directory = tmp_path / "api"
    directory.mkdir()
    with KubeAPI(directory, tokens=(TOKEN,)) as server:
        yield server


@pytest.fixture
def mnist(api):
    """Deployment mnist at revision 3 with the ReplicaSets of revisions 1-3, and decoys."""
    dep = api.put("deployments", kube_api.deployment("mnist", NS, "model:v3", revision=3))
    api.put("replicasets", kube_api.replica_set(dep, "model:v1", 1, "aaa111"))
    api.put("replicasets", kube_api.replica_set(dep, "model:v2", 2, "bbb222"))
    api.put("replicasets", kube_api.replica_set(dep, "model:v3", 3, "ccc333", replicas=2))
    # Same labels, another owner with a higher revision: not ours.
    stranger = kube_api.replica_set(dep, "model:evil", 9, "zzz999")
    stranger["metadata"]["ownerReferences"][0]["uid"] = "another-deployment"
    api.put("replicasets", stranger)
    # Ours by owner, but in another namespace: not listed.
    elsewhere = kube_api.replica_set(dep, "model:other", 7, "yyy888")
    elsewhere["metadata"]["namespace"] = "other"
    api.put("replicasets", elsewhere)
    return dep


@pytest.fixture
def in_cluster(api, tmp_path, monkeypatch):
    """The pod's view: KUBERNETES_SERVICE_HOST/PORT and a service account directory."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN + "\n")
    (account / "ca.crt").write_bytes(api.ca.cert_file.read_bytes())
    (account / "namespace").write_text(NS)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
    return account


def call() -> HookCall:
    return HookCall(make_incident(hooks=("k8s",)), "k8s", 1, "edge")


def test_rollout_undo_in_cluster_restores_the_previous_revision_as_kubectl_does(api, mnist, in_cluster):
    hook = KubernetesHook(type="kubernetes", deployment="mnist", service_account_dir=in_cluster)
    message = kubernetes.run(hook, call())
    assert message == "deployment models/mnist rolled back to revision 2 (replicaset mnist-bbb222)"

    get_dep, list_rs, patch = api.requests
    assert (get_dep.method, get_dep.path) == ("GET", "/apis/apps/v1/namespaces/models/deployments/mnist")
    assert (list_rs.method, list_rs.path) == ("GET", "/apis/apps/v1/namespaces/models/replicasets")
    assert list_rs.query == {"labelSelector": ["app=mnist"]}
    assert (patch.method, patch.content_type) == ("PATCH", "application/json-patch+json")
    assert [(op["op"], op["path"]) for op in patch.body] == [
        ("test", "/metadata/resourceVersion"), ("replace", "/spec/template"), ("replace", "/metadata/annotations")]
    assert {seen.user for seen in api.requests} == {f"token:{TOKEN}"}

    after = api.get("deployments", NS, "mnist")
    assert after["spec"]["template"]["spec"]["containers"][0]["image"] == "model:v2"
    # The hash label is the ReplicaSet's, not the template's.
    assert after["spec"]["template"]["metadata"]["labels"] == {"app": "mnist"}
    # Revision bookkeeping stays the Deployment's; the rest comes from the ReplicaSet (kubectl's rule),
    # so the Deployment's own "team" annotation, which the ReplicaSet does not have, is gone too.
    stamp = after["metadata"]["annotations"]
    assert int(stamp.pop(kubernetes.ROLLED_BACK_AT)) > 0
    assert stamp.pop(kubernetes.ROLLED_BACK_BY) == f"{call().incident.id} (edge)"
    assert stamp == {"deployment.kubernetes.io/revision": "3", "kubernetes.io/change-cause": "deploy model:v2"}
    assert after["metadata"]["generation"] == 2
    assert after["spec"]["replicas"] == 2 and after["spec"]["paused"] is False


def test_another_replica_does_not_undo_the_rollback_within_the_guard(api, mnist, in_cluster):
    """Every sidecar of the Deployment may get the fleet's alert; the second undo would restore the bad version."""
    hook = KubernetesHook(type="kubernetes", deployment="mnist", service_account_dir=in_cluster)
    assert "rolled back to revision 2" in kubernetes.run(hook, call())
    api.put("replicasets", kube_api.replica_set(api.get("deployments", NS, "mnist"), "model:v2", 4, "ddd444"))
    patches = sum(seen.method == "PATCH" for seen in api.requests)
    other_replica = HookCall(make_incident(hooks=("k8s",)), "k8s", 1, "another-pod")
    message = kubernetes.run(hook, other_replica)
    assert message.startswith("skipped: deployment models/mnist rolled back") and "not again within 3600 s" in message
    assert sum(seen.method == "PATCH" for seen in api.requests) == patches
    assert api.get("deployments", NS, "mnist")["spec"]["template"]["spec"]["containers"][0]["image"] == "model:v2"
    # Past the guard it would roll back again (here: a guard of 0 s).
    unguarded = KubernetesHook(type="kubernetes", deployment="mnist", service_account_dir=in_cluster,
                               min_seconds_between_rollbacks=0)
    assert "rolled back to revision" in kubernetes.run(unguarded, other_replica)


def test_a_patch_racing_another_replicas_is_refused_by_the_resource_version_test(api, mnist, in_cluster):
    hook = KubernetesHook(type="kubernetes", deployment="mnist", service_account_dir=in_cluster)
    stale = api.get("deployments", NS, "mnist")
    assert "rolled back" in kubernetes.run(hook, call())  # the other replica wins
    from agent.alerts.hooks.kubeclient import KubeError, connect

    client = connect(hook, 5)
    with pytest.raises(KubeError) as refused:
        client.patch("/apis/apps/v1/namespaces/models/deployments/mnist",
                     [{"op": "test", "path": "/metadata/resourceVersion", "value": stale["metadata"]["resourceVersion"]},
                      {"op": "replace", "path": "/spec/template", "value": stale["spec"]["template"]}],
                     "application/json-patch+json")
    assert refused.value.status == 422


def test_to_revision_picks_that_revision(api, mnist, in_cluster):
    hook = KubernetesHook(type="kubernetes", deployment="mnist", service_account_dir=in_cluster, to_revision=1)
    assert "revision 1" in kubernetes.run(hook, call())
    assert api.get("deployments", NS, "mnist")["spec"]["template"]["spec"]["containers"][0]["image"] == "model:v1"
    hook = KubernetesHook(type="kubernetes", deployment="mnist", service_account_dir=in_cluster, to_revision=9)
    with pytest.raises(HookFailed, match="unable to find the specified revision 9"):
        kubernetes.run(hook, call())


def test_paused_deployment_is_refused_and_left_alone(api, mnist, in_cluster):
    paused = api.get("deployments", NS, "mnist")
    paused["spec"]["paused"] = True
    api.put("deployments", paused)
    hook = KubernetesHook(type="kubernetes", deployment="mnist", service_account_dir=in_cluster)
    with pytest.raises(HookFailed, match="is paused"):
        kubernetes.run(hook, call())
    assert api.writes() == []


def test_no_previous_revision_is_refused(api, in_cluster):
    dep = api.put("deployments", kube_api.deployment("fresh", NS, "model:v1", revision=1))
    api.put("replicasets", kube_api.replica_set(dep, "model:v1", 1, "aaa111", replicas=2))
    hook = KubernetesHook(type="kubernetes", deployment="fresh", service_account_dir=in_cluster)
    with pytest.raises(HookFailed, match="no rollout history found for deployment 'fresh'"):
        kubernetes.run(hook, call())
    assert api.writes() == []


def test_template_already_at_the_previous_revision_is_skipped_without_a_patch(api, mnist, in_cluster):
    hook = KubernetesHook(type="kubernetes", deployment="mnist", service_account_dir=in_cluster,
                          min_seconds_between_rollbacks=0)  # not the stamp's guard: kubectl's own check
    kubernetes.run(hook, call())
    # A second undo before the Deployment controller has renumbered the revisions (the stand-in runs no
    # controller): revision 2 is still "previous" and already in the template, so kubectl skips.
    writes = len(api.writes())
    assert kubernetes.run(hook, call()) == "skipped: deployment models/mnist already matches revision 2"
    assert len(api.writes()) == writes


def test_wrong_token_and_missing_deployment_fail_with_the_api_servers_message(api, mnist, in_cluster):
    (in_cluster / "token").write_text("stolen-token")
    hook = KubernetesHook(type="kubernetes", deployment="mnist", service_account_dir=in_cluster)
    with pytest.raises(HookFailed, match="401 Unauthorized"):
        kubernetes.run(hook, call())
    (in_cluster / "token").write_text(TOKEN)          # re-read on every request: rotation works
    hook = KubernetesHook(type="kubernetes", deployment="nope", service_account_dir=in_cluster)
    with pytest.raises(HookFailed, match='404 NotFound: deployments.apps "nope" not found'):
        kubernetes.run(hook, call())


def test_outside_a_cluster_without_kubeconfig_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    hook = KubernetesHook(type="kubernetes", deployment="mnist", service_account_dir=tmp_path)
    with pytest.raises(HookFailed, match="not running in a cluster"):
        kubernetes.run(hook, call())


def _kubeconfig(tmp_path: Path, api: KubeAPI, user: dict, namespace: str = NS) -> Path:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "prod",
        "clusters": [{"name": "prod-cluster", "cluster": {
            "server": api.url, "certificate-authority-data": base64.b64encode(api.ca.cert_file.read_bytes()).decode()}},
            {"name": "wrong-cluster", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "sidewatch", "user": user}],
        "contexts": [{"name": "prod", "context": {"cluster": "prod-cluster", "user": "sidewatch", "namespace": namespace}},
                     {"name": "wrong", "context": {"cluster": "wrong-cluster", "user": "sidewatch"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def test_kubeconfig_with_a_token_uses_the_current_context_and_its_namespace(api, mnist, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = _kubeconfig(tmp_path, api, {"token": TOKEN})
    hook = KubernetesHook(type="kubernetes", deployment="mnist", kubeconfig=kubeconfig)
    assert "revision 2" in kubernetes.run(hook, call())
    assert {seen.user for seen in api.requests} == {f"token:{TOKEN}"}
    hook = KubernetesHook(type="kubernetes", deployment="mnist", kubeconfig=kubeconfig, context="wrong", timeout_seconds=2)
    with pytest.raises(HookFailed, match="cannot reach"):
        kubernetes.run(hook, call())


def test_kubeconfig_with_insecure_skip_tls_verify_and_a_token_file(api, mnist, tmp_path):
    kubeconfig = _kubeconfig(tmp_path, api, {"tokenFile": "token"})
    config = yaml.safe_load(kubeconfig.read_text())
    config["clusters"][0]["cluster"] = {"server": api.url, "insecure-skip-tls-verify": True}
    kubeconfig.write_text(yaml.safe_dump(config))
    (tmp_path / "token").write_text(TOKEN + "\n")
    hook = KubernetesHook(type="kubernetes", deployment="mnist", kubeconfig=kubeconfig)
    assert "revision 2" in kubernetes.run(hook, call())
    assert {seen.user for seen in api.requests} == {f"token:{TOKEN}"}


def test_kubeconfig_with_a_client_certificate(api, mnist, tmp_path):
    client = api.ca.issue("sidewatch", server=False)
    files = _kubeconfig(tmp_path, api, {"client-certificate": client.cert.name, "client-key": client.key.name})
    # Relative paths are relative to the kubeconfig's directory.
    (tmp_path / client.cert.name).write_bytes(client.cert.read_bytes())
    (tmp_path / client.key.name).write_bytes(client.key.read_bytes())
    hook = KubernetesHook(type="kubernetes", deployment="mnist", kubeconfig=files)
    assert "revision 2" in kubernetes.run(hook, call())
    assert {seen.user for seen in api.requests} == {"cert:sidewatch"}

    inline = _kubeconfig(tmp_path, api, {"client-certificate-data": base64.b64encode(client.cert.read_bytes()).decode(),
                                         "client-key-data": base64.b64encode(client.key.read_bytes()).decode()})
    api.requests.clear()
    hook = KubernetesHook(type="kubernetes", deployment="mnist", kubeconfig=inline, to_revision=1,
                          min_seconds_between_rollbacks=0)  # a second rollback, on purpose
    assert "revision 1" in kubernetes.run(hook, call())
    assert {seen.user for seen in api.requests} == {"cert:sidewatch"}


def test_kubeconfig_with_an_exec_plugin_is_refused_clearly(api, tmp_path):
    kubeconfig = _kubeconfig(tmp_path, api, {"exec": {"command": "aws", "args": ["eks", "get-token"]}})
    hook = KubernetesHook(type="kubernetes", deployment="mnist", kubeconfig=kubeconfig)
    with pytest.raises(HookFailed, match="exec or auth-provider plugin"):
        kubernetes.run(hook, call())


def test_server_certificate_is_verified(api, mnist, tmp_path, in_cluster):
    from tests.support.certs import CertificateAuthority

    other = tmp_path / "other-ca"
    other.mkdir()
    (in_cluster / "ca.crt").write_bytes(CertificateAuthority(other, "someone else").cert_file.read_bytes())
    hook = KubernetesHook(type="kubernetes", deployment="mnist", service_account_dir=in_cluster)
    with pytest.raises(HookFailed, match="CERTIFICATE_VERIFY_FAILED"):
        kubernetes.run(hook, call())
    assert api.requests == []


def test_a_patch_without_an_answer_is_unknown_and_not_retried(api, mnist, in_cluster):
    from prometheus_client import CollectorRegistry

    from agent.alerts.dispatcher import RollbackDispatcher
    from agent.config.rollback import RollbackConfig
    from agent.dataplane.routes import RouteTable
    from agent.metrics import AlertMetrics

    api.stall_patches = 3            # applied, but the answer comes after the hook's timeout
    config = RollbackConfig(hooks={"k8s": KubernetesHook(
        type="kubernetes", deployment="mnist", service_account_dir=in_cluster, timeout_seconds=1, retries=3,
        backoff_seconds=0)})
    dispatcher = RollbackDispatcher(config, AlertMetrics(CollectorRegistry()), RouteTable())
    dispatcher.start()
    try:
        dispatcher.firing(make_incident(hooks=("k8s",)).alert)
        assert dispatcher.wait_idle(30)
        [incident] = dispatcher.status()["incidents"]
    finally:
        dispatcher.close()
    state = incident["hooks"]["k8s"]
    assert state["result"] == "unknown" and state["attempts"] == 1
    assert "may have been applied, so it is not retried" in state["message"]
    # Retrying would have rolled back a second time once the controller renumbered the revisions.
    assert len(api.writes()) == 1
    assert api.get("deployments", NS, "mnist")["spec"]["template"]["spec"]["containers"][0]["image"] == "model:v2"


# --- argo rollouts ---------------------------------------------------------------------------------------


def test_abort_patches_the_status_subresource_with_a_merge_patch(api, in_cluster):
    api.put("rollouts", kube_api.rollout("mnist", NS))
    hook = ArgoRolloutsHook(type="argo-rollouts", rollout="mnist", service_account_dir=in_cluster)
    assert argo_rollouts.run(hook, call()) == "rollout models/mnist aborted"
    [patch] = api.requests
    assert (patch.method, patch.path) == ("PATCH", "/apis/argoproj.io/v1alpha1/namespaces/models/rollouts/mnist/status")
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body == {"status": {"abort": True}}
    after = api.get("rollouts", NS, "mnist")
    assert after["status"] == {"phase": "Paused", "currentStepIndex": 1, "stableRS": "abc123", "abort": True}
    assert after["spec"] == kube_api.rollout("mnist", NS)["spec"]


def test_abort_falls_back_to_the_main_resource_without_a_status_subresource(api, in_cluster):
    api.rollout_status_subresource = False
    api.put("rollouts", kube_api.rollout("mnist", NS))
    hook = ArgoRolloutsHook(type="argo-rollouts", rollout="mnist", service_account_dir=in_cluster)
    argo_rollouts.run(hook, call())
    assert [(s.path.rsplit("/", 1)[-1], s.content_type) for s in api.requests] == [
        ("status", "application/merge-patch+json"), ("mnist", "application/merge-patch+json")]
    assert api.get("rollouts", NS, "mnist")["status"]["abort"] is True


def test_abort_of_a_missing_rollout_fails(api, in_cluster):
    hook = ArgoRolloutsHook(type="argo-rollouts", rollout="ghost", service_account_dir=in_cluster)
    with pytest.raises(HookFailed, match='rollouts.argoproj.io "ghost" not found'):
        argo_rollouts.run(hook, call())


# --- the stand-in refuses what the real API server refuses -----------------------------------------------


def _raw_patch(api: KubeAPI, path: str, body, content_type: str) -> tuple[int, dict]:
    context = ssl.create_default_context(cafile=str(api.ca.cert_file))
    request = urllib.request.Request(api.url + path, data=json.dumps(body).encode(), method="PATCH",
                                     headers={"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_stand_in_rejects_unsupported_patch_types_and_invalid_results(api, mnist):
    api.put("rollouts", kube_api.rollout("mnist", NS))
    rollouts = f"/apis/argoproj.io/v1alpha1/namespaces/{NS}/rollouts/mnist/status"
    code, status = _raw_patch(api, rollouts, {"status": {"abort": True}}, "application/strategic-merge-patch+json")
    assert code == 415 and status["reason"] == "UnsupportedMediaType"
    deployments = f"/apis/apps/v1/namespaces/{NS}/deployments/mnist"
    code, status = _raw_patch(api, deployments, {"spec": {"paused": True}}, "application/json")
    assert code == 415 and status["kind"] == "Status"
    code, status = _raw_patch(api, deployments, [{"op": "replace", "path": "/spec/template/metadata/labels",
                                                  "value": {"app": "other"}}], "application/json-patch+json")
    assert code == 422 and "does not match template" in status["message"]
    code, _ = _raw_patch(api, deployments, [{"op": "replace", "path": "/spec/nothing/here", "value": 1}],
                         "application/json-patch+json")
    assert code == 422
    assert api.get("deployments", NS, "mnist")["spec"] == mnist["spec"]


def test_label_selector_strings_match_kubectl():
    selector = {"matchLabels": {"tier": "model", "app": "mnist"},
                "matchExpressions": [{"key": "track", "operator": "In", "values": ["stable", "canary"]},
                                     {"key": "legacy", "operator": "DoesNotExist"}]}
    text = kubernetes.label_selector(selector)
    assert text == "app=mnist,tier=model,track in (canary,stable),!legacy"
    matches = kube_api.parse_selector(text)
    assert matches({"app": "mnist", "tier": "model", "track": "canary"})
    assert not matches({"app": "mnist", "tier": "model", "track": "canary", "legacy": "y"})
    assert not matches({"app": "mnist", "tier": "model", "track": "beta"})
