"""The ``/metrics`` listener: prometheus_client's exposition (text or OpenMetrics, gzip when asked) served by
a GuardedServer, so that slow connections can neither hold every slot nor stall the TLS handshake of the
next scrape (prometheus_client's own start_http_server shakes hands in its accept loop, without a timeout:
one silent connection stopped every scrape).

``/metrics`` has no token: a client is trusted once it has sent a whole request head (as Prometheus does at
once); one still sending its head is evicted when the slots run out. The answer is HTTP/1.0: the connection
closes after it.
"""

from __future__ import annotations

import ssl
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client import MetricsHandler as ExpositionHandler

from agent.httpd.guard import ConnectionLimits, GuardedHandler, GuardedServer


class MetricsHandler(GuardedHandler, ExpositionHandler):
    """GET (any path, as prometheus_client answers): the registry's metrics."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self.trust()
        super().do_GET()


def start_metrics_listener(address: tuple[str, int], registry: CollectorRegistry, limits: ConnectionLimits,
                           tls: ssl.SSLContext | None,
                           count_cut: Callable[[str], None] = lambda reason: None) -> GuardedServer:
    """Serve ``registry`` on ``address`` from a thread of its own; ``close()`` the answer to stop."""
    handler = type("RegistryMetricsHandler", (MetricsHandler,), {"registry": registry})
    server = GuardedServer("metrics", address, handler, limits, tls, count_cut)
    server.start()
    return server
