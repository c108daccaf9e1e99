"""The webhook hook against a real HTTP receiver that checks the HMAC signature, as a user's would."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.alerts.hooks import HookCall, HookFailed, webhook
from agent.alerts.incident import Alert, Incident, alert_key
from agent.config.rollback import WebhookHook

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


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "webhook-secret"
    path.write_bytes(SECRET + b"\n")
    return path


def test_delivery_is_signed_over_the_raw_body_and_carries_the_incident(secret_file):
    with WebhookReceiver() as receiver:
        hook = WebhookHook(type="webhook", url=receiver.url, secret_file=secret_file, headers={"X-Team": "ml"})
        before = time.time()
        message = webhook.run(hook, HookCall(make_incident(), "notify", 2, "edge-7"))
    assert "delivered" in message
    [delivery] = receiver.deliveries
    assert delivery.signature_ok and delivery.status == 200
    assert delivery.path == "/hooks/sidewatch"
    body = json.loads(delivery.body)
    assert body["incident"] == "inc-test-1"
    assert body["alert"] == "AdversarialRateHigh"
    assert body["labels"] == {"model": "mnist_cnn", "version": "2"}
    assert body["annotations"] == {"summary": "adversarial inputs above 5%"}
    assert body["value"] == 0.12 and body["started_at"] == 1700000000.0
    assert body["source"] == "sidecar" and body["hook"] == "notify" and body["attempt"] == 2
    assert body["instance"] == "edge-7"
    # The timestamp is inside the signed body (replay protection) and repeated in a header.
    assert before - 1 <= body["sent_at"] <= time.time() + 1
    assert float(delivery.headers["X-Sidewatch-Timestamp"]) == body["sent_at"]
    assert delivery.headers["X-Sidewatch-Delivery"] == "inc-test-1/notify/2"
    assert delivery.headers["Content-Type"] == "application/json"
    assert delivery.headers["X-Team"] == "ml"
    assert webhook.verify(SECRET, delivery.body, delivery.headers["X-Sidewatch-Signature"])
    assert not webhook.verify(SECRET, delivery.body.replace(b"mnist_cnn", b"mnist_cnX"),
                              delivery.headers["X-Sidewatch-Signature"])


def test_secret_from_the_environment(monkeypatch):
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET.decode())
    with WebhookReceiver() as receiver:
        hook = WebhookHook(type="webhook", url=receiver.url, secret_env="TEST_WEBHOOK_SECRET")
        webhook.run(hook, HookCall(make_incident(), "notify", 1, "edge"))
    assert [d.signature_ok for d in receiver.deliveries] == [True]


def test_a_receiver_with_another_secret_refuses_and_the_hook_fails(secret_file):
    with WebhookReceiver(secret=b"not-the-same") as receiver:
        hook = WebhookHook(type="webhook", url=receiver.url, secret_file=secret_file)
        with pytest.raises(HookFailed, match="401"):
            webhook.run(hook, HookCall(make_incident(), "notify", 1, "edge"))
    assert receiver.successful() == []


def test_server_error_is_a_failure(secret_file):
    with WebhookReceiver(fail_first=1) as receiver:
        hook = WebhookHook(type="webhook", url=receiver.url, secret_file=secret_file)
        with pytest.raises(HookFailed, match="500"):
            webhook.run(hook, HookCall(make_incident(), "notify", 1, "edge"))


def test_no_answer_within_the_timeout_is_a_failure(secret_file):
    with WebhookReceiver() as receiver:
        receiver.hold = threading.Event()
        hook = WebhookHook(type="webhook", url=receiver.url, secret_file=secret_file, timeout_seconds=0.3)
        with pytest.raises(HookFailed, match="did not answer within 0.3 s"):
            webhook.run(hook, HookCall(make_incident(), "notify", 1, "edge"))


def test_redirects_are_not_followed(secret_file):
    with WebhookReceiver() as elsewhere, WebhookReceiver() as receiver:
        receiver.redirect_to = elsewhere.url
        hook = WebhookHook(type="webhook", url=receiver.url, secret_file=secret_file)
        with pytest.raises(HookFailed, match="307"):
            webhook.run(hook, HookCall(make_incident(), "notify", 1, "edge"))
    assert elsewhere.deliveries == []


def test_unreachable_receiver_and_unreadable_secret_are_failures(tmp_path, secret_file):
    from tests.support.harness import free_port

    hook = WebhookHook(type="webhook", url=f"http://127.0.0.1:{free_port()}/", secret_file=secret_file)
    with pytest.raises(HookFailed, match="cannot reach"):
        webhook.run(hook, HookCall(make_incident(), "notify", 1, "edge"))
    hook = WebhookHook(type="webhook", url="http://127.0.0.1:1/", secret_file=tmp_path / "missing")
    with pytest.raises(HookFailed, match="cannot read secret_file"):
        webhook.run(hook, HookCall(make_incident(), "notify", 1, "edge"))


def test_config_needs_exactly_one_secret_and_an_http_url():
    with pytest.raises(ValueError, match="exactly one of secret_file and secret_env"):
        WebhookHook(type="webhook", url="http://x/")
    with pytest.raises(ValueError, match="http"):
        WebhookHook(type="webhook", url="ftp://x/", secret_env="X")
