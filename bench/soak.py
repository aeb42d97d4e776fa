"""A long soak: worker processes at the top rate for minutes, the store pruning by itself.

Several worker processes share one database (a fresh PostgreSQL database, or one SQLite
file) and one scope.  Each runs consumer tasks that take events from a queue of its own
as fast as the store handles them: mostly independent events, some chains whose events
arrive shuffled (a follower before its leader parks and is released by the leader's
completion; one that finds its leader in flight waits to be woken), and a few followers
whose leader never comes, which the lost-follower sweep hands out once the lookback has
passed.  Seen rows expire after ``--seen-expiration`` and the store's pruner runs every
``--prune-interval``, so retention works many times over the run.

Per period (a minute unless ``--period`` says otherwise; the first ``--warm-up`` seconds
are a period of their own, shown but left out of the verdicts) the run prints and saves:
events/s, p50/p99 of one delivery (``preceding_event_confirmed`` from begin to complete,
released followers inside their leader's), the seen table's rows and size (SQLite: the
file's), dead tuples (PostgreSQL) or free pages (SQLite), the workers' resident memory,
and the seen rows the pruner deleted.  At the end it compares the last period with the
first, and checks that every event was handled once, no chain's event before its leader,
nothing left waiting.

    python -m bench.soak --dialect postgresql --workers 2 --tasks 64 --minutes 20
    python -m bench.soak --dialect sqlite --workers 1 --tasks 64 --minutes 20

Nothing reclaims what the pruner deletes on a PostgreSQL server with autovacuum off:
there ``--vacuum-every SECONDS`` has the soak VACUUM the store's tables, as autovacuum
would; the report names the server's setting either way.

Writes ``--out`` + ``.json``, ``.md`` and (with matplotlib, the ``bench`` extra) ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import multiprocessing
import os
import queue
import random
import sqlite3
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from ordering import (
    CausalOrdering,
    EventArrivedEarly,
    EventBeingProcessed,
    ReceivedEvent,
    dispose,
    retention,
)
from ordering.models import utc_now
from ordering.urls import with_prune_interval

from .cpu import CpuSample, cpu_sample
from .databases import admin_url, asyncpg_connect, postgres_database, sqlite_database
from .memory import rss_kib
from .sql import warm_up

SCOPE = "bench.soak"
INDEPENDENT, CHAINED, ORPHAN = "soak.independent", "soak.chained", "soak.orphan"
KINDS = (INDEPENDENT, CHAINED, ORPHAN)
#: Latencies are counted in buckets 2 % wide, so that a worker sends a small histogram
#: per period rather than every sample; percentiles are read to within 2 %.
_BUCKETS_PER_E = 1 / math.log(1.02)
#: How long the parent waits for the workers to be ready, and for a period's figures.
READY_TIMEOUT_S = 300.0
REPORT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Settings:
    """What every worker needs to know about the run."""

    url: str
    scope: str
    tasks: int
    chain_share: float
    chain_length: int
    orphan_share: float
    seen_expiration: float
    lookback: float
    sweep_interval: float
    seed: int


# -- the workers ----------------------------------------------------------------------


#: One chain event handled: (chain, position, when in monotonic ns, which Linux keeps
#: one clock for across processes, and whether the lookback had passed since it was
#: received).
Handling = tuple[str, int, int, bool]


@dataclass
class Tally:
    """One worker's counts for the period under way."""

    handled: Counter[str] = field(default_factory=Counter)
    latency_buckets: Counter[int] = field(default_factory=Counter)
    parked: int = 0
    #: Followers handed to the handler by their leader's completion.
    released: int = 0
    #: Followers handled in their own delivery: the leader was seen, or in flight and
    #: its completion woke them.
    followed_directly: int = 0
    busy: int = 0
    swept: int = 0
    pruned: int = 0
    #: Chain events handled: (chain, position, monotonic ns, past the lookback then).
    chained: list[Handling] = field(default_factory=list)

    def time(self, nanoseconds: int) -> None:
        self.latency_buckets[int(math.log(max(nanoseconds, 1)) * _BUCKETS_PER_E)] += 1


