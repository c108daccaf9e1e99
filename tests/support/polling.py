"""Polling for something that happens on another thread or in another process."""

from __future__ import annotations

import time


def wait_for(condition, what: str, timeout: float = 20.0):
    """Poll ``condition()`` every 10 ms until it returns something true; return it, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")
