"""The idle CPU the tap's sampler leaves to the calls (agent/dataplane/envoy/spare_cpu.py), read from files
laid out as the kernel lays out /proc/stat and the cgroup's CPU files, and how the sampler uses it."""

from pathlib import Path

from agent.dataplane.envoy.sampling import SamplingController
from agent.dataplane.envoy.spare_cpu import SpareCpu


def proc_stat(path: Path, per_cpu: dict[int, tuple[int, int, int, int]]) -> None:
    """Each CPU's (busy user ticks, idle ticks, iowait ticks, steal ticks); the aggregate line first, as in
    the real file (it must be ignored: only the CPUs this process may use count)."""
    lines = ["cpu  999999 0 0 999999 0 0 0 0 0 0"]
    for cpu, (user, idle, iowait, steal) in per_cpu.items():
        lines.append(f"cpu{cpu} {user} 0 0 {idle} {iowait} 0 0 {steal} 0 0")
    lines.append("intr 1 2 3")
    path.write_text("\n".join(lines) + "\n")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_idle_host_cpus_are_counted_in_cores_and_only_those_this_process_may_use(tmp_path):
    stat = tmp_path / "stat"
    proc_stat(stat, {0: (0, 0, 0, 0), 1: (0, 0, 0, 0), 2: (0, 0, 0, 0)})
    spare = SpareCpu(proc_stat=stat, cgroup_root=tmp_path / "no-cgroup", cpus={0, 1})
    assert spare.sample() is None  # one reading is not an interval
    # Over 100 ticks per CPU: cpu0 75 idle + 5 iowait, cpu1 all busy; cpu2 (not ours) all idle.
    proc_stat(stat, {0: (20, 75, 5, 0), 1: (100, 0, 0, 0), 2: (0, 100, 0, 0)})
    assert spare.sample() == 2 * 80 / 200


def test_time_stolen_by_the_hypervisor_is_not_spare(tmp_path):
    stat = tmp_path / "stat"
    proc_stat(stat, {0: (0, 0, 0, 0)})
    spare = SpareCpu(proc_stat=stat, cgroup_root=tmp_path, cpus={0})
    spare.sample()
    proc_stat(stat, {0: (10, 40, 0, 50)})
    assert spare.sample() == 0.4


def test_a_container_at_its_cgroup_v2_limit_has_no_spare_cpu_however_idle_the_host(tmp_path):
    stat, cgroup, clock = tmp_path / "stat", tmp_path / "cgroup", Clock()
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("150000 100000\n")  # a limit of 1.5 cores
    (cgroup / "cpu.stat").write_text("usage_usec 5000000\nuser_usec 4000000\nsystem_usec 1000000\n")
    proc_stat(stat, {0: (0, 0, 0, 0), 1: (0, 0, 0, 0)})
    spare = SpareCpu(proc_stat=stat, cgroup_root=cgroup, cpus={0, 1}, clock=clock)
    assert spare.limit == (1.5, cgroup / "cpu.stat")
    spare.sample()
    clock.now += 2.0
    proc_stat(stat, {0: (0, 100, 0, 0), 1: (0, 100, 0, 0)})  # the host: both CPUs idle
    (cgroup / "cpu.stat").write_text("usage_usec 7000000\n")  # the container: 1 core over 2 s
    assert spare.sample() == 0.5
    clock.now += 1.0
    proc_stat(stat, {0: (0, 200, 0, 0), 1: (0, 200, 0, 0)})
    (cgroup / "cpu.stat").write_text("usage_usec 8600000\n")  # 1.6 cores: over the limit, none to spare
    assert spare.sample() == 0.0


