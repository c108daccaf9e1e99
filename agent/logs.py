"""Structured logs: one JSON object per line, with the request's id where a line is about a call.

Request payloads are never logged: a call's line carries its id, model, version, method, status and
duration, nothing of its tensors. The id is the caller's ``x-request-id`` metadata (what Envoy, Istio
and most gateways set), cut to a bounded length, or one made up here so that lines about one call
can still be joined.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid

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
