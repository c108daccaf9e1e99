"""The demo's live display: a block of lines redrawn in place on a terminal, appended otherwise."""

from __future__ import annotations

import sys


class LiveDisplay:
    def __init__(self, stream=sys.stdout) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._lines_drawn = 0

    def draw(self, lines: list[str]) -> None:
        if self._tty and self._lines_drawn:
            # Move the cursor up over the previous block and clear it.
            self._stream.write(f"\x1b[{self._lines_drawn}F\x1b[J")
        self._stream.write("\n".join(lines) + "\n")
        if not self._tty:
            self._stream.write("\n")
        self._stream.flush()
        self._lines_drawn = len(lines)


def bar(fraction: float, width: int = 30) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "#" * filled + "." * (width - filled)
