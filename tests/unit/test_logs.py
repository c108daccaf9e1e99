"""The log's lines: bounded JSON whatever the values, cancellations at INFO, and what others write to stderr
turned into records."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import threading
import warnings

import pytest

from agent import logs
from agent.config import load_config
from agent.logs import CUT_MARK, DEFAULT_MAX_LINE_BYTES, MIN_MAX_LINE_BYTES, JsonFormatter, bounded_line


def _record(message: str, level: int = logging.WARNING, exc_info=None, **extra) -> logging.LogRecord:
    record = logging.LogRecord("test.logs", level, __file__, 1, "%s", (message,), exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_a_short_line_is_unchanged():
    line = JsonFormatter().format(_record("hello", request_id="r-1", duration_seconds=0.5))
    entry = json.loads(line)
    assert (entry["message"], entry["request_id"], entry["duration_seconds"]) == ("hello", "r-1", 0.5)
    assert "cut" not in entry


@pytest.mark.parametrize("value", ["p" * 100_000, "\x01" * 50_000, "é" * 30_000, '"\\' * 20_000])
def test_a_long_value_is_cut_and_marked_and_the_line_stays_json(value):
    formatter = JsonFormatter(MIN_MAX_LINE_BYTES)
    line = formatter.format(_record(value, model="m" * 5000, request_id="r"))
    assert len(line.encode()) + 1 <= MIN_MAX_LINE_BYTES  # with the handler's newline
    entry = json.loads(line)
    assert entry["message"].endswith(CUT_MARK) and value.startswith(entry["message"][:-len(CUT_MARK)])
    assert entry["model"].endswith(CUT_MARK) and set(entry["cut"]) == {"message", "model"}
    assert entry["request_id"] == "r" and entry["logger"] == "test.logs"  # short values are kept whole


def test_a_long_traceback_is_cut_too():
    try:
        raise ValueError("x" * 40_000)
    except ValueError:
        line = JsonFormatter().format(_record("failed", exc_info=sys.exc_info()))
    entry = json.loads(line)
    assert len(line) < DEFAULT_MAX_LINE_BYTES and entry["cut"] == ["exception"]
    assert entry["exception"].startswith("Traceback") and entry["message"] == "failed"


def test_bounded_line_fits_every_bound_exactly():
    entry = {"time": "t", "message": "a\nb" * 1000, "exception": "c" * 3000}
    for bound in range(200, 4000, 97):
        line = bounded_line(dict(entry), bound)
        assert len(line) <= bound and json.loads(line)["time"] == "t"


def test_the_config_default_is_the_log_default_and_the_key_is_checked(tmp_path):
    assert load_config().log_max_line_bytes == DEFAULT_MAX_LINE_BYTES
    path = tmp_path / "c.yaml"
    path.write_text("log_max_line_bytes: 4096\n")
    assert load_config(path).log_max_line_bytes == 4096
    path.write_text(f"log_max_line_bytes: {MIN_MAX_LINE_BYTES - 1}\n")
    with pytest.raises(Exception, match="log_max_line_bytes"):
        load_config(path)
    with pytest.raises(ValueError):
        JsonFormatter(MIN_MAX_LINE_BYTES - 1)


@pytest.fixture
def captured():
    """The root logger writing JSON lines to a buffer, restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, sys.stderr
    buffer = io.StringIO()
    sys.stderr = buffer
    logs.configure("INFO", "json")
    sys.stderr = saved[2]
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    root.handlers[:], root.level = saved[0], saved[1]


def test_a_cancellation_logged_as_an_error_becomes_an_info_line_without_traceback(captured):
    try:
        raise asyncio.CancelledError()
    except asyncio.CancelledError:
        logging.getLogger("grpc._cython.cygrpc").exception("Exception not handled in servicer method [%s]", "/a/B")
    logging.getLogger("other").error("a real error")
    (cancelled, real) = captured()
    assert cancelled["level"] == "info" and "exception" not in cancelled
    assert cancelled["message"] == "Exception not handled in servicer method [/a/B] (cancelled)"
    assert real["level"] == "error"


def test_a_cancellation_below_the_level_is_dropped(captured):
    logging.getLogger().setLevel("WARNING")
    logging.getLogger("x").error("cut", exc_info=(asyncio.CancelledError, asyncio.CancelledError(), None))
    assert captured() == []


def test_stray_output_becomes_records_with_whole_lines_per_thread(captured):
    with logs.stray_output_logged():
        def printer(name: str) -> None:
            for number in range(50):
                print(f"{name} line", number, file=sys.stderr)  # three writes: text, number, newline

        threads = [threading.Thread(target=printer, args=(name,)) for name in ("a", "b", "c")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        warnings.warn("careful", UserWarning, stacklevel=1)
        failing = threading.Thread(target=lambda: 1 / 0, name="doomed")
        failing.start()
        failing.join()
        sys.stderr.write("no newline at the end")
    entries = captured()
    printed = [entry["message"] for entry in entries if entry["logger"] == "sidewatch.stderr"]
    assert sorted(printed[:-1]) == sorted(f"{name} line {number}" for name in "abc" for number in range(50))
    assert printed[-1] == "no newline at the end"
    (warned,) = [entry for entry in entries if entry["logger"] == "py.warnings"]
    assert "careful" in warned["message"]
    (crashed,) = [entry for entry in entries if entry["logger"] == "sidewatch.threads"]
    assert crashed["level"] == "error" and "doomed" in crashed["message"] and "ZeroDivisionError" in crashed["exception"]
    assert not isinstance(sys.stderr, logs.StderrToLog) and threading.excepthook is not logs._log_thread_exception
