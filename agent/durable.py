"""Making a file's directory entry durable: after creating or renaming a file, fsync its directory,
or a power cut can bring back the old entry (or none) even though the file's data was fsync'd."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
