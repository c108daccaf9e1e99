"""The ``kubernetes`` hook: roll a Deployment back to its previous revision, as ``kubectl rollout undo`` does.

The steps follow kubectl's DeploymentRollbacker (k8s.io/kubectl/pkg/polymorphichelpers/rollback.go):

1. GET the Deployment (apps/v1).
2. List ReplicaSets in its namespace with its label selector and keep those it controls (an
   ownerReference with ``controller: true`` and the Deployment's uid).
3. Read each one's ``deployment.kubernetes.io/revision``; the target is the second-highest revision
   (``to_revision``: that revision exactly). None: "no rollout history".
4. Refuse a paused Deployment. If the target's pod template already equals the Deployment's (ignoring
   the ``pod-template-hash`` label), there is nothing to do: success, "skipped".
5. PATCH the Deployment with a JSON patch (application/json-patch+json) that replaces
   ``/spec/template`` with the target's template minus the ``pod-template-hash`` label, and
   ``/metadata/annotations`` with the Deployment's own revision bookkeeping annotations plus every
   other annotation of the target ReplicaSet.

The Deployment controller then rolls the pods to that template, as after kubectl.

Across replicas. Every sidecar in the Deployment's pods may receive the same fleet-wide alert, and
an undo undone again is the bad version back. So the PATCH also stamps the Deployment with
``sidewatch.dev/rolled-back-at`` (unix seconds) and ``sidewatch.dev/rolled-back-by`` (incident and
instance), and step 4 skips a Deployment stamped less than ``min_seconds_between_rollbacks`` ago.
The PATCH starts with a JSON-patch ``test`` of the ``resourceVersion`` read in step 1, so of two
replicas racing, the API server applies one PATCH and refuses the other (422), which then retries,
reads the stamp and skips.

An undo is not idempotent: once the controller has renumbered the revisions, a second undo goes back
to the bad version. So a PATCH that was sent and got no answer (or a gateway timeout) is not retried:
it is reported as a failure with ``retry=False``, which the dispatcher records as ``unknown``. Errors
before the PATCH, or answers that say it was refused, are retried as usual.
"""

from __future__ import annotations

import copy
import time

from agent.alerts.hooks import Hook, HookCall, HookFailed, Plan
from agent.alerts.hooks.kubeclient import KubeError, connect
from agent.config.rollback import KubernetesHook

REVISION = "deployment.kubernetes.io/revision"
ROLLED_BACK_AT = "sidewatch.dev/rolled-back-at"
ROLLED_BACK_BY = "sidewatch.dev/rolled-back-by"
HASH_LABEL = "pod-template-hash"
# Kept from the Deployment, never copied from the ReplicaSet (kubectl's annotationsToSkip).
ANNOTATIONS_TO_SKIP = frozenset({
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas",
    "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to",
    ROLLED_BACK_AT,
    ROLLED_BACK_BY,
})


def label_selector(selector: dict) -> str:
    """A LabelSelector as the ``labelSelector`` query string (metav1.LabelSelectorAsSelector)."""
    parts = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], sorted(expression.get("values") or [])
        if operator == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif operator == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif operator == "Exists":
            parts.append(key)
        elif operator == "DoesNotExist":
            parts.append(f"!{key}")
        else:
            raise HookFailed(f"unsupported label selector operator {operator!r}")
    if not parts:
        raise HookFailed("the Deployment's selector is empty")
    return ",".join(parts)


def revision(replica_set: dict) -> int | None:
    """The ReplicaSet's revision; 0 without the annotation, None when it is not a number (as kubectl)."""
    value = (replica_set.get("metadata", {}).get("annotations") or {}).get(REVISION)
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        return None


