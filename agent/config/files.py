"""The files the configuration names, checked before anything starts.

A field that names a file sidewatch reads (a certificate, a key, a CA bundle, a webhook's secret, a
kubeconfig) or a program it runs (a command hook's ``argv``) is declared with a marker in its type:

    cert_file: ReadableFile
    client_ca_file: Annotated[Path | None, READ] = None   (the marker outside the union, for an optional one)
    cwd: Annotated[Path | None, DIRECTORY] = None
    argv: Program

:func:`file_problems` walks a whole configuration, finds every marked field that is set, and checks
that the file is there and can be read (the program: found and executable), the way it will be used.
``sidewatch serve --check-config`` and the start of ``sidewatch serve`` both call :func:`check_files`,
so a missing certificate or secret fails both, before anything binds, with one line per problem naming
the configuration key and the file, rather than at the first TLS handshake or at the first rollback.

Files whose contents sidewatch parses at start have their own checks, which also read them (the admin
token, drift reference files, calibration artifacts); this module checks that files are there.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel

from agent.config.base import ConfigError


def _not_a_file(path: Path) -> tuple[str, str] | None:
    if not path.exists():
        return str(path), "no such file"
    if not path.is_file():
        return str(path), "not a regular file"
    return None


@dataclass(frozen=True)
class _ReadsFile:
    """Marks a ``Path`` field: sidewatch reads that file."""

    def problem(self, value: Any, section: BaseModel) -> tuple[str, str] | None:
        path = Path(value)
        if (found := _not_a_file(path)) is not None:
            return found
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            return str(path), f"cannot be read: {err.strerror or err}"
        return None


@dataclass(frozen=True)
class _InDirectory:
    """Marks a ``Path`` field: a directory sidewatch works in (a command hook's ``cwd``)."""

    def problem(self, value: Any, section: BaseModel) -> tuple[str, str] | None:
        path = Path(value)
        if not path.is_dir():
            return str(path), "no such directory" if not path.exists() else "not a directory"
        return None


@dataclass(frozen=True)
class _RunsProgram:
    """Marks an argument list (``argv``): sidewatch runs its first item, found as ``subprocess`` finds it
    (a name without ``/`` on the PATH the program gets, the section's ``env`` first; a path with ``/``
    from the section's ``cwd``)."""

    def problem(self, value: Any, section: BaseModel) -> tuple[str, str] | None:
        program = str(value[0])
        env = getattr(section, "env", None) or {}
        if "/" not in program:
            search = env.get("PATH", os.environ.get("PATH", os.defpath))
            if shutil.which(program, path=search) is None:
                return program, "not found on PATH (or not executable)"
            return None
        cwd = getattr(section, "cwd", None)
        path = Path(cwd) / program if cwd is not None else Path(program)
        if (found := _not_a_file(path)) is not None:
            return found
        if not os.access(path, os.X_OK):
            return str(path), "not executable"
        return None


READ = _ReadsFile()
DIRECTORY = _InDirectory()
ReadableFile = Annotated[Path, READ]
Program = Annotated[list[str], _RunsProgram()]

_MARKERS = (_ReadsFile, _InDirectory, _RunsProgram)


def file_problems(section: Any, key: str = "") -> list[str]:
    """``key: file: what is wrong`` for every marked field under ``section`` (a configuration model, or a
    dict or list of them), keys dotted from the top (``metrics.tls.cert_file``, ``rollback.hooks.undo.argv``)."""
    problems: list[str] = []
    if isinstance(section, BaseModel):
        for name, info in type(section).model_fields.items():
            value = getattr(section, name)
            if value is None:
                continue
            where = f"{key}.{name}" if key else name
            markers = [marker for marker in info.metadata if isinstance(marker, _MARKERS)]
            for marker in markers:
                found = marker.problem(value, section)
                if found is not None:
                    problems.append(f"{where}: {found[0]}: {found[1]}")
            if not markers:
                problems.extend(file_problems(value, where))
    elif isinstance(section, dict):
        for name, value in section.items():
            problems.extend(file_problems(value, f"{key}.{name}"))
    elif isinstance(section, (list, tuple)):
        for index, value in enumerate(section):
            problems.extend(file_problems(value, f"{key}.{index}"))
    return problems


def check_files(config: BaseModel) -> None:
    """Raise a ConfigError, one line per problem (``sidewatch: KEY: FILE: what is wrong``), when a file the
    configuration names is not there, not readable, or (a program) not executable."""
    problems = file_problems(config)
    if problems:
        raise ConfigError("\n".join(f"sidewatch: {problem}" for problem in problems))
