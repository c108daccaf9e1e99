"""Log lines for failures that repeat: the first in full, then at most one per interval.

A detector that fails on every request would otherwise write a traceback per request and drown the
log (and the disk). Metrics count every failure; the log only has to say that it is happening. Each
kind of failure has a key (a sink's name, a model version); a key logs at most once per interval, and
its next line says how many were left out since the last one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Hashable

# Long enough that a failure on every request costs a line a minute, short enough that an operator
# tailing the log sees that it is still going on.
INTERVAL_SECONDS = 60.0


class ThrottledLog:
    def __init__(self, logger: logging.Logger, interval_seconds: float = INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (when it was last logged, occurrences not logged since)
        self._last: dict[Hashable, tuple[float, int]] = {}

    def log(self, level: int, key: Hashable, message: str, *args, exc_info: bool = False,
            extra: dict | None = None) -> bool:
        """Log ``message % args`` unless ``key`` was logged less than an interval ago; True when logged."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self.interval_seconds:
                self._last[key] = (last[0], last[1] + 1)
                return False
            self._last[key] = (now, 0)
        if last is not None and last[1]:
            message += " (%d more like this in the last %.0f s, not logged)"
            args = (*args, last[1], now - last[0])
        self._logger.log(level, message, *args, exc_info=exc_info, extra=extra)
        return True

    def warning(self, key: Hashable, message: str, *args, exc_info: bool = False, extra: dict | None = None) -> bool:
        return self.log(logging.WARNING, key, message, *args, exc_info=exc_info, extra=extra)

    def error(self, key: Hashable, message: str, *args, exc_info: bool = False) -> bool:
        return self.log(logging.ERROR, key, message, *args, exc_info=exc_info)