def controlled_by(obj: dict, uid: str) -> bool:
    return any(ref.get("controller") and ref.get("uid") == uid
               for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def pick_revision(replica_sets: list[dict], to_revision: int | None, deployment: str) -> tuple[dict, int]:
    """The ReplicaSet to roll back to: ``to_revision``, or the second-highest revision."""
    numbered = [(rev, rs) for rs in replica_sets if (rev := revision(rs)) is not None]
    if to_revision is not None:
        for rev, rs in numbered:
            if rev == to_revision:
                return rs, rev
        raise HookFailed(f"unable to find the specified revision {to_revision} of deployment {deployment!r}")
    numbered.sort(key=lambda item: item[0], reverse=True)
    if len(numbered) < 2:
        raise HookFailed(f"no rollout history found for deployment {deployment!r}")
    rev, rs = numbered[1]
    return rs, rev


def _without_hash(template: dict) -> dict:
    template = copy.deepcopy(template)
    labels = template.get("metadata", {}).get("labels")
    if labels is not None:
        labels.pop(HASH_LABEL, None)
    return template


def rollback_annotations(deployment: dict, replica_set: dict) -> dict[str, str]:
    current = deployment["metadata"].get("annotations") or {}
    annotations = {key: current[key] for key in ANNOTATIONS_TO_SKIP if key in current}
    for key, value in (replica_set["metadata"].get("annotations") or {}).items():
        if key not in ANNOTATIONS_TO_SKIP:
            annotations[key] = value
    return annotations


def recent_rollback(deployment: dict, min_seconds: float, now: float) -> str | None:
    """Why not to roll back again: a sidewatch stamp on the Deployment younger than ``min_seconds``."""
    annotations = deployment["metadata"].get("annotations") or {}
    try:
        at = float(annotations[ROLLED_BACK_AT])
    except (KeyError, ValueError):
        return None
    if now - at >= min_seconds:
        return None
    return (f"rolled back {now - at:.0f} s ago by {annotations.get(ROLLED_BACK_BY, 'sidewatch')}; "
            f"not again within {min_seconds:.0f} s")


def describe(hook: KubernetesHook, call: HookCall) -> str:
    target = f"revision {hook.to_revision}" if hook.to_revision else "its previous revision"
    return f"roll deployment {hook.namespace or '(default namespace)'}/{hook.deployment} back to {target}"


def run(hook: KubernetesHook, call: HookCall) -> str:
    try:
        return _rollback(hook, call)
    except KubeError as err:
        raise HookFailed(f"deployment {hook.deployment}: {err}") from None


def _rollback(hook: KubernetesHook, call: HookCall) -> str:
    client = connect(hook, hook.timeout_seconds)
    namespace, name = client.namespace, hook.deployment
    path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"
    deployment = client.get(path)
    selector = label_selector(deployment["spec"].get("selector") or {})
    listed = client.get(f"/apis/apps/v1/namespaces/{namespace}/replicasets", query={"labelSelector": selector})
    owned = [rs for rs in listed.get("items") or [] if controlled_by(rs, deployment["metadata"]["uid"])]
    target, rev = pick_revision(owned, hook.to_revision, name)
    now = time.time()
    guard = recent_rollback(deployment, hook.min_seconds_between_rollbacks, now)
    if guard is not None:
        return f"skipped: deployment {namespace}/{name} {guard}"
    if deployment["spec"].get("paused"):
        raise HookFailed(f"deployment {namespace}/{name} is paused: kubectl refuses to roll back a paused "
                         "deployment (resume it first)")
    template = _without_hash(target["spec"]["template"])
    if template == _without_hash(deployment["spec"]["template"]):
        return f"skipped: deployment {namespace}/{name} already matches revision {rev}"
    annotations = rollback_annotations(deployment, target)
    annotations[ROLLED_BACK_AT] = str(int(now))
    annotations[ROLLED_BACK_BY] = f"{call.incident.id} ({call.instance})"
    patch = [
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "replace", "path": "/metadata/annotations", "value": annotations},
    ]
    resource_version = deployment["metadata"].get("resourceVersion")
    if resource_version is not None:
        # Only the Deployment as read: another replica's PATCH in between makes this one fail (422).
        patch.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version})
    try:
        client.patch(path, patch, "application/json-patch+json")
    except KubeError as err:
        if err.status in (0, 504):
            raise HookFailed(f"deployment {namespace}/{name}: the rollback PATCH got no answer ({err}); it may have "
                             "been applied, so it is not retried: check `kubectl rollout history`", retry=False) from None
        raise
    return f"deployment {namespace}/{name} rolled back to revision {rev} (replicaset {target['metadata']['name']})"


class KubernetesRollback(Hook):
    def plan(self, call: HookCall) -> Plan:
        return Plan(describe(self.config, call))

    def apply(self, plan: Plan, call: HookCall) -> str:
        return run(self.config, call)
