"""A stand-in Kubernetes API server for the kubernetes and argo-rollouts hooks.

No real API server can run on the test machine, so this one serves, over HTTPS on loopback, the
paths, verbs, content types and answers those hooks use, as the real server does:

* ``GET /apis/apps/v1/namespaces/NS/deployments/NAME`` and ``PATCH`` of it;
* ``GET /apis/apps/v1/namespaces/NS/replicasets?labelSelector=...`` (equality- and set-based selectors,
  as ``labels.Parse`` reads them), a ``ReplicaSetList``;
* ``GET`` and ``PATCH /apis/argoproj.io/v1alpha1/namespaces/NS/rollouts/NAME`` and its ``/status``
  subresource. With the subresource enabled (the CRD's ``subresources: status``, as Argo Rollouts
  installs it), a patch of the main resource leaves ``status`` alone and a patch of ``/status``
  changes only ``status``; disabled (controllers before v1.0), ``/status`` is 404.

Authentication: ``Authorization: Bearer`` with one of ``tokens``, or a client certificate signed by
the server's CA whose common name is in ``client_users``; anything else is 401 with a ``Status``.
Errors are ``Status`` objects (kind, status Failure, message, reason, details, code) with the real
messages (``deployments.apps "x" not found``).

Patches: ``application/json-patch+json`` (RFC 6902: add, remove, replace, test, move, copy),
``application/merge-patch+json`` (RFC 7386) and, for built-in kinds only, ``application/strategic-merge-patch+json``
applied as a merge patch (list merge keys are not modelled; sidewatch never sends one). Any other
content type is 415, as is a strategic merge patch of a custom resource. A changed spec bumps
``metadata.generation``; every write bumps ``resourceVersion``. A Deployment whose template labels
no longer match its selector is refused with 422, as the real validation does.

Not modelled: controllers (nothing rolls pods or renumbers revisions after a patch), watches, RBAC.
``stall_patches`` (seconds) holds the answer to a PATCH after applying it: a reply lost on the way back.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.support.certs import CertificateAuthority

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

# (API prefix, resource) -> (kind, group for messages, built-in?)
_RESOURCES = {
    ("/apis/apps/v1", "deployments"): ("Deployment", "apps", True),
    ("/apis/apps/v1", "replicasets"): ("ReplicaSet", "apps", True),
    ("/apis/argoproj.io/v1alpha1", "rollouts"): ("Rollout", "argoproj.io", False),
}
_PATH = re.compile(r"^(?P<prefix>/apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<resource>[^/]+)"
                   r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$")


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: object
    user: str | None


class PatchError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
              "reason": reason, "code": code}
    if details:
        status["details"] = details
    return status


class KubeAPI:
    def __init__(self, directory: Path, tokens: tuple[str, ...] = ("sidewatch-token",),
                 client_users: tuple[str, ...] = ("sidewatch",)) -> None:
        self.ca = CertificateAuthority(directory, "kube test CA")
        server_cert = self.ca.issue("kube-apiserver", server=True)
        self.tokens = set(tokens)
        self.client_users = set(client_users)
        self.rollout_status_subresource = True
        self.stall_patches = 0.0
        self.objects: dict[tuple[str, str, str], dict] = {}      # (resource, namespace, name) -> object
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._versions = itertools.count(1000)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(server_cert.cert, server_cert.key)
        context.load_verify_locations(self.ca.cert_file)
        context.verify_mode = ssl.CERT_OPTIONAL        # client certificates are one way in, tokens another
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                api._handle(self, "GET")

            def do_PATCH(self):
                api._handle(self, "PATCH")

            def do_POST(self):
                api._handle(self, "POST")

            def do_PUT(self):
                api._handle(self, "PUT")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "KubeAPI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- objects ------------------------------------------------------------------------------

    def put(self, resource: str, obj: dict) -> dict:
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[(resource, meta["namespace"], meta["name"])] = obj
        return obj

    def get(self, resource: str, namespace: str, name: str) -> dict:
        return copy.deepcopy(self.objects[(resource, namespace, name)])

    def writes(self) -> list[Seen]:
        return [seen for seen in self.requests if seen.method != "GET"]

    # --- HTTP ---------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        content_type = (handler.headers.get("Content-Type") or "").split(";")[0].strip() or None
        user = self._authenticate(handler)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        with self._lock:
            self.requests.append(Seen(method, url.path, parse_qs(url.query), content_type, body, user))
            if user is None:
                code, answer = 401, status_object(401, "Unauthorized", "Unauthorized")
            else:
                code, answer = self._route(method, url.path, parse_qs(url.query), content_type, body)
        if method == "PATCH" and self.stall_patches:
            time.sleep(self.stall_patches)
        data = json.dumps(answer).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _authenticate(self, handler: BaseHTTPRequestHandler) -> str | None:
        authorization = handler.headers.get("Authorization") or ""
        if authorization.startswith("Bearer "):
            token = authorization[len("Bearer "):]
            # A wrong token is refused even when a client certificate is also presented, as the real one.
            return f"token:{token}" if token in self.tokens else None
        cert = handler.connection.getpeercert() if hasattr(handler.connection, "getpeercert") else None
        if cert:
            common_name = dict(item[0] for item in cert["subject"]).get("commonName")
            if common_name in self.client_users:
                return f"cert:{common_name}"
        return None

    def _route(self, method: str, path: str, query: dict, content_type: str | None, body) -> tuple[int, dict]:
        match = _PATH.match(path)
        if not match or (match["prefix"], match["resource"]) not in _RESOURCES:
            return 404, status_object(404, "NotFound", "the server could not find the requested resource")
        prefix, namespace, resource, name, sub = match.group("prefix", "ns", "resource", "name", "sub")
        kind, group, builtin = _RESOURCES[(prefix, resource)]
        if sub is not None and (sub != "status" or (kind == "Rollout" and not self.rollout_status_subresource)):
            return 404, status_object(404, "NotFound", "the server could not find the requested resource")
        if name is None:
            if method != "GET":
                return 405, status_object(405, "MethodNotAllowed", f"the server does not allow this method on {resource}")
            return 200, self._list(prefix, resource, kind, namespace, query)
        key = (resource, namespace, name)
        if key not in self.objects:
            return 404, status_object(404, "NotFound", f'{resource}.{group} "{name}" not found',
                                      {"name": name, "group": group, "kind": resource})
        if method == "GET":
            return 200, self.objects[key]
        if method != "PATCH":
            return 405, status_object(405, "MethodNotAllowed", f"the server does not allow this method on {resource}")
        accepted = [JSON_PATCH, MERGE_PATCH, APPLY_PATCH] + ([STRATEGIC_MERGE_PATCH] if builtin else [])
        if content_type not in accepted or content_type == APPLY_PATCH:
            return 415, status_object(415, "UnsupportedMediaType",
                                      f"the body of the request was in an unknown format - accepted media types "
                                      f"include: {', '.join(accepted)}")
        try:
            return 200, self._patch(key, kind, sub, content_type, body)
        except PatchError as err:
            return err.code, status_object(err.code, err.reason, err.message)

    def _list(self, prefix: str, resource: str, kind: str, namespace: str, query: dict) -> dict:
        selector = parse_selector((query.get("labelSelector") or [""])[0])
        items = [copy.deepcopy(obj) for (res, ns, _), obj in sorted(self.objects.items())
                 if res == resource and ns == namespace and selector(obj["metadata"].get("labels") or {})]
        return {"kind": f"{kind}List", "apiVersion": prefix[len("/apis/"):],
                "metadata": {"resourceVersion": str(next(self._versions))}, "items": items}

    def _patch(self, key: tuple[str, str, str], kind: str, sub: str | None, content_type: str, body) -> dict:
        current = self.objects[key]
        if content_type == JSON_PATCH:
            if not isinstance(body, list):
                raise PatchError(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
            patched = json_patch(current, body)
        else:
            if not isinstance(body, dict):
                raise PatchError(400, "BadRequest", "the body of the request was not a JSON object")
            patched = merge_patch(current, body)
        has_status_subresource = kind != "Rollout" or self.rollout_status_subresource
        if sub == "status":
            # Only status changes through the status subresource.
            patched = {**copy.deepcopy(current), "status": patched.get("status")}
        elif has_status_subresource:
            # ... and a patch of the main resource cannot change status.
            patched["status"] = copy.deepcopy(current.get("status"))
            if patched["status"] is None:
                del patched["status"]
        for field in ("uid", "name", "namespace"):
            if patched["metadata"].get(field) != current["metadata"][field]:
                raise PatchError(422, "Invalid", f"metadata.{field}: field is immutable")
        if kind == "Deployment":
            _validate_deployment(patched)
        if patched.get("spec") != current.get("spec"):
            patched["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        patched["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[key] = patched
        return patched


def _validate_deployment(deployment: dict) -> None:
    selector = (deployment["spec"].get("selector") or {}).get("matchLabels") or {}
    labels = (deployment["spec"]["template"].get("metadata") or {}).get("labels") or {}
    if any(labels.get(key) != value for key, value in selector.items()):
        name = deployment["metadata"]["name"]
        raise PatchError(422, "Invalid", f'Deployment.apps "{name}" is invalid: spec.template.metadata.labels: '
                                         f"Invalid value: {labels}: `selector` does not match template `labels`")


# --- label selectors (k8s.io/apimachinery/pkg/labels.Parse) ------------------------------------------


def parse_selector(text: str):
    """A predicate over a label dict for a selector string; an empty selector matches everything."""
    requirements = []
    for part in _split_requirements(text):
        part = part.strip()
        if not part:
            continue
        if match := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", part):
            key, operator, values = match[1], match[2], {v.strip() for v in match[3].split(",")}
            if operator == "in":
                requirements.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                requirements.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif match := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)", part):
            key, operator, value = match[1], match[2], match[3]
            if operator == "!=":
                requirements.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                requirements.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif match := re.fullmatch(r"!([\w./-]+)", part):
            requirements.append(lambda labels, k=match[1]: k not in labels)
        elif re.fullmatch(r"[\w./-]+", part):
            requirements.append(lambda labels, k=part: k in labels)
        else:
            raise ValueError(f"unable to parse requirement: {part!r}")
    return lambda labels: all(requirement(labels) for requirement in requirements)


def _split_requirements(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


# --- patches -----------------------------------------------------------------------------------------


def merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _parent(doc, tokens: list[str], path: str):
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise PatchError(422, "Invalid", f"the server rejected our request: doc is missing path: {path!r}")
    return node


def json_patch(doc: dict, operations: list[dict]) -> dict:
    """RFC 6902, all or nothing."""
    doc = copy.deepcopy(doc)
    for operation in operations:
        op, path = operation.get("op"), operation.get("path", "")
        tokens = _pointer(path)
        if not tokens:
            raise PatchError(422, "Invalid", "patching the whole document is not allowed")
        if op in ("move", "copy"):
            source_tokens = _pointer(operation.get("from", ""))
            source_parent = _parent(doc, source_tokens, operation.get("from", ""))
            value = copy.deepcopy(_get(source_parent, source_tokens[-1], operation.get("from", "")))
            if op == "move":
                _remove(source_parent, source_tokens[-1], operation.get("from", ""))
            _add(_parent(doc, tokens, path), tokens[-1], value, path)
            continue
        parent = _parent(doc, tokens, path)
        last = tokens[-1]
        if op == "add":
            _add(parent, last, copy.deepcopy(operation["value"]), path)
        elif op == "remove":
            _remove(parent, last, path)
        elif op == "replace":
            _get(parent, last, path)          # must exist
            if isinstance(parent, list):
                parent[int(last)] = copy.deepcopy(operation["value"])
            else:
                parent[last] = copy.deepcopy(operation["value"])
        elif op == "test":
            if _get(parent, last, path) != operation.get("value"):
                raise PatchError(422, "Invalid", f"the server rejected our request: testing value {path} failed")
        else:
            raise PatchError(400, "BadRequest", f"Unexpected kind: {op}")
    return doc


def _get(parent, token: str, path: str):
    if isinstance(parent, dict) and token in parent:
        return parent[token]
    if isinstance(parent, list) and token.isdigit() and int(token) < len(parent):
        return parent[int(token)]
    raise PatchError(422, "Invalid", f"the server rejected our request: replace operation does not apply: "
                                     f"doc is missing key: {path}")


def _add(parent, token: str, value, path: str) -> None:
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list) and (token == "-" or (token.isdigit() and int(token) <= len(parent))):
        parent.insert(len(parent) if token == "-" else int(token), value)
    else:
        raise PatchError(422, "Invalid", f"the server rejected our request: add operation does not apply: {path}")


def _remove(parent, token: str, path: str) -> None:
    _get(parent, token, path)
    if isinstance(parent, list):
        del parent[int(token)]
    else:
        del parent[token]


# --- objects as the Deployment controller leaves them ---------------------------------------------------


def deployment(name: str, namespace: str, image: str, revision: int, paused: bool = False) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "annotations": {"deployment.kubernetes.io/revision": str(revision),
                                     "kubernetes.io/change-cause": f"deploy {image}",
                                     "team": "ml-platform"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "paused": paused,
                 "template": _template(labels, image)},
        "status": {"observedGeneration": 1, "replicas": 2},
    }


def replica_set(owner: dict, image: str, revision: int, pod_hash: str, replicas: int = 0) -> dict:
    labels = {**owner["spec"]["selector"]["matchLabels"], "pod-template-hash": pod_hash}
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {
            "name": f"{name}-{pod_hash}", "namespace": owner["metadata"]["namespace"], "labels": labels,
            "annotations": {"deployment.kubernetes.io/revision": str(revision),
                            "deployment.kubernetes.io/desired-replicas": "2",
                            "deployment.kubernetes.io/max-replicas": "3",
                            "kubernetes.io/change-cause": f"deploy {image}"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                                 "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": _template(labels, image)},
    }


def _template(labels: dict, image: str) -> dict:
    return {"metadata": {"labels": dict(labels)},
            "spec": {"containers": [{"name": "model", "image": image, "ports": [{"containerPort": 8001}]}]}}


def rollout(name: str, namespace: str) -> dict:
    return {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": name}},
                 "strategy": {"canary": {"steps": [{"setWeight": 20}, {"pause": {}}]}},
                 "template": _template({"app": name}, "model:v2")},
        "status": {"phase": "Paused", "currentStepIndex": 1, "stableRS": "abc123"},
    }
