"""The admin HTTP API: alert and rollback status, route undo, and the Alertmanager receiver.

    GET  /status          alerts (state, since, value, labels) and the dispatcher's incidents and pins
    POST /routes/undo     {"model": "mnist_cnn", "actor": "alice"}: remove the model's route pin
    POST /baseline/reset  {"model": "credit", "version": "3", "actor": "alice"}: re-baseline a version's drift
    POST /alertmanager    Alertmanager's webhook payload (version 4)

Every request needs ``Authorization: Bearer <token>`` (compared in constant time); without it the
answer is 401 with ``WWW-Authenticate``. Bodies are bounded (``admin.max_body_bytes``). It is a
GuardedServer (agent/httpd/guard.py) on a thread of its own, listening on loopback unless configured
otherwise: each request has a deadline for its whole exchange (``admin.request_timeout_seconds``) and
at most ``admin.max_connections`` connections are served, a connection that has not yet shown the token
being evicted for a new one when they run out; so slow or unauthenticated clients cannot lock out
Alertmanager's deliveries. The metrics endpoint is separate and read-only.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
from typing import TYPE_CHECKING, Callable

from agent import tls as tls_setup
from agent.admin.token import MIN_TOKEN_CHARS, TOKEN_ENV, read_token
from agent.config import Admin, split_address
from agent.httpd.guard import GuardedHandler, GuardedServer
from agent.jsonbody import BadBody, parse_json_body

if TYPE_CHECKING:
    from agent.alerts.dispatcher import RollbackDispatcher
    from agent.alerts.engine import AlertEngine
    from agent.alerts.receiver import AlertmanagerReceiver
    from agent.metrics import AlertMetrics

log = logging.getLogger(__name__)

_ENDPOINTS = {"/status": ("status", "GET"), "/routes/undo": ("routes_undo", "POST"),
              "/baseline/reset": ("baseline_reset", "POST"), "/alertmanager": ("alertmanager", "POST")}


def load_token(config: Admin) -> str | None:
    """The admin token from ``admin.token_file``, else from SIDEWATCH_ADMIN_TOKEN; None when neither is set."""
    token, source = read_token(config.token_file, "admin.token_file")
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"sidewatch: the admin token in {source} is shorter than {MIN_TOKEN_CHARS} characters")
    return token


def admin_token(config: Admin) -> str | None:
    """The token the admin API starts with; None: it stays off. Raises ValueError for a config that
    needs the API (Alertmanager alerts mapped to hooks) but gives it no token."""
    if not config.enabled:
        return None
    token = load_token(config)
    if token is None and config.alertmanager_hooks:
        raise ValueError("sidewatch: admin.alertmanager_hooks needs the admin API, and the admin API needs a "
                         f"token: set admin.token_file or {TOKEN_ENV}")
    return token


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class _Server(GuardedServer):
    """The admin API's GuardedServer: its handlers reach the AdminServer through it."""

    def __init__(self, address, admin: "AdminServer", tls: ssl.SSLContext | None,
                 count_cut: Callable[[str], None]) -> None:
        self.admin = admin
        super().__init__("admin API", address, _Handler, admin.config, tls, count_cut)


