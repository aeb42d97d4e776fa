"""Retention: do the store's own prunes keep the seen table small, and at what cost?

Two runs, each on a database of its own (made, migrated and dropped by the run; a
SQLite file in a temporary folder, or a fresh PostgreSQL database beside the one the
URL names):

``steady``
    A worker handles independent events at ``--rate`` per second through
    ``preceding_event_confirmed`` for ``--seconds``, with a short
    ``--seen-expiration``, nobody pruning by hand; ``--prune-interval 0`` turns the
    store's pruning off (as before it had any).  Prints, every ``--report`` seconds,
    the seen rows written so far and those still in the table, and at the end the
    share of the rows written that are left.

``ingest`` (PostgreSQL)
    Seen rows inserted straight into the table at ``--rate`` per second (a tick of
    ``rate/10`` rows every 100 ms, each row expiring ``--seen-expiration`` after it
    was written, as the store's completions write them), while the store's pruner
    runs at ``--prune-interval``; a probe makes one ``record_event_as_seen`` call per
    tick, the hot path's write.  Prints, per report interval: rows inserted and
    pruned, rows in the table, n_live_tup / n_dead_tup, the autovacuum and
    autoanalyze counts, the table's and its indexes' size, and the probe's p50 / p99,
    apart for the ticks that ran while a prune round did.

    python -m bench.retention steady --url sqlite --seconds 150 --rate 40
    python -m bench.retention ingest --url postgresql+asyncpg://postgres@127.0.0.1/test \\
        --rate 10000 --seconds 240 --prune-interval 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from ordering import CausalOrdering, ReceivedEvent, dispose, retention
from ordering.migrate import upgrade
from ordering.models import utc_now
from ordering.urls import asyncpg_dsn


@asynccontextmanager
async def own_database(url: str) -> AsyncIterator[str]:
    """A migrated database of this run's own, dropped afterwards."""
    if url == "sqlite" or url.startswith("sqlite"):
        with tempfile.TemporaryDirectory() as folder:
            own = f"sqlite+aiosqlite:///{Path(folder) / 'retention.db'}"
            await asyncio.to_thread(upgrade, own)
            yield own
        return
    name = f"bench_retention_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        own = make_url(url).set(database=name).render_as_string(hide_password=False)
        try:
            await asyncio.to_thread(upgrade, own)
            yield own
        finally:
            await dispose()
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def seen_rows(url: str) -> int:
    """Seen rows in the table, counted beside the store."""
    if url.startswith("sqlite"):
        path = make_url(url).database
        assert path is not None

        def count() -> int:
            with sqlite3.connect(path) as connection:
                return int(connection.execute(SQLITE_COUNT).fetchone()[0])

        return await asyncio.to_thread(count)
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return int(await connection.fetchval("SELECT count(*) FROM ordering.seen_events"))
    finally:
        await connection.close()


SQLITE_COUNT = "SELECT count(*) FROM ordering_seen_events"


# -- steady ---------------------------------------------------------------------------


async def steady(args: argparse.Namespace) -> None:
    async with own_database(args.url) as url:
        ordering = CausalOrdering(
            "bench.steady",
            url=url,
            seen_expiration=timedelta(seconds=args.seen_expiration),
            prune_interval=timedelta(seconds=args.prune_interval),
        )
        dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        print(
            f"steady on {dialect}: {args.rate:g} events/s for {args.seconds:g} s, "
            f"seen_expiration {args.seen_expiration:g} s, prune_interval "
            f"{args.prune_interval:g} s ({'off' if args.prune_interval == 0 else 'on'})"
        )
        print(f"{'t (s)':>6} {'written':>8} {'in table':>9}")
        loop = asyncio.get_running_loop()
        start = loop.time()
        written = 0
        next_report = args.report

        async def handled(_: ReceivedEvent, depth: int = 0) -> None:
            return None

        while (elapsed := loop.time() - start) < args.seconds:
            now = utc_now()
            event = ReceivedEvent(
                occurred=now,
                event="bench.steady",
                resource={"prefect.resource.id": "bench.resource"},
                id=uuid.uuid4(),
                received=now,
            )
            async with ordering.preceding_event_confirmed(handled, event):
                pass
            written += 1
            if elapsed >= next_report:
                print(f"{elapsed:6.0f} {written:8d} {await seen_rows(url):9d}", flush=True)
                next_report += args.report
            await asyncio.sleep(max(0.0, start + written / args.rate - loop.time()))
        left = await seen_rows(url)
        pruner = ordering.backend.pruner
        rounds = pruner.rounds if pruner else 0
        print(
            f"written {written}, left {left} ({100 * left / max(written, 1):.0f}%), "
            f"prune rounds {rounds}"
        )
        await dispose()


# -- ingest -----------------------------------------------------------------------------

TABLE_STATS = """
SELECT n_live_tup, n_dead_tup, autovacuum_count, autoanalyze_count,
       pg_table_size('seen_events'), pg_indexes_size('seen_events')
FROM pg_stat_user_tables WHERE relid = 'seen_events'::regclass
"""


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.1f}"


