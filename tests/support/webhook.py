"""A webhook receiver for the tests: a real HTTP server on loopback that checks the HMAC signature, as a
user's would, and records every delivery; and a ready-made incident to send to hooks."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agent.alerts.incident import Alert, Incident, alert_key

SECRET = b"s3cret-for-tests"


@dataclass
class Delivery:
    path: str
    headers: dict
    body: bytes
    signature_ok: bool
    status: int


class WebhookReceiver:
    """A real HTTP server that verifies X-Sidewatch-Signature with its secret and records every delivery.

    ``fail_first``: answer the first N requests with 500. ``hold``: when set, handlers wait until it is
    released before answering. ``delay``: seconds to sleep before answering.
    """

    def __init__(self, secret: bytes = SECRET, fail_first: int = 0) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self.delay = 0.0
        self.hold: threading.Event | None = None
        self.redirect_to: str | None = None
        self.deliveries: list[Delivery] = []
        self.arrived = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                expected = "sha256=" + hmac.new(receiver.secret, body, hashlib.sha256).hexdigest()
                signature_ok = hmac.compare_digest(expected, self.headers.get("X-Sidewatch-Signature", ""))
                with receiver._lock:
                    failing = len(receiver.deliveries) < receiver.fail_first
                    if receiver.redirect_to:
                        status = 307
                    elif not signature_ok:
                        status = 401
                    else:
                        status = 500 if failing else 200
                    delivery = Delivery(self.path, dict(self.headers), body, signature_ok, status)
                    receiver.deliveries.append(delivery)
                receiver.arrived.set()
                if receiver.hold is not None:
                    receiver.hold.wait(30)
                time.sleep(receiver.delay)
                self.send_response(status)
                if status == 307:
                    self.send_header("Location", receiver.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/sidewatch"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def successful(self) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.signature_ok and 200 <= d.status < 300]

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


def make_incident(hooks=("notify",), **labels) -> Incident:
    labels = labels or {"model": "mnist_cnn", "version": "2"}
    alert = Alert("AdversarialRateHigh", alert_key("AdversarialRateHigh", labels), "critical", labels,
                  {"summary": "adversarial inputs above 5%"}, "sidecar", 1700000000.0, 0.12, tuple(hooks))
    return Incident("inc-test-1", alert, 1700000001.0)
