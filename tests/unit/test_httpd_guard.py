"""GuardedServer's slots (agent/httpd/guard.py), in process: which connection makes room for a new one.

The deadline and the listeners built on it are probed on a real sidecar: tests/integration/test_hostile_slowloris.py.
"""

from __future__ import annotations

import http.client
import time
from types import SimpleNamespace

import pytest

from agent.httpd.guard import GuardedHandler, GuardedServer


class Handler(GuardedHandler):
    """GET /trust trusts the connection (as a valid token would); any other path leaves it untrusted."""

    protocol_version = "HTTP/1.1"  # connections are kept alive between requests

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        if self.path == "/trust":
            self.trust()
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass


@pytest.fixture
def server():
    cuts: list[str] = []
    server = GuardedServer("test", ("127.0.0.1", 0), Handler,
                           SimpleNamespace(max_connections=2, request_timeout_seconds=30.0), None, cuts.append)
    server.cuts = cuts
    server.start()
    yield server
    server.close()


def connect(server, path: str) -> http.client.HTTPConnection:
    """A kept-alive connection that has had one request on ``path`` answered (so it holds a slot)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    assert answered(connection, path)
    return connection


def answered(connection: http.client.HTTPConnection, path: str = "/") -> bool:
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        return reply.status == 200 and reply.read() == b"ok"
    except (ConnectionError, http.client.HTTPException):
        return False


def test_a_new_connection_evicts_the_oldest_untrusted_one(server):
    oldest = connect(server, "/")
    trusted = connect(server, "/trust")
    newest = connect(server, "/")  # every slot was taken: the untrusted one goes
    assert server.cuts == ["evicted"]
    assert not answered(oldest)
    assert answered(trusted) and answered(newest)
    younger = connect(server, "/")  # the untrusted one evicted now is `newest`, the trusted one stays
    assert server.cuts == ["evicted", "evicted"]
    assert not answered(newest)
    assert answered(trusted) and answered(younger)


def test_when_every_connection_is_trusted_a_new_one_is_closed(server):
    first, second = connect(server, "/trust"), connect(server, "/trust")
    refused = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    assert not answered(refused)
    assert server.cuts == ["full"]
    assert answered(first) and answered(second)
    first.close()  # its slot is free again once its thread has seen it closed
    deadline = time.monotonic() + 5
    while not answered(http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)):
        assert time.monotonic() < deadline, "the closed connection's slot was not released"
        time.sleep(0.01)
