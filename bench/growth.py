"""Growth: is the hot path as fast on big tables as on empty ones, and can expired rows
be pruned while a worker goes on?

1. In-order on an almost empty database (the baseline p50, same process and engine).
2. Preload, in bulk and in the scope the next run uses, SIZE live seen rows and
   SIZE/10 waiting followers (rows are made by the database itself: generate_series
   on PostgreSQL, a recursive CTE on SQLite), then ANALYZE as autovacuum would.
3. In-order again: its p50 against the baseline (target: within 1.3x).
4. Preload SIZE expired seen rows; run the store's prune in another process while
   this one keeps delivering in-order events; report both.

The resident memory of this process is taken before, after the grown run and after
the prune: it should not grow with the tables.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, Integer, String, TextClause, bindparam, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ordering import SEEN_EXPIRATION, CausalOrdering, EventArrivedEarly, ReceivedEvent, dispose
from ordering.migrate import engine_for

from .memory import maxrss_kib, rss_kib
from .results import Growth
from .sql import run_workload, warm_up
from .workloads import Consumer, Timing, deliver, make_specs, materialize, percentile

BATCH = 200_000
#: A prune that takes longer than this is reported as a failure.
WORK_DURING_PRUNE_MAX_S = 3600.0

#: A follower's JSON as the store keeps it; the preloaded followers' leaders never
#: come, so only its size matters.
FOLLOWER_JSON = (
    '{"occurred": "2026-01-01T00:00:00Z", "event": "bench.preloaded", '
    '"resource": {"prefect.resource.id": "bench.resource.preloaded"}, "related": [], '
    '"payload": {}, "id": "00000000-0000-0000-0000-000000000000", '
    '"follows": "00000000-0000-0000-0000-000000000001", "received": "2026-01-01T00:00:00Z"}'
)

_NEW_ID = {"postgresql": "gen_random_uuid()", "sqlite": "lower(hex(randomblob(16)))"}
_JSON = {"postgresql": "CAST(:event AS JSONB)", "sqlite": ":event"}


def bulk_engine(url: str) -> AsyncEngine:
    """The bench's own engine for the bulk writes (the store has none to lend); in
    AUTOCOMMIT, so that each INSERT ... SELECT stays written."""
    return engine_for(url, isolation_level="AUTOCOMMIT")


def _time_type(dialect: str) -> Any:
    """Times as the store keeps them: timestamptz on PostgreSQL; on SQLite naive UTC
    text of fixed width (``2026-01-01 00:00:00.000000``), so text order is time order."""
    return String() if dialect == "sqlite" else DateTime(timezone=True)


def _time(dialect: str, at: datetime) -> Any:
    if dialect == "sqlite":
        return at.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    return at


async def _table(engine: AsyncEngine, name: str) -> str:
    """The table's name: in the ``ordering`` schema on PostgreSQL where it exists,
    else with the ``ordering_`` prefix."""
    if engine.dialect.name != "postgresql":
        return f"ordering_{name}"
    async with engine.connect() as connection:
        found = await connection.scalar(text(f"SELECT to_regclass('ordering.{name}') IS NOT NULL"))
    return f"ordering.{name}" if found else f"ordering_{name}"


def _preload_sql(dialect: str, table: str, name: str) -> TextClause:
    """One INSERT ... SELECT that makes ``:n`` rows in the database itself."""
    new_id = _NEW_ID[dialect]
    if table == "seen":
        target = f"{name} (scope, event_id, seen_at)"
        values = f":scope, {new_id}, :at"
    else:
        target = f"{name} (scope, follower_id, leader_id, occurred, received, event)"
        values = f":scope, {new_id}, {new_id}, :at, :at, {_JSON[dialect]}"
    if dialect == "postgresql":
        sql = f"INSERT INTO {target} SELECT {values} FROM generate_series(1, :n)"
    else:
        sql = (
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :n) "
            f"INSERT INTO {target} SELECT {values} FROM n"
        )
    return text(sql).bindparams(
        bindparam("scope", type_=String()),
        bindparam("at", type_=_time_type(dialect)),
        bindparam("n", type_=Integer()),
    )


async def preload(engine: AsyncEngine, scope: str, table: str, rows: int, at: datetime) -> None:
    dialect = engine.dialect.name
    name = await _table(engine, "seen_events" if table == "seen" else "waiting_followers")
    statement = _preload_sql(dialect, table, name)
    done = 0
    async with engine.connect() as connection:
        while done < rows:
            batch = min(BATCH, rows - done)
            params: dict[str, Any] = {"scope": scope, "at": _time(dialect, at), "n": batch}
            if table != "seen":
                params["event"] = FOLLOWER_JSON
            await connection.execute(statement, params)
            done += batch
        await connection.exec_driver_sql("ANALYZE")


async def _grow(
    url: str, dialect: str, size: int, events: int, seed: int, empty_p50: float | None
) -> Growth:
    await warm_up(url, seed)
    baseline = await run_workload(url, dialect, "in-order", events, seed)
    rss_before = rss_kib()
    engine = bulk_engine(url)
    scope = f"bench-growth-{uuid.uuid4().hex[:10]}"
    try:
        started = time.perf_counter()
        now = datetime.now(UTC)
        await preload(engine, scope, "seen", size, now)
        await preload(engine, scope, "followers", size // 10, now)
        preload_s = time.perf_counter() - started
    finally:
        await engine.dispose()
    grown = await run_workload(url, dialect, "in-order", events, seed, scope=scope)
    return Growth(
        dialect=dialect,
        size=size,
        seen_rows=size,
        waiting_rows=size // 10,
        preload_s=preload_s,
        empty_p50_ms=baseline.p50_ms,
        grown_p50_ms=grown.p50_ms,
        grown_p99_ms=grown.p99_ms,
        p50_ratio=grown.p50_ms / baseline.p50_ms,
        grown_events_per_s=grown.events_per_s,
        rss_kib_before=rss_before,
        rss_kib_after_preload_run=rss_kib(),
        maxrss_kib=maxrss_kib(),
        main_run_empty_p50_ms=empty_p50,
    )


# -- prune while a worker goes on ---------------------------------------------------


def _prune_process(url: str, out: Any) -> None:
    """Run ``ordering.admin.prune`` as an operator's cron job would, timing each batch."""
    batch_ends: list[int] = []

    def progress(done: int, total: int) -> None:
        batch_ends.append(time.monotonic_ns())

    try:
        from ordering.admin import prune
    except ImportError as exc:  # written in parallel with this bench
        out.put(("missing", f"ordering.admin.prune is not importable: {exc}"))
        return
    started = time.monotonic_ns()
    try:
        outcome = asyncio.run(prune(url, progress=progress))
    except Exception as exc:
        out.put(("failed", repr(exc)))
        return
    finished = time.monotonic_ns()
    gaps = [b - a for a, b in zip([started, *batch_ends], batch_ends, strict=False)]
    out.put(
        (
            "ok",
            {
                "started_ns": started,
                "finished_ns": finished,
                "seconds": (finished - started) / 1e9,
                "deleted_seen": outcome.seen_events,
                "deleted_leases": outcome.leases,
                "batches": len(batch_ends),
                # the first gap includes counting the rows for the progress bar
                "longest_batch_ms": max(gaps[1:] or gaps or [0]) / 1e6,
                "median_batch_ms": sorted(gaps)[len(gaps) // 2] / 1e6 if gaps else 0.0,
            },
        )
    )


async def _count_seen(engine: AsyncEngine, before: datetime) -> int:
    dialect = engine.dialect.name
    name = await _table(engine, "seen_events")
    statement = text(f"SELECT count(*) FROM {name} WHERE seen_at < :before")
    statement = statement.bindparams(bindparam("before", type_=_time_type(dialect)))
    async with engine.connect() as connection:
        result = await connection.execute(statement, {"before": _time(dialect, before)})
        return int(result.scalar_one())


async def _work_until(url: str, out: Any, seed: int) -> tuple[Timing, tuple[str, Any]]:
    """Deliver in-order events in small batches until the pruner reports."""
    ordering = CausalOrdering(f"bench-during-prune-{uuid.uuid4().hex[:10]}", url=url)
    consumer = Consumer(lambda: ordering, EventArrivedEarly)
    latencies: list[int] = []
    starts: list[int] = []
    deadline = time.monotonic() + WORK_DURING_PRUNE_MAX_S
    while time.monotonic() < deadline:
        specs = make_specs("in-order", 100, seed)
        timing = await deliver(consumer, materialize(specs, ReceivedEvent))
        latencies += timing.latencies_ns
        starts += timing.starts_ns
        try:
            report: tuple[str, Any] = out.get_nowait()
        except queue.Empty:
            continue
        return Timing(sum(latencies) / 1e9, latencies, starts), report
    raise TimeoutError(f"prune did not finish within {WORK_DURING_PRUNE_MAX_S:.0f} s")


async def _prune_while_working(url: str, size: int, seed: int) -> tuple[dict[str, Any], str | None]:
    expired_at = datetime.now(UTC) - SEEN_EXPIRATION - timedelta(hours=1)
    cutoff = datetime.now(UTC) - SEEN_EXPIRATION
    engine = bulk_engine(url)
    scope = f"bench-prune-{uuid.uuid4().hex[:10]}"
    try:
        await preload(engine, scope, "seen", size, expired_at)
        expired_before = await _count_seen(engine, cutoff)
        context = multiprocessing.get_context("spawn")
        out = context.Queue()
        pruner = context.Process(target=_prune_process, args=(url, out), daemon=True)
        pruner.start()
        try:
            timing, (status, outcome) = await _work_until(url, out, seed)
        finally:
            pruner.join(timeout=60)
            if pruner.is_alive():
                pruner.terminate()
        expired_after = await _count_seen(engine, cutoff)
    finally:
        await engine.dispose()
    result: dict[str, Any] = {"expired_rows_before": expired_before}
    if status != "ok":
        return result, f"prune not measured: {status}: {outcome}"
    during = [
        latency
        for latency, begun in zip(timing.latencies_ns, timing.starts_ns, strict=True)
        if outcome["started_ns"] <= begun <= outcome["finished_ns"]
    ]
    result.update(
        {
            "expired_rows_after": expired_after,
            "seconds": outcome["seconds"],
            "deleted_seen": outcome["deleted_seen"],
            "batches": outcome["batches"],
            "longest_batch_ms": outcome["longest_batch_ms"],
            "median_batch_ms": outcome["median_batch_ms"],
            "worker_events_during_prune": len(during),
            "worker_p50_ms": percentile(during, 0.5),
            "worker_p99_ms": percentile(during, 0.99),
        }
    )
    return result, None


async def _measure(
    url: str,
    dialect: str,
    size: int,
    events: int,
    seed: int,
    empty_p50: float | None,
    notes: list[str],
) -> Growth:
    try:
        growth = await _grow(url, dialect, size, events, seed, empty_p50)
        growth.prune, note = await _prune_while_working(url, size, seed)
        if note:
            notes.append(note)
        growth.rss_kib_after_prune = rss_kib()
        growth.maxrss_kib = maxrss_kib()
        return growth
    finally:
        await dispose()


def measure(
    url: str,
    dialect: str,
    size: int,
    events: int,
    seed: int,
    empty_p50: float | None,
    notes: list[str],
) -> Growth:
    return asyncio.run(_measure(url, dialect, size, events, seed, empty_p50, notes))
