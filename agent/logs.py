"""Logs: one JSON object per line, with the request's id where a line is about a call; and throttled
logs for failures that repeat.

Request payloads are never logged: a call's line carries its id, model, version, method, status and
duration, nothing of its tensors. The id is the caller's ``x-request-id`` metadata (what Envoy, Istio
and most gateways set), cut to a bounded length, or one made up here so that lines about one call
can still be joined.

Every JSON line is bounded (``log_max_line_bytes``): values that clients choose (a request path, a name) or
that grow without end (a traceback) cannot make lines of megabytes; a line over the bound has its longest
values cut, marked as cut, and stays valid JSON. While a server runs (:func:`stray_output_logged`), what
other code writes to stderr (the stdlib's servers printing tracebacks, grpc's ``print_exc``, warnings,
exceptions no one caught in a thread) goes through the log too: stderr carries JSON lines only, written
by one handler under its lock, so that threads cannot interleave half lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
import threading
import time
import uuid
from typing import Callable, Hashable, Iterator

# Fields a log call may pass with ``extra=`` that the JSON lines carry.
CALL_FIELDS = ("request_id", "model", "version", "method", "code", "duration_seconds")
REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128

# The longest JSON line, its newline included (``log_max_line_bytes``): room for any line sidewatch writes
# about itself, a traceback included, while a value a client chose cannot make a line of megabytes.
DEFAULT_MAX_LINE_BYTES = 16 * 1024
# Below this the fixed fields and the cut marks might not fit.
MIN_MAX_LINE_BYTES = 1024
# The end of a value that was cut to fit the line; the line's "cut" field lists the keys cut.
CUT_MARK = "...[cut]"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", <call fields>, "exception", "cut"}``, one line per record,
    at most ``max_line_bytes`` with its newline."""

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        super().__init__()
        if max_line_bytes < MIN_MAX_LINE_BYTES:
            raise ValueError(f"sidewatch: a log line needs at least {MIN_MAX_LINE_BYTES} bytes")
        self.max_line_bytes = max_line_bytes

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
                entry[field] = value if isinstance(value, (str, int, float)) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return bounded_line(entry, self.max_line_bytes - 1)  # the handler adds the newline


def bounded_line(entry: dict, max_bytes: int) -> str:
    """``entry`` as a JSON line of at most ``max_bytes`` bytes: while it is longer, its longest string value
    is cut (and ends with CUT_MARK) and its key is listed under ``"cut"``. ASCII only (non-ASCII characters
    are escaped), so characters and bytes are one."""
    line = json.dumps(entry)
    if len(line) <= max_bytes:
        return line
    entry = dict(entry, cut=[])
    cut: list[str] = entry["cut"]
    while len(line) > max_bytes:
        kept = {key: value[:-len(CUT_MARK)] if key in cut else value
                for key, value in entry.items() if isinstance(value, str)}
        kept = {key: value for key, value in kept.items() if value}
        if not kept:  # cannot happen with MIN_MAX_LINE_BYTES: only the string values are unbounded
            break
        key = max(kept, key=lambda name: len(json.dumps(kept[name])))  # escapes count
        over = len(line) - max_bytes + (0 if key in cut else len(CUT_MARK))
        entry[key] = kept[key][:max(0, len(kept[key]) - over)] + CUT_MARK
        if key not in cut:
            cut.append(key)
        line = json.dumps(entry)
    return line


class CancellationsAreOrdinary(logging.Filter):
    """A record whose exception is a cancellation (``asyncio.CancelledError``: a call its client gave up on,
    or one the shutdown grace cut) tells of an ordinary end, whoever logged it (grpc logs some as errors):
    it is kept at INFO at most, without its traceback, and dropped when INFO is not logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            record.msg, record.args = f"{record.getMessage()} (cancelled)", ()
            record.exc_info = record.exc_text = None
            if record.levelno > logging.INFO:
                record.levelno, record.levelname = logging.INFO, "INFO"
            return record.levelno >= logging.getLogger().getEffectiveLevel()
        return True


def configure(level: str = "INFO", log_format: str = "auto", max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
    """Log to stderr as JSON (``json``), as text (``text``), or JSON unless stderr is a terminal (``auto``);
    JSON lines are at most ``max_line_bytes`` long."""
    stream = sys.stderr
    if isinstance(stream, StderrToLog):  # configured again while stderr goes to the log: the real one
        stream = stream.original
    if log_format == "auto":
        log_format = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(max_line_bytes))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(CancellationsAreOrdinary())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# --- what others write to stderr -------------------------------------------------------------------


class StderrToLog(io.TextIOBase):
    """Stands in for ``sys.stderr``: each line written to it becomes a log record (logger
    ``sidewatch.stderr``, WARNING). Lines are gathered per thread, so that two threads printing at once
    make whole lines each; a line written while this thread is already logging one (the log's own failure
    to write) goes to the real stderr instead of round again."""

    def __init__(self, original) -> None:
        super().__init__()
        self.original = original
        self._logger = logging.getLogger("sidewatch.stderr")
        self._local = threading.local()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"

    def fileno(self) -> int:
        return self.original.fileno()

    def write(self, text: str) -> int:
        local = self._local
        if getattr(local, "logging", False):
            with contextlib.suppress(Exception):
                self.original.write(text)
            return len(text)
        *lines, local.partial = (getattr(local, "partial", "") + text).split("\n")
        for line in lines:
            self._log(line)
        return len(text)

    def flush(self) -> None:
        local = self._local
        partial, local.partial = getattr(local, "partial", ""), ""
        if partial:
            self._log(partial)

    def _log(self, line: str) -> None:
        if not line.strip():
            return
        self._local.logging = True
        try:
            self._logger.warning("%s", line.rstrip())
        finally:
            self._local.logging = False


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("sidewatch.threads").error("sidewatch: uncaught exception in thread %s", name,
                                                 exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_unraisable(unraisable) -> None:
    """Exceptions Python cannot raise (in ``__del__``, in a finalizer): the stdlib prints them to stderr."""
    logging.getLogger("sidewatch.unraisable").warning(
        "sidewatch: %s: %r", unraisable.err_msg or "Exception ignored in", unraisable.object,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


@contextlib.contextmanager
def stray_output_logged() -> Iterator[None]:
    """For a server's lifetime: stderr, warnings and uncaught exceptions in threads go through the log.

    Code that does not log but writes to ``sys.stderr`` (socketserver's ``handle_error``, grpc's
    ``traceback.print_exc``, a library's ``print``), ``warnings``, and exceptions that end a thread or that
    Python cannot raise, all become log records, formatted as every other line. Restored on exit, so that
    a refusal to start is still printed as the plain message the operator reads.
    """
    saved = sys.stderr, threading.excepthook, sys.unraisablehook
    sys.stderr = StderrToLog(saved[0])
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        stray = sys.stderr
        sys.stderr, threading.excepthook, sys.unraisablehook = saved
        if isinstance(stray, StderrToLog):
            stray.flush()


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
