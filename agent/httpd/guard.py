"""A threaded HTTP server that slow and unauthenticated clients cannot pin (slowloris).

Two bounds, both from the listener's section of the configuration:

- **A deadline per request** (``request_timeout_seconds``): the whole exchange, from when the server starts
  waiting for the request (the accept, or the end of the previous answer on a kept-alive connection) to the
  last byte of its answer: the TLS handshake, the request line, the headers, the body, the handling and the
  answer. A timeout per read is not enough: a client that sends a header line every 5 seconds never lets a
  10-second read timeout fire, and holds its connection for as long as it likes. The deadline is enforced
  by the serving thread between accepts (``service_actions``, every ``REAP_INTERVAL_SECONDS``): a late
  connection is shut down, which wakes its thread wherever it is blocked.
- **Slots that unauthenticated clients cannot all hold** (``max_connections``): every connection takes a
  slot and starts *untrusted*; its handler trusts it once the client has shown it may use the listener
  (the admin API: a valid bearer token; ``/metrics``: a whole request head). When every slot is taken, a
  new connection evicts the oldest untrusted one; only when all are trusted is the new one closed.

Why eviction rather than slots kept in reserve for authenticated requests: every connection starts
unauthenticated (the token comes in the headers), so a reserve would only serve connections already
authenticated, and Alertmanager opens new ones. With eviction, a client that sends its request promptly
always gets a slot, and keeps it unless ``max_connections`` newer untrusted connections arrive before its
head is complete: to keep it out, an attacker must open connections faster than it sends its headers,
which is a flood by volume (for a rate limit in front, SECURITY.md), not a few slow connections. The
oldest untrusted connection is the one evicted: a slow client has been waiting longest, a prompt one is
young. Connections cut are counted through ``count_cut``, by reason: "deadline", "evicted", or "full" (a
new connection closed: every slot trusted, or too many threads of cut connections still ending).

The TLS handshake runs in the connection's own thread, under the same deadline, never in the accept.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Protocol

log = logging.getLogger(__name__)

# How often the serving thread looks for connections past their deadline: a deadline is kept within this.
REAP_INTERVAL_SECONDS = 0.2


class ConnectionLimits(Protocol):
    """A listener's bounds (the ``admin:`` and ``metrics:`` sections of the configuration)."""

    max_connections: int
    request_timeout_seconds: float


