"""A client of the admin API, for ``sidewatch alerts status``, ``route undo`` and ``baseline reset``."""

from __future__ import annotations

import getpass
import json
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from agent.admin.token import TOKEN_ENV, read_token

DEFAULT_URL = "http://127.0.0.1:9103"


class AdminError(Exception):
    """The admin API could not be reached, refused the request, or answered an error."""

    def __init__(self, message: str, status: int | None = None, reply: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reply = reply or {}


def client_token(token_file: Path | None) -> str:
    """The token from ``token_file``, else from SIDEWATCH_ADMIN_TOKEN."""
    try:
        token, _ = read_token(token_file)
    except ValueError as err:
        raise AdminError(str(err)) from None
    if token is None:
        raise AdminError(f"sidewatch: no admin token: give --token-file or set {TOKEN_ENV}")
    return token


class AdminClient:
    def __init__(self, url: str, token: str, ca_file: Path | None = None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) \
            if self.url.startswith("https://") else None

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:
            try:
                payload = json.loads(err.read())
            except ValueError:
                payload = {}
            message = payload.get("error") or f"sidewatch: admin API answered {err.code} {err.reason}"
            raise AdminError(message, err.code, payload) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise AdminError(f"sidewatch: cannot reach the admin API at {self.url}: {reason}") from None

    def status(self) -> dict:
        return self._request("GET", "/status")

    def undo_route(self, model: str, actor: str | None = None) -> dict:
        return self._request("POST", "/routes/undo", {"model": model, "actor": actor or default_actor()})

    def reset_baseline(self, model: str, version: str, actor: str | None = None) -> dict:
        return self._request("POST", "/baseline/reset",
                             {"model": model, "version": version, "actor": actor or default_actor()})


def default_actor() -> str:
    """Who runs the command, for the audit log: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