class Workload:
    """Makes one worker's events: independent ones, shuffled chains, orphans."""

    def __init__(self, settings: Settings, worker: int) -> None:
        self.settings = settings
        self.worker = worker
        self.rng = random.Random(settings.seed + worker)
        length = settings.chain_length
        # The chance that the next item is a chain, such that about chain_share of all
        # events belong to chains.
        share = settings.chain_share
        self.chain_chance = share / (length - share * (length - 1)) if share else 0.0
        self.generated: Counter[str] = Counter()
        self.chains = 0

    def _event(self, kind: str, follows: uuid.UUID | None, **payload: Any) -> ReceivedEvent:
        now = utc_now()
        return ReceivedEvent(
            occurred=now,
            event=kind,
            resource={"prefect.resource.id": f"bench.soak.{self.worker}"},
            payload=payload,
            follows=follows,
            received=now,
        )

    def next_events(self) -> list[ReceivedEvent]:
        draw = self.rng.random()
        if draw < self.settings.orphan_share:
            events = [self._event(ORPHAN, uuid.uuid4())]
        elif draw < self.settings.orphan_share + self.chain_chance:
            events = self._chain()
        else:
            events = [self._event(INDEPENDENT, None)]
        self.generated[events[0].event] += len(events)
        return events

    def _chain(self) -> list[ReceivedEvent]:
        key = f"{self.worker}.{self.chains}"
        self.chains += 1
        links: list[ReceivedEvent] = []
        for position in range(self.settings.chain_length):
            follows = links[-1].id if links else None
            links.append(self._event(CHAINED, follows, chain=key, position=position))
        self.rng.shuffle(links)
        return links


class ChainCheck:
    """Each chain's events must be handled after their leader, each once.  Fed the
    handlings of every worker in the order they happened (a follower parked by one
    worker may be handed out by another's sweep); a chain is forgotten once complete,
    so memory holds only the chains under way.

    A follower handled before its leader is no fault once the lookback has passed since
    it was received: the store then sends it on (too old to wait for) or the sweep hands
    it out as lost, as Prefect's interface specifies.  Those are counted apart."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.handled_positions: dict[str, set[int]] = {}
        self.violations = 0
        self.examples: list[str] = []
        self.past_lookback = 0

    def feed(self, handlings: Iterable[Handling]) -> None:
        for key, position, _, past_lookback in sorted(handlings, key=lambda h: h[2]):
            self._handled(key, position, past_lookback)

    def _handled(self, key: str, position: int, past_lookback: bool) -> None:
        done = self.handled_positions.setdefault(key, set())
        problem = None
        if position in done:
            problem = f"chain {key}: position {position} handled twice"
        elif position > 0 and position - 1 not in done:
            if past_lookback:
                self.past_lookback += 1
            else:
                problem = f"chain {key}: position {position} handled before {position - 1}"
        if problem is not None:
            self.violations += 1
            if len(self.examples) < 3:
                self.examples.append(problem)
        done.add(position)
        if len(done) == self.length:
            del self.handled_positions[key]


async def _soak(settings: Settings, worker: int, out: Any, go: Any, timeline: Any) -> None:
    await warm_up(settings.url, settings.seed)
    ordering = CausalOrdering(
        settings.scope,
        url=settings.url,
        seen_expiration=timedelta(seconds=settings.seen_expiration),
        preceding_event_lookback=timedelta(seconds=settings.lookback),
    )
    tally = Tally()
    lookback = timedelta(seconds=settings.lookback)
    workload = Workload(settings, worker)

    def count_pruned(table: str, rows: int) -> None:
        if table == "seen_events":
            tally.pruned += rows

    retention.on_pruned = count_pruned

    def record(event: ReceivedEvent) -> None:
        tally.handled[event.event] += 1
        if event.event == CHAINED:
            tally.chained.append(_handling(event, lookback))

    async def handler(event: ReceivedEvent, depth: int = 0) -> None:
        async with ordering.preceding_event_confirmed(handler, event, depth=depth):
            record(event)
            tally.released += 1

    async def deliver(event: ReceivedEvent) -> None:
        started = time.monotonic_ns()
        try:
            async with ordering.preceding_event_confirmed(handler, event):
                record(event)
                tally.followed_directly += event.event == CHAINED and event.follows is not None
        except EventArrivedEarly:
            tally.parked += 1
        except EventBeingProcessed:
            tally.busy += 1
        tally.time(time.monotonic_ns() - started)

    out.put(("ready", worker))
    if not await asyncio.to_thread(go.wait, READY_TIMEOUT_S):
        raise TimeoutError("the run never started")
    boundaries = list(timeline)
    end = boundaries[-1]
    inbox: asyncio.Queue[ReceivedEvent | None] = asyncio.Queue(maxsize=2 * settings.tasks)

    async def produce() -> None:
        await asyncio.sleep(max(0.0, boundaries[0] - time.monotonic()))
        while time.monotonic() < end:
            for event in workload.next_events():
                await inbox.put(event)
        for _ in range(settings.tasks):
            await inbox.put(None)

    async def consume() -> None:
        while (event := await inbox.get()) is not None:
            await deliver(event)

    async def sweep() -> None:
        while time.monotonic() < end:
            await asyncio.sleep(settings.sweep_interval)
            for lost in await ordering.get_lost_followers():
                tally.swept += 1
                await deliver(lost)

    async def report() -> None:
        nonlocal tally
        for index, boundary in enumerate(boundaries[1:]):
            await asyncio.sleep(max(0.0, boundary - time.monotonic()))
            done, tally = tally, Tally()
            out.put(("period", worker, index, done))

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(produce())
            group.create_task(sweep())
            group.create_task(report())
            for _ in range(settings.tasks):
                group.create_task(consume())
        out.put(
            (
                "done",
                worker,
                {
                    "generated": dict(workload.generated),
                    "handled_after_end": dict(tally.handled),
                    "busy_after_end": tally.busy,
                    "chained_after_end": tally.chained,
                },
            )
        )
    finally:
        retention.on_pruned = None
        await dispose()


def _handling(event: ReceivedEvent, lookback: timedelta) -> Handling:
    return (
        str(event.payload["chain"]),
        int(event.payload["position"]),
        time.monotonic_ns(),
        utc_now() - event.received >= lookback,
    )


def _worker(settings: Settings, worker: int, out: Any, go: Any, timeline: Any) -> None:
    asyncio.run(_soak(settings, worker, out, go, timeline))


# -- what the parent samples ----------------------------------------------------------


@dataclass
class Period:
    """One row of the table."""

    index: int
    label: str
    seconds: float
    events: int
    events_per_s: float
    p50_ms: float
    p99_ms: float
    seen_rows: int
    size_kib: int
    dead: int
    rss_sum_mib: float
    rss_max_mib: float
    #: CPU time per event handled: the workers' processes, and the rest of the
    #: machine (the database server, this process, anything else running), in µs;
    #: and the share of the machine's CPU time nobody used.
    cpu_workers_us: float
    cpu_rest_us: float
    idle_pct: float
    pruned: int
    parked: int
    released: int
    followed_directly: int
    swept: int
    busy: int
    waiting: int
    handled: dict[str, int] = field(default_factory=dict)
    #: SQLite: the database's pages and the WAL file's size; PostgreSQL: the seen
    #: table's vacuums so far, by autovacuum and by hand (``--vacuum-every``).
    extra: dict[str, int] = field(default_factory=dict)


def percentile_ms(buckets: Counter[int], fraction: float) -> float:
    total = sum(buckets.values())
    if not total:
        return math.nan
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for bucket in sorted(buckets):
        seen += buckets[bucket]
        if seen >= rank:
            return math.exp((bucket + 0.5) / _BUCKETS_PER_E) / 1e6
    return math.nan


PG_STATS = """
SELECT (SELECT count(*) FROM ordering.seen_events) AS rows,
       pg_total_relation_size('ordering.seen_events') AS size,
       s.n_dead_tup AS dead, s.autovacuum_count AS autovacuums, s.vacuum_count AS vacuums,
       (SELECT count(*) FROM ordering.waiting_followers WHERE scope = $1) AS waiting
