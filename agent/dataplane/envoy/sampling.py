"""Sampling under Envoy: the share of calls copied to the tap, adapted to a CPU budget.

Envoy copies a call to the tap when its route's ``runtime_fraction`` picks it (ext_proc.py); the
fraction is a runtime value that sidewatch moves through Envoy's admin API
(``POST /runtime_modify?sidewatch.tap.percent=N``). Envoy reads an integer set there as a percentage, so
the share moves in steps of 1% and never goes below 1% (``min_ratio``). Envoy draws per call and never waits for
sidewatch, so sampling never slows a call: it only decides how much the detectors see.

:class:`SamplingController` is the decision, pure logic: given the share copied during the last interval,
the CPU the sidecar process used in it (cores) and how full the tap queue is, the next share. With Envoy
carrying the calls, the sidecar process does little else than the tap (the ext_proc server, decoding,
the detectors), so its CPU time is the detectors' cost, measured wherever their threads run (ONNX
Runtime's included). The cost is taken as proportional to the share:

- queue more than half full: the detectors are behind; halve the share, whatever the CPU says;
- copies lost on the way (more than 1% of those Envoy tried to send in the interval: its ext_proc streams
  refused while sidewatch is behind, envoy_stats.py, or closed before sidewatch had read them, ext_proc.py):
  scale the share down to what got through, times ``headroom``. The CPU misses this when sidewatch is
  short of CPU it does not use (Envoy, the model server and the clients share the cores), so it is a
  signal of its own;
- the calls first: the budget shrinks to what the sidecar uses plus the CPU left idle around it
  (spare_cpu.py) less ``reserve_cores``, kept idle for the calls' bursts. On a machine the calls keep
  busy the share falls to the floor, however little of its budget the tap uses: the tap takes only what
  the calls leave (no spare reading: the budget alone);
- over the budget: scale the share down to aim at ``headroom`` of the budget;
- under the aim: scale it up the same way, at most doubling per interval (the estimate is poor when
  few calls were copied, so the climb is gradual);
- never below ``min_ratio`` (the detectors keep seeing some traffic) nor above 1; in whole percent.

>>> controller = SamplingController(budget_cores=1.0)
>>> controller.next_ratio(ratio=1.0, cpu_cores=2.0, queue_load=0.0)
0.4
>>> controller.next_ratio(ratio=0.4, cpu_cores=0.2, queue_load=0.0)
0.8
>>> controller.next_ratio(ratio=0.4, cpu_cores=0.2, queue_load=0.9)
0.2
>>> controller.next_ratio(ratio=1.0, cpu_cores=0.5, queue_load=0.0, lost_share=0.5)
0.4
>>> controller.next_ratio(ratio=1.0, cpu_cores=0.5, queue_load=0.0, spare_cores=0.0)
0.4

:class:`Sampler` runs it: a thread that, every interval, reads the process's CPU time, the idle CPU and
the tap queue, sets the share, exports it (``sidewatch_tap_sampled_ratio``, ``sidewatch_tap_cpu_cores``,
``sidewatch_tap_cpu_budget_cores``) and tells
Envoy. It tells Envoy every interval, changed or not, so that a restarted Envoy (whose runtime starts
again at every call copied) is brought back within one interval.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
from typing import Callable

from agent.logs import ThrottledLog
from agent.metrics import ProxyMetrics

log = logging.getLogger(__name__)


class SamplingController:
    """The next share of calls to copy (module docstring)."""

    def __init__(self, budget_cores: float, min_ratio: float = 0.01, headroom: float = 0.8,
                 max_step: float = 2.0, reserve_cores: float = 0.25) -> None:
        self.budget_cores = budget_cores
        self.min_ratio = min_ratio
        self.headroom = headroom
        self.max_step = max_step
        self.reserve_cores = reserve_cores

    def budget(self, cpu_cores: float, spare_cores: float | None) -> float:
        """The cores the tap may use now: its budget, or less where the calls leave less idle."""
        if spare_cores is None:
            return self.budget_cores
        return max(0.0, min(self.budget_cores, cpu_cores + spare_cores - self.reserve_cores))

    def next_ratio(self, ratio: float, cpu_cores: float, queue_load: float, lost_share: float = 0.0,
                   spare_cores: float | None = None) -> float:
        budget = self.budget(cpu_cores, spare_cores)
        aim = self.headroom * budget
        if queue_load > 0.5:
            ratio = ratio / 2
        elif lost_share > 0.01:
            ratio = ratio * (1 - lost_share) * self.headroom
        elif cpu_cores > budget:
            ratio = ratio * aim / cpu_cores
        elif cpu_cores < aim:
            ratio = ratio * min(self.max_step, aim / max(cpu_cores, 1e-9))
        return round(min(1.0, max(self.min_ratio, ratio)), 2)


class Sampler:
    """The thread that applies the controller (module docstring). ``apply(percent)`` tells Envoy;
    ``queue_load()`` is how full the tap queue is, 0 to 1; ``copies()``, running totals of the copies Envoy
    tried to send and of those lost (plane.tap_copies)."""

    def __init__(self, controller: SamplingController, metrics: ProxyMetrics, apply: Callable[[int], None],
                 queue_load: Callable[[], float], interval_seconds: float = 1.0,
                 copies: Callable[[], tuple[int, int]] = lambda: (0, 0),
                 spare_cores: Callable[[], float | None] = lambda: None) -> None:
        self.copies = copies
        self.spare_cores = spare_cores
        self.controller = controller
        self.metrics = metrics
        self.apply = apply
        self.queue_load = queue_load
        self.interval = interval_seconds
        self.ratio = 1.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = ThrottledLog(log)

    def start(self) -> None:
        self.metrics.tap_sampled_ratio.set(self.ratio)
        self._tell_envoy()
        self._thread = threading.Thread(target=self._run, name="sidewatch-tap-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        cpu, wall = time.process_time(), time.monotonic()
        tried, lost = self.copies()
        while not self._stopping.wait(self.interval):
            cpu_now, wall_now = time.process_time(), time.monotonic()
            cores = (cpu_now - cpu) / max(wall_now - wall, 1e-6)
            cpu, wall = cpu_now, wall_now
            tried_now, lost_now = self.copies()
            # At most 1: a stream's copies lost are counted per message (ext_proc.py), its tries per stream.
            lost_share = min(1.0, (lost_now - lost) / max(tried_now - tried, 1))
            tried, lost = tried_now, lost_now
            spare = self.spare_cores()
            self.ratio = self.controller.next_ratio(self.ratio, cores, self.queue_load(), lost_share, spare)
            self.metrics.tap_cpu_cores.set(round(cores, 4))
            self.metrics.tap_cpu_budget_cores.set(round(self.controller.budget(cores, spare), 4))
            self.metrics.tap_sampled_ratio.set(self.ratio)
            self._tell_envoy()

    def _tell_envoy(self) -> None:
        try:
            self.apply(round(self.ratio * 100))
        except (OSError, urllib.error.URLError, RuntimeError) as err:
            # Envoy restarting: the next interval tries again.
            self._log.warning("runtime", "sidewatch: cannot set envoy's tap sampling: %s", err)
