"""Probes of slow, unauthenticated clients of the sidecar's HTTP listeners (issue 14, defect 4), on a real
sidecar, with plain HTTP and with TLS on both listeners:

- 40 slowloris connections (more than the 32 slots, ``max_connections``' default) that send a header line
  per round and never end their head, or with TLS never start the handshake, and reconnect when cut: an
  authenticated request to the admin API (GET /status, POST /alertmanager), and a scrape of /metrics, are
  still answered at once, and again after the attack's connections have passed their deadline;
- one such connection is cut at ``request_timeout_seconds``, however often it sends: the deadline is for
  the whole request head (and the TLS handshake), not for each read.

Before the fix, the admin API refused every new connection while the 40 held its slots, for as long as
they stayed (a read timeout of 10 s never fired for a line every few seconds), and one silent connection
to a TLS /metrics stopped every scrape (the handshake ran in the accept loop, without a timeout).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import threading
import time

import pytest

from tests.support.alert_harness import admin_config, write_config, write_token
from tests.support.certs import CertificateAuthority
from tests.support.harness import free_port, metric_value, start_sidecar

pytestmark = pytest.mark.hostile

# admin.request_timeout_seconds and metrics.request_timeout_seconds in these tests (10 by default).
REQUEST_TIMEOUT = 1.5
SLOWLORIS_CONNECTIONS = 40  # more than the 32 slots of each listener (max_connections' default)
# An authenticated request or a scrape under the attack must be answered within this (on loopback they take
# milliseconds); a probe gives up after GIVE_UP seconds of retries.
ANSWER_BOUND = 1.0
GIVE_UP = 3.0

ALERTMANAGER_PAYLOAD = json.dumps({
    "version": "4", "status": "resolved", "receiver": "sidewatch", "groupKey": "{}:{}", "alerts": [{
        "status": "resolved", "labels": {"alertname": "ModelBroken", "model": "mnist_cnn"}, "annotations": {},
        "startsAt": "2024-05-01T12:00:00Z", "endsAt": "2024-05-01T12:05:00Z"}]}).encode()


class Listeners:
    """A sidecar whose admin API and /metrics listen with plain HTTP or TLS, with a short request deadline."""

    def __init__(self, tmp_path, tls: bool) -> None:
        self.token, token_file = write_token(tmp_path)
        self.context = None
        listener_tls = {}
        if tls:
            authority = CertificateAuthority(tmp_path)
            server = authority.issue("localhost", server=True)
            listener_tls = {"tls": {"cert_file": str(server.cert), "key_file": str(server.key)}}
            self.context = ssl.create_default_context(cafile=str(authority.cert_file))
        admin, self.admin_port = admin_config(tmp_path, token_file, request_timeout_seconds=REQUEST_TIMEOUT,
                                              **listener_tls)
        config = write_config(tmp_path, {
            "admin": admin, "metrics": {"request_timeout_seconds": REQUEST_TIMEOUT, **listener_tls}})
        # No model server: neither listener needs one.
        self.process, _, self.metrics_port = start_sidecar(tmp_path, free_port(), config=config)
        self.process.wait_listening(self.admin_port)

    def request(self, port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self.context is None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=GIVE_UP)
        else:
            connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=GIVE_UP, context=self.context)
        try:
            connection.request(method, path, body=body, headers={"Authorization": f"Bearer {self.token}"})
            reply = connection.getresponse()
            return reply.status, reply.read()
        finally:
            connection.close()

    def seconds_to_answer(self, port: int, method: str, path: str, body: bytes | None = None) -> float | None:
        """Seconds until the request is answered 200, retrying when refused; None: not within GIVE_UP."""
        started = time.monotonic()
        while time.monotonic() - started < GIVE_UP:
            try:
                status, _ = self.request(port, method, path, body)
                if status == 200:
                    return time.monotonic() - started
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        return None

    def cut(self, listener: str, reason: str) -> float:
        _, text = self.request(self.metrics_port, "GET", "/metrics")
        return metric_value(text.decode(), "sidewatch_http_connections_cut_total", listener=listener, reason=reason)


@pytest.fixture(scope="module", params=[False, True], ids=["http", "https"])
def listeners(request, tmp_path_factory):
    listeners = Listeners(tmp_path_factory.mktemp("slowloris"), tls=request.param)
    yield listeners
    listeners.process.stop()


class Slowloris:
    """``count`` connections that hold an HTTP listener as a slowloris does. Each sends a request line, then
    a header line per round, and never ends its head; ``silent`` ones send nothing (a TLS handshake that
    never starts). A connection the server closes is opened again at the next round, as slowloris tools do."""

    def __init__(self, port: int, count: int, silent: bool, interval: float = 0.25) -> None:
        self.port = port
        self.silent = silent
        self.interval = interval
        self.sockets: list[socket.socket | None] = [None] * count
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._first_round = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Slowloris":
        self._thread.start()
        assert self._first_round.wait(30), "the slowloris connections did not open"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        for sock in self.sockets:
            if sock is not None:
                sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for index, sock in enumerate(self.sockets):
                if sock is not None and closed_by_peer(sock):
                    sock.close()
                    sock = None
                    self.closed_by_server += 1
                self.sockets[index] = self._open() if sock is None else self._trickle(sock)
            self._first_round.set()
            self._stop.wait(self.interval)

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            if not self.silent:
                sock.sendall(b"GET /status HTTP/1.1\r\nHost: sidecar\r\n")
            return sock
        except OSError:
            return None

    def _trickle(self, sock: socket.socket) -> socket.socket | None:
        if self.silent:
            return sock
        try:
            sock.sendall(b"X-Slow: 1\r\n")
            return sock
        except OSError:
            sock.close()
            self.closed_by_server += 1
            return None


def closed_by_peer(sock: socket.socket) -> bool:
    """The server closed the connection (it never answers these: readable means end of file or a reset)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        sock.recv(4096)
    except OSError:
        pass
    return True


