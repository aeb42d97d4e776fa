"""Retention by the store itself (ordering/retention.py), on SQLite and PostgreSQL: seen
rows carry their expiry, and each backend's pruner deletes expired seen rows and dead
leases at its interval, one process per database per round.

Time is moved with the orderings' clock; rounds are run with ``Pruner.run_once`` where
a test needs to know when one ran, and by the pruner's own timer (a short interval)
where the test is that it runs by itself."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from ordering import CausalOrdering, ReceivedEvent, admin, dispose, retention, sql
from ordering.backends import Backend, PostgresBackend, SqliteBackend, backend_for
from ordering.retention import PRUNER_SCOPE, Pruner, PruneRound
from ordering.urls import resolve_url

from .helpers import (
    Consumer,
    MutableClock,
    eventually,
    make_chain,
    make_event,
    rows_of_scope,
    run_in_threads,
    run_sql,
)

SHORT = timedelta(seconds=10)
#: An interval long enough that the pruner's own timer never fires during a test: the
#: test runs the rounds.
BY_HAND = timedelta(hours=1)


def ordering_on(
    url: str,
    scope: str,
    clock: MutableClock,
    *,
    seen_expiration: timedelta = SHORT,
    prune_interval: timedelta = BY_HAND,
) -> CausalOrdering[ReceivedEvent]:
    return CausalOrdering(
        scope,
        url=url,
        clock=clock,
        seen_expiration=seen_expiration,
        prune_interval=prune_interval,
    )


def pruner_of(ordering: CausalOrdering[Any]) -> Pruner:
    pruner = ordering.backend.pruner
    assert pruner is not None, "the ordering's first use starts its backend's pruner"
    return pruner


async def handle(ordering: CausalOrdering[ReceivedEvent], count: int, clock: MutableClock) -> None:
    """``count`` events through the consumer's entry point (so completion writes the
    seen rows), half of them followers of the one before."""
    consumer = Consumer(ordering)
    for event in make_chain(clock, count, name=f"chain-{uuid4().hex[:6]}"):
        await consumer.consume(event)


@pytest.fixture(autouse=True)
def _no_hook() -> Iterator[None]:
    yield
    retention.on_pruned = None


@pytest.fixture(autouse=True)
def _turn_free(request: pytest.FixtureRequest) -> None:
    """The pruner's turn free at the start: a test before may have left it taken until
    an hour past its own clock."""
    if "db_url" in request.fixturenames:
        url = request.getfixturevalue("db_url")
        asyncio.run(
            run_sql(url, "DELETE FROM {processing_leases} WHERE scope = :s", {"s": PRUNER_SCOPE})
        )


# -- what goes and what stays ---------------------------------------------------------


async def test_rows_past_their_expiry_are_gone_after_a_round(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    short = ordering_on(db_url, scope, clock)
    long = ordering_on(db_url, scope, clock, seen_expiration=timedelta(hours=1))
    try:
        await handle(short, 12, clock)
        for _ in range(3):
            await short.record_event_as_seen(make_event(clock))
        kept = [make_event(clock) for _ in range(4)]
        for event in kept:
            await long.record_event_as_seen(event)
        assert (await rows_of_scope(db_url, scope)).seen == 19

        clock.advance(SHORT + timedelta(seconds=1))
        round_ = await pruner_of(short).run_once()
        assert not round_.skipped
        assert round_.seen_events >= 15  # other tests' expired rows may go too
        assert (await rows_of_scope(db_url, scope)).seen == 4
        for event in kept:  # what a longer expiration wrote lives on, and reads as seen
            assert await long.event_has_been_seen(event)
    finally:
        await short.clear()


async def test_rows_still_live_are_never_pruned(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    ordering = ordering_on(db_url, scope, clock)
    try:
        await handle(ordering, 6, clock)
        assert await ordering.record_event_as_processing(make_event(clock))
        # A follower whose leader never came, long past the lookback: the lost-follower
        # sweep's to hand out, never the pruner's.
        await ordering.record_follower(make_event(clock, follows=uuid4()))
        clock.advance(SHORT - timedelta(seconds=1))
        before = await rows_of_scope(db_url, scope)
        assert before == (6, 1, 1)
        await pruner_of(ordering).run_once()
        assert await rows_of_scope(db_url, scope) == before

        clock.advance(timedelta(days=2))  # everything expired; the follower stays
        await pruner_of(ordering).run_once()
        assert await rows_of_scope(db_url, scope) == (0, 0, 1)
        [lost] = await ordering.get_lost_followers()
        assert lost.follows is not None
    finally:
        await ordering.clear()


async def test_the_pruner_runs_by_itself_and_reports_what_it_removed(
    db_url: str, clock: MutableClock, scope: str, caplog: pytest.LogCaptureFixture
) -> None:
    reported: list[tuple[str, int]] = []
    retention.on_pruned = lambda table, rows: reported.append((table, rows))
    ordering = ordering_on(db_url, scope, clock, prune_interval=timedelta(seconds=0.2))
    try:
        with caplog.at_level(logging.INFO, logger="ordering.retention"):
            await handle(ordering, 8, clock)
            assert await ordering.record_event_as_processing(make_event(clock))
            clock.advance(timedelta(minutes=2))  # past SHORT and the lease's minute

            async def pruned() -> bool:
                return await rows_of_scope(db_url, scope) == (0, 0, 0)

            await eventually(pruned, what="the pruner's own round", within=20)
        pruner = pruner_of(ordering)
        assert pruner.rounds >= 1
        assert sum(rows for table, rows in reported if table == "seen_events") >= 8
        assert any(table == "processing_leases" for table, _ in reported)
        assert any(
            "pruned" in r.message and "expired seen events" in r.message
            for r in caplog.records
            if r.levelno == logging.INFO
        )
    finally:
        await ordering.clear()


# -- one pruner per round -------------------------------------------------------------


async def test_two_backends_at_once_only_one_prunes_per_round(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    """Two backends on one database (the deadline makes their URLs differ, as two
    workers would be), each with its own pruner: they ask for the turn at the same
    moment; one prunes, the other skips, and the turn holds for an interval."""
    first = ordering_on(db_url, scope, clock)
    second = CausalOrdering(
        scope,
        url=db_url,
        clock=clock,
        seen_expiration=SHORT,
        prune_interval=BY_HAND,
        deadline=timedelta(seconds=9),
    )
    assert first.backend is not second.backend
    try:
        await handle(first, 10, clock)
        clock.advance(SHORT + timedelta(seconds=1))
        rounds = await asyncio.gather(pruner_of(first).run_once(), pruner_of(second).run_once())
        assert sorted(r.skipped for r in rounds) == [False, True], rounds
        assert (await rows_of_scope(db_url, scope)).seen == 0
        # Within the interval, the turn stays with the one that pruned.
        winner, loser = (first, second) if not rounds[0].skipped else (second, first)
        assert (await pruner_of(loser).run_once()).skipped
        assert not (await pruner_of(winner).run_once()).skipped
        # Once the turn has run out (an interval later), the first to ask takes it.
        clock.advance(BY_HAND + timedelta(seconds=1))
        assert not (await pruner_of(loser).run_once()).skipped
    finally:
        await first.clear()


def test_pruners_on_separate_event_loops_take_turns(db_url: str, scope: str) -> None:
    """Four threads, each its own event loop and so its own backend and connections,
    asking for the turn at once: exactly one prunes."""
    clock = MutableClock(datetime.fromisoformat("2026-11-28T12:00:00+00:00"))

    async def setup() -> None:
        ordering = ordering_on(db_url, scope, clock)
        await handle(ordering, 5, clock)
        await dispose()

    asyncio.run(setup())
    clock.advance(SHORT + timedelta(seconds=1))

    async def one(_: int) -> PruneRound:
        return await pruner_of(ordering_on(db_url, scope, clock)).run_once()

    rounds = run_in_threads(4, one)
    assert sorted(r.skipped for r in rounds) == [False, True, True, True], rounds
    assert asyncio.run(rows_of_scope(db_url, scope)).seen == 0


# -- the release before ---------------------------------------------------------------

#: The statements of the release before (schema revision 0005) that write seen rows:
#: no expires_at; on PostgreSQL complete_event_v1.
PREVIOUS_RELEASE = {
    "postgresql": """
