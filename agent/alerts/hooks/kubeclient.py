"""A minimal Kubernetes API client for the kubernetes and argo-rollouts hooks: urllib, ssl and YAML.

Two ways in, as client-go has them:

* in-cluster (the default): the API server at KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT, the pod's
  service account token (re-read for every request: projected tokens rotate) and CA certificate, and
  the namespace the pod runs in;
* a kubeconfig file: the cluster, user and namespace of ``context`` (default: current-context); the
  server's CA from ``certificate-authority(-data)``; a bearer ``token``/``tokenFile`` or a client
  certificate (``client-certificate(-data)`` and ``client-key(-data)``). Exec and auth-provider
  plugins (cloud logins) are not supported: use a service-account token in the kubeconfig.

Errors come back as :class:`KubeError` with the API's status code, reason and message.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from agent.config.rollback import KubernetesAccess


class KubeError(Exception):
    """A request the API server refused or that did not reach it (status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class KubeClient:
    server: str                             # https://host:port, no trailing slash
    namespace: str
    context: ssl.SSLContext | None
    token: Callable[[], str | None]         # the bearer token, read when a request is made
    deadline: float                         # time.monotonic() by which every request must be done

    def get(self, path: str, query: dict[str, str] | None = None) -> dict:
        return self.request("GET", path, query=query)

    def patch(self, path: str, body, content_type: str) -> dict:
        return self.request("PATCH", path, body=body, content_type=content_type)

    def request(self, method: str, path: str, body=None, content_type: str | None = None,
                query: dict[str, str] | None = None) -> dict:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise KubeError(0, "Timeout", f"{method} {path}: out of time")
        url = self.server + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json", "User-Agent": "sidewatch-rollback"}
        token = self.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type or "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        handlers = [urllib.request.HTTPSHandler(context=self.context)] if self.context is not None else []
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(request, timeout=remaining) as reply:
                return json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as err:
            raise _status_error(err) from None
        except urllib.error.URLError as err:
            raise KubeError(0, "Unreachable", f"cannot reach {self.server}: {err.reason}") from None
        except (TimeoutError, OSError) as err:
            raise KubeError(0, "Unreachable", f"{method} {path}: {err or 'timed out'}") from None
        except ValueError as err:
            raise KubeError(0, "BadResponse", f"{method} {path}: not JSON: {err}") from None


def _status_error(err: urllib.error.HTTPError) -> KubeError:
    """The API's Status object (kind: Status) as a KubeError; plain text when there is none."""
    raw = err.read(4096)
    err.close()
    try:
        status = json.loads(raw)
        return KubeError(err.code, str(status.get("reason") or err.reason), str(status.get("message") or ""))
    except (ValueError, AttributeError):
        return KubeError(err.code, str(err.reason), raw.decode("utf-8", "replace").strip())


def connect(access: KubernetesAccess, timeout_seconds: float) -> KubeClient:
    """A client for ``access`` whose requests must all finish within ``timeout_seconds``."""
    deadline = time.monotonic() + timeout_seconds
    try:
        if access.kubeconfig is not None:
            return _from_kubeconfig(access, deadline)
        return _in_cluster(access, deadline)
    except (OSError, ValueError) as err:  # unreadable CA or client certificate, bad base64
        raise KubeError(0, "BadCredentials", f"cannot set up TLS for the API server: {err}") from None


def _in_cluster(access: KubernetesAccess, deadline: float) -> KubeClient:
    account = access.service_account_dir
    server = access.api_server
    if server is None:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise KubeError(0, "NoCluster", "not running in a cluster (KUBERNETES_SERVICE_HOST/PORT unset) "
                                            "and no kubeconfig or api_server configured")
        server = f"https://{'[' + host + ']' if ':' in host else host}:{port}"
    token_file = account / "token"
    if not token_file.exists():
        raise KubeError(0, "NoCredentials", f"no service account token at {token_file}")
    ca_file = account / "ca.crt"
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file.exists() else ssl.create_default_context()
    namespace = access.namespace or _read_text(account / "namespace") or "default"
    return KubeClient(server.rstrip("/"), namespace, context, lambda: _read_text(token_file), deadline)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _named(items: list | None, name: str, what: str, source: Path) -> dict:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name:
            return item.get(what) or {}
    raise KubeError(0, "BadKubeconfig", f"{source}: no {what} named {name!r}")


def _from_kubeconfig(access: KubernetesAccess, deadline: float) -> KubeClient:
    path = access.kubeconfig
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise KubeError(0, "BadKubeconfig", f"cannot read kubeconfig {path}: {err}") from None
    if not isinstance(config, dict):
        raise KubeError(0, "BadKubeconfig", f"{path} is not a kubeconfig")
    base = path.parent
    context_name = access.context or config.get("current-context")
    if not context_name:
        raise KubeError(0, "BadKubeconfig", f"{path}: no current-context, and the hook names no context")
    context = _named(config.get("contexts"), context_name, "context", path)
    cluster = _named(config.get("clusters"), context.get("cluster", ""), "cluster", path)
    user = _named(config.get("users"), context.get("user", ""), "user", path) if context.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise KubeError(0, "BadKubeconfig", f"{path}: user {context.get('user')!r} logs in with an exec or "
                                            "auth-provider plugin, which sidewatch does not run; use a token")
    server = access.api_server or cluster.get("server")
    if not server:
        raise KubeError(0, "BadKubeconfig", f"{path}: cluster {context.get('cluster')!r} has no server")

    def resolve(name: str) -> str:
        return str(base / name) if not os.path.isabs(name) else name

    ssl_context = None
    if server.startswith("https://"):
        if cluster.get("insecure-skip-tls-verify"):
            ssl_context = ssl.create_default_context()
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
        elif cluster.get("certificate-authority-data"):
            ssl_context = ssl.create_default_context(
                cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        elif cluster.get("certificate-authority"):
            ssl_context = ssl.create_default_context(cafile=resolve(cluster["certificate-authority"]))
        else:
            ssl_context = ssl.create_default_context()
        _load_client_certificate(ssl_context, user, resolve)

    if user.get("token"):
        token = str(user["token"])

        def read_token() -> str | None:
            return token
    elif user.get("tokenFile"):
        token_file = Path(resolve(user["tokenFile"]))

        def read_token() -> str | None:
            return _read_text(token_file)
    else:
        def read_token() -> str | None:
            return None

    namespace = access.namespace or context.get("namespace") or "default"
    return KubeClient(server.rstrip("/"), namespace, ssl_context, read_token, deadline)


def _load_client_certificate(context: ssl.SSLContext, user: dict, resolve) -> None:
    cert, key = user.get("client-certificate"), user.get("client-key")
    cert_data, key_data = user.get("client-certificate-data"), user.get("client-key-data")
    if cert and key:
        context.load_cert_chain(resolve(cert), resolve(key))
    elif cert_data and key_data:
        # ssl loads certificates from files only: write them to a private temporary file for the call.
        with tempfile.NamedTemporaryFile("wb", suffix=".pem") as pem:
            os.chmod(pem.name, 0o600)
            pem.write(base64.b64decode(cert_data) + b"\n" + base64.b64decode(key_data))
            pem.flush()
            context.load_cert_chain(pem.name)
