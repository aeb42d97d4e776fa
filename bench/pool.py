"""``python -m bench.pool``: the store's connection pool beside asyncpg's, on PostgreSQL.

What a switch to ``asyncpg.create_pool`` would gain or cost, measured in one run:

- overhead: many tasks (64 by default) share at most 30 connections and each runs
  operations one after another: ``SELECT 1``, or nothing at all (taking and giving back
  a connection only).  The store's pool (``PostgresConnections.run``: deadline,
  attempt, retry bookkeeping included) is timed beside asyncpg's pool with its default
  reset on release (``Connection.reset()``: one query per release) and with a reset
  that does nothing.  The rounds are interleaved and the median is reported, as
  microseconds per operation (wall clock, and this process's CPU) and as ratios to
  the store's pool.
- a fault: a host that accepts TCP connections and never answers (a hung server, a
  half-open path), alone and as the first of two hosts before a working one.  How long
  a call with a 3 s deadline takes, and whether it got through.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from ordering.backends.postgresql import PostgresConnections
from ordering.exceptions import StoreUnavailable
from ordering.hosts import connect_in_order
from ordering.urls import asyncpg_dsn, asyncpg_dsns, resolve_url

from .databases import admin_url

APPLICATION = "ordering-bench-pool"
MAX_CONNECTIONS = 30

#: One task's loop of operations on a pool: (operations) -> None.
Worker = Callable[[int], Awaitable[None]]


async def _nothing(connection: Any) -> None:
    return None


async def _select_one(connection: Any) -> None:
    await connection.fetchval("SELECT 1", timeout=10)


def _ours(connections: PostgresConnections, statement: bool) -> Worker:
    operation = _select_one if statement else _nothing

    async def work(operations: int) -> None:
        for _ in range(operations):
            await connections.run(operation)

    return work


def _asyncpg(pool: asyncpg.Pool, statement: bool) -> Worker:
    async def work(operations: int) -> None:
        for _ in range(operations):
            async with pool.acquire(timeout=10) as connection:
                if statement:
                    await connection.fetchval("SELECT 1", timeout=10)

    return work


async def _no_reset(connection: Any) -> None:
    return None


async def _timed(work: Worker, tasks: int, operations: int) -> tuple[float, float]:
    """Microseconds per operation with ``tasks`` tasks at once: wall clock, and this
    process's CPU (user and system; steadier than the wall clock on a shared machine)."""
    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(work(operations) for _ in range(tasks)))
    count = tasks * operations
    return (time.perf_counter() - start) / count * 1e6, (time.process_time() - cpu) / count * 1e6


async def _overhead(url: str, tasks: int, operations: int, rounds: int) -> None:
    ours = PostgresConnections(url, "public", max_connections=MAX_CONNECTIONS)
    settings = {"application_name": APPLICATION, "jit": "off"}
    pools = {
        reset: await asyncpg.create_pool(
            asyncpg_dsn(url),
            min_size=0,
            max_size=MAX_CONNECTIONS,
            max_inactive_connection_lifetime=60,
            reset=None if reset == "default reset" else _no_reset,
            server_settings=settings,
        )
        for reset in ("default reset", "no reset")
    }
    try:
        for statement in (True, False):
            kinds: dict[str, Worker] = {"store's pool": _ours(ours, statement)}
            for reset, pool in pools.items():
                kinds[f"asyncpg pool, {reset}"] = _asyncpg(pool, statement)
            for work in kinds.values():  # warm up: every connection opened
                await _timed(work, tasks, 5)
            walls: dict[str, list[float]] = {kind: [] for kind in kinds}
            cpus: dict[str, list[float]] = {kind: [] for kind in kinds}
            for _ in range(rounds):
                for kind, work in kinds.items():
                    wall, cpu = await _timed(work, tasks, operations)
                    walls[kind].append(wall)
                    cpus[kind].append(cpu)
            what = "SELECT 1" if statement else "no statement (take and give back)"
            print(f"\n{what}, {tasks} tasks, {MAX_CONNECTIONS} connections, median of {rounds}")
            print(f"  {'':32} {'wall us/op':>10} {'ratio':>6} {'CPU us/op':>10} {'ratio':>6}")
            wall_base = statistics.median(walls["store's pool"])
            cpu_base = statistics.median(cpus["store's pool"])
            for kind in kinds:
                wall, cpu = statistics.median(walls[kind]), statistics.median(cpus[kind])
                print(
                    f"  {kind:32} {wall:10.1f} {wall / wall_base:6.2f} "
                    f"{cpu:10.1f} {cpu / cpu_base:6.2f}"
                )
    finally:
        await ours.close_idle()
        for pool in pools.values():
            await pool.close()


