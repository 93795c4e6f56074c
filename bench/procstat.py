"""What the kernel knows about a server's processes: CPU time and resident memory from /proc.

Servers here are process trees (the tensorps supervisor forks its workers), so every figure is summed
over a root process and its live descendants.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def tree(root: int) -> list[int]:
    """`root` and its live descendants (children are listed per thread, so every thread is asked)."""
    found = [root]
    index = 0
    while index < len(found):
        pid = found[index]
        index += 1
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            except FileNotFoundError:
                continue
            found.extend(int(child) for child in children if int(child) not in found)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a whole process (all threads), from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS


def tree_cpu_seconds(root: int) -> float:
    return sum(cpu_seconds(pid) for pid in tree(root))


@dataclass(frozen=True)
class Memory:
    """Resident memory in bytes, summed over a process tree."""

    rss: int  # VmRSS now
    hwm: int  # VmHWM: each process's peak RSS
    shmem: int  # RssShmem now: the part of rss that is shared memory (tmpfs, /dev/shm mappings)


def _status_kib(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def tree_memory(root: int) -> Memory:
    stats = [_status_kib(pid) for pid in tree(root)]
    return Memory(
        rss=sum(s.get("VmRSS", 0) for s in stats),
        hwm=sum(s.get("VmHWM", 0) for s in stats),
        shmem=sum(s.get("RssShmem", 0) for s in stats),
    )


def directory_bytes(path: str) -> int:
    """Bytes a directory's files occupy (allocated blocks: what a tmpfs really holds)."""
    total = 0
    for entry in Path(path).rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # removed while we walked
            total += entry.lstat().st_blocks * 512
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent in processes since boot, plus steal (time the hypervisor gave to others).

    Interrupt time is left out: much of it is our own loopback traffic, charged to no process.
    """
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields
    return (user + nice + system + steal) / _TICKS


class ForeignLoad:
    """How much CPU the rest of the machine used while we measured: busy time minus our process tree's."""

    def __init__(self) -> None:
        self._machine = machine_busy_seconds()
        self._ours = tree_cpu_seconds(os.getpid())
        self._wall = time.monotonic()

    def fraction(self) -> float:
        """Foreign CPU seconds per second of wall time per CPU (0: a quiet machine, 1: all CPUs busy)."""
        machine = machine_busy_seconds() - self._machine
        ours = tree_cpu_seconds(os.getpid()) - self._ours
        elapsed = (time.monotonic() - self._wall) * (os.cpu_count() or 1)
        return max(0.0, machine - ours) / elapsed if elapsed > 0 else 0.0
