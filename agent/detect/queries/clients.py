"""Each client's recent inputs, in bounded memory: fingerprints, repeats, near-duplicates and the flag.

:class:`ClientHistory` is one client's state for one model:

- the fingerprints (fingerprint.py) of its last ``fingerprints_per_client`` rows, in a ring (a table of
  uint16 that grows by doubling up to that many rows, so a client seen once costs little), and a 64-bit digest
  of each of those rows' exact values;
- a row whose digest is in the ring is a **repeat** (a retry, the same image asked again): it counts for
  nothing, neither for nor against the client, and is not stored again;
- any other row is a **near-duplicate** when it shares at least ``match_threshold`` hashes with a stored one;
- the last ``history`` rows' near-duplicate bits; the client is **flagged** by the row that makes at least
  ``near_duplicates_to_flag`` of them near-duplicates. The bits are then cleared: a client that goes on is
  flagged again after as many more.

:class:`ClientTable` holds the histories by key (client identity, model), at most ``max_clients`` of them, the
least recently seen dropped first (counted in ``evicted``), and each dropped once idle for ``idle_seconds``.

Memory: a client at its full ring costs ``fingerprints_per_client * (2 * hashes + 8)`` bytes of arrays plus some
500 bytes of Python objects: about 4 KB at the defaults (3,456 bytes of arrays for 32 rows of 50 hashes; 3.8 MiB
per 1,000 clients measured by bench/query_detector.py), and a client seen once about 1 KB.

>>> limits = Limits(fingerprints_per_client=4, hashes=3, match_threshold=2, history=4, near_duplicates_to_flag=2)
>>> history = ClientHistory(limits)
>>> fingerprint = np.array([5, 9, 12], np.uint16)
>>> history.observe(fingerprint, digest=1)                           # the first row: nothing to match
Seen(repeat=False, near_duplicate=False, flagged=False)
>>> history.observe(fingerprint, digest=1)                           # the same row again: a repeat
Seen(repeat=True, near_duplicate=False, flagged=False)
>>> history.observe(np.array([5, 9, 40], np.uint16), digest=2)       # two hashes shared: near-duplicate
Seen(repeat=False, near_duplicate=True, flagged=False)
>>> history.observe(np.array([5, 12, 41], np.uint16), digest=3)      # the second of the last four: flagged
Seen(repeat=False, near_duplicate=True, flagged=True)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

# A new client's table starts with this many rows and doubles up to fingerprints_per_client.
_FIRST_ROWS = 4


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-client bounds and thresholds (agent/config/queries.py gives their defaults and reasons)."""

    fingerprints_per_client: int
    hashes: int
    match_threshold: int
    history: int
    near_duplicates_to_flag: int


@dataclass(frozen=True, slots=True)
class Seen:
    """What one row said about its client: a repeat, a near-duplicate, and whether it raised the flag."""

    repeat: bool
    near_duplicate: bool
    flagged: bool


REPEAT = Seen(repeat=True, near_duplicate=False, flagged=False)


class ClientHistory:
    """One client's recent rows of one model (module docstring). ``blocked_until`` is the watch's (enforce
    mode: a monotonic time before which the client is refused); ``last_seen`` the table's."""

    __slots__ = ("_limits", "_table", "_digests", "_filled", "_next", "_bits", "blocked_until", "last_seen")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        rows = min(_FIRST_ROWS, limits.fingerprints_per_client)
        self._table = np.zeros((rows, limits.hashes), np.uint16)  # 0 pads: no fingerprint holds 0
        self._digests = np.zeros(rows, np.int64)
        self._filled = 0
        self._next = 0
        self._bits = 0  # the last `history` rows' near-duplicate bits, the newest lowest
        self.blocked_until = 0.0
        self.last_seen = 0.0

    @property
    def near_duplicates(self) -> int:
        """Near-duplicates among the last ``history`` rows (since the last flag)."""
        return self._bits.bit_count()

    def observe(self, fingerprint: np.ndarray, digest: int) -> Seen:
        """Take one row: its fingerprint (sorted distinct uint16) and a digest of its exact values."""
        filled = self._filled
        if filled and bool((self._digests[:filled] == digest).any()):
            return REPEAT
        limits = self._limits
        near = filled > 0 and fingerprint.size >= limits.match_threshold and \
            self._most_shared(fingerprint, filled) >= limits.match_threshold
        self._store(fingerprint, digest)
        self._bits = ((self._bits << 1) | near) & ((1 << limits.history) - 1)
        flagged = near and self._bits.bit_count() >= limits.near_duplicates_to_flag
        if flagged:
            self._bits = 0
        return Seen(False, near, flagged)

    def _most_shared(self, fingerprint: np.ndarray, filled: int) -> int:
        """The most hashes any stored row shares with ``fingerprint``."""
        stored = self._table[:filled]
        positions = np.searchsorted(fingerprint, stored)
        positions[positions == fingerprint.size] = 0
        return int((fingerprint[positions] == stored).sum(axis=1).max())

    def _store(self, fingerprint: np.ndarray, digest: int) -> None:
        rows = len(self._table)
        if self._next == rows and rows < self._limits.fingerprints_per_client:
            grown = min(2 * rows, self._limits.fingerprints_per_client)
            self._table = np.concatenate([self._table, np.zeros((grown - rows, self._limits.hashes), np.uint16)])
            self._digests = np.concatenate([self._digests, np.zeros(grown - rows, np.int64)])
            rows = grown
        slot = self._next % rows
        self._table[slot, :fingerprint.size] = fingerprint
        self._table[slot, fingerprint.size:] = 0
        self._digests[slot] = digest
        self._filled = min(self._filled + 1, rows)
        self._next = slot + 1 if slot + 1 < self._limits.fingerprints_per_client else 0

    def nbytes(self) -> int:
        """The bytes of its arrays (the bench adds the objects around them)."""
        return self._table.nbytes + self._digests.nbytes


class ClientTable:
    """The histories by key, bounded (module docstring). Not thread-safe: the watch holds its lock."""

    def __init__(self, limits: Limits, max_clients: int, idle_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.max_clients = max_clients
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._histories: OrderedDict[Hashable, ClientHistory] = OrderedDict()  # least recently seen first
        self.evicted = 0  # dropped for room (max_clients) before they were idle long enough

    def __len__(self) -> int:
        return len(self._histories)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._histories

    def get(self, key: Hashable) -> ClientHistory:
        """The history of ``key`` (a new one for a client not seen or forgotten), now its most recent."""
        now = self._clock()
        histories = self._histories
        history = histories.get(key)
        if history is None:
            history = histories[key] = ClientHistory(self.limits)
        else:
            histories.move_to_end(key)
        history.last_seen = now
        self._forget(now)
        return history

    def _forget(self, now: float) -> None:
        """Drop the idle histories (oldest first: they are in order of last seen) and those beyond the bound."""
        histories = self._histories
        while histories:
            oldest = next(iter(histories.values()))
            if now - oldest.last_seen >= self.idle_seconds:
                histories.popitem(last=False)
            elif len(histories) > self.max_clients:
                histories.popitem(last=False)
                self.evicted += 1
            else:
                break