FROM pg_stat_user_tables s WHERE s.relid = 'ordering.seen_events'::regclass
"""


async def _postgres_stats(url: str, scope: str) -> dict[str, int]:
    connection = await asyncpg_connect(url)
    try:
        row = await connection.fetchrow(PG_STATS, scope)
    finally:
        await connection.close()
    return {
        "rows": row["rows"],
        "size": row["size"],
        "dead": row["dead"],
        "waiting": row["waiting"],
        "autovacuums": row["autovacuums"],
        "vacuums": row["vacuums"],
    }


def _sqlite_stats(path: str, scope: str) -> dict[str, int]:
    connection = sqlite3.connect(path, timeout=10)
    try:

        def one(sql: str, *values: str) -> int:
            return int(connection.execute(sql, values).fetchone()[0])

        wal = Path(f"{path}-wal")
        return {
            "rows": one("SELECT count(*) FROM ordering_seen_events"),
            "size": Path(path).stat().st_size,
            "dead": one("PRAGMA freelist_count"),
            "waiting": one(
                "SELECT count(*) FROM ordering_waiting_followers WHERE scope = ?", scope
            ),
            "pages": one("PRAGMA page_count"),
            "wal_kib": wal.stat().st_size // 1024 if wal.exists() else 0,
        }
    finally:
        connection.close()


async def server_autovacuum(url: str) -> str:
    """The server's ``autovacuum`` setting (PostgreSQL), for the report."""
    connection = await asyncpg_connect(url)
    try:
        return str(await connection.fetchval("SHOW autovacuum"))
    finally:
        await connection.close()


