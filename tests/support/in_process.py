"""A whole sidecar in the test's own process, so that a test can reach into it (break a detector, read its
registry) while real gRPC calls go through it."""

from __future__ import annotations

import asyncio
import threading

from prometheus_client import CollectorRegistry

from agent.app import Sidecar, limit_native_threads
from agent.config import load_config
from agent.modelserver.repository import BUNDLED_REPOSITORY
from tests.support.harness import TESTS_DATA_PLANE, free_port

MODEL = "mnist_cnn"


class InProcessSidecar:
    """A Sidecar on its own event loop in a thread."""

    def __init__(self, config) -> None:
        limit_native_threads()  # as `sidewatch serve` does for its process
        self.registry = CollectorRegistry()
        if config.data_plane == "auto":  # as start_sidecar does (harness.TESTS_DATA_PLANE)
            config = config.model_copy(update={"data_plane": TESTS_DATA_PLANE})
        self.sidecar = Sidecar(config, self.registry)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "InProcessSidecar":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sidecar.start(), self.loop).result(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.sidecar.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def value(self, name, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def sidecar_config(upstream_port: int, mode: str):
    """A sidecar's configuration: free loopback ports, the bundled repository's detectors in ``mode``, in front
    of the model server on ``upstream_port``."""
    return load_config(overrides={
        "listen": f"127.0.0.1:{free_port()}", "upstream.address": f"127.0.0.1:{upstream_port}",
        "metrics.listen": f"127.0.0.1:{free_port()}",
        "detection.model_repository": str(BUNDLED_REPOSITORY), "detection.adversarial_mode": mode,
    })
