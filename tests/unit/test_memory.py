"""agent/memory.py: freed memory goes back to the system on a timer, and nothing happens where glibc's
malloc_trim is missing."""

from __future__ import annotations

import time

from agent.memory import MemoryTrimmer


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_trim_returns_the_pages_that_freed_blocks_left_resident():
    trimmer = MemoryTrimmer(interval_seconds=60)
    assert trimmer.available  # this machine's C library is glibc
    trimmer.trim()
    # Many small blocks, freed all but every 64th: the arenas stay full of free pages glibc keeps.
    blocks = [bytearray(4000) for _ in range(40_000)]
    kept = blocks[::64]
    del blocks
    before = _rss_kb()
    assert trimmer.trim()
    after = _rss_kb()
    assert before - after > 50_000, (before, after)  # most of the ~160 MB freed comes back
    assert len(kept) == 625


def test_the_timer_trims_until_stopped():
    trimmer = MemoryTrimmer(interval_seconds=0.01)
    calls = []
    trimmer._trim = lambda pad: calls.append(pad) or 1
    trimmer.start()
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    trimmer.stop()
    assert calls[:3] == [0, 0, 0]
    settled = len(calls)
    time.sleep(0.05)
    assert len(calls) == settled


def test_without_malloc_trim_it_does_nothing():
    trimmer = MemoryTrimmer(interval_seconds=0.01)
    trimmer._trim = None
    assert not trimmer.available and not trimmer.trim()
    trimmer.start()
    trimmer.stop()
