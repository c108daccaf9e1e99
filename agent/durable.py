"""Durable writes: a file replaced atomically and fsync'd, and a directory entry made durable.

After creating or renaming a file, its directory must be fsync'd too, or a power cut can bring back the
old entry (or none) even though the file's data was fsync'd.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str, sync_directory: bool = True) -> Path:
    """Replace ``path`` with ``text``: written to a temporary file beside it, fsync'd, then renamed over it,
    so a reader (or a restart after a crash) sees the old file or the new one, never half of one.
    ``sync_directory=False`` leaves the directory's fsync to the caller (one for many files)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    if sync_directory:
        fsync_directory(path.parent)
    return path
