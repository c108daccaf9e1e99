"""A small kustomize for the deployment tests, so that they run where `kubectl kustomize` is not installed.

It implements what deploy/k8s/ uses, as kustomize v5 does it: `resources` (files and kustomization
folders), `namespace` (objects, and ServiceAccount subjects of RoleBindings), `labels` (metadata only),
`images`, `configMapGenerator` and `secretGenerator` (files, `behavior: replace`, `type`,
`options.disableNameSuffixHash`), the content-hash suffix of generated ConfigMaps and the references to
them in pod templates, and `patches` as strategic merge patches (maps merged, null deletes, lists of
containers, volumes, mounts, env and ports merged by key, `$patch: delete` for list items and whole
objects). Anything else in a kustomization.yaml is refused, so that the deployment cannot grow a feature
this builder ignores. tests/integration/test_deploy_k8s.py checks its output against `kubectl kustomize` where
kubectl is installed.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "configMapGenerator",
             "secretGenerator", "patches"}
# Strategic-merge keys of the Kubernetes types the patches touch (from the API's patchMergeKey tags).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "volumeMounts": "mountPath",
              "env": "name", "ports": "containerPort", "imagePullSecrets": "name"}
GENERATED = "_generated"     # marks a generated object whose name still lacks its hash suffix


class _Loader(yaml.SafeLoader):
    """YAML as Kubernetes reads it: `=` is a plain string (PyYAML's YAML 1.1 makes it a `value` tag)."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def load_all(text: str) -> list[dict]:
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc]


def _load_file(path: Path) -> list[dict]:
    return load_all(path.read_text())


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _generate(folder: Path, spec: dict, kind: str) -> dict:
    data = {}
    for entry in spec.get("files", []):
        key, _, path = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
        raw = (folder / path).read_bytes()
        data[key] = base64.b64encode(raw).decode() if kind == "Secret" else raw.decode()
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}, "data": data}
    if kind == "Secret":
        obj["type"] = spec.get("type", "Opaque")
    if not (spec.get("options") or {}).get("disableNameSuffixHash"):
        obj[GENERATED] = True
    return obj


def _merge(target, patch, field: str | None = None):
    """Strategic merge of ``patch`` into ``target`` (both parsed YAML), for the fields in MERGE_KEYS."""
    if isinstance(patch, dict) and isinstance(target, dict):
        result = copy.deepcopy(target)
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            elif key in result:
                result[key] = _merge(result[key], value, key)
            else:
                result[key] = _strip_directives(value)
        return result
    if isinstance(patch, list) and isinstance(target, list) and field in MERGE_KEYS:
        merge_key = MERGE_KEYS[field]
        result = copy.deepcopy(target)
        for item in patch:
            index = next((i for i, old in enumerate(result) if old.get(merge_key) == item.get(merge_key)), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    del result[index]
            elif index is None:
                result.append(_strip_directives(item))
            else:
                result[index] = _merge(result[index], item)
        return result
    return _strip_directives(patch)


def _strip_directives(value):
    if isinstance(value, dict):
        return {key: _strip_directives(item) for key, item in value.items() if not key.startswith("$patch")}
    if isinstance(value, list):
        return [_strip_directives(item) for item in value]
    return value


def _patch(objects: list[dict], patch: dict) -> list[dict]:
    target = (patch["kind"], patch["metadata"]["name"])
    matches = [i for i, obj in enumerate(objects) if _key(obj) == target]
    if len(matches) != 1:
        raise ValueError(f"patch target {target} matches {len(matches)} objects")
    if patch.get("$patch") == "delete":
        return [obj for i, obj in enumerate(objects) if i != matches[0]]
    body = {key: value for key, value in patch.items() if key not in ("apiVersion", "kind")}
    objects = list(objects)
    objects[matches[0]] = _merge(objects[matches[0]], body)
    return objects


def _containers(obj: dict):
    """Every container and init container of the object's pod template, if it has one."""
    spec = (((obj.get("spec") or {}).get("template") or {}).get("spec")) or {}
    for field in ("initContainers", "containers"):
        yield from spec.get(field) or []


def _set_image(obj: dict, images: list[dict]) -> None:
    for container in _containers(obj):
        image = container.get("image", "")
        name = image.split("@")[0].rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image.split("@")[0]
        for rule in images:
            if rule["name"] == name:
                new = rule.get("newName", name)
                if "digest" in rule:
                    container["image"] = f"{new}@{rule['digest']}"
                else:
                    tag = rule.get("newTag") or (image[len(name) + 1:] if image != name else "")
                    container["image"] = f"{new}:{tag}" if tag else new


def _go_json(value) -> str:
    """json.Marshal's encoding: map keys sorted, no spaces, and <, > and & escaped as Go does."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def config_map_hash(obj: dict) -> str:
    """kustomize's name suffix for a ConfigMap (api/hasher): the start of a SHA-256 of its kind and data (and an
    empty name: kustomize hashes the generated object before it is named)."""
    encoded = {"kind": "ConfigMap", "name": "", "data": obj.get("data") or {}}
    if obj.get("binaryData"):
        encoded["binaryData"] = obj["binaryData"]
    digest = hashlib.sha256(_go_json(encoded).encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _rename_references(value, renames: dict[str, str]):
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("configMap", "configMapRef", "configMapKeyRef") and isinstance(item, dict) \
                    and item.get("name") in renames:
                item["name"] = renames[item["name"]]
            else:
                _rename_references(item, renames)
    elif isinstance(value, list):
        for item in value:
            _rename_references(item, renames)


def _build(folder: Path) -> list[dict]:
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise ValueError(f"{folder}/kustomization.yaml: {sorted(unknown)} not supported by this builder")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        objects += _build(path) if path.is_dir() else _load_file(path)
    for kind, field in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for generator in spec.get(field, []):
            obj = _generate(folder, generator, kind)
            existing = [i for i, old in enumerate(objects) if _key(old) == _key(obj)]
            if generator.get("behavior", "create") == "replace":
                if len(existing) != 1:
                    raise ValueError(f"{folder}: {kind} {generator['name']} to replace is not in the resources")
                obj["metadata"] = copy.deepcopy(objects[existing[0]]["metadata"])
                objects[existing[0]] = obj
            elif existing:
                raise ValueError(f"{folder}: {kind} {generator['name']} generated twice")
            else:
                objects.append(obj)
    for entry in spec.get("patches", []):
        docs = _load_file(folder / entry["path"]) if "path" in entry else load_all(entry["patch"])
        for patch in docs:
            objects = _patch(objects, patch)
    for obj in objects:
        if "namespace" in spec:
            obj["metadata"]["namespace"] = spec["namespace"]
            if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                for subject in obj.get("subjects") or []:
                    if subject.get("kind") == "ServiceAccount":
                        subject["namespace"] = spec["namespace"]
        for rule in spec.get("labels", []):
            if rule.get("includeSelectors") or rule.get("includeTemplates"):
                raise ValueError(f"{folder}: labels on selectors or templates not supported by this builder")
            obj["metadata"].setdefault("labels", {}).update(rule["pairs"])
        _set_image(obj, spec.get("images", []))
    return objects


def build(folder: Path) -> list[dict]:
    """The objects `kubectl kustomize FOLDER` prints, in no particular order."""
    objects = _build(Path(folder))
    renames = {}
    for obj in objects:
        if obj.pop(GENERATED, False):
            old = obj["metadata"]["name"]
            obj["metadata"]["name"] = renames[old] = f"{old}-{config_map_hash(obj)}"
    for obj in objects:
        _rename_references(obj.get("spec"), renames)
    return objects
