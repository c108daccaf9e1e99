"""Traffic at a steady rate, as a deployed client sends it: the budgeted alarms look in wall-clock time,
so a test that bursts its requests would squeeze minutes of traffic into a few slots."""

from __future__ import annotations

import time
from collections.abc import Callable


def send_paced(send: Callable[[int], None], rate: float, seconds: float,
               until: Callable[[], bool] | None = None) -> None:
    """Call ``send(i)`` for i = 0, 1, ... every 1/``rate`` s, for ``seconds``, or until ``until()`` holds
    (checked once a second)."""
    started = time.monotonic()
    next_check = started + 1.0
    for i in range(10**9):
        now = time.monotonic()
        if now - started >= seconds:
            return
        if until is not None and now >= next_check:
            next_check = now + 1.0
            if until():
                return
        send(i)
        time.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