class Slot:
    """One connection's place in the server: its socket, the deadline of the request it is on, and whether
    its handler trusts it (then it is never evicted)."""

    __slots__ = ("connection", "deadline", "trusted", "cut_reason")

    def __init__(self, connection: socket.socket, timeout: float) -> None:
        self.connection = connection
        self.deadline = time.monotonic() + timeout
        self.trusted = False
        self.cut_reason: str | None = None

    def cut(self, reason: str) -> None:
        """Shut the connection down: its thread, blocked in a read, a write or the TLS handshake, wakes
        with end of file or an error and ends. socket.socket's shutdown, not SSLSocket's: that one also
        drops the TLS state, which the connection's thread may be using."""
        self.cut_reason = reason
        try:
            socket.socket.shutdown(self.connection, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by its thread


class GuardedServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` connections, each request under a deadline.

    ``start`` serves on a thread of its own; ``close`` stops it and cuts the connections still open.
    """

    daemon_threads = True

    def __init__(self, name: str, address: tuple[str, int], handler: type[GuardedHandler], limits: ConnectionLimits,
                 tls: ssl.SSLContext | None, count_cut: Callable[[str], None] = lambda reason: None) -> None:
        self.name = name
        self.max_connections = limits.max_connections
        self.request_timeout = limits.request_timeout_seconds
        self.request_queue_size = limits.max_connections  # the listen backlog
        self._count_cut = count_cut
        # Every connection whose thread has not ended, in the order they were accepted (the oldest first);
        # those cut (cut_reason set) hold no slot any more: their threads are ending.
        self._slots: dict[socket.socket, Slot] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        if tls is not None:
            # The handshake happens in the connection's own thread (finish_request), not in accept().
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": REAP_INTERVAL_SECONDS},
                                        name=f"sidewatch-{self.name.replace(' ', '-')}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()  # returns once serve_forever has (it would wait for ever on a server never started)
            self._thread.join(timeout=5)
            self._thread = None
        self.server_close()
        with self._lock:
            remaining = self._open()
        for slot in remaining:
            slot.cut("closing")

    def slot_of(self, connection: socket.socket) -> Slot:
        """The slot of a connection whose thread is running (it is released when the thread ends)."""
        with self._lock:
            return self._slots[connection]

    # --- socketserver's hooks ------------------------------------------------------------------

    def process_request(self, request, client_address) -> None:
        """In the serving thread, after accept: give the connection a slot, evicting the oldest untrusted
        connection when every slot is taken; close it when every one is trusted, or when the threads of
        connections already cut are still as many as the slots (they end within moments, but a flood of
        connections must not outrun them: at most twice max_connections threads)."""
        with self._lock:
            open_slots = self._open()
            evicted = None
            if len(open_slots) >= self.max_connections:
                evicted = next((slot for slot in open_slots if not slot.trusted), None)
            admitted = len(self._slots) < 2 * self.max_connections and (
                len(open_slots) < self.max_connections or evicted is not None)
            if admitted:
                if evicted is not None:
                    self._cut(evicted, "evicted")
                self._slots[request] = Slot(request, self.request_timeout)
            else:
                self._count_cut("full")
        if not admitted:
            log.debug("sidewatch: %s: no slot for a new connection from %s: closed", self.name, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._release(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def finish_request(self, request, client_address) -> None:
        # A bound on each read and write too, should the deadline not be kept (the serving thread gone): a
        # backstop, longer than the deadline so that it is the deadline that cuts (and is counted).
        request.settimeout(2 * self.request_timeout)
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except OSError as err:  # ssl.SSLError too
                if self.slot_of(request).cut_reason is None:
                    log.info("sidewatch: %s: TLS handshake with %s failed: %s", self.name, client_address[0], err)
                return
        super().finish_request(request, client_address)

    def service_actions(self) -> None:
        """In the serving thread, at least every REAP_INTERVAL_SECONDS: cut the connections past their deadline."""
        now = time.monotonic()
        with self._lock:
            for slot in self._open():
                if slot.deadline <= now:
                    self._cut(slot, "deadline")

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            # The client went away, or was cut at its deadline: nothing of ours failed (and no traceback
            # on stderr, which takes JSON log lines only).
            log.debug("sidewatch: %s: connection from %s ended: %s", self.name, client_address[0], error)
            return
        log.exception("sidewatch: %s: a request from %s failed", self.name, client_address[0])

    # --- slots ---------------------------------------------------------------------------------

    def _open(self) -> list[Slot]:
        """The slots of connections not cut, the oldest first (under the lock)."""
        return [slot for slot in self._slots.values() if slot.cut_reason is None]

    def _release(self, connection: socket.socket) -> None:
        with self._lock:
            self._slots.pop(connection, None)

    def _cut(self, slot: Slot, reason: str) -> None:
        """(Under the lock.) Shutting a socket down does not block."""
        slot.cut(reason)
        self._count_cut(reason)
        log.debug("sidewatch: %s: cut a connection (%s)", self.name, reason)


class GuardedHandler(BaseHTTPRequestHandler):
    """A request handler for GuardedServer. Call ``trust`` once the client has shown it may use the
    listener: from then on its connection is never evicted (its requests still have their deadline)."""

    server: GuardedServer

    def setup(self) -> None:
        super().setup()
        self.slot = self.server.slot_of(self.connection)

    def trust(self) -> None:
        self.slot.trusted = True

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok and self.slot.cut_reason is not None:
            # Cut while its head was arriving: the end of file that woke it is taken by the stdlib for the
            # end of the headers. A head cut short is not a request: not answered, not logged.
            self.close_connection = True
            return False
        return ok

    def handle_one_request(self) -> None:
        super().handle_one_request()
        # The next request on a kept-alive connection has a deadline of its own, counted from now.
        self.slot.deadline = time.monotonic() + self.server.request_timeout