async def vacuum_every(url: str, first: float, seconds: float) -> None:
    """VACUUM the store's tables at ``first`` (on ``time.monotonic``) and every
    ``seconds`` after, until cancelled: what autovacuum would do, for a server that has
    it turned off (``--vacuum-every``)."""
    connection = await asyncpg_connect(url)
    try:
        for due in itertools.count(first, seconds):
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await connection.execute(
                "VACUUM ordering.seen_events, ordering.processing_leases, "
                "ordering.waiting_followers"
            )
    finally:
        await connection.close()


async def database_stats(url: str, scope: str) -> dict[str, int]:
    """The seen table's rows and size, dead tuples (PostgreSQL) or free pages (SQLite),
    and the followers of ``scope`` still waiting."""
    if url.startswith("sqlite"):
        path = make_url(url).database
        assert path is not None
        return await asyncio.to_thread(_sqlite_stats, path, scope)
    return await _postgres_stats(url, scope)


# -- the run ------------------------------------------------------------------------


@dataclass
class Check:
    """A PASS/FAIL line of the verdict, with the figures behind it."""

    criterion: str
    passed: bool
    figures: str


@dataclass
class SoakResult:
    dialect: str
    workers: int
    tasks: int
    warm_up_s: float
    period_s: float
    seen_expiration_s: float
    prune_interval_s: float
    lookback_s: float
    #: PostgreSQL: the server's autovacuum setting, and the soak's own VACUUM interval
    #: standing in for it (0: none).
    autovacuum: str
    vacuum_every_s: float
    periods: list[Period]
    steadiness: list[Check]
    correctness: list[Check]
    totals: dict[str, Any]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.steadiness + self.correctness)


class Mailbox:
    """The workers' messages, read as they come; fails as soon as a worker dies or a
    deadline passes, rather than waiting for ever."""

    def __init__(self, out: Any, processes: Sequence[Any]) -> None:
        self.out = out
        self.processes = processes
        self.messages: list[tuple[Any, ...]] = []

    async def gather(
        self, kind: str, count: int, within_s: float, index: int | None = None
    ) -> list[Any]:
        """The payloads of ``count`` messages of one kind (and period), once they came."""
        deadline = time.monotonic() + within_s
        while self._count(kind, index) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers did not report within {within_s:g} s")
            try:
                self.messages.append(await asyncio.to_thread(self.out.get, True, 1.0))
            except queue.Empty:
                dead = [p.exitcode for p in self.processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"worker processes failed with exit codes {dead}") from None
        taken = [m for m in self.messages if self._matches(m, kind, index)]
        self.messages = [m for m in self.messages if not self._matches(m, kind, index)]
        return [m[-1] for m in taken]

    @staticmethod
    def _matches(message: tuple[Any, ...], kind: str, index: int | None) -> bool:
        return message[0] == kind and (index is None or message[2] == index)

    def _count(self, kind: str, index: int | None) -> int:
        return sum(1 for m in self.messages if self._matches(m, kind, index))


def _period(
    index: int,
    seconds: float,
    tallies: Sequence[Tally],
    stats: dict[str, int],
    rss: list[int],
    cpu: CpuSample,
) -> Period:
    handled: Counter[str] = Counter()
    buckets: Counter[int] = Counter()
    for tally in tallies:
        handled.update(tally.handled)
        buckets.update(tally.latency_buckets)
    events = sum(handled.values())
    extra = {k: v for k, v in stats.items() if k not in ("rows", "size", "dead", "waiting")}
    return Period(
        index=index,
        label="warm-up" if index == 0 else str(index),
        seconds=seconds,
        events=events,
        events_per_s=events / seconds,
        p50_ms=percentile_ms(buckets, 0.50),
        p99_ms=percentile_ms(buckets, 0.99),
        seen_rows=stats["rows"],
        size_kib=stats["size"] // 1024,
        dead=stats["dead"],
        rss_sum_mib=sum(rss) / 1024,
        rss_max_mib=max(rss) / 1024,
        cpu_workers_us=cpu.processes / max(events, 1) * 1e6,
        cpu_rest_us=cpu.rest / max(events, 1) * 1e6,
        idle_pct=cpu.idle_share * 100,
        pruned=sum(t.pruned for t in tallies),
        parked=sum(t.parked for t in tallies),
        released=sum(t.released for t in tallies),
        followed_directly=sum(t.followed_directly for t in tallies),
        swept=sum(t.swept for t in tallies),
        busy=sum(t.busy for t in tallies),
        waiting=stats["waiting"],
        handled=dict(handled),
        extra=extra,
    )


def _within(name: str, first: float, last: float, tolerance: float, unit: str = "") -> Check:
    change = last / first - 1 if first else math.inf
    return Check(
        name,
        abs(change) <= tolerance,
        f"first {first:,.1f}{unit}, last {last:,.1f}{unit}, {change:+.1%} "
        f"(allowed ±{tolerance:.0%})",
    )