-- name: complete(scope, event_id, owner, now, claim_owner, claim_until, is_follower)
SELECT released_event FROM complete_event_v1($1, $2, $3, $4, $5, $6, $7)

-- name: record_seen(scope, event_id, now)
INSERT INTO seen_events (scope, event_id, seen_at) VALUES ($1, $2, $3)
ON CONFLICT (scope, event_id) DO UPDATE SET seen_at = excluded.seen_at

-- name: seen(scope, event_id, seen_after)
SELECT EXISTS (SELECT 1 FROM seen_events s
               WHERE s.scope = $1 AND s.event_id = $2 AND s.seen_at > $3)
""",
    "sqlite": """
-- name: record_seen(scope, event_id, now)
INSERT INTO ordering_seen_events (scope, event_id, seen_at) VALUES (?1, ?2, ?3)
ON CONFLICT (scope, event_id) DO UPDATE SET seen_at = excluded.seen_at

-- name: seen(scope, event_id, seen_after)
SELECT EXISTS (SELECT 1 FROM ordering_seen_events s
               WHERE s.scope = ?1 AND s.event_id = ?2 AND s.seen_at > ?3)
""",
}


def previous_release_backend(url: str) -> Backend:
    """The backend the release before would build: its statements, its revision."""
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    queries = {**sql.queries(dialect), **sql.parse_queries(PREVIOUS_RELEASE[dialect], dialect)}
    if dialect == "sqlite":
        return SqliteBackend(url, queries=queries, code_revision="0005")
    return PostgresBackend(url, queries=queries, code_revision="0005")


async def test_rows_of_either_release_read_the_same_to_both(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    """While a rolling deploy runs: a row the release before wrote (no expiry) reads
    as seen to this release within its seen expiration, and the pruner leaves it for
    ``ordering prune --seen-expiration``; a row this release wrote reads as seen to
    the release before (its rule, its statement)."""
    ordering = ordering_on(db_url, scope, clock)
    previous = previous_release_backend(resolve_url(db_url))
    try:
        await previous.check_version()  # it runs on this revision: an expand step
        old_row, new_row = uuid4(), make_event(clock)
        now = clock()
        if db_url.startswith("postgresql"):
            await previous.query(
                "complete",
                scope=scope,
                event_id=old_row,
                owner=None,
                now=now,
                claim_owner=None,
                claim_until=None,
                is_follower=False,
            )
        else:
            await previous.query("record_seen", scope=scope, event_id=old_row, now=now)
        await ordering.record_event_as_seen(new_row)
        expiry = await run_sql(
            db_url,
            "SELECT event_id, expires_at FROM {seen_events} WHERE scope = :s",
            {"s": scope},
        )
        assert sorted(row["expires_at"] is None for row in expiry) == [False, True]

        assert await ordering.event_has_been_seen(old_row)
        seen_after = now - SHORT
        [(new_seen,)] = await previous.query(
            "seen", scope=scope, event_id=new_row.id, seen_after=seen_after
        )
        assert new_seen

        clock.advance(timedelta(days=2))
        await pruner_of(ordering).run_once()
        remaining = await run_sql(
            db_url, "SELECT event_id FROM {seen_events} WHERE scope = :s", {"s": scope}
        )
        assert [_uuid(r["event_id"]) for r in remaining] == [old_row]
        result = await admin.prune(
            db_url, scope=scope, now=clock(), seen_expiration=timedelta(days=1)
        )
        assert result.seen_events == 1
        assert (await rows_of_scope(db_url, scope)).seen == 0
    finally:
        await previous.dispose()
        await ordering.clear()


def _uuid(value: Any) -> UUID:
    return value if isinstance(value, UUID) else UUID(hex=str(value))


# -- settings ---------------------------------------------------------------------------


async def test_the_interval_comes_from_the_ordering_the_url_or_the_default(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    default = CausalOrdering(scope, url=db_url, clock=clock)
    assert default.prune_interval == timedelta(seconds=60)
    separator = "&" if "?" in db_url else "?"
    from_url = CausalOrdering(scope, url=f"{db_url}{separator}prune_interval=7.5", clock=clock)
    assert from_url.prune_interval == timedelta(seconds=7.5)
    # The URL's setting is the store's, not the driver's: a call works.
    assert not await from_url.event_has_been_seen(uuid4())
    assert pruner_of(from_url).interval == 7.5
    given = CausalOrdering(
        scope,
        url=f"{db_url}{separator}prune_interval=7.5",
        clock=clock,
        prune_interval=timedelta(seconds=3),
    )
    assert given.prune_interval == timedelta(seconds=3)


async def test_an_interval_of_zero_turns_pruning_off(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    ordering = ordering_on(db_url, scope, clock, prune_interval=timedelta(0))
    try:
        await handle(ordering, 3, clock)
        pruner = pruner_of(ordering)
        assert not pruner.enabled
        clock.advance(timedelta(days=2))
        await asyncio.sleep(0.3)
        assert pruner.rounds == 0
        assert (await rows_of_scope(db_url, scope)).seen == 3
        # ``ordering prune`` still removes them, by their expiry.
        result = await admin.prune(db_url, scope=scope, now=clock())
        assert result.seen_events == 3
    finally:
        await ordering.clear()


@pytest.mark.parametrize("given", ["-1", "soon", "inf", "nan"])
def test_a_bad_interval_in_the_url_is_refused_by_name(given: str) -> None:
    with pytest.raises(ValueError, match=f"prune_interval= must be .* not '{given}'"):
        resolve_url(f"sqlite+aiosqlite:///x.db?prune_interval={given}")


@pytest.mark.parametrize("given", [timedelta(seconds=-1), 60, "60"])
def test_a_bad_interval_given_to_the_ordering_is_refused_by_name(given: Any) -> None:
    with pytest.raises(ValueError, match="prune_interval must be a timedelta of 0 or more"):
        CausalOrdering("s", url="sqlite+aiosqlite:///x.db", prune_interval=given)


# -- failures and shutdown ----------------------------------------------------------------


async def test_a_failed_round_is_logged_and_tried_at_the_next_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = resolve_url("postgresql+asyncpg://postgres@127.0.0.1:9/none?deadline=0.3")
    backend = backend_for(url)
    with caplog.at_level(logging.WARNING, logger="ordering.retention"):
        pruner = Pruner(backend, interval=0.1, clock=MutableClock(datetime.now().astimezone()))
        backend.pruner = pruner
        pruner.start()

        def failures() -> int:
            return sum("pruning" in r.message and "failed" in r.message for r in caplog.records)

        await eventually(lambda: failures() >= 2, what="two failed rounds", within=15)
    assert pruner.rounds == 0
    await dispose()
    assert pruner._timer is None and pruner._task is None


async def test_dispose_stops_the_pruner(db_url: str, clock: MutableClock, scope: str) -> None:
    ordering = ordering_on(db_url, scope, clock, prune_interval=timedelta(seconds=0.05))
    assert not await ordering.event_has_been_seen(uuid4())
    pruner = pruner_of(ordering)
    await eventually(lambda: pruner.rounds >= 1, what="a round", within=10)
    await dispose()
    rounds = pruner.rounds
    await asyncio.sleep(0.3)
    assert pruner.rounds == rounds
    assert pruner._timer is None and pruner._task is None


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork")
def test_a_forked_child_prunes_with_its_own_pruner_never_the_parents(
    db_url: str, scope: str
) -> None:
    """The parent's pruner is scheduled on a loop the child inherits and runs: it never
    fires there (its backend's connections are the parent's); the child's orderings get
    a backend and a pruner of their own, which run."""
    clock = MutableClock(datetime.fromisoformat("2026-11-28T12:00:00+00:00"))
    loop = asyncio.new_event_loop()
    try:
        parent = ordering_on(db_url, scope, clock, prune_interval=timedelta(seconds=0.3))
        loop.run_until_complete(parent.event_has_been_seen(uuid4()))
        parents = loop.run_until_complete(_pruner_soon(parent))
        pid = os.fork()
        if pid == 0:  # the child: run the inherited loop for a while
            code = 1
            try:
                code = loop.run_until_complete(_child(db_url, scope, clock, parents))
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        loop.run_until_complete(dispose())
        loop.close()


async def _pruner_soon(ordering: CausalOrdering[Any]) -> Pruner:
    return pruner_of(ordering)


async def _child(url: str, scope: str, clock: MutableClock, parents: Pruner) -> int:
    before = parents.last  # a new PruneRound after each round, skipped ones too
    child = ordering_on(url, scope, clock, prune_interval=timedelta(seconds=0.3))
    own = pruner_of(child)
    if own is parents:
        return 2
    first = own.last
    await eventually(lambda: own.last is not first, what="the child's round", within=10)
    await asyncio.sleep(0.6)  # two of the parent's intervals
    await dispose()
    return 0 if parents.last is before else 3
