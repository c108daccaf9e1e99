"""The ``webhook`` hook: POST the incident as JSON, signed with HMAC-SHA256.

Headers:

* ``X-Sidewatch-Signature: sha256=<hex>``: HMAC-SHA256 of the raw body with the configured secret.
* ``X-Sidewatch-Timestamp``: the body's ``sent_at`` (unix seconds). It is inside the signed body, so a
  receiver that checks the signature and rejects a ``sent_at`` older than a few minutes cannot be
  fed a replayed delivery; ``incident`` + ``hook`` identify the delivery for deduplication
  (a retry after a timeout may deliver twice).
* ``X-Sidewatch-Delivery: <incident>/<hook>/<attempt>``.

A 2xx answer is success; any other status, a connection error or a timeout is a failure (retried).
Redirects are not followed: they would turn the POST into a GET or resend the signed body elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import urllib.error
import urllib.request

from agent.alerts.hooks import Hook, HookCall, HookFailed, Plan
from agent.config.rollback import WebhookHook

SIGNATURE_HEADER = "X-Sidewatch-Signature"
TIMESTAMP_HEADER = "X-Sidewatch-Timestamp"
DELIVERY_HEADER = "X-Sidewatch-Delivery"


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str | None) -> bool:
    """What a receiver does: constant-time comparison of the header with the body's signature."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx status


_opener = urllib.request.build_opener(_NoRedirect)


def describe(hook: WebhookHook, call: HookCall) -> str:
    return f"POST the incident to {hook.url}"


def run(hook: WebhookHook, call: HookCall) -> str:
    try:
        secret = hook.secret()
    except ValueError as err:
        raise HookFailed(str(err)) from None
    payload = call.payload()
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        **hook.headers,
        "Content-Type": "application/json",
        "User-Agent": "sidewatch-rollback",
        SIGNATURE_HEADER: sign(secret, body),
        TIMESTAMP_HEADER: str(payload["sent_at"]),
        DELIVERY_HEADER: f"{call.incident.id}/{call.hook}/{call.attempt}",
    }
    request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=hook.timeout_seconds) as reply:
            status = reply.status
            reply.read(4096)
    except urllib.error.HTTPError as err:
        detail = err.read(300).decode("utf-8", "replace").strip()
        err.close()
        raise HookFailed(f"{hook.url} answered {err.code} {err.reason}" + (f": {detail}" if detail else "")) from None
    except (TimeoutError, socket.timeout):
        raise HookFailed(f"{hook.url} did not answer within {hook.timeout_seconds} s") from None
    except urllib.error.URLError as err:
        raise HookFailed(f"cannot reach {hook.url}: {err.reason}") from None
    except OSError as err:
        raise HookFailed(f"cannot reach {hook.url}: {err}") from None
    if not 200 <= status < 300:
        raise HookFailed(f"{hook.url} answered {status}")
    return f"delivered to {hook.url} ({status})"


class Webhook(Hook):
    def plan(self, call: HookCall) -> Plan:
        return Plan(describe(self.config, call))

    def apply(self, plan: Plan, call: HookCall) -> str:
        return run(self.config, call)
