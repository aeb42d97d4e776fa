"""The database's own limits, measured without the store: what one durable single-row
commit and one ``SELECT 1`` cost on the same machine, in the same run.

PostgreSQL: plain asyncpg on the bench database, autocommit INSERTs into a regular
table (a TEMP table would be cheating: its writes skip the WAL, so its commit never
waits for a flush).  SQLite: aiosqlite on a scratch file beside the store's, with the
store's own tuning (WAL, synchronous=NORMAL).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import aiosqlite

from .databases import asyncpg_connect
from .results import Limits
from .workloads import percentile

WARMUP = 50


def _limits(dialect: str, how: str, inserts_ns: int, samples: int, select_ns: list[int]) -> Limits:
    per_insert_s = inserts_ns / 1e9 / samples
    return Limits(
        dialect=dialect,
        how=how,
        insert_commit_per_s=1 / per_insert_s,
        insert_commit_us=per_insert_s * 1e6,
        select1_p50_us=percentile(select_ns, 0.5) * 1000,
    )


async def postgres_limits(url: str, samples: int) -> Limits:
    connection = await asyncpg_connect(url)
    clock = time.perf_counter_ns
    try:
        await connection.execute(
            "CREATE TABLE bench_scratch (id bigint PRIMARY KEY, note text NOT NULL)"
        )
        insert = "INSERT INTO bench_scratch (id, note) VALUES ($1, $2)"
        for i in range(WARMUP):
            await connection.execute(insert, -1 - i, "warm")
        started = clock()
        for i in range(samples):
            await connection.execute(insert, i, "autocommit")
        autocommit_ns = clock() - started
        started = clock()
        for i in range(samples):
            async with connection.transaction():
                await connection.execute(insert, samples + i, "begin-commit")
        transaction_ns = clock() - started
        select_ns: list[int] = []
        for _ in range(WARMUP):
            await connection.fetchval("SELECT 1")
        for _ in range(samples):
            before = clock()
            await connection.fetchval("SELECT 1")
            select_ns.append(clock() - before)
        await connection.execute("DROP TABLE bench_scratch")
        version = str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()
    limits = _limits(
        "postgresql",
        "asyncpg, autocommit single-row INSERT into a regular table; SELECT 1 via fetchval",
        autocommit_ns,
        samples,
        select_ns,
    )
    limits.insert_in_transaction_per_s = samples / (transaction_ns / 1e9)
    limits.server_version = version
    return limits


async def sqlite_limits(directory: Path, samples: int) -> Limits:
    path = directory / "limits.db"
    clock = time.perf_counter_ns
    async with aiosqlite.connect(path) as connection:
        await connection.execute("PRAGMA journal_mode=WAL")
        await connection.execute("PRAGMA synchronous=NORMAL")
        await connection.execute(
            "CREATE TABLE bench_scratch (id INTEGER PRIMARY KEY, note TEXT NOT NULL)"
        )
        await connection.commit()
        insert = "INSERT INTO bench_scratch (id, note) VALUES (?, ?)"
        for i in range(WARMUP):
            await connection.execute(insert, (-1 - i, "warm"))
            await connection.commit()
        started = clock()
        for i in range(samples):
            await connection.execute(insert, (i, "commit"))
            await connection.commit()
        insert_ns = clock() - started
        select_ns: list[int] = []
        for _ in range(WARMUP):
            await connection.execute_fetchall("SELECT 1")
        for _ in range(samples):
            before = clock()
            await connection.execute_fetchall("SELECT 1")
            select_ns.append(clock() - before)
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    limits = _limits(
        "sqlite",
        "aiosqlite, WAL + synchronous=NORMAL, INSERT then COMMIT (two thread hops); "
        "SELECT 1 via execute_fetchall (one hop)",
        insert_ns,
        samples,
        select_ns,
    )
    limits.server_version = sqlite3.sqlite_version
    return limits
