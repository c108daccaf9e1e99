"""The ``argo-rollouts`` hook: abort a Rollout, as ``kubectl argo rollouts abort`` does.

The plugin (argo-rollouts pkg/kubectl-argo-rollouts/cmd/abort/abort.go) sends the merge patch
``{"status":{"abort":true}}`` (application/merge-patch+json) to the Rollout's ``status`` subresource,
and to the Rollout itself when the status subresource is not found (controllers older than v1.0
keep status in the main resource). The controller then scales the canary or preview ReplicaSet
down and sends traffic back to the stable one.
"""

from __future__ import annotations

from agent.alerts.hooks import Hook, HookCall, HookFailed, Plan
from agent.alerts.hooks.kubeclient import KubeError, connect
from agent.config.rollback import ArgoRolloutsHook

ABORT_PATCH = {"status": {"abort": True}}
MERGE_PATCH = "application/merge-patch+json"


def describe(hook: ArgoRolloutsHook, call: HookCall) -> str:
    return f"abort rollout {hook.namespace or '(default namespace)'}/{hook.rollout}"


def run(hook: ArgoRolloutsHook, call: HookCall) -> str:
    try:
        client = connect(hook, hook.timeout_seconds)
        path = f"/apis/argoproj.io/v1alpha1/namespaces/{client.namespace}/rollouts/{hook.rollout}"
        try:
            rollout = client.patch(path + "/status", ABORT_PATCH, MERGE_PATCH)
        except KubeError as err:
            if err.status != 404:
                raise
            rollout = client.patch(path, ABORT_PATCH, MERGE_PATCH)
    except KubeError as err:
        raise HookFailed(f"rollout {hook.rollout}: {err}") from None
    if not (rollout.get("status") or {}).get("abort"):
        raise HookFailed(f"rollout {client.namespace}/{hook.rollout}: the API server did not record status.abort")
    return f"rollout {client.namespace}/{hook.rollout} aborted"


class ArgoRolloutsAbort(Hook):
    def plan(self, call: HookCall) -> Plan:
        return Plan(describe(self.config, call))

    def apply(self, plan: Plan, call: HookCall) -> str:
        return run(self.config, call)
