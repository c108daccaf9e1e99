"""The event loop a server process runs on: uvloop when it is installed, else asyncio's own."""

from __future__ import annotations

import asyncio
import os


def run_event_loop(main) -> None:
    """Run a coroutine on uvloop when it is installed, else on asyncio's default loop.

    SIDEWATCH_EVENT_LOOP=asyncio forces the default loop (the benchmark compares the two).
    """
    if os.environ.get("SIDEWATCH_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)