class _Handler(GuardedHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sidewatch-admin"
    sys_version = ""
    server: _Server

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("sidewatch: admin API %s: " + format, self.client_address[0], *args)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        admin = self.server.admin
        path = self.path.split("?", 1)[0]
        endpoint, allowed = _ENDPOINTS.get(path, ("other", None))
        if not admin.authorized(self.headers.get("Authorization", "")):
            if endpoint == "alertmanager":
                admin.receiver.count("unauthorized")
            log.warning("sidewatch: admin API: refused %s %s from %s: missing or wrong bearer token",
                        method, path, self.client_address[0])
            self._reply(endpoint, 401, {"error": "sidewatch: a valid bearer token is required"},
                        {"WWW-Authenticate": 'Bearer realm="sidewatch"'}, close=True)
            return
        # Authenticated: this connection is never evicted for a newer one (agent/httpd/guard.py).
        self.trust()
        if allowed is None:
            self._reply(endpoint, 404, {"error": f"sidewatch: no such endpoint {path}"}, close=True)
            return
        if method != allowed:
            self._reply(endpoint, 405, {"error": f"sidewatch: {path} takes {allowed}"}, {"Allow": allowed}, close=True)
            return
        body = b""
        if method == "POST":
            body = self._read_body(endpoint)
            if body is None:
                return
        try:
            status, reply = getattr(self, f"_{endpoint}")(admin, body)
        except Exception:
            log.exception("sidewatch: admin API: %s %s failed", method, path)
            status, reply = 500, {"error": "sidewatch: internal error (see the sidecar's log)"}
        self._reply(endpoint, status, reply)

    def _read_body(self, endpoint: str) -> bytes | None:
        """The request body, or None after answering why it was refused."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(endpoint, 411, {"error": "sidewatch: send a Content-Length, not a chunked body"}, close=True)
            return None
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self._reply(endpoint, 411, {"error": "sidewatch: Content-Length required"}, close=True)
            return None
        if not length_text.isdigit():
            self._bad_input(endpoint, 400, "malformed", f"sidewatch: bad Content-Length {length_text!r}")
            return None
        length = int(length_text)
        limit = self.server.admin.config.max_body_bytes
        if length > limit:
            self._bad_input(endpoint, 413, "too_large", f"sidewatch: body of {length} bytes is over the {limit}-byte limit")
            return None
        try:
            body = self.rfile.read(length)
        except OSError:
            self.close_connection = True
            return None
        if len(body) != length:
            self.close_connection = True  # the client went away mid-body
            return None
        return body

    def _bad_input(self, endpoint: str, status: int, result: str, message: str) -> None:
        if endpoint == "alertmanager":
            self.server.admin.receiver.count(result)
        self._reply(endpoint, status, {"error": message}, close=True)

    # --- endpoints ---------------------------------------------------------------------------

    @staticmethod
    def _status(admin: "AdminServer", body: bytes) -> tuple[int, dict]:
        return 200, admin.status()

    def _routes_undo(self, admin: "AdminServer", body: bytes) -> tuple[int, dict]:
        try:
            request = parse_json_body(body)
        except BadBody as err:
            return 400, {"error": f"sidewatch: the body must be a JSON object: {{\"model\": \"...\"}} ({err})"}
        model, actor = request.get("model"), request.get("actor")
        if not isinstance(model, str) or not model:
            return 400, {"error": "sidewatch: the body must name a model: {\"model\": \"...\"}"}
        if actor is not None and not isinstance(actor, str):
            return 400, {"error": "sidewatch: actor must be a string"}
        # Who asked, as far as the API can tell: the name the client gave and where it came from.
        who = f"{actor or 'admin-api'}@{self.client_address[0]}"
        if admin.dispatcher.undo_route(model, who):
            log.warning("sidewatch: route pin of %s undone by %s", model, who)
            return 200, {"model": model, "undone": True}
        return 404, {"model": model, "undone": False, "error": f"sidewatch: model {model} has no route pin"}

    def _baseline_reset(self, admin: "AdminServer", body: bytes) -> tuple[int, dict]:
        try:
            request = parse_json_body(body)
        except BadBody:
            request = None
        if request is None or not all(isinstance(request.get(key), str) for key in ("model", "version")):
            return 400, {"error": "sidewatch: the body must be JSON naming a model and a version: "
                                  "{\"model\": \"...\", \"version\": \"...\"}"}
        model, version, actor = request["model"], request["version"], request.get("actor")
        if admin.baseline_reset is None:
            return 404, {"error": "sidewatch: drift is not watched by this sidecar"}
        who = f"{actor if isinstance(actor, str) and actor else 'admin-api'}@{self.client_address[0]}"
        if admin.baseline_reset(model, version):
            log.warning("sidewatch: drift baseline of %s version %s reset by %s", model, version, who)
            return 200, {"model": model, "version": version, "reset": True}
        return 404, {"model": model, "version": version, "reset": False,
                     "error": f"sidewatch: drift of {model} version {version} is not watched"}

    @staticmethod
    def _alertmanager(admin: "AdminServer", body: bytes) -> tuple[int, dict]:
        return admin.receiver.handle(body)

    def _reply(self, endpoint: str, status: int, payload: dict, headers: dict | None = None,
               close: bool = False) -> None:
        self.server.admin.metrics.admin_requests.labels(endpoint, str(status)).inc()
        data = (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            # The body may not have been read: the connection cannot be reused.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)


class AdminServer:
    """The admin API on its own thread. ``start`` binds; ``stop`` closes the listener and waits for it."""

    def __init__(self, config: Admin, token: str, dispatcher: "RollbackDispatcher", engine: "AlertEngine | None",
                 receiver: "AlertmanagerReceiver", metrics: "AlertMetrics",
                 baseline_reset: "Callable[[str, str], bool] | None" = None,
                 count_cut: Callable[[str], None] = lambda reason: None) -> None:
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"sidewatch: the admin token must have at least {MIN_TOKEN_CHARS} characters")
        self.config = config
        self._token = token.encode()
        self.dispatcher = dispatcher
        self.engine = engine
        self.receiver = receiver
        self.metrics = metrics
        # Re-baselines a model version's drift (the drift watch's), or None without one.
        self.baseline_reset = baseline_reset
        # Counts the connections the server cuts, by reason (agent/httpd/guard.py).
        self._count_cut = count_cut
        self._server: _Server | None = None
        self.port: int | None = None
        for endpoint in ("status", "routes_undo", "baseline_reset", "alertmanager"):
            metrics.admin_requests.labels(endpoint, "401")

    def authorized(self, header: str) -> bool:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(), self._token)

    def status(self) -> dict:
        return {
            "alerts": self.engine.status() if self.engine is not None else [],
            "rollback": self.dispatcher.status(),
        }

    def start(self) -> None:
        host, port = split_address(self.config.listen)
        tls = None
        if self.config.tls is not None:
            tls = tls_setup.server_context(self.config.tls)
        elif not is_loopback(host):
            log.warning("sidewatch: the admin API listens on %s without TLS: its bearer token crosses the network "
                        "in the clear (set admin.tls)", self.config.listen)
        try:
            self._server = _Server((host, port), self, tls, self._count_cut)
        except OSError as err:
            raise OSError(f"sidewatch: cannot listen on admin.listen {self.config.listen}: {err.strerror}") from err
        self.port = self._server.server_address[1]
        self._server.start()
        log.info("sidewatch: admin API on %s%s", self.config.listen, " (TLS)" if tls else "")

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
