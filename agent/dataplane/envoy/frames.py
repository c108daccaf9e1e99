"""gRPC messages out of HTTP/2 body chunks: the 5-byte length-prefixed frames, reassembled, bounded.

Envoy's ext_proc filter (STREAMED body mode) hands sidewatch a call's body in chunks as they pass, cut
wherever the transport cut them: a frame may span chunks and a chunk may hold several frames. Each frame is
one flag byte (1: compressed), a 4-byte big-endian length, then the message.

Everything here is sized by the client, so it is bounded: a frame that announces more than
``max_message_bytes`` is refused at its header, before its bytes are kept, and the bytes held for one
direction of a call never exceed ``max_buffer_bytes``. After a refusal the reassembler stays broken (the
frame boundaries after it are unknown) and the caller drops the call from the tap.

>>> frames = Frames(max_message_bytes=16, max_buffer_bytes=64)
>>> frame = bytes([0, 0, 0, 0, 3]) + b"abc"
>>> frames.feed(frame[:2]), frames.feed(frame[2:] + frame)
([], [b'abc', b'abc'])
>>> frames.feed(bytes([0, 0, 0, 1, 0])), frames.error
([], 'too_large')
"""

from __future__ import annotations

HEADER_BYTES = 5


class Frames:
    """The reassembler of one direction of one call (module docstring). ``error`` is None while it is
    usable, else why not: ``too_large``, ``buffer`` or ``compressed`` (a compressed message cannot be
    decoded without the call's grpc-encoding; the detectors get none)."""

    __slots__ = ("max_message_bytes", "max_buffer_bytes", "error", "_buffer", "_needed")

    def __init__(self, max_message_bytes: int, max_buffer_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_buffer_bytes = max_buffer_bytes
        self.error: str | None = None
        self._buffer = bytearray()
        # The length of the frame being read (header included), once its header is in; else 0.
        self._needed = 0

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> list[bytes]:
        """The messages that ``chunk`` completes, in order; [] once ``error`` is set."""
        if self.error is not None:
            return []
        buffer = self._buffer
        buffer += chunk
        messages = []
        while True:
            if not self._needed:
                if len(buffer) < HEADER_BYTES:
                    break
                if buffer[0] & 1:
                    return self._fail("compressed")
                length = int.from_bytes(buffer[1:5], "big")
                if length > self.max_message_bytes:
                    return self._fail("too_large")
                self._needed = HEADER_BYTES + length
            if len(buffer) < self._needed:
                break
            messages.append(bytes(buffer[HEADER_BYTES:self._needed]))
            del buffer[:self._needed]
            self._needed = 0
        if len(buffer) > self.max_buffer_bytes:
            return self._fail("buffer")
        return messages

    def _fail(self, reason: str) -> list[bytes]:
        self.error = reason
        self._buffer = bytearray()  # the memory goes back at once
        self._needed = 0
        return []
