"""The CPU left idle around the sidecar: what the tap may take without taking it from the calls.

Under Envoy the calls run in other processes (Envoy, the model server, the clients on the same host), so
the sidecar's own CPU time cannot tell whether the tap is taking CPU they need. The idle CPU can: when
the cores are all busy, every cycle the tap spends is one the calls wait for. Two readings, the lower
wins:

- the host: idle and I/O-wait time of the CPUs this process may run on (``sched_getaffinity``) in
  ``/proc/stat``, as a share of their time times their number; time stolen by a hypervisor is busy;
- the cgroup's CPU limit, where it has one (a container's ``resources.limits.cpu``): the limit minus what
  the cgroup used over the interval (cgroup v2 ``cpu.max`` and ``cpu.stat``, or v1 ``cpu.cfs_quota_us`` and
  ``cpuacct.usage``). A container at its limit has no spare CPU however idle the host is.

:meth:`SpareCpu.sample` returns the idle cores since the previous call (``None`` the first time, or when
neither reading is possible: the sampler then goes by its budget alone).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

# Fields of a /proc/stat cpu line: user nice system idle iowait irq softirq steal (guest time is
# already inside user and nice).
_IDLE_FIELDS = (3, 4)
_COUNTED_FIELDS = 8


def host_ticks(proc_stat: Path, cpus: set[int]) -> tuple[int, int] | None:
    """(idle ticks, all ticks) summed over ``cpus``, or None when /proc/stat cannot be read."""
    idle = total = found = 0
    try:
        lines = proc_stat.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(field) for field in rest.split()[:_COUNTED_FIELDS]]
        idle += sum(ticks[index] for index in _IDLE_FIELDS)
        total += sum(ticks)
        found += 1
    return (idle, total) if found else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_limit(root: Path) -> tuple[float, Path] | None:
    """(the CPU limit in cores, the file that counts the cgroup's CPU time) where the cgroup this process
    sees at ``root`` has a limit; None without one. Seen from inside a container, ``root`` is its own cgroup."""
    cpu_max = _read(root / "cpu.max")  # v2: "max 100000" or "200000 100000"
    if cpu_max is not None:
        quota, _, period = cpu_max.partition(" ")
        if quota == "max" or not period:
            return None
        return int(quota) / int(period), root / "cpu.stat"
    quota_us = _read(root / "cpu" / "cpu.cfs_quota_us")  # v1
    period_us = _read(root / "cpu" / "cpu.cfs_period_us")
    if quota_us is None or period_us is None or int(quota_us) <= 0:
        return None
    return int(quota_us) / int(period_us), root / "cpuacct" / "cpuacct.usage"


def cgroup_cpu_seconds(usage: Path) -> float | None:
    """CPU seconds the cgroup has used: v2 ``usage_usec`` in cpu.stat, v1 nanoseconds in cpuacct.usage."""
    text = _read(usage)
    if text is None:
        return None
    if usage.name == "cpu.stat":
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        return None
    return int(text) / 1e9


class SpareCpu:
    """Idle cores around this process, between two calls of :meth:`sample` (module docstring)."""

    def __init__(self, proc_stat: Path = Path("/proc/stat"), cgroup_root: Path = Path("/sys/fs/cgroup"),
                 cpus: set[int] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.proc_stat = proc_stat
        self.clock = clock
        self.cpus = cpus if cpus is not None else os.sched_getaffinity(0)
        self.limit = cgroup_limit(cgroup_root)
        self._host: tuple[int, int] | None = None
        self._cgroup: tuple[float, float] | None = None  # (cpu seconds used, monotonic time)

    def sample(self) -> float | None:
        readings = [spare for spare in (self._host_spare(), self._cgroup_spare()) if spare is not None]
        return min(readings) if readings else None

    def _host_spare(self) -> float | None:
        now = host_ticks(self.proc_stat, self.cpus)
        before, self._host = self._host, now
        if now is None or before is None or now[1] <= before[1]:
            return None
        return len(self.cpus) * (now[0] - before[0]) / (now[1] - before[1])

    def _cgroup_spare(self) -> float | None:
        if self.limit is None:
            return None
        cores, usage = self.limit
        used = cgroup_cpu_seconds(usage)
        now = (used, self.clock()) if used is not None else None
        before, self._cgroup = self._cgroup, now
        if now is None or before is None or now[1] <= before[1]:
            return None
        return max(0.0, cores - (now[0] - before[0]) / (now[1] - before[1]))
