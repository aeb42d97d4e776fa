"""``python -m bench.floor``: what two PostgreSQL round trips cost without this package.

Calls the hot path's two functions (``begin_event_v1`` and ``complete_event_v1``) on bare
asyncpg, one event at a time, and reports per event the client's CPU (user and system,
from getrusage) and the serving backend's CPU (from /proc, so only with the server on
this machine); beside them a single durable ``INSERT ... ON CONFLICT`` and ``SELECT 1``.
These are the floors the package's own figures (``python -m bench``) sit on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from ordering.migrate import upgrade

from .databases import admin_url, asyncpg_connect, postgres_database

BEGIN = "SELECT * FROM begin_event_v1($1, $2, $3, $4, $5, $6, $7, $8)"
COMPLETE = "SELECT * FROM complete_event_v1($1, $2, $3, $4, $5, $6, $7)"
UPSERT = (
    "INSERT INTO seen_events (scope, event_id, seen_at) VALUES ($1, $2, $3) "
    "ON CONFLICT (scope, event_id) DO UPDATE SET seen_at = excluded.seen_at"
)


def _backend_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(
    connection: Any, pid: int, events: int, step: Callable[[int], Awaitable[None]]
) -> str:
    before, server = resource.getrusage(resource.RUSAGE_SELF), _backend_cpu(pid)
    start = time.perf_counter()
    for i in range(events):
        await step(i)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    user = (after.ru_utime - before.ru_utime) / events * 1e6
    system = (after.ru_stime - before.ru_stime) / events * 1e6
    backend = (_backend_cpu(pid) - server) / events * 1e6
    return (
        f"{events / wall:8,.0f}/s | client user {user:4.0f} µs + system {system:4.0f} µs | "
        f"backend {backend:4.0f} µs"
    )


async def _run(url: str, events: int) -> None:
    connection = await asyncpg_connect(url)
    try:
        await connection.execute("SET search_path TO ordering; SET jit TO off")
        pid = await connection.fetchval("SELECT pg_backend_pid()")
        now = datetime.now(UTC)
        ids = [uuid.uuid4() for _ in range(events)]
        later, earlier = now + timedelta(minutes=1), now - timedelta(minutes=30)

        async def event(i: int) -> None:
            follows = ids[i - 1] if i else None
            await connection.fetch(BEGIN, "floor", ids[i], follows, "o", now, later, earlier, True)
            await connection.fetch(COMPLETE, "floor", ids[i], "o", now, "c", later, True)

        async def upsert(i: int) -> None:
            await connection.execute(UPSERT, "floor-upsert", ids[i], now)

        async def select_one(_: int) -> None:
            await connection.fetchval("SELECT 1")

        for label, step in (
            ("begin + complete, bare asyncpg (per event)", event),
            ("one durable INSERT ... ON CONFLICT", upsert),
            ("SELECT 1", select_one),
        ):
            print(f"{label:44} {await _measure(connection, pid, events, step)}")
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--pg-url", help="PostgreSQL server to create a scratch database on")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args()
    with postgres_database(admin_url(args.pg_url)) as url:
        upgrade(url)
        if args.uvloop:
            import uvloop

            uvloop.run(_run(url, args.events))
        else:
            asyncio.run(_run(url, args.events))


if __name__ == "__main__":
    main()
