"""The copies of a stream's requests waiting for their responses (agent/dataplane/pending.py), shared by both
data planes: bounded in number and in bytes, and paired by number whatever was dropped."""

from __future__ import annotations

from agent.dataplane.pending import PendingRequests


class Count:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


def _pending(max_requests: int = 100, max_bytes: int = 1000) -> tuple[PendingRequests, Count]:
    dropped = Count()
    return PendingRequests(max_requests, max_bytes, dropped), dropped


def test_copies_past_the_byte_bound_are_dropped_and_counted_the_others_pair_with_their_own_responses():
    pending, dropped = _pending(max_bytes=250)
    kept = [pending.request(bytes([number]) * 100, float(number), 0.0) for number in range(5)]
    assert kept == [True, True, False, False, False] and dropped.value == 3 and pending.bytes == 200
    assert pending.response()[0] == bytes([0]) * 100
    assert pending.request(bytes([5]) * 100, 5.0, 0.0)  # room again: kept
    answers = [pending.response() for _ in range(5)]
    assert [answer and answer[0][0] for answer in answers] == [1, None, None, None, 5]
    assert pending.bytes == 0 and len(pending) == 0


def test_copies_past_the_count_bound_are_dropped_and_counted():
    pending, dropped = _pending(max_requests=2)
    assert [pending.request(b"x", 0.0, 0.0) for _ in range(4)] == [True, True, False, False]
    assert dropped.value == 2 and len(pending) == 2


def test_a_message_larger_than_the_bound_is_never_kept():
    pending, dropped = _pending(max_bytes=10)
    assert not pending.request(b"x" * 11, 0.0, 0.0)
    assert pending.request(b"x" * 10, 0.0, 0.0)
    assert dropped.value == 1


def test_an_upstream_that_answers_a_request_twice_does_not_leave_a_copy_waiting_for_ever():
    """Responses pair by number: a copy whose number the responses have passed is dropped (counted), not kept."""
    pending, dropped = _pending()
    pending.request(b"a", 0.0, 0.0)
    assert pending.response()[0] == b"a"
    assert pending.response() is None  # a second answer to request 0: the count moves to 2
    pending.request(b"b", 0.0, 0.0)  # request 1, whose own response has passed
    pending.request(b"c", 0.0, 0.0)  # request 2
    assert pending.response()[0] == b"c"
    assert dropped.value == 1 and pending.bytes == 0


def test_clear_forgets_every_copy():
    pending, _ = _pending()
    pending.request(b"abc", 0.0, 0.0)
    pending.clear()
    assert len(pending) == 0 and pending.bytes == 0
