"""A false-alarm budget in time, and the wall-clock looks that spend it.

The setting is a budget such as ``1/30d``: at most one false drift alarm per model version per 30 days
of benign traffic, for all of its tests together, whatever the request rate. Read as a rate
``lambda = alarms / period`` of false alarms per second, it is spent like this:

* Tests run at *looks*, one per wall-clock interval of ``T`` seconds (60 s, say), never per request.
  :class:`LookClock` says when a look is due: at most once per interval ``[i T, (i + 1) T)``, the
  intervals anchored to multiples of ``T`` since the epoch.
* At each look each of the ``m`` tests (one per feature) rejects at level
  ``alpha = lambda T / m`` (:meth:`AlarmBudget.alpha`). A period ``P`` holds at most ``P / T + 1``
  looks, so by the union bound the expected number of false rejections in it is at most
  ``lambda (P + T)``: the budget, up to one look's worth at the edges. No independence between
  tests or looks is needed, only p-values that are valid at level ``alpha``.
* The request rate does not enter: looks are counted in time, not in requests. A look with too
  little data is skipped (its ``alpha`` left unspent, which is conservative) and its data carried into
  the next one. Restarts add no look: the last look's index is checkpointed (:meth:`LookClock.state_dict`)
  and a restored clock does not look again in the interval it already looked in.

``alpha`` is capped at 0.5: a budget so loose that it asks for more is not a false-alarm budget.

>>> budget = AlarmBudget.parse("1/30d")
>>> budget.alarms, budget.period_seconds, str(budget)
(1, 2592000.0, '1/30d')
>>> f"{budget.alpha(look_seconds=60, tests=100):.3g}"        # per test, per 60 s look
'2.31e-07'
>>> clock = LookClock(60)
>>> [clock.due(t) for t in (100.0, 110.0, 121.0, 150.0, 185.0)]   # first call: records the interval only
[False, False, True, False, True]
>>> restarted = LookClock(60).load_state_dict(clock.state_dict())
>>> restarted.due(190.0), restarted.due(240.5)                     # no second look in [180, 240)
(False, True)
"""

from __future__ import annotations

import math
from typing import Any, Self

from agent.config.budget import AlarmBudget

STATE_KIND = "sidewatch-look-clock"
FORMAT_VERSION = 1


class LookClock:
    """When a look is due: at most once per wall-clock interval ``[i T, (i + 1) T)``, ``T = interval_seconds``.

    ``due(now)`` is True when ``floor(now / T)`` is above the last look's index, and then records the
    new index. The very first call (no look recorded, nothing restored) only records its interval and
    returns False: the process has seen at most part of that interval, and its data go to the next
    look. A clock that steps back is never due until it passes the last look's interval again, so no
    interval gets two looks. :meth:`state_dict` / :meth:`load_state_dict` carry the last index across a
    restart (a restart then adds no look).
    """

    def __init__(self, interval_seconds: float) -> None:
        if not (math.isfinite(interval_seconds) and interval_seconds > 0):
            raise ValueError(f"sidewatch: a look interval must be > 0 seconds, got {interval_seconds!r}")
        self.interval_seconds = float(interval_seconds)
        self.last_index: int | None = None

    def index(self, now: float) -> int:
        """The interval ``now`` falls in: ``floor(now / T)``."""
        return math.floor(now / self.interval_seconds)

    def due(self, now: float) -> bool:
        """Whether a look is due at ``now`` (at most once per interval); records it when it is."""
        index = self.index(now)
        if self.last_index is None:
            self.last_index = index
            return False
        if index > self.last_index:
            self.last_index = index
            return True
        return False

    def next_due(self, now: float) -> float:
        """The earliest time after ``now`` at which :meth:`due` may be True (the next interval's start)."""
        after = self.index(now) + 1 if self.last_index is None else max(self.index(now), self.last_index) + 1
        return after * self.interval_seconds

    def state_dict(self) -> dict[str, Any]:
        """The last look's interval, JSON-serialisable."""
        return {"kind": STATE_KIND, "format_version": FORMAT_VERSION,
                "interval_seconds": self.interval_seconds, "last_index": self.last_index}

    def load_state_dict(self, state: dict[str, Any]) -> Self:
        """Restore :meth:`state_dict`. Saved under another interval, the index is moved to the new
        interval holding the end of the old one: the move may skip a look, never add one."""
        if state.get("kind") != STATE_KIND or state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sidewatch: not a {STATE_KIND} state of format {FORMAT_VERSION}: "
                             f"kind={state.get('kind')!r}, format_version={state.get('format_version')!r}")
        last = state["last_index"]
        if last is None:
            self.last_index = None
            return self
        saved = float(state["interval_seconds"])
        if saved == self.interval_seconds:
            self.last_index = int(last)
        else:  # the old look came before (last + 1) * saved: the new interval holding that instant is spent
            self.last_index = math.ceil((int(last) + 1) * saved / self.interval_seconds) - 1
        return self


__all__ = ["AlarmBudget", "LookClock"]
