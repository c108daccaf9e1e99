"""Route pins under Envoy: the route table and the fallback clusters in files that Envoy watches.

Under the grpc.aio relay a pin is read on every call (agent/dataplane/policy.py). Envoy reads its routes
and clusters instead from two files (filesystem RDS and CDS: ``path_config_source`` with a
``watched_directory``), which :class:`PinFiles` rewrites whenever the :class:`RouteTable`'s pins change
(``RouteTable.on_change`` wakes its thread). Each file is written beside its final name and renamed over
it, so Envoy only ever reads a whole file; a route update applies to calls that start after it, and
calls in flight finish on the route and cluster they started on.

How a call finds its pin: while any model is pinned, every route carries ``pins: true`` in its Lua
metadata; the gRPC field extraction filter (model_routing.py) has held the headers until the first
request message was whole and left its model name in dynamic metadata; the Lua filter
(model_peek.lua) then removes a client's copy of ``x-sidewatch-model``, puts that name there and clears
the route cache, and the pinned model's routes (matched first) take the call:

- pinned to a fallback upstream: every model-scoped call of the model goes to the cluster of that
  HOST:PORT (TLS as toward the main upstream);
- pinned to a version: ModelInfer and ModelStreamInfer go to the main upstream through the rewriting
  ext_proc filter (pin_rewrite.py). A stream goes where its first message's model sends it.

With nothing pinned the routes carry no flag and the Lua filter does nothing more than before. The tap's
sampled routes are kept on pinned routes too, so copies of pinned calls still reach the tap.

Order, so that no call is routed to a cluster Envoy does not have: a new fallback cluster is written and
seen active in Envoy's admin API before a route names it; clusters are kept after their pin is undone (a
call in flight may still use them), up to ``MAX_FALLBACK_CLUSTERS`` addresses, the oldest unused dropped.

Model names that cannot be a header value (bytes outside printable ASCII, spaces, 128 bytes or longer)
cannot be routed this way: such a pin is logged and has no effect under Envoy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from agent.config import ServeConfig, split_address
from agent.dataplane.envoy import pin_rewrite
from agent.dataplane.envoy.bootstrap import UPSTREAM, http2_cluster, max_client_connections, upstream_route, upstream_tls
from agent.dataplane.envoy.ext_proc import sampled_routes
from agent.dataplane.envoy.lua import LUA_FILTER
from agent.dataplane.routes import Pin, RouteTable
from agent.metrics import max_label_bytes
from agent.protocol import paths

log = logging.getLogger(__name__)

HEADER = "x-sidewatch-model"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
MAX_FALLBACK_CLUSTERS = 64
# How long a new fallback cluster may take to become active before its route is written anyway, and how
# long sidewatch watches for Envoy to apply a route update.
WAIT_SECONDS = 5.0
PINNED_METHODS = (paths.MODEL_INFER, paths.MODEL_STREAM_INFER)


def routable(model: str) -> bool:
    """Whether the Lua filter can carry ``model`` in the header (module docstring)."""
    return 0 < len(model.encode()) < max_label_bytes() and all(33 <= ord(c) <= 126 for c in model)


def cluster_name(address: str) -> str:
    return "sidewatch_pin_" + hashlib.sha256(address.encode()).hexdigest()[:16]


def fallback_cluster(config: ServeConfig, address: str) -> dict[str, Any]:
    host, port = split_address(address)
    socket = None if config.upstream.tls is None else upstream_tls(config.upstream.tls, host)
    return {"@type": CLUSTER_TYPE, **http2_cluster(cluster_name(address), host, port, transport_socket=socket,
                                                   pool_per_client_connection=True,
                                                   max_requests=config.max_concurrent_calls,
                                                   max_connections=max_client_connections(config),
                                                   stream_window_bytes=config.stream_window_bytes)}


def _with_model(route: dict[str, Any], model: str, cluster: str, rewrite: bool) -> dict[str, Any]:
    route = json.loads(json.dumps(route))  # a copy: the tap's routes are shared
    route["match"]["headers"] = [{"name": HEADER, "string_match": {"exact": model}}]
    route["route"]["cluster"] = cluster
    if not rewrite:
        _no_rewrite(route)
    return route


def _no_rewrite(route: dict[str, Any]) -> None:
    route["typed_per_filter_config"] = {**route.get("typed_per_filter_config", {}), **pin_rewrite.disable_on_route()}


def pin_routes(pin: Pin, tapped: bool) -> list[dict[str, Any]]:
    """The routes that take ``pin.model``'s calls (module docstring), matched before every other route."""
    rewrite = pin.version is not None
    cluster = UPSTREAM if rewrite else cluster_name(pin.upstream)
    routes = [_with_model(route, pin.model, cluster, rewrite) for route in sampled_routes(UPSTREAM)] if tapped else []
    if rewrite:
        plain = [upstream_route({"path": path}, UPSTREAM) for path in PINNED_METHODS]
    else:
        plain = [upstream_route({"prefix": "/"}, UPSTREAM)]
    return routes + [_with_model(route, pin.model, cluster, rewrite) for route in plain]


def route_config(base: dict[str, Any], pins: dict[str, Pin], tapped: bool) -> dict[str, Any]:
    """``base`` (the bootstrap's route configuration) with the pins' routes first, every route flagged."""
    config = json.loads(json.dumps(base))
    for host in config["virtual_hosts"]:
        for route in host["routes"]:
            _no_rewrite(route)
    if not pins:
        return config
    routes = [route for model in sorted(pins) for route in pin_routes(pins[model], tapped)]
    for host in config["virtual_hosts"]:
        host["routes"] = routes + host["routes"]
        for route in host["routes"]:
            route["metadata"] = {"filter_metadata": {LUA_FILTER: {"pins": True}}}

    return config


