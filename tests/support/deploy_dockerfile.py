"""A small Dockerfile reader and .dockerignore matcher for the offline image tests (no Docker here).

It follows the Dockerfile reference as far as the project's Dockerfiles need: parser directives and
comments, backslash line continuations, ARG substitution in FROM, stages named with AS, exec-form
(JSON) and shell-form arguments. The .dockerignore matcher follows Docker's rules: patterns relative
to the context root, `*` and `?` within one path element, `**` across any number, a pattern that
matches a folder excludes what is in it, `!` re-includes, and the last matching pattern wins.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str        # upper case
    text: str           # the arguments, continuation lines joined

    def exec_form(self) -> list[str] | None:
        """The arguments as a JSON array (exec form), or None for shell form."""
        try:
            value = json.loads(self.text)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(item, str) for item in value) else None

    def flags_and_args(self) -> tuple[dict[str, str], list[str]]:
        """`--flag=value` options first, then the rest split like a shell would (COPY, ADD, USER)."""
        words = shlex.split(self.text)
        flags = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words


@dataclass
class Stage:
    base: str                      # the FROM image, with ARGs substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    args: dict[str, str]           # global ARGs (before the first FROM) and their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue                  # comments and parser directives
        if current and stripped.startswith("#"):
            continue                  # comment lines inside a continued instruction are dropped
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current.strip())
    return lines


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            base = _substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"{path}: {keyword} before the first FROM")
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return Dockerfile(global_args, stages)


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    def __init__(self, path: Path) -> None:
        self.rules: list[tuple[bool, re.Pattern]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                include = line.startswith("!")
                pattern = line.lstrip("!").strip().strip("/")
                self.rules.append((include, _pattern_regex(pattern)))

    def excluded(self, relative: str) -> bool:
        """Whether the file or folder at ``relative`` (to the context root) is left out of the build context."""
        parts = relative.strip("/").split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for include, regex in self.rules:
            if any(regex.match(prefix) for prefix in prefixes):
                excluded = not include
        return excluded

    def context_files(self, root: Path) -> list[str]:
        """Every file the build context holds, relative to ``root``."""
        # An excluded folder is not walked into unless a `!` pattern could bring something back from it.
        prune = not any(include for include, _ in self.rules)
        files = []
        for folder, dirs, names in os.walk(root):
            base = Path(folder).relative_to(root)
            if prune:
                dirs[:] = [name for name in dirs if not self.excluded(str(base / name))]
            files += [str(base / name) for name in names if not self.excluded(str(base / name))]
        return sorted(files)
