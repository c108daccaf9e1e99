"""The grpc.aio data plane as one unit: the listener, the upstream channel, the health service and the relay.

It knows bytes and gRPC; what else happens to a call comes in through its policy. The composition root
(agent/app.py) builds it beside the detectors and alerts and starts and stops it with them.
"""

from __future__ import annotations

import logging

from grpc import aio

from agent import tls
from agent.config import ServeConfig
from agent.dataplane.health import UpstreamHealth
from agent.dataplane.policy import Policy
from agent.dataplane.relay import Forwarder
from agent.dataplane.upstream import open_upstream_channel, transport_options
from agent.metrics import ProxyMetrics

log = logging.getLogger(__name__)

# After the shutdown grace, how long the calls it cut get to end (they end at their next await: this only
# bounds a handler stuck elsewhere).
CUT_CALLS_END_SECONDS = 1.0


class GrpcDataPlane:
    """``start`` binds and serves; ``stop`` reports NOT_SERVING, drains in-flight calls, then closes."""

    def __init__(self, config: ServeConfig, metrics: ProxyMetrics, policy: Policy) -> None:
        self.config = config
        self.metrics = metrics
        self.policy = policy
        self.server: aio.Server | None = None
        self.channel: aio.Channel | None = None
        self.health: UpstreamHealth | None = None
        self.port: int | None = None
        self.forwarder: Forwarder | None = None
        self._draining = False

    async def start(self) -> None:
        config = self.config
        self.channel = open_upstream_channel(config)
        self.server = aio.server(options=transport_options(config) + [
            ("grpc.max_concurrent_streams", config.max_streams_per_connection),
            ("grpc.max_allowed_incoming_connections", config.max_connections)],
            maximum_concurrent_rpcs=config.max_concurrent_calls)
        # The health service is registered first so that it answers before the catch-all forwarder.
        self.health = UpstreamHealth(self.server, self.channel, config.upstream_health_interval_seconds)
        self.forwarder = Forwarder(self.channel, self.metrics, self.policy, config.tap.max_pending_stream_requests,
                                   config.tap.max_pending_stream_bytes)
        self.server.add_generic_rpc_handlers([self.forwarder])
        if config.tls is None:
            self.port = self.server.add_insecure_port(config.listen)
        else:
            self.port = self.server.add_secure_port(config.listen, tls.server_credentials(config.tls))
        if self.port == 0:
            raise OSError(f"sidewatch: cannot listen on {config.listen}")
        await self.server.start()
        await self.health.start()

    async def shutting_down(self) -> None:
        """Tell health checks that this replica is going away (load balancers stop sending calls)."""
        if self.health is not None and not self._draining:
            self._draining = True
            await self.health.shutting_down()

    async def stop(self) -> None:
        """Stop taking calls, let in-flight calls finish within the grace period, then close the channels."""
        await self.shutting_down()
        if self.server is not None:
            await self.server.stop(self.config.shutdown_grace_seconds)
            await self.forwarder.handlers_ended(CUT_CALLS_END_SECONDS)
        if self.channel is not None:
            await self.channel.close()
        await self.policy.close()  # fallback upstreams' channels