def _source(path: Path) -> dict[str, Any]:
    return {"path_config_source": {"path": str(path), "watched_directory": {"path": str(path.parent)}},
            "resource_api_version": "V3"}


def write_resources(path: Path, resources: list[dict[str, Any]], version: int) -> None:
    """Replace ``path`` with a discovery response holding ``resources``, atomically (module docstring)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({"version_info": str(version), "resources": resources}))
    os.replace(temporary, path)


class PinFiles:
    """The RDS and CDS files of one Envoy data plane, kept in step with a RouteTable (module docstring).

    ``install`` moves the bootstrap's route table into the RDS file and adds the CDS source, writing both
    from the pins in force (before Envoy starts: pins replayed from the audit log hold from the first
    call); ``start`` follows later changes on a thread of its own; ``stop`` ends it.
    """

    def __init__(self, config: ServeConfig, routes: RouteTable, directory: Path, tapped: bool,
                 admin: Callable[[str], bytes]) -> None:
        self.config = config
        self.routes = routes
        self.tapped = tapped
        # GET on Envoy's admin API (raises OSError or EnvoyError while Envoy is down).
        self.admin = admin
        self.route_path = directory / "routes" / "routes.json"
        self.cluster_path = directory / "clusters" / "clusters.json"
        self._base: dict[str, Any] | None = None
        # Fallback addresses with a cluster, oldest first (dict: ordered, no duplicates).
        self._addresses: dict[str, None] = {}
        self._version = 0
        self._written: tuple | None = None
        # The pins (as in _written) that Envoy has been seen to apply.
        self._applied: tuple | None = None
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()
        routes.on_change(self._changed.set)

    def install(self, bootstrap: dict[str, Any]) -> None:
        for path in (self.route_path, self.cluster_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        for listener in bootstrap["static_resources"]["listeners"]:
            for chain in listener["filter_chains"]:
                manager = chain["filters"][0]["typed_config"]
                self._base = manager.pop("route_config")
                manager["rds"] = {"route_config_name": self._base["name"], "config_source": _source(self.route_path)}
        bootstrap.setdefault("dynamic_resources", {})["cds_config"] = _source(self.cluster_path)
        self.sync(wait_for_clusters=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sidewatch-envoy-pins", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while True:
            self._changed.wait()
            if self._stopping.is_set():
                return
            self._changed.clear()
            try:
                self.sync()
            except OSError as err:  # a full disk: the next change tries again
                log.error("sidewatch: cannot write Envoy's route files for pins: %s", err)

    def sync(self, wait_for_clusters: bool = True) -> None:
        """Write the files for the pins in force now, if they differ from what was written last."""
        pins = {model: pin for model, pin in self.routes.pins.items() if self._usable(pin)}
        state = tuple(sorted((model, pin.version, pin.upstream) for model, pin in pins.items()))
        if state == self._written:
            return
        started = time.monotonic()
        self._version += 1
        new = [pin.upstream for pin in pins.values() if pin.upstream is not None and pin.upstream not in self._addresses]
        if new or self._written is None:
            for address in new:
                self._addresses[address] = None
            in_use = {pin.upstream for pin in pins.values()}
            for address in list(self._addresses):
                if len(self._addresses) <= MAX_FALLBACK_CLUSTERS:
                    break
                if address not in in_use:
                    del self._addresses[address]
            write_resources(self.cluster_path, [fallback_cluster(self.config, a) for a in self._addresses],
                            self._version)
            if wait_for_clusters:
                names = [cluster_name(address) for address in new]
                if not self._wait(lambda: all(f"\n{name}::".encode() in b"\n" + (self._get("/clusters") or b"")
                                              for name in names)):
                    log.error("sidewatch: envoy has not made the fallback cluster(s) %s active within %.0f s; "
                              "routing to them anyway", ", ".join(names), WAIT_SECONDS)
        write_resources(self.route_path, [{"@type": ROUTE_TYPE, **route_config(self._base, pins, self.tapped)}],
                        self._version)
        self._written = state
        if not wait_for_clusters:
            self._applied = state  # before Envoy starts: it reads these files first
            return
        applied = self._wait(lambda: self._route_version() == str(self._version))
        if applied:
            self._applied = state
        log.info("sidewatch: envoy routes for %d pin(s) (version %d) %s after %.3f s", len(pins), self._version,
                 "in effect" if applied else "written, not yet seen in effect", time.monotonic() - started)

    def in_effect(self) -> bool:
        """Whether Envoy routes by the pins in force now (for tests and the bench)."""
        state = tuple(sorted((model, pin.version, pin.upstream) for model, pin in self.routes.pins.items()
                             if routable(model)))
        return state == self._applied

    def _route_version(self) -> str | None:
        dump = json.loads(self._get("/config_dump?resource=dynamic_route_configs") or b"{}")
        versions = [config.get("version_info") for config in dump.get("configs", [])]
        return versions[0] if versions else None

    def _get(self, path: str) -> bytes | None:
        try:
            return self.admin(path)
        except (OSError, RuntimeError):  # Envoy restarting (EnvoyError is a RuntimeError)
            return None

    def _wait(self, done: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + WAIT_SECONDS
        while not done():
            if time.monotonic() > deadline or self._stopping.is_set():
                return False
            time.sleep(0.01)
        return True

    def _usable(self, pin: Pin) -> bool:
        if routable(pin.model):
            return True
        if pin.model not in self._warned and len(self._warned) < MAX_FALLBACK_CLUSTERS:
            self._warned.add(pin.model)
            log.warning("sidewatch: the pin of model %r has no effect under Envoy: its name cannot be a header "
                        "value (printable ASCII without spaces, under %d bytes)", pin.model[:max_label_bytes()],
                        max_label_bytes())
        return False
