"""CPU time of processes from /proc: what the benchmarks measure other processes (a coordinator, a worker
daemon and its executors, a server) by."""

from __future__ import annotations

import os
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Settled: past the coordinator's next log checkpoint after a job (checkpointer.CHECKPOINT_EVERY_S, 3 s), so
# that the idle figure takes in none of the job's work.
IDLE_S, SETTLE_S = 5.0, 4.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def minor_faults(pid: int) -> int:
    """Page faults served without I/O (a new page zeroed, most of them): each costs the kernel a few us."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def run_seconds(pid: int) -> float:
    """The CPU time of a live process's threads, to the nanosecond (/proc/PID/task/*/schedstat): the
    coordinator's per-row figures are differences of a few tens of ms, which /proc/PID/stat's 10 ms ticks
    blur. Threads that ended meanwhile are missed: the coordinator's live as long as it does."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except OSError:
            continue  # ended meanwhile
    return total / 1e9


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process and its live descendants (a worker daemon and its executors), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue  # ended meanwhile
        todo.extend(children.get(pid, ()))
    return total


def idle_cpu_per_s(pid: int, seconds: float = IDLE_S) -> float:
    """A process's CPU per second while no job runs (heartbeats, the event loop, the checkpointer), once the
    last job's after-work (its log checkpoint) is done."""
    time.sleep(SETTLE_S)
    before = run_seconds(pid)
    time.sleep(seconds)
    return (run_seconds(pid) - before) / seconds
