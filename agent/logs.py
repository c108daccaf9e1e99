"""Logs: one JSON object per line, with the request's id where a line is about a call; and throttled
logs for failures that repeat.

Request payloads are never logged: a call's line carries its id, model, version, method, status and
duration, nothing of its tensors. The id is the caller's ``x-request-id`` metadata (what Envoy, Istio
and most gateways set), cut to a bounded length, or one made up here so that lines about one call
can still be joined.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from typing import Callable, Hashable

# Fields a log call may pass with ``extra=`` that the JSON lines carry.
CALL_FIELDS = ("request_id", "model", "version", "method", "code", "duration_seconds")
REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", <call fields>, "exception"}``, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in CALL_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", log_format: str = "auto") -> None:
    """Log to stderr as JSON (``json``), as text (``text``), or JSON unless stderr is a terminal (``auto``)."""
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def request_id(metadata) -> str:
    """The caller's ``x-request-id`` (printable, bounded), else a fresh random one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            cleaned = "".join(ch for ch in value[:MAX_REQUEST_ID_CHARS] if ch.isprintable())
            if cleaned:
                return cleaned
    return uuid.uuid4().hex[:16]


# --- throttled logs ---------------------------------------------------------------------------
#
# Log lines for failures that repeat: the first in full, then at most one per interval.
#
# A detector that fails on every request would otherwise write a traceback per request and drown the
# log (and the disk). Metrics count every failure; the log only has to say that it is happening. Each
# kind of failure has a key (a sink's name, a model version); a key logs at most once per interval, and
# its next line says how many were left out since the last one.

# Long enough that a failure on every request costs a line a minute, short enough that an operator
# tailing the log sees that it is still going on.
INTERVAL_SECONDS = 60.0


class ThrottledLog:
    """Logs each key at most once per interval; the next line counts those left out."""

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