def steadiness(
    dialect: str, periods: Sequence[Period], tolerance: float, memory_tolerance: float
) -> list[Check]:
    """The last measured period against the first (the warm-up left out)."""
    sized = "database file" if dialect == "sqlite" else "seen table"
    first, last = periods[1], periods[-1]
    memory_growth = last.rss_sum_mib / first.rss_sum_mib - 1
    return [
        _within("throughput", first.events_per_s, last.events_per_s, tolerance, " events/s"),
        _within("p99 latency", first.p99_ms, last.p99_ms, tolerance, " ms"),
        _within("seen rows level", first.seen_rows, last.seen_rows, tolerance),
        _within(
            f"{sized} size level", first.size_kib / 1024, last.size_kib / 1024, tolerance, " MiB"
        ),
        Check(
            "memory flat",
            memory_growth <= memory_tolerance,
            f"workers' RSS sum first {first.rss_sum_mib:,.1f} MiB, last "
            f"{last.rss_sum_mib:,.1f} MiB, {memory_growth:+.1%} (allowed +{memory_tolerance:.0%}); "
            f"max {first.rss_max_mib:,.1f} -> {last.rss_max_mib:,.1f} MiB",
        ),
    ]


def correctness(
    generated: Counter[str],
    handled: Counter[str],
    chains: ChainCheck,
    busy_found: int,
    waiting: int,
) -> list[Check]:
    missing = {k: generated[k] - handled[k] for k in KINDS if generated[k] != handled[k]}
    unfinished = len(chains.handled_positions)
    busy = busy_found
    return [
        Check(
            "every event handled once",
            not missing and not busy,
            f"{sum(handled.values()):,} handled of {sum(generated.values()):,} generated "
            f"({', '.join(f'{k[5:]} {handled[k]:,}/{generated[k]:,}' for k in KINDS)})"
            f"; {busy} found busy",
        ),
        Check(
            "no follower before its leader",
            not chains.violations and not unfinished,
            f"{chains.violations} out of order, {unfinished} chains unfinished, "
            f"{chains.past_lookback} sent before their leader once past the lookback "
            "(allowed)" + (f": {chains.examples}" if chains.examples else ""),
        ),
        Check("nothing left waiting", waiting == 0, f"{waiting} followers waiting at the end"),
    ]


async def _final_sweep(
    settings: Settings, scope: str, deadline_s: float
) -> tuple[Counter[str], list[Handling]]:
    """What is still waiting once the lookback has passed (the orphans of the last
    seconds), handed out as a worker's sweep would; returns the handled events by kind,
    and the chain events among them."""
    ordering = CausalOrdering(
        scope,
        url=with_prune_interval(settings.url, 0),
        seen_expiration=timedelta(seconds=settings.seen_expiration),
        preceding_event_lookback=timedelta(seconds=settings.lookback),
    )
    handled: Counter[str] = Counter()
    chained: list[Handling] = []
    lookback = timedelta(seconds=settings.lookback)

    async def handler(event: ReceivedEvent, depth: int = 0) -> None:
        async with ordering.preceding_event_confirmed(handler, event, depth=depth):
            handled[event.event] += 1
            if event.event == CHAINED:
                chained.append(_handling(event, lookback))

    deadline = time.monotonic() + deadline_s
    try:
        while (
            time.monotonic() < deadline and (await database_stats(settings.url, scope))["waiting"]
        ):
            for lost in await ordering.get_lost_followers():
                await handler(lost)
            await asyncio.sleep(1.0)
    finally:
        await dispose()
    return handled, chained