def test_authenticated_requests_are_answered_under_40_slowloris_connections(listeners):
    silent = listeners.context is not None
    with Slowloris(listeners.admin_port, SLOWLORIS_CONNECTIONS, silent) as attack:
        waited = listeners.seconds_to_answer(listeners.admin_port, "GET", "/status")
        delivered = listeners.seconds_to_answer(listeners.admin_port, "POST", "/alertmanager", ALERTMANAGER_PAYLOAD)
        # Past the deadline of every connection the attack had open, and with it reconnecting: still answered.
        time.sleep(REQUEST_TIMEOUT + 0.5)
        later = listeners.seconds_to_answer(listeners.admin_port, "GET", "/status")
        reconnected = attack.closed_by_server
    print(f"admin API under {SLOWLORIS_CONNECTIONS} slowloris connections: GET /status answered after {waited} s, "
          f"POST /alertmanager after {delivered} s, again after {later} s; {reconnected} attack connections cut")
    for seconds in (waited, delivered, later):
        assert seconds is not None and seconds < ANSWER_BOUND, (waited, delivered, later)
    assert listeners.cut("admin", "evicted") > 0  # the attack's connections made room


def test_scrapes_are_answered_under_40_slowloris_connections(listeners):
    silent = listeners.context is not None
    with Slowloris(listeners.metrics_port, SLOWLORIS_CONNECTIONS, silent):
        waited = listeners.seconds_to_answer(listeners.metrics_port, "GET", "/metrics")
        time.sleep(REQUEST_TIMEOUT + 0.5)
        later = listeners.seconds_to_answer(listeners.metrics_port, "GET", "/metrics")
    print(f"/metrics under {SLOWLORIS_CONNECTIONS} slowloris connections: answered after {waited} s, again after "
          f"{later} s")
    for seconds in (waited, later):
        assert seconds is not None and seconds < ANSWER_BOUND, (waited, later)
    assert listeners.cut("metrics", "evicted") > 0


@pytest.mark.parametrize("listener", ["admin", "metrics"])
def test_a_connection_that_never_ends_its_head_is_cut_at_the_deadline(listeners, listener):
    port = listeners.admin_port if listener == "admin" else listeners.metrics_port
    before = listeners.cut(listener, "deadline")
    # One connection sending a header line every 0.1 s (with TLS, a handshake that never starts).
    with Slowloris(port, 1, silent=listeners.context is not None, interval=0.1) as attack:
        opened = time.monotonic()
        while attack.closed_by_server == 0 and time.monotonic() - opened < REQUEST_TIMEOUT + 2:
            time.sleep(0.05)
        lasted = time.monotonic() - opened
    print(f"{listener}: a slowloris connection was cut after {lasted:.2f} s (deadline {REQUEST_TIMEOUT} s)")
    assert attack.closed_by_server >= 1, f"still open after {lasted:.1f} s"
    assert REQUEST_TIMEOUT - 0.5 < lasted < REQUEST_TIMEOUT + 1.0
    assert listeners.cut(listener, "deadline") >= before + 1
