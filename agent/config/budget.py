"""A false-alarm budget in time (``1/30d``): the setting that drift and adversarial-rate alarms spend.

It is a value of the configuration, so it sits in the bottom layer: the config validates it at load
time, and the detectors (agent/detect/drift/budget.py explains how it is spent) read it.

>>> budget = AlarmBudget.parse("1/30d")
>>> budget.alarms, budget.period_seconds, str(budget)
(1, 2592000.0, '1/30d')
>>> f"{budget.alpha(look_seconds=60, tests=100):.3g}"        # per test, per 60 s look
'2.31e-07'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# Units of a budget's period, in seconds. No bare "m": minutes or months?
UNITS: dict[str, float] = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
BUDGET_FORM = "'<alarms>/<number><unit>' with unit s, min, h, d or w (e.g. '1/30d', '2/1h', '1/10min')"
_BUDGET_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?|\.\d+)?\s*(s|min|h|d|w)\s*$")



def _format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class AlarmBudget:
    """At most ``alarms`` false alarms per ``period_seconds`` of benign traffic (per model version).

    ``text`` is what :meth:`parse` read (``str()`` gives it back); a budget built directly prints in
    the largest unit that divides its period. It does not take part in comparisons.
    """

    alarms: int
    period_seconds: float
    text: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.alarms, bool) or int(self.alarms) != self.alarms or self.alarms < 1:
            raise ValueError(f"sidewatch: a false-alarm budget needs a whole number of alarms >= 1, got {self.alarms!r}")
        if not (math.isfinite(self.period_seconds) and self.period_seconds > 0):
            raise ValueError(f"sidewatch: a false-alarm budget needs a period > 0 seconds, got {self.period_seconds!r}")
        object.__setattr__(self, "alarms", int(self.alarms))
        object.__setattr__(self, "period_seconds", float(self.period_seconds))

    @classmethod
    def parse(cls, text: str) -> AlarmBudget:
        """``"1/30d"``, ``"1/10min"``, ``"2/1h"``, ``"1/45s"``, ``"1/2w"`` (a number before the unit may be
        left out: ``"1/d"``). Raises ValueError naming the text and the expected form."""
        match = _BUDGET_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"sidewatch: false-alarm budget {text!r} is not of the form {BUDGET_FORM}")
        alarms, number, unit = match.groups()
        amount = 1.0 if number is None else float(number)
        if int(alarms) < 1 or amount <= 0:
            raise ValueError(f"sidewatch: false-alarm budget {text!r} needs at least one alarm and a period > 0; "
                             f"expected {BUDGET_FORM}")
        return cls(int(alarms), amount * UNITS[unit], text="".join(text.split()))

    @property
    def rate_per_second(self) -> float:
        """False alarms allowed per second (``lambda``)."""
        return self.alarms / self.period_seconds

    def alpha(self, look_seconds: float, tests: int) -> float:
        """Each test's level at a look covering ``look_seconds``, with ``tests`` tests per look:
        ``min(0.5, lambda * look_seconds / tests)`` (Bonferroni over tests and looks)."""
        if not look_seconds > 0 or tests < 1:
            raise ValueError(f"sidewatch: alpha needs look_seconds > 0 and tests >= 1, got {look_seconds!r}, {tests!r}")
        return min(0.5, self.rate_per_second * float(look_seconds) / int(tests))

    def __str__(self) -> str:
        if self.text:
            return self.text
        for unit, seconds in sorted(UNITS.items(), key=lambda kv: -kv[1]):
            amount = self.period_seconds / seconds
            if amount >= 1 and float(amount).is_integer():
                return f"{self.alarms}/{int(amount)}{unit}"
        return f"{self.alarms}/{_format_number(self.period_seconds)}s"
