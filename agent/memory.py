"""Giving freed memory back to the system, so that the sidecar's resident memory follows what it holds.

glibc's malloc keeps the blocks a process frees in its arenas for reuse and returns them to the system
only from the top of a heap. A relay of large messages (a 5 MiB request, a 1 MiB model name: each is
allocated and freed a few times per call, by gRPC's threads and the event loop) leaves the arenas full
of free but resident pages: the hostile property suite measured the grpc.aio relay growing from 158 to
497 MB over 240 calls of 5 MiB from 8 clients, with no Python object alive (tracemalloc), and
``malloc_trim(0)`` bringing it back below where it started. So the sidecar asks glibc to return its free
pages every ``memory_trim_interval_seconds``: a walk over the heaps, a few milliseconds, on a thread of
its own. On a C library without ``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


class MemoryTrimmer:
    """Calls ``malloc_trim(0)`` every ``interval_seconds`` until stopped; inert where there is none."""

    def __init__(self, interval_seconds: float) -> None:
        self.interval_seconds = interval_seconds
        self._trim = _malloc_trim()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sidewatch-memory-trim", daemon=True)

    @property
    def available(self) -> bool:
        return self._trim is not None

    def trim(self) -> bool:
        """Return free pages now; True when the C library did (malloc_trim's own answer)."""
        return bool(self._trim(0)) if self._trim is not None else False

    def start(self) -> None:
        if self._trim is None:
            log.info("sidewatch: no malloc_trim in this C library: freed memory stays with the allocator")
            return
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_seconds):
            self.trim()