def test_the_busier_reading_wins_and_a_cgroup_without_a_limit_is_not_read(tmp_path):
    stat, cgroup, clock = tmp_path / "stat", tmp_path / "cgroup", Clock()
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert SpareCpu(proc_stat=stat, cgroup_root=cgroup, cpus={0}).limit is None
    (cgroup / "cpu.max").write_text("400000 100000\n")
    (cgroup / "cpu.stat").write_text("usage_usec 0\n")
    proc_stat(stat, {0: (0, 0, 0, 0), 1: (0, 0, 0, 0)})
    spare = SpareCpu(proc_stat=stat, cgroup_root=cgroup, cpus={0, 1}, clock=clock)
    spare.sample()
    clock.now += 1.0
    proc_stat(stat, {0: (90, 10, 0, 0), 1: (90, 10, 0, 0)})  # the host: 0.2 cores idle
    (cgroup / "cpu.stat").write_text("usage_usec 1000000\n")  # the container: 3 of its 4 cores spare
    assert spare.sample() == 0.2


def test_a_cgroup_v1_quota_is_read_too(tmp_path):
    root, clock = tmp_path / "cgroup", Clock()
    (root / "cpu").mkdir(parents=True)
    (root / "cpuacct").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert SpareCpu(proc_stat=tmp_path / "none", cgroup_root=root, cpus={0}).limit is None
    (root / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (root / "cpuacct" / "cpuacct.usage").write_text("0\n")
    spare = SpareCpu(proc_stat=tmp_path / "none", cgroup_root=root, cpus={0}, clock=clock)
    assert spare.sample() is None
    clock.now += 0.5
    (root / "cpuacct" / "cpuacct.usage").write_text("250000000\n")  # 0.25 s over 0.5 s: half a core
    assert spare.sample() == 1.5


def test_with_nothing_to_read_there_is_no_spare_reading(tmp_path):
    spare = SpareCpu(proc_stat=tmp_path / "none", cgroup_root=tmp_path, cpus={0})
    spare.sample()
    assert spare.sample() is None


def test_on_a_machine_the_calls_keep_busy_the_share_falls_to_the_floor_within_its_budget():
    controller = SamplingController(budget_cores=1.0, headroom=0.8, reserve_cores=0.25, min_ratio=0.01)
    # The tap uses 0.3 cores, far under its 1-core budget, but nothing is idle: each interval cuts.
    ratio, ratios = 1.0, []
    for _ in range(3):
        cpu = 0.3 * ratio + 0.02  # the tap's cost follows the share; a little is fixed
        ratio = controller.next_ratio(ratio, cpu_cores=cpu, queue_load=0.0, spare_cores=0.0)
        ratios.append(ratio)
    assert ratios[0] < 0.6 and ratios[-1] == 0.01


def test_with_idle_cpu_around_it_the_share_climbs_back_and_holds_within_what_is_spare():
    controller = SamplingController(budget_cores=1.0, headroom=0.8, reserve_cores=0.25)
    ratio = 0.01
    for _ in range(12):
        cpu = 0.5 * ratio + 0.02
        spare = 1.0 - cpu  # the calls take a core of two; the tap the rest it uses
        ratio = controller.next_ratio(ratio, cpu_cores=cpu, queue_load=0.0, spare_cores=spare)
    assert ratio == 1.0  # at most 0.52 cores, under 0.8 x (1.0 - 0.25)
    # The calls grow to 1.6 cores: 0.4 left, less the reserve, less than the tap uses at 1.0.
    for _ in range(6):
        cpu = 0.5 * ratio + 0.02
        ratio = controller.next_ratio(ratio, cpu_cores=cpu, queue_load=0.0, spare_cores=max(0.0, 0.4 - cpu))
    assert 0.1 < ratio < 0.5
    assert 0.5 * ratio + 0.02 <= 0.4 - 0.25 + 0.05


def test_without_a_spare_reading_the_budget_alone_decides():
    controller = SamplingController(budget_cores=1.0, headroom=0.8, reserve_cores=0.25)
    assert controller.budget(0.3, None) == 1.0
    assert controller.next_ratio(0.5, cpu_cores=0.3, queue_load=0.0, spare_cores=None) == 1.0
    assert abs(controller.budget(0.3, 0.1) - 0.15) < 1e-9
