"""Streamed requests waiting for their responses, so that the tap can pair each response with its request.

A ModelStreamInfer stream answers its requests in order, one response each, so the n-th response pairs
with the n-th request. Until it comes, the request's copy waits here. How many wait is up to the caller's
client and the upstream (a client that never reads its responses leaves every request the upstream has
taken waiting), so the copies are bounded per stream in number and in bytes
(``tap.max_pending_stream_requests``, ``tap.max_pending_stream_bytes``). A copy that would pass either
bound is not kept: it is lost to the tap, counted (``sidewatch_tap_copies_dropped_total{reason="unpaired"}``),
and the call itself goes on unchanged. Its response, when it comes, is passed over: pairing is by number,
so a dropped copy never shifts the others onto the wrong responses.

Both data planes keep their copies here: the grpc.aio relay (relay.py) and Envoy's tap (envoy/ext_proc.py).

>>> class Count:
...     value = 0
...     def inc(self, amount=1):
...         self.value += amount
>>> dropped = Count()
>>> pending = PendingRequests(max_requests=8, max_bytes=10, dropped=dropped)
>>> [pending.request(message, 0.0, 0.0) for message in (b"aaaa", b"bbbbbbb", b"cccc")]
[True, False, True]
>>> len(pending), pending.bytes, dropped.value
(2, 8, 1)
>>> [pending.response() for _ in range(3)]  # the second response's request was not kept
[(b'aaaa', 0.0, 0.0), None, (b'cccc', 0.0, 0.0)]
>>> pending.bytes
0
"""

from __future__ import annotations

import collections
from typing import Protocol


class Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class PendingRequests:
    """The copies of one stream's requests that wait for their responses (module docstring)."""

    __slots__ = ("max_requests", "max_bytes", "bytes", "_dropped", "_kept", "_requests", "_responses")

    def __init__(self, max_requests: int, max_bytes: int, dropped: Counter) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        # Bytes of the copies kept (their messages' lengths).
        self.bytes = 0
        self._dropped = dropped
        # (request number, message, time.time() and time.perf_counter() when it came), oldest first.
        self._kept: collections.deque[tuple[int, bytes, float, float]] = collections.deque()
        self._requests = 0  # requests seen, kept or not
        self._responses = 0  # responses seen

    def __len__(self) -> int:
        return len(self._kept)

    def request(self, message: bytes, received_at: float, started: float) -> bool:
        """Keep a copy of the stream's next request; False (counted) when a bound leaves no room for it."""
        number = self._requests
        self._requests += 1
        if len(self._kept) >= self.max_requests or self.bytes + len(message) > self.max_bytes:
            self._dropped.inc()
            return False
        self._kept.append((number, message, received_at, started))
        self.bytes += len(message)
        return True

    def response(self) -> tuple[bytes, float, float] | None:
        """The request that the stream's next response answers, with its two times; None when its copy was
        not kept."""
        number = self._responses
        self._responses += 1
        kept = self._kept
        # A copy older than this response lost its own (an upstream that answered some request twice moved
        # the count past it): it would wait for nothing.
        while kept and kept[0][0] < number:
            self.bytes -= len(kept.popleft()[1])
            self._dropped.inc()
        if not kept or kept[0][0] != number:
            return None
        _, message, received_at, started = kept.popleft()
        self.bytes -= len(message)
        return message, received_at, started

    def clear(self) -> None:
        """Forget every copy (the caller counts them, if they are lost)."""
        self._kept.clear()
        self.bytes = 0