async def ingest(args: argparse.Namespace) -> None:
    async with own_database(args.url) as url:
        if url.startswith("sqlite"):
            raise SystemExit("ingest measures PostgreSQL: give a postgresql+asyncpg:// URL")
        pruned = {"seen_events": 0, "processing_leases": 0}

        def count(table: str, rows: int) -> None:
            pruned[table] += rows

        retention.on_pruned = count
        ordering = CausalOrdering(
            "bench.probe",
            url=url,
            seen_expiration=timedelta(seconds=args.seen_expiration),
            prune_interval=timedelta(seconds=args.prune_interval),
        )
        pruner = ordering.backend.pruner
        assert pruner is not None
        if args.batch:
            pruner.batch_size = args.batch
        writer = await asyncpg.connect(
            asyncpg_dsn(url), server_settings={"search_path": "ordering"}
        )
        stats = await asyncpg.connect(asyncpg_dsn(url), server_settings={"search_path": "ordering"})
        per_tick = max(1, round(args.rate / 10))
        insert = (
            "INSERT INTO seen_events (scope, event_id, seen_at, expires_at) "
            "SELECT 'bench.ingest', gen_random_uuid(), now(), now() + $2::interval "
            "FROM generate_series(1, $1)"
        )
        expiry = timedelta(seconds=args.seen_expiration)
        print(
            f"ingest on postgresql: {per_tick * 10:,} rows/s for {args.seconds:g} s, expiry "
            f"{args.seen_expiration:g} s, prune_interval {args.prune_interval:g} s, "
            f"batch {pruner.batch_size}"
        )
        print(
            f"{'t':>4} {'inserted':>9} {'pruned':>9} {'in table':>9} {'live_tup':>9} "
            f"{'dead_tup':>9} {'autovac':>7} {'autoanl':>7} {'table MB':>8} {'index MB':>8} "
            f"{'probe p50':>9} {'p99':>6} {'in-round p99':>12} {'late ticks':>10}"
        )
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        inserted = 0
        probe_quiet: list[float] = []
        probe_round: list[float] = []
        all_quiet: list[float] = []
        all_round: list[float] = []
        late = 0
        next_report = args.report
        while (elapsed := loop.time() - start) < args.seconds:
            await writer.execute(insert, per_tick, expiry)
            inserted += per_tick
            in_round = pruner._task is not None
            t0 = time.perf_counter()
            await ordering.record_event_as_seen(
                ReceivedEvent(
                    occurred=utc_now(),
                    event="bench.probe",
                    resource={"prefect.resource.id": "bench.probe"},
                    id=uuid.uuid4(),
                    received=utc_now(),
                )
            )
            spent = time.perf_counter() - t0
            (probe_round if in_round else probe_quiet).append(spent)
            tick += 1
            if elapsed >= next_report:
                live, dead, autovac, autoanl, table, index = await stats.fetchrow(TABLE_STATS)
                rows = await stats.fetchval("SELECT count(*) FROM seen_events")
                print(
                    f"{elapsed:4.0f} {inserted:9,} {pruned['seen_events']:9,} {rows:9,} "
                    f"{live:9,} {dead:9,} {autovac:7} {autoanl:7} {table / 2**20:8.1f} "
                    f"{index / 2**20:8.1f} {_ms(probe_quiet + probe_round, 0.5):>9} "
                    f"{_ms(probe_quiet + probe_round, 0.99):>6} {_ms(probe_round, 0.99):>12} "
                    f"{late:10}",
                    flush=True,
                )
                all_quiet += probe_quiet
                all_round += probe_round
                probe_quiet, probe_round = [], []
                next_report += args.report
            pause = start + tick / 10 - loop.time()
            if pause < 0:
                late += 1
            await asyncio.sleep(max(0.0, pause))
        rows = await stats.fetchval("SELECT count(*) FROM seen_events")
        print(
            f"inserted {inserted:,}, pruned {pruned['seen_events']:,}, left {rows:,} "
            f"(expected at most about rate x (expiry + interval) = "
            f"{per_tick * 10 * (args.seen_expiration + args.prune_interval):,.0f}); probe "
            f"p50/p99 outside rounds {_ms(all_quiet, 0.5)}/{_ms(all_quiet, 0.99)} ms "
            f"({len(all_quiet)}), during rounds {_ms(all_round, 0.5)}/{_ms(all_round, 0.99)} "
            f"ms ({len(all_round)}); mean insert tick late {late} of {tick}"
        )
        if all_quiet and all_round:
            print(
                f"probe mean outside/during rounds: {1000 * statistics.mean(all_quiet):.2f} / "
                f"{1000 * statistics.mean(all_round):.2f} ms"
            )
        await writer.close()
        await stats.close()
        retention.on_pruned = None
        await dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.retention", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run", choices=["steady", "ingest"])
    parser.add_argument("--url", default="sqlite", help="'sqlite', or a PostgreSQL URL")
    parser.add_argument("--rate", type=float, default=40.0, help="events (rows) per second")
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--seen-expiration", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--prune-interval", type=float, default=60.0, help="seconds; 0: the store never prunes"
    )
    parser.add_argument("--report", type=float, default=10.0, help="seconds between lines")
    parser.add_argument(
        "--batch", type=int, default=None, help="rows per delete (default: the store's)"
    )
    args = parser.parse_args()
    asyncio.run(steady(args) if args.run == "steady" else ingest(args))


if __name__ == "__main__":
    main()