def _silent_host() -> socket.socket:
    """A listening socket that is never accepted from: the kernel completes the TCP
    handshake, and the client then waits for a server that never speaks."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener


async def _faults(url: str, deadline: float) -> None:
    parsed = make_url(url)
    real = f"{parsed.host or '127.0.0.1'}:{parsed.port or 5432}"
    user = parsed.username or "postgres"
    database = parsed.database or "postgres"
    with _silent_host() as silent:
        hung = f"127.0.0.1:{silent.getsockname()[1]}"
        cases = {
            "one host that never answers": f"postgresql+asyncpg://{user}@{hung}/{database}",
            "that host first, a working one second": (
                f"postgresql+asyncpg://{user}@{hung},{real}/{database}"
                "?target_session_attrs=read-write"
            ),
        }
        print(f"\nA call with a deadline of {deadline:g} s")
        for case, case_url in cases.items():
            checked = resolve_url(case_url)
            print(f"  {case}:")
            print(
                f"    store's pool:                   {await _ours_under_fault(checked, deadline)}"
            )
            for connect, name in ((None, "its own connect"), (_host_by_host, "host by host")):
                figure = await _asyncpg_under_fault(checked, deadline, connect)
                print(f"    asyncpg pool, {name + ':':17} {figure}")


async def _ours_under_fault(url: str, deadline: float) -> str:
    connections = PostgresConnections(url, "public", deadline=deadline)
    start = time.perf_counter()
    try:
        await connections.run(_select_one)
        outcome = "answered"
    except StoreUnavailable as exc:
        outcome = f"StoreUnavailable ({str(exc).rsplit(': ', 1)[-1]})"
    finally:
        await connections.close_idle()
    return f"{outcome} after {time.perf_counter() - start:.2f} s"


def _host_by_host(url: str, seconds: float) -> Callable[..., Awaitable[asyncpg.Connection]]:
    """asyncpg's ``connect=`` hook with the store's multi-host connect: each host gets
    its share of an attempt's time (``seconds``)."""

    async def connect(*_args: Any, **options: Any) -> asyncpg.Connection:
        options.pop("loop", None)
        return await connect_in_order(asyncpg_dsns(url), seconds, **options)

    return connect


async def _asyncpg_under_fault(
    url: str, deadline: float, connect: Callable[[str, float], Any] | None
) -> str:
    start = time.perf_counter()
    hook = None if connect is None else connect(url, deadline / 3)
    pool = await asyncpg.create_pool(asyncpg_dsn(url), min_size=0, connect=hook)
    try:
        async with pool.acquire(timeout=deadline) as connection:
            await connection.fetchval("SELECT 1", timeout=deadline)
        outcome = "answered"
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        outcome = f"{type(exc).__name__}"
    finally:
        pool.terminate()
    return f"{outcome} after {time.perf_counter() - start:.2f} s"


async def _run(url: str, tasks: int, operations: int, rounds: int, deadline: float) -> None:
    await _overhead(url, tasks, operations, rounds)
    await _faults(url, deadline)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__)
    parser.add_argument("--pg-url", help="PostgreSQL server (default $ORDERING_TEST_POSTGRES_URL)")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--operations", type=int, default=100, help="per task and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--deadline", type=float, default=3.0)
    args = parser.parse_args()
    url = admin_url(args.pg_url)
    logging.getLogger("ordering").setLevel(logging.ERROR)  # the retries' warnings
    asyncio.run(_run(url, args.tasks, args.operations, args.rounds, args.deadline))


if __name__ == "__main__":
    main()
