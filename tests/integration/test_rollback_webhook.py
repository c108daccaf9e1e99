"""The webhook hook against a real HTTP receiver that checks the HMAC signature, as a user's would."""

from __future__ import annotations

import json
import threading
import time

import pytest

from agent.alerts.hooks import HookCall, HookFailed, webhook
from agent.config.rollback import WebhookHook
from tests.support.webhook import SECRET, WebhookReceiver, make_incident


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
