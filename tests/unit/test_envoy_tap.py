"""The Envoy tap's pure parts: gRPC frames out of body chunks (frames.py) and the sampling controller
(sampling.py). The whole, with a real Envoy, is tests/integration/test_envoy_tap_sidecar.py."""

from __future__ import annotations

import pytest

from agent.dataplane.envoy.frames import Frames
from agent.dataplane.envoy.sampling import SamplingController


def frame(message: bytes, compressed: bool = False) -> bytes:
    return bytes([int(compressed)]) + len(message).to_bytes(4, "big") + message


def test_frames_cut_anywhere_come_out_whole_and_in_order():
    messages = [b"", b"a" * 7, bytes(range(256)) * 3, b"z"]
    wire = b"".join(frame(m) for m in messages)
    for cut in (1, 2, 5, 6, 64, len(wire)):
        frames = Frames(max_message_bytes=1024, max_buffer_bytes=2048)
        out = []
        for start in range(0, len(wire), cut):
            out += frames.feed(wire[start:start + cut])
        assert out == messages, cut
        assert frames.buffered == 0 and frames.error is None


def test_a_frame_over_the_message_bound_is_refused_at_its_header():
    frames = Frames(max_message_bytes=100, max_buffer_bytes=1000)
    assert frames.feed(frame(b"x" * 100)) == [b"x" * 100]
    assert frames.feed(frame(b"x" * 101)[:5]) == []  # only the header: refused before the bytes come
    assert frames.error == "too_large" and frames.buffered == 0
    assert frames.feed(frame(b"y")) == []  # broken for good: the boundaries after it are unknown


def test_the_buffer_bound_holds_whatever_the_chunks():
    frames = Frames(max_message_bytes=1000, max_buffer_bytes=600)
    assert frames.feed(frame(b"x" * 1000)[:500]) == []
    assert frames.error is None
    frames.feed(b"x" * 200)
    assert frames.error == "buffer" and frames.buffered == 0


def test_a_compressed_message_is_not_copied():
    frames = Frames(max_message_bytes=1000, max_buffer_bytes=2000)
    assert frames.feed(frame(b"abc", compressed=True)) == []
    assert frames.error == "compressed"


def test_over_the_budget_the_share_falls_in_proportion():
    controller = SamplingController(budget_cores=1.0, headroom=0.8)
    assert controller.next_ratio(1.0, cpu_cores=1.6, queue_load=0.0) == pytest.approx(0.5)
    assert controller.next_ratio(0.5, cpu_cores=4.0, queue_load=0.0) == pytest.approx(0.1)


def test_under_the_aim_the_share_climbs_at_most_doubling():
    controller = SamplingController(budget_cores=1.0, headroom=0.8)
    assert controller.next_ratio(0.1, cpu_cores=0.01, queue_load=0.0) == pytest.approx(0.2)
    assert controller.next_ratio(0.1, cpu_cores=0.5, queue_load=0.0) == pytest.approx(0.16)
    assert controller.next_ratio(0.9, cpu_cores=0.0, queue_load=0.0) == 1.0


def test_between_the_aim_and_the_budget_the_share_holds():
    controller = SamplingController(budget_cores=1.0, headroom=0.8)
    assert controller.next_ratio(0.3, cpu_cores=0.9, queue_load=0.0) == pytest.approx(0.3)


def test_a_filling_queue_halves_the_share_whatever_the_cpu():
    controller = SamplingController(budget_cores=1.0)
    assert controller.next_ratio(0.8, cpu_cores=0.0, queue_load=0.6) == pytest.approx(0.4)
    assert controller.next_ratio(0.8, cpu_cores=0.0, queue_load=0.5) == 1.0


def test_the_share_never_falls_below_the_floor():
    controller = SamplingController(budget_cores=0.01, min_ratio=0.01)
    ratio = 1.0
    for _ in range(50):  # a budget that cannot hold: the floor, not zero
        ratio = controller.next_ratio(ratio, cpu_cores=0.5, queue_load=1.0)
    assert ratio == 0.01


def test_the_share_settles_where_the_budget_holds():
    """A sidecar whose CPU is 0.05 cores idle plus 2 cores at every call copied: the share settles where the
    CPU is between the aim and the budget."""
    controller = SamplingController(budget_cores=1.0, headroom=0.8)
    ratio = 1.0
    for _ in range(30):
        ratio = controller.next_ratio(ratio, cpu_cores=0.05 + 2.0 * ratio, queue_load=0.0)
    assert 0.8 * 1.0 - 0.02 <= 0.05 + 2.0 * ratio <= 1.0  # within a percent step of the aim


def test_copies_lost_between_envoy_and_the_tap_cut_the_share_whatever_the_cpu():
    """Envoy refusing ext_proc streams (sidewatch behind, the CPU short elsewhere) is a reason of its own."""
    controller = SamplingController(budget_cores=1.0, headroom=0.8)
    assert controller.next_ratio(1.0, cpu_cores=0.3, queue_load=0.0, lost_share=0.25) == pytest.approx(0.6)
    assert controller.next_ratio(1.0, cpu_cores=0.3, queue_load=0.0, lost_share=0.005) == 1.0  # noise: climbs
