"""The ``rollback:`` section of the configuration: safety limits and the named hooks.

Alert rules and the Alertmanager receiver refer to hooks by name. Every hook has a timeout, a number
of retries and an exponential backoff between attempts (``backoff_seconds``, doubled per retry up to
``max_backoff_seconds``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from agent.config.base import Strict, check_address
from agent.config.files import DIRECTORY, READ, Program

_DEFAULT_SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")



class _Hook(Strict):
    timeout_seconds: float = Field(10.0, gt=0)
    # Attempts after the first one when it fails.
    retries: int = Field(2, ge=0, le=20)
    backoff_seconds: float = Field(1.0, ge=0)
    max_backoff_seconds: float = Field(60.0, ge=0)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next one."""
        return min(self.backoff_seconds * 2 ** (attempt - 1), self.max_backoff_seconds)


class RouteHook(_Hook):
    """Inside the sidecar: pin the model's ModelInfer traffic to a version, or send it to another upstream.

    With neither ``version`` nor ``upstream``, the version is the last known-good one: the most
    recent version of the model that served traffic, other than the alert's ``version`` label.
    Without ``model``, the model is the alert's ``model`` label.
    """

    type: Literal["route"]
    model: str | None = Field(None, min_length=1)
    version: str | None = Field(None, min_length=1)
    upstream: str | None = None
    retries: int = Field(0, ge=0, le=20)

    @field_validator("upstream")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            check_address(value)
        return value

    @model_validator(mode="after")
    def _one_target(self) -> "RouteHook":
        if self.version is not None and self.upstream is not None:
            raise ValueError("give either version or upstream, not both")
        return self


class WebhookHook(_Hook):
    """POST the incident as JSON, signed with HMAC-SHA256 (header X-Sidewatch-Signature)."""

    type: Literal["webhook"]
    url: str
    # The HMAC key: the file's contents (trailing newline stripped) or an environment variable.
    secret_file: Annotated[Path | None, READ] = None
    secret_env: str | None = None
    # Extra request headers (e.g. an Authorization header the receiver wants).
    headers: dict[str, str] = {}

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> "WebhookHook":
        if (self.secret_file is None) == (self.secret_env is None):
            raise ValueError("give exactly one of secret_file and secret_env (the HMAC key)")
        return self

    def secret(self) -> bytes:
        """The HMAC key; raises ValueError naming the file or variable when it cannot be read."""
        if self.secret_file is not None:
            try:
                value = self.secret_file.read_bytes().rstrip(b"\r\n")
            except OSError as err:
                raise ValueError(f"cannot read secret_file {self.secret_file}: {err.strerror}") from None
            source = f"secret_file {self.secret_file}"
        else:
            value = os.environ.get(self.secret_env, "").encode()
            source = f"environment variable {self.secret_env}"
        if not value:
            raise ValueError(f"{source} is empty")
        return value


class CommandHook(_Hook):
    """Run a program (an argument list, no shell) with the incident in its environment; exit 0 is success."""

    type: Literal["command"]
    argv: Program = Field(min_length=1)
    # Added to the program's environment. The sidecar's own environment is not passed on (it may hold
    # tokens); only PATH, HOME, LANG, LC_ALL and TZ are, plus these and the SIDEWATCH_* variables.
    env: dict[str, str] = {}
    cwd: Annotated[Path | None, DIRECTORY] = None
    timeout_seconds: float = Field(30.0, gt=0)


class KubernetesAccess(Strict):
    """How to reach the API server: in-cluster (the default) or a kubeconfig file."""

    namespace: str | None = None    # default: the kubeconfig context's, the service account's, or "default"
    kubeconfig: Annotated[Path | None, READ] = None
    context: str | None = None      # kubeconfig context; default: current-context
    # Overrides the server URL (in-cluster: instead of KUBERNETES_SERVICE_HOST/PORT).
    api_server: str | None = None
    service_account_dir: Path = _DEFAULT_SERVICE_ACCOUNT


class KubernetesHook(_Hook, KubernetesAccess):
    """Roll a Deployment back to its previous revision, as ``kubectl rollout undo`` does."""

    type: Literal["kubernetes"]
    deployment: str = Field(min_length=1)
    # Roll back to this revision instead of the previous one (kubectl's --to-revision).
    to_revision: int | None = Field(None, ge=1)
    # A guard across replicas: every sidecar of the Deployment may get the alert, and a second undo
    # would go back to the bad version. A rollback stamps the Deployment (annotations), and no
    # replica rolls it back again within this many seconds of the stamp.
    min_seconds_between_rollbacks: float = Field(3600.0, ge=0)


class ArgoRolloutsHook(_Hook, KubernetesAccess):
    """Abort an Argo Rollout, as ``kubectl argo rollouts abort`` does."""

    type: Literal["argo-rollouts"]
    rollout: str = Field(min_length=1)


HookConfig = Annotated[
    Union[RouteHook, WebhookHook, CommandHook, KubernetesHook, ArgoRolloutsHook],
    Field(discriminator="type"),
]


class RollbackConfig(Strict):
    # Decide and audit-log, run nothing.
    dry_run: bool = False
    # Append-only JSON-lines audit log; without one, decisions live in memory only (and incidents,
    # their results and route pins are forgotten at restart).
    audit_log: Path | None = None
    # No new rollback within this many seconds after one.
    cooldown_seconds: float = Field(300.0, ge=0)
    # No more than this many rollbacks in any hour.
    max_per_hour: int = Field(3, ge=0)
    # Incidents of Alertmanager's alerts (POST /alertmanager) open at once, at most: while this many are open
    # a new one is refused (counted in sidewatch_alert_firings_ignored_total{reason="max_open_incidents"},
    # logged once a minute, answered 200 and listed as refused); Alertmanager sends a firing alert again at
    # every repeat_interval, and it opens then if there is room. The replay of the audit log at start keeps
    # the same bound. The shipped rules that roll back (3, grouped by model and version) on metrics.max_models
    # (64) model versions open 192 at most. The sidecar's own alerts are neither counted nor refused: they are
    # bounded by alerts.rules and the model labels, and the engine hands a firing over once, with no resend.
    max_open_alertmanager_incidents: int = Field(256, ge=1)
    # How far ahead of this sidecar's clock an alert's start (Alertmanager's startsAt) may be: the clocks of
    # the hosts of Prometheus, Alertmanager and the sidecar differ a little. A firing that starts later than
    # that is not trusted as a time at all: it opens nothing (counted, reason="future"), and it is taken when
    # it is sent again once its start is no longer ahead. No resolution is remembered later than this either,
    # so a start dated years ahead cannot make the alert's real firings look stale for years. 5 minutes:
    # Kerberos's default maximum clock skew.
    max_clock_skew_seconds: float = Field(300.0, ge=0)
    # The sidewatch instance named in webhooks and command environments.
    instance: str = Field(default_factory=socket.gethostname)
    hooks: dict[str, HookConfig] = {}

    @field_validator("hooks")
    @classmethod
    def _names(cls, hooks: dict) -> dict:
        for name in hooks:
            if not name or any(ch.isspace() or ch == "," for ch in name):
                raise ValueError(f"hook name {name!r}: no spaces or commas")
        return hooks

    def check_hook_names(self, names, where: str) -> None:
        """Raise ValueError when ``names`` (hooks referred to at ``where``) are not all configured."""
        unknown = [name for name in names if name not in self.hooks]
        if unknown:
            known = ", ".join(sorted(self.hooks)) or "none"
            raise ValueError(f"{where}: unknown hook(s) {', '.join(unknown)} (configured: {known})")