async def soak(url: str, args: argparse.Namespace, scope: str = SCOPE) -> SoakResult:
    """Run the soak on a migrated database; prints each period as it ends."""
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    periods = round(args.minutes * 60 / args.period)
    if periods < 2:
        raise ValueError(
            f"--minutes {args.minutes:g} with --period {args.period:g} makes {periods} "
            "period(s): the verdict compares the first with the last, so it needs two"
        )
    settings = Settings(
        url=with_prune_interval(url, args.prune_interval),
        scope=scope,
        tasks=args.tasks,
        chain_share=args.chain_share,
        chain_length=args.chain_length,
        orphan_share=args.orphan_share,
        seen_expiration=args.seen_expiration,
        lookback=args.lookback,
        sweep_interval=args.sweep_interval,
        seed=args.seed,
    )
    context = multiprocessing.get_context("spawn")
    out, go = context.Queue(), context.Event()
    timeline = context.Array("d", periods + 2)
    processes = [
        context.Process(target=_worker, args=(settings, worker, out, go, timeline))
        for worker in range(args.workers)
    ]
    for process in processes:
        process.start()
    mail = Mailbox(out, processes)
    rows: list[Period] = []
    chains = ChainCheck(args.chain_length)
    autovacuum = "n/a" if dialect == "sqlite" else await server_autovacuum(url)
    vacuuming: asyncio.Task[None] | None = None
    try:
        await mail.gather("ready", args.workers, READY_TIMEOUT_S)
        start = time.monotonic() + 1.0
        ends = [start + args.warm_up + k * args.period for k in range(periods + 1)]
        timeline[:] = [start, *ends]
        go.set()
        if args.vacuum_every and dialect == "postgresql":
            # Halfway between the samples, so that each sees the dead tuples of half
            # an interval rather than a phase that drifts.
            first = start + args.vacuum_every / 2
            vacuuming = asyncio.create_task(vacuum_every(url, first, args.vacuum_every))
        print(header(dialect), flush=True)
        pids = [p.pid for p in processes if p.pid is not None]
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu = cpu_sample(pids)
        for index, (began, ended) in enumerate(itertools.pairwise([start, *ends])):
            await asyncio.sleep(max(0.0, ended - time.monotonic()))
            cpu_before, cpu = cpu, cpu_sample(pids)
            stats = await database_stats(settings.url, scope)
            rss = [rss_kib(pid) for pid in pids]
            tallies = await mail.gather("period", args.workers, REPORT_TIMEOUT_S, index)
            chains.feed(h for tally in tallies for h in tally.chained)
            rows.append(_period(index, ended - began, tallies, stats, rss, cpu - cpu_before))
            print(row_line(rows[-1]), flush=True)
        done = await mail.gather("done", args.workers, REPORT_TIMEOUT_S)
        chains.feed(h for report in done for h in report["chained_after_end"])
        for process in processes:
            process.join(timeout=30)
    finally:
        if vacuuming is not None:
            vacuuming.cancel()
            await asyncio.gather(vacuuming, return_exceptions=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
    swept, swept_chained = await _final_sweep(settings, scope, args.lookback + 30.0)
    chains.feed(swept_chained)
    generated: Counter[str] = Counter()
    handled: Counter[str] = Counter(swept)
    for report in done:
        generated.update(report["generated"])
        handled.update(report["handled_after_end"])
    for period in rows:
        handled.update(period.handled)
    busy = sum(p.busy for p in rows) + sum(report["busy_after_end"] for report in done)
    waiting = (await database_stats(settings.url, scope))["waiting"]
    return SoakResult(
        dialect=dialect,
        workers=args.workers,
        tasks=args.tasks,
        warm_up_s=args.warm_up,
        period_s=args.period,
        seen_expiration_s=args.seen_expiration,
        prune_interval_s=args.prune_interval,
        lookback_s=args.lookback,
        autovacuum=autovacuum,
        vacuum_every_s=args.vacuum_every if dialect == "postgresql" else 0.0,
        periods=rows,
        steadiness=steadiness(dialect, rows, args.tolerance, args.memory_tolerance),
        correctness=correctness(generated, handled, chains, busy, waiting),
        totals={
            "generated": dict(generated),
            "handled": dict(handled),
            "handled_by_final_sweep": sum(swept.values()),
            "parked": sum(p.parked for p in rows),
            "released": sum(p.released for p in rows),
            "followed_directly": sum(p.followed_directly for p in rows),
            "swept": sum(p.swept for p in rows),
            "pruned": sum(p.pruned for p in rows),
        },
    )


# -- printing and saving --------------------------------------------------------------

COLUMNS = (
    "period",
    "s",
    "events/s",
    "p50 ms",
    "p99 ms",
    "seen rows",
    "{size}",
    "{dead}",
    "RSS sum MiB",
    "RSS max MiB",
    "CPU µs/event workers",
    "rest",
    "idle %",
    "pruned",
    "parked",
    "swept",
    "{extra}",
)


def _columns(dialect: str) -> list[str]:
    if dialect == "sqlite":
        names = {"size": "file MiB", "dead": "free pages", "extra": "pages, WAL KiB"}
    else:
        names = {"size": "seen MiB", "dead": "dead tuples", "extra": "auto/vacuums"}
    return [c.format(**names) for c in COLUMNS]


def _cells(period: Period) -> list[str]:
    return [
        period.label,
        f"{period.seconds:.0f}",
        f"{period.events_per_s:,.0f}",
        f"{period.p50_ms:.2f}",
        f"{period.p99_ms:.2f}",
        f"{period.seen_rows:,}",
        f"{period.size_kib / 1024:,.1f}",
        f"{period.dead:,}",
        f"{period.rss_sum_mib:,.1f}",
        f"{period.rss_max_mib:,.1f}",
        f"{period.cpu_workers_us:,.0f}",
        f"{period.cpu_rest_us:,.0f}",
        f"{period.idle_pct:.0f}",
        f"{period.pruned:,}",
        f"{period.parked:,}",
        f"{period.swept:,}",
        ", ".join(f"{v:,}" for v in period.extra.values()),
    ]


_WIDTHS = (7, 4, 8, 7, 7, 10, 8, 11, 11, 11, 20, 5, 6, 9, 7, 6, 14)


def header(dialect: str) -> str:
    return " ".join(f"{name:>{w}}" for name, w in zip(_columns(dialect), _WIDTHS, strict=True))


def row_line(period: Period) -> str:
    return " ".join(f"{cell:>{w}}" for cell, w in zip(_cells(period), _WIDTHS, strict=True))


def vacuum_note(result: SoakResult) -> str:
    """Who vacuums the PostgreSQL tables in this run; empty on SQLite."""
    if result.dialect == "sqlite":
        return ""
    by_hand = (
        f", the soak VACUUMs the tables every {result.vacuum_every_s:g} s"
        if result.vacuum_every_s
        else ", no VACUUM by hand"
    )
    return f"server autovacuum {result.autovacuum}{by_hand}"


def verdict_lines(result: SoakResult) -> list[str]:
    lines = [vacuum_note(result)] if result.dialect == "postgresql" else []
    lines.append(
        f"first period (1) against the last ({len(result.periods) - 1}); "
        f"the {result.warm_up_s:g} s warm-up is left out:"
    )
    for check in result.steadiness + result.correctness:
        lines.append(f"{'PASS' if check.passed else 'FAIL'}  {check.criterion}: {check.figures}")
    return lines


def markdown(result: SoakResult) -> str:
    columns = _columns(result.dialect)
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(columns))) + "|",
    ]
    lines += ["| " + " | ".join(_cells(p)) + " |" for p in result.periods]
    lines.append("")
    if result.dialect == "postgresql":
        lines += [f"- {vacuum_note(result)}"]
    lines += [
        f"- **{'PASS' if c.passed else 'FAIL'}** {c.criterion}: {c.figures}"
        for c in result.steadiness + result.correctness
    ]
    return "\n".join(lines) + "\n"


