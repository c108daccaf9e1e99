"""The append-only audit log of the rollback side: one JSON object per line.

Every decision, hook attempt and hook result is one record, written with a single ``write`` on a
file opened with O_APPEND and ``fsync``'d before the caller takes its next step, so a ``kill -9``
(or a power cut, as far as the disk honours fsync) loses nothing that was already decided. The log is
also the state: at start the dispatcher replays it to find open incidents, hooks that already ran
and route pins.

A crash can leave a torn last line. Replay skips any line that is not a JSON object (with a warning)
and the next append first ends the torn line, so one bad line never hides the records after it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from agent.durable import fsync_directory

log = logging.getLogger(__name__)


class AuditLog:
    """Records appended to ``path``; with no path, kept in memory only (lost at restart)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._memory: list[dict] = []
        self.skipped_lines = 0

    def open(self) -> list[dict]:
        """Read the records already in the log, then open it for appending. Returns the records."""
        if self.path is None:
            log.warning("sidewatch: rollback.audit_log is not set: incidents, hook results and route pins "
                        "are kept in memory only and forgotten at restart")
            return list(self._memory)
        try:
            records = self._read()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            if created:
                fsync_directory(self.path.parent)
            elif _ends_torn(self.path):
                # A crash mid-write left a partial line: end it so the next record starts on its own line.
                self._write(b"\n")
        except OSError as err:
            raise OSError(f"sidewatch: cannot open rollback.audit_log {self.path}: {err.strerror or err}") from None
        return records

    def append(self, record_type: str, **fields) -> dict:
        """Write one record and make it durable before returning it. Raises OSError when it cannot."""
        record = {"ts": round(time.time(), 6), "type": record_type, **fields}
        line = json.dumps(record, separators=(",", ":"), sort_keys=False, default=str).encode() + b"\n"
        with self._lock:
            if self.path is None:
                self._memory.append(json.loads(line))
            else:
                if self._fd is None:
                    raise OSError(f"sidewatch: audit log {self.path} is not open")
                self._write(line)
        return record

    def records(self) -> list[dict]:
        """Everything in the log now (reads the file again; for tests and tools, not the hot path)."""
        with self._lock:
            if self.path is None:
                return list(self._memory)
            return self._read()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _write(self, data: bytes) -> None:
        # One write per record: with O_APPEND it lands whole at the end, after any other writer's.
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"sidewatch: short write to audit log {self.path} ({written} of {len(data)} bytes)")
        os.fsync(self._fd)

    def _read(self) -> list[dict]:
        records: list[dict] = []
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return records
        for number, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or "type" not in record:
                self.skipped_lines += 1
                log.warning("sidewatch: audit log %s line %d is not a record (torn by a crash?); skipped",
                            self.path, number)
                continue
            records.append(record)
        return records


def _ends_torn(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() == 0:
            return False
        file.seek(-1, os.SEEK_END)
        return file.read(1) != b"\n"

