"""CPU time per event: the bench process (all its threads: the ordering, SQLAlchemy, the
drivers, aiosqlite's thread and SQLite itself) and, on PostgreSQL, the server backends
serving the bench database.  Wall time minus both is time nobody computed: waiting for
a WAL flush, for the scheduler (two cores shared by client and server), for locks.

CPU time, unlike wall time, hardly changes when other work shares the machine, so
these figures are the steadier ones on a busy machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .databases import asyncpg_connect

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def process_cpu_s() -> float:
    return time.process_time()


def _backend_cpu_s(pid: int) -> float | None:
    """utime + stime of a process on this machine (a server backend, a worker), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command name: state is field 3, utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) * _TICK_S


@dataclass
class ServerCpu:
    """CPU of the PostgreSQL backends connected to one database, when on this machine."""

    url: str
    readable: bool = True

    async def snapshot(self) -> dict[int, float]:
        connection = await asyncpg_connect(self.url)
        try:
            rows = await connection.fetch(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await connection.close()
        found: dict[int, float] = {}
        for row in rows:
            cpu = _backend_cpu_s(int(row["pid"]))
            if cpu is None:
                self.readable = False  # the server runs elsewhere (or as another user)
            else:
                found[int(row["pid"])] = cpu
        return found

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        """CPU seconds between two snapshots; a backend that started meanwhile counts whole."""
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds of some processes, of the whole machine busy, and of it idle; the
    difference of two samples is what was spent between them."""

    processes: float
    busy: float
    idle: float

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(
            self.processes - other.processes, self.busy - other.busy, self.idle - other.idle
        )

    @property
    def rest(self) -> float:
        """The machine's busy time not spent by the processes: the database server,
        the process sampling, anything else running."""
        return max(0.0, self.busy - self.processes)

    @property
    def idle_share(self) -> float:
        total = self.busy + self.idle
        return self.idle / total if total else 0.0


def cpu_sample(pids: Iterable[int]) -> CpuSample:
    """A sample of these processes (a process gone counts 0) and of the machine, from
    /proc/stat (short-lived processes, such as autovacuum's, included)."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return CpuSample(
        processes=sum(_backend_cpu_s(pid) or 0.0 for pid in pids),
        busy=(user + nice + system + irq + softirq + steal) * _TICK_S,
        idle=(idle + iowait) * _TICK_S,
    )