def plot(result: SoakResult, path: Path) -> bool:
    """The per-period figures as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = result.periods
    minutes = [(sum(p.seconds for p in measured[: i + 1])) / 60 for i in range(len(measured))]
    dead = "free pages" if result.dialect == "sqlite" else "dead tuples"
    size = "database file" if result.dialect == "sqlite" else "seen table"
    panels: list[tuple[str, list[tuple[str, list[float]]]]] = [
        ("events/s", [("events/s", [p.events_per_s for p in measured])]),
        (
            "latency of one delivery (ms)",
            [("p50", [p.p50_ms for p in measured]), ("p99", [p.p99_ms for p in measured])],
        ),
        ("seen rows", [("rows", [p.seen_rows for p in measured])]),
        (
            f"{size} (MiB), {dead} (dashed)",
            [("size MiB", [p.size_kib / 1024 for p in measured])],
        ),
        (
            "workers' RSS (MiB)",
            [
                ("sum", [p.rss_sum_mib for p in measured]),
                ("max", [p.rss_max_mib for p in measured]),
            ],
        ),
        ("seen rows pruned per period", [("pruned", [p.pruned for p in measured])]),
        (
            "CPU per event (µs)",
            [
                ("workers", [p.cpu_workers_us for p in measured]),
                ("rest of the machine", [p.cpu_rest_us for p in measured]),
            ],
        ),
        ("machine's CPU idle (%)", [("idle", [p.idle_pct for p in measured])]),
    ]
    figure, axes = plt.subplots(4, 2, figsize=(11, 11.5), sharex=True)
    first = True
    for axis, (title, series) in zip(axes.flat, panels, strict=True):
        for label, values in series:
            axis.plot(minutes, values, marker="o", markersize=3, label=label)
        axis.set_title(title, fontsize=10)
        axis.set_ylim(bottom=0)
        axis.axvspan(0, minutes[0], color="0.9", label="warm-up (left out)" if first else None)
        first = False
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    dead_axis = axes.flat[3].twinx()
    dead_axis.plot(minutes, [p.dead for p in measured], color="C3", linestyle="--", label=dead)
    dead_axis.set_ylim(bottom=0)
    dead_axis.legend(fontsize=8, loc="lower left")
    for axis in axes[-1]:
        axis.set_xlabel("minutes since the start")
    verdict = "PASS" if result.passed else "FAIL"
    figure.suptitle(
        f"soak on {result.dialect}: {result.workers} workers x {result.tasks} tasks, "
        f"seen_expiration {result.seen_expiration_s:g} s, prune_interval "
        f"{result.prune_interval_s:g} s - {verdict}"
        + (f"\n{vacuum_note(result)}" if result.dialect == "postgresql" else ""),
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def save(result: SoakResult, prefix: Path, command: str) -> list[Path]:
    """JSON, markdown and (when it can) PNG beside each other; returns what it wrote."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = [prefix.with_suffix(".json"), prefix.with_suffix(".md")]
    document = asdict(result) | {"passed": result.passed, "command": command}
    written[0].write_text(json.dumps(document, indent=2) + "\n")
    written[1].write_text(f"`{command}`\n\n{markdown(result)}")
    if plot(result, prefix.with_suffix(".png")):
        written.append(prefix.with_suffix(".png"))
    return written


