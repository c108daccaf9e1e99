"""The standard gRPC health service, following the upstream's readiness.

The overall status ("") is SERVING while the sidecar runs, so a liveness probe checks the
sidecar alone. The inference service's status follows the upstream's ServerReady, so a
readiness probe keeps a pod out of rotation while its model server is not ready.
"""

from __future__ import annotations

import asyncio
import logging

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.protocol import oip_pb2, paths

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class UpstreamHealth:
    def __init__(self, server: aio.Server, channel: aio.Channel, interval_seconds: float) -> None:
        self.servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self._ready = channel.unary_unary(
            paths.SERVER_READY,
            request_serializer=oip_pb2.ServerReadyRequest.SerializeToString,
            response_deserializer=oip_pb2.ServerReadyResponse.FromString,
        )
        self._interval = interval_seconds
        self._task: asyncio.Task | None = None
        self.upstream_ready = False

    async def start(self) -> None:
        await self.servicer.set(health.OVERALL_HEALTH, SERVING)
        await self.servicer.set(paths.SERVICE, NOT_SERVING)
        self._task = asyncio.create_task(self._watch())

    async def check_once(self) -> bool:
        try:
            reply = await self._ready(oip_pb2.ServerReadyRequest(), timeout=max(0.5, self._interval))
            ready = reply.ready
        except aio.AioRpcError:
            ready = False
        if ready != self.upstream_ready:
            log.info("sidewatch: upstream is %s", "ready" if ready else "not ready")
        self.upstream_ready = ready
        await self.servicer.set(paths.SERVICE, SERVING if ready else NOT_SERVING)
        return ready

    async def _watch(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval)

    async def shutting_down(self) -> None:
        """Report NOT_SERVING everywhere so load balancers stop sending new calls."""
        if self._task is not None:
            self._task.cancel()
        await self.servicer.enter_graceful_shutdown()
