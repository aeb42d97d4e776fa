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
from dataclasses import dataclass
from pathlib import Path

from .databases import asyncpg_connect

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def process_cpu_s() -> float:
    return time.process_time()


def _backend_cpu_s(pid: int) -> float | None:
    """utime + stime of a server process (same machine), from /proc."""
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