# -- command line ---------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Worker processes at the top rate for minutes, the store pruning by "
        "itself; per-period figures, a first-vs-last verdict and a correctness check.",
    )
    p.add_argument("--dialect", choices=("postgresql", "sqlite"), required=True)
    p.add_argument(
        "--pg-url",
        help="server to create the soak's database on "
        "(default $ORDERING_TEST_POSTGRES_URL, else the local test server)",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--tasks", type=int, default=64, help="consumer tasks per worker (64)")
    p.add_argument("--minutes", type=float, default=20.0, help="measured time (20)")
    p.add_argument(
        "--warm-up",
        type=float,
        default=60.0,
        help="seconds before the first measured period, left out of the verdict",
    )
    p.add_argument("--period", type=float, default=60.0, help="seconds per table row (60)")
    p.add_argument("--seen-expiration", type=float, default=30.0, help="seconds (30)")
    p.add_argument("--prune-interval", type=float, default=10.0, help="seconds (10)")
    p.add_argument(
        "--lookback",
        type=float,
        default=10.0,
        help="preceding_event_lookback in seconds: when an orphan counts as lost",
    )
    p.add_argument(
        "--sweep-interval",
        type=float,
        default=5.0,
        help="seconds between each worker's get_lost_followers (5)",
    )
    p.add_argument(
        "--chain-share",
        type=float,
        default=0.2,
        help="share of the events that belong to shuffled chains (0.2)",
    )
    p.add_argument("--chain-length", type=int, default=5)
    p.add_argument(
        "--orphan-share",
        type=float,
        default=0.002,
        help="chance that the next event is a follower whose leader never comes",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.2,
        help="allowed change, last period against the first (0.2)",
    )
    p.add_argument(
        "--memory-tolerance",
        type=float,
        default=0.1,
        help="allowed growth of the workers' RSS (0.1)",
    )
    p.add_argument(
        "--vacuum-every",
        type=float,
        default=0.0,
        help="PostgreSQL: VACUUM the store's tables every so many seconds, standing in "
        "for autovacuum on a server that has it off (default 0: never)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--out",
        type=Path,
        help="where to save: PREFIX.json, .md, .png (default bench/results/soak-DIALECT)",
    )
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Bad settings fail before any process starts, each naming what is wrong."""
    if args.workers < 1 or args.tasks < 1:
        raise SystemExit("--workers and --tasks must be at least 1")
    for name in ("minutes", "warm_up", "period", "seen_expiration", "lookback", "sweep_interval"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if args.vacuum_every < 0:
        raise SystemExit("--vacuum-every must be 0 (never) or positive")
    if args.prune_interval <= 0:
        raise SystemExit("--prune-interval must be positive: the soak is about pruning")
    if not 0 <= args.chain_share < 1 or not 0 <= args.orphan_share < 1:
        raise SystemExit("--chain-share and --orphan-share are shares between 0 and 1")
    if args.chain_length < 2:
        raise SystemExit("--chain-length must be at least 2")
    if args.lookback >= args.seen_expiration:
        raise SystemExit("--lookback must be shorter than --seen-expiration")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_arguments(args)
    command = "python -m bench.soak " + " ".join(sys.argv[1:] if argv is None else argv)
    prefix = args.out or Path("bench/results") / f"soak-{args.dialect}"
    print(
        f"soak on {args.dialect}: {args.workers} workers x {args.tasks} tasks, "
        f"{args.minutes:g} min after a {args.warm_up:g} s warm-up, seen_expiration "
        f"{args.seen_expiration:g} s, prune_interval {args.prune_interval:g} s, "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    if args.dialect == "sqlite":
        with sqlite_database() as (url, _):
            result = asyncio.run(soak(url, args))
    else:
        with postgres_database(admin_url(args.pg_url)) as url:
            result = asyncio.run(soak(url, args))
    print("\n".join(verdict_lines(result)))
    print("totals:", json.dumps(result.totals))
    for path in save(result, prefix, command):
        print(f"wrote {path}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
