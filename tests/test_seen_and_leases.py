"""Seen events and processing leases: seen expiry, exclusive leases, take-over of an
expired lease, release on every way out of a body, the connections kept between
operations, and the SQLite specifics."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy.engine import make_url

from ordering import (
    SEEN_EXPIRATION,
    CausalOrdering,
    EventArrivedEarly,
    EventBeingProcessed,
    ReceivedEvent,
    dispose,
)
from ordering.backends import PostgresBackend, _registry
from ordering.causal import dispose_engines
from ordering.migrate import current_revision, upgrade
from ordering.models import utc_now
from ordering.schema import CODE_REVISION

from .helpers import (
    MutableClock,
    eventually,
    make_chain,
    make_event,
    real_clock,
    rows_of_scope,
    run_in_threads,
    run_sql,
    statements_of,
)

Ordering = CausalOrdering[ReceivedEvent]


async def test_an_event_is_seen_once_recorded(ordering: Ordering, clock: MutableClock) -> None:
    event = make_event(clock)
    assert not await ordering.event_has_been_seen(event)
    await ordering.record_event_as_seen(event)
    assert await ordering.event_has_been_seen(event)
    assert await ordering.event_has_been_seen(event.id)


async def test_seen_expires_after_seen_expiration(ordering: Ordering, clock: MutableClock) -> None:
    event = make_event(clock)
    await ordering.record_event_as_seen(event)
    clock.advance(SEEN_EXPIRATION - timedelta(seconds=1))
    assert await ordering.event_has_been_seen(event)
    clock.advance(timedelta(seconds=1))
    assert not await ordering.event_has_been_seen(event)


async def test_seen_has_no_size_cap(ordering: Ordering, clock: MutableClock) -> None:
    """The in-memory peer forgets beyond 10,000 events; the store does not."""
    first = make_event(clock)
    await ordering.record_event_as_seen(first)
    rows = [
        {"scope": ordering.scope, "event_id": uuid4(), "seen_at": clock()} for _ in range(10_500)
    ]
    await run_sql(
        ordering.url,
        "INSERT INTO {seen_events} (scope, event_id, seen_at) VALUES (:scope, :event_id, :seen_at)",
        rows,
    )
    last = make_event(clock)
    await ordering.record_event_as_seen(last)
    assert await ordering.event_has_been_seen(first)
    assert await ordering.event_has_been_seen(last)
    assert (await rows_of_scope(ordering.url, ordering.scope)).seen == 10_502


async def test_a_processing_lease_is_exclusive(ordering: Ordering, clock: MutableClock) -> None:
    event = make_event(clock)
    assert not await ordering.event_has_started_processing(event)
    assert await ordering.record_event_as_processing(event)
    assert await ordering.event_has_started_processing(event)
    assert await ordering.event_has_started_processing(event.id)
    assert not await ordering.record_event_as_processing(event)
    await ordering.forget_event_is_processing(event)
    assert not await ordering.event_has_started_processing(event)
    assert await ordering.record_event_as_processing(event)


async def test_an_expired_lease_may_be_taken_over(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    crashed = CausalOrdering(scope, url=db_url, clock=clock, lease_duration=timedelta(seconds=30))
    survivor = CausalOrdering(scope, url=db_url, clock=clock)
    event = make_event(clock)
    assert await crashed.record_event_as_processing(event)
    clock.advance(timedelta(seconds=29))
    assert not await survivor.record_event_as_processing(event)
    clock.advance(timedelta(seconds=1))
    assert not await survivor.event_has_started_processing(event)
    assert await survivor.record_event_as_processing(event)
    await survivor.clear()


async def test_a_stale_holder_finishing_late_keeps_the_new_lease(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    """Leases are released by their own token only: a holder whose lease expired and
    was taken over does not drop the new holder's lease when it finally finishes."""
    stale = CausalOrdering(scope, url=db_url, clock=clock, lease_duration=timedelta(seconds=30))
    survivor = CausalOrdering(scope, url=db_url, clock=clock)
    event = make_event(clock)

    async def handler(e: ReceivedEvent, depth: int = 0) -> None:  # pragma: no cover
        pass

    async with stale.preceding_event_confirmed(handler, event):
        clock.advance(timedelta(seconds=31))
        assert await survivor.record_event_as_processing(event)
    assert await survivor.event_has_started_processing(event)
    assert await survivor.event_has_been_seen(event)
    await survivor.clear()


def test_fifty_concurrent_callers_on_fifty_connections_one_winner(db_url: str, scope: str) -> None:
    event = make_event(real_clock())

    async def attempt(_: int) -> bool:
        return await CausalOrdering(scope, url=db_url).record_event_as_processing(event)

    results = run_in_threads(50, attempt)
    assert results.count(True) == 1

    async def cleanup(_: int) -> None:
        await CausalOrdering(scope, url=db_url).clear()

    run_in_threads(1, cleanup)


async def test_event_is_processing_marks_seen_and_releases(
    ordering: Ordering, clock: MutableClock
) -> None:
    event = make_event(clock)
    async with ordering.event_is_processing(event):
        assert await ordering.event_has_started_processing(event)
        with pytest.raises(EventBeingProcessed) as raised:
            async with ordering.event_is_processing(event):
                pass  # pragma: no cover
        assert raised.value.event is event
    assert await ordering.event_has_been_seen(event)
    assert not await ordering.event_has_started_processing(event)


async def test_a_failed_body_releases_without_marking_seen(
    ordering: Ordering, clock: MutableClock
) -> None:
    event = make_event(clock)
    with pytest.raises(RuntimeError):
        async with ordering.event_is_processing(event):
            raise RuntimeError("handler failed")
    assert not await ordering.event_has_been_seen(event)
    assert not await ordering.event_has_started_processing(event)


@pytest.mark.parametrize("entry", ["event_is_processing", "preceding_event_confirmed"])
async def test_cancellation_still_releases_the_lease(
    ordering: Ordering, clock: MutableClock, entry: str
) -> None:
    event = make_event(clock)
    inside = asyncio.Event()

    async def handler(e: ReceivedEvent, depth: int = 0) -> None:  # pragma: no cover
        pass

    async def consumer() -> None:
        manager = (
            ordering.event_is_processing(event)
            if entry == "event_is_processing"
            else ordering.preceding_event_confirmed(handler, event)
        )
        async with manager:
            inside.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(consumer())
    await inside.wait()
    assert await ordering.event_has_started_processing(event)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await ordering.event_has_started_processing(event)
    assert not await ordering.event_has_been_seen(event)


async def test_a_timeout_around_the_consumer_releases_the_lease(
    ordering: Ordering, clock: MutableClock
) -> None:
    event = make_event(clock)

    async def handler(e: ReceivedEvent, depth: int = 0) -> None:  # pragma: no cover
        pass

    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as deadline:
            async with ordering.preceding_event_confirmed(handler, event):
                assert await ordering.event_has_started_processing(event)
                deadline.reschedule(loop.time())  # the timeout strikes inside the body
                await asyncio.Event().wait()
    assert not await ordering.event_has_started_processing(event)
    assert await ordering.record_event_as_processing(event)


async def test_a_slow_body_keeps_its_lease_alive(db_url: str, scope: str) -> None:
    """A live holder renews its lease, so only a dead one ever loses it (real time here:
    the lease is a second long and the body takes two)."""
    holder = CausalOrdering(scope, url=db_url, lease_duration=timedelta(seconds=1))
    other = CausalOrdering(scope, url=db_url)
    event = make_event(real_clock())
    async with holder.event_is_processing(event):
        await asyncio.sleep(2.0)
        assert not await other.record_event_as_processing(event)
    assert await other.event_has_been_seen(event)
    await holder.clear()


def _slow(*statements: str, seconds: float) -> Callable[[str, str], None]:
    """A statement listener that holds up the first of ``statements`` the store sends
    for ``seconds`` of real time, as a busy store would."""
    slowed: list[str] = []

    def listener(name: str, _sql: str) -> None:
        if name.startswith(statements) and not slowed:
            slowed.append(name)
            time.sleep(seconds)

    return listener


async def _expiry(url: str, sql: str, scope: str) -> datetime:
    """The one time ``sql`` selects for the scope, as an aware datetime."""
    [row] = await run_sql(url, sql, {"scope": scope})
    [expires_at] = row.values()
    if isinstance(expires_at, str):  # SQLite's text layout, in UTC
        return datetime.fromisoformat(expires_at).replace(tzinfo=UTC)
    assert isinstance(expires_at, datetime)
    return expires_at


async def _lease_expiry(url: str, scope: str) -> datetime:
    sql = "SELECT expires_at FROM {processing_leases} WHERE scope = :scope"
    return await _expiry(url, sql, scope)


async def test_a_lease_that_comes_back_late_is_renewed_at_once(db_url: str, scope: str) -> None:
    """A begin that took longer than a third of the lease (held up 2.5 s here, of a 6 s
    lease) leaves the lease less time than the renewals' schedule assumes: it is
    renewed at the keeper's next tick (every 1 s), not a whole interval (2 s) later,
    when it would have had half a second left."""
    lease = timedelta(seconds=6)
    holder = CausalOrdering(scope, url=db_url, lease_duration=lease)
    slow = _slow("begin", seconds=2.5)
    holder.backend.listeners.append(slow)
    asked = utc_now()
    try:
        async with holder.event_is_processing(make_event(real_clock())):
            taken_until = asked + lease

            async def renewed() -> bool:
                return await _lease_expiry(db_url, scope) > taken_until + timedelta(seconds=1)

            await eventually(renewed, what="the late lease renewed", within=1.6)
    finally:
        holder.backend.listeners.remove(slow)
    await holder.clear()


async def test_claims_that_come_back_late_are_renewed_at_once(db_url: str, scope: str) -> None:
    """The same for the claim a leader's completion takes on its followers: the
    completion held up 2.5 s of a 6 s lease, the parked follower's claim is renewed at
    the keeper's next tick, while the follower is handed on."""
    lease = timedelta(seconds=6)
    holder = CausalOrdering(scope, url=db_url, lease_duration=lease)
    clock = real_clock()
    leader, follower = make_chain(clock, 2)
    claimed = "SELECT claimed_until FROM {waiting_followers} WHERE scope = :scope"
    renewals: list[bool] = []

    async def handler(event: ReceivedEvent, depth: int = 0) -> None:
        async with holder.preceding_event_confirmed(handler, event, depth):
            if event.id != follower.id:
                return
            # The claim was taken until a lease after the completion was asked for.
            taken_until = asked[0] + lease

            async def renewed() -> bool:
                later = await _expiry(db_url, claimed, scope)
                return later > taken_until + timedelta(seconds=1)

            await eventually(renewed, what="the late claim renewed", within=1.6)
            renewals.append(True)

    with pytest.raises(EventArrivedEarly):
        await handler(follower)
    # PostgreSQL completes in one statement; SQLite's claim is a step of its own.
    slow = _slow("complete", "claim", seconds=2.5)
    asked: list[datetime] = []

    def note_time(_name: str, _sql: str) -> None:
        asked.append(utc_now())

    holder.backend.listeners += [note_time, slow]
    try:
        await handler(leader)
    finally:
        holder.backend.listeners.remove(note_time)
        holder.backend.listeners.remove(slow)
    assert renewals == [True], "the follower was not handed on"
    await holder.clear()


async def test_a_lease_that_comes_back_expired_is_logged(
    db_url: str, scope: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A begin that came back after the lease it took had expired says so: another
    worker may have taken the event over meanwhile."""
    holder = CausalOrdering(scope, url=db_url, lease_duration=timedelta(seconds=1))
    slow = _slow("begin", seconds=1.3)
    holder.backend.listeners.append(slow)
    try:
        with caplog.at_level(logging.WARNING, logger="ordering"):
            async with holder.event_is_processing(make_event(real_clock())):
                pass
    finally:
        holder.backend.listeners.remove(slow)
    assert "a lease or claim had expired" in caplog.text
    assert "before the store's answer came" in caplog.text
    await holder.clear()


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"scope": ""}, "scope"),
        ({"scope": "x" * 201}, "scope"),
        ({"scope": "s", "url": "mysql://nope"}, "unsupported database URL"),
        ({"scope": "s", "url": "sqlite+aiosqlite://"}, "in-memory SQLite"),
        ({"scope": "s", "url": "::not a url::"}, "not a database URL"),
        ({"scope": "s", "url": "postgresql://u@h/db?search_path=x"}, "search_path"),
        ({"scope": "s", "lease_duration": timedelta(0)}, "lease_duration"),
        ({"scope": "s", "poll_interval": 0}, "poll_interval"),
        ({"scope": "s", "event_type": dict}, "event_type"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_error(kwargs: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        CausalOrdering(**kwargs)


async def test_a_naive_clock_is_refused(db_url: str, scope: str) -> None:
    ordering = CausalOrdering(scope, url=db_url, clock=lambda: datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="clock must return an aware UTC datetime"):
        await ordering.event_has_been_seen(uuid4())
    with pytest.raises(ValueError, match="clock must return an aware UTC datetime"):
        await ordering.record_event_as_seen(make_event(real_clock()))
    assert await rows_of_scope(db_url, scope) == (0, 0, 0)


async def test_sqlite_waits_for_another_writer_without_blocking_the_loop(
    sqlite_url: str, clock: MutableClock, scope: str
) -> None:
    """Store operations run on the loop's thread and never wait there: when another
    process holds SQLite's write lock, the operation waits in a worker thread while the
    loop goes on, and completes once the lock is released."""
    ordering = CausalOrdering(scope, url=sqlite_url, clock=clock)
    event = make_event(clock)
    await ordering.event_has_been_seen(event)  # revision checked, connection open
    other = sqlite3.connect(sqlite_url.split("///", 1)[1], isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    with statements_of(ordering.backend) as sent:
        recording = asyncio.create_task(ordering.record_event_as_seen(event))
        await eventually(lambda: sent.count("record_seen") > 0, what="the write to be tried")
    started = ticks
    await eventually(lambda: ticks >= started + 10, what="the loop to tick ten times")
    assert not recording.done()  # waiting for the lock, while the loop kept running
    other.execute("COMMIT")
    other.close()
    await recording
    ticking.cancel()
    assert await ordering.event_has_been_seen(event)
    await ordering.clear()


async def test_sqlite_wal_is_checkpointed_by_the_store(
    sqlite_url: str, clock: MutableClock, scope: str
) -> None:
    """The store turns SQLite's automatic checkpoint off on its connections (it would
    fsync inside a commit on the event loop) and checkpoints in a worker thread
    instead: the WAL must stay small however many events go through."""
    ordering = CausalOrdering(scope, url=sqlite_url, clock=clock)
    wal = Path(sqlite_url.split("///", 1)[1] + "-wal")

    async def handle(count: int) -> int:
        """Handle ``count`` events; the WAL's size then (a checkpoint restarts the WAL
        rather than shrink the file, so the size is the most it ever held)."""
        for event in [make_event(clock) for _ in range(count)]:
            async with ordering.event_is_processing(event):
                pass
        return await asyncio.to_thread(lambda: wal.stat().st_size)

    # 3,000 commits of a few pages each come to about 45 MB of WAL without
    # checkpoints, and twice that after as many again; with them, a checkpoint every
    # few hundred writes keeps it to about 8 MB however many events go through (the
    # store's statements wait for a pending checkpoint, so a busy machine does not
    # let the WAL grow while the checkpoint waits for a gap between writes).
    bound = 16 * 1024 * 1024
    assert await handle(1500) < bound
    assert await handle(1500) < bound
    await ordering.clear()


async def test_orderings_built_per_event_share_one_store_and_open_nothing(
    db_url: str, scope: str
) -> None:
    """Prefect builds an ordering for every event: construction does no I/O and every
    instance on a URL shares one backend and its connections (per event loop)."""
    await dispose()
    orderings = [CausalOrdering(f"{scope}-{i}", url=db_url) for i in range(1000)]
    assert _registry.current() == []  # nothing opened yet
    assert len({id(o.backend) for o in orderings}) == 1
    assert len({id(o.backend.connections) for o in orderings}) == 1
    assert len(_registry.current()) == 1


async def test_dispose_engines_still_closes_the_store_and_names_its_successor(
    db_url: str, scope: str
) -> None:
    """The README once said ``await dispose_engines()``: code that copied it keeps
    working, and is told to call ``ordering.dispose()``."""
    assert not await CausalOrdering(scope, url=db_url).event_has_been_seen(uuid4())
    assert len(_registry.current()) == 1
    with pytest.warns(DeprecationWarning, match=r"ordering\.dispose\(\)"):
        await dispose_engines()
    assert _registry.current() == []


async def _burst(connections: Any, size: int) -> None:
    """``size`` operations at once, each holding its connection for a moment."""

    async def hold() -> None:
        async with connections.held():
            await asyncio.sleep(0.02)

    await asyncio.gather(*(hold() for _ in range(size)))


async def test_connections_opened_for_a_burst_serve_the_next_one(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More operations at once than the pool used to keep idle: the connections they
    opened stay open for the next burst rather than being closed and opened again."""
    connections = CausalOrdering("pool", url=db_url).backend.connections
    opened = 0
    connect = connections.connect

    async def counted() -> Any:
        nonlocal opened
        opened += 1
        return await connect()

    monkeypatch.setattr(connections, "connect", counted)
    await _burst(connections, 25)
    after_first = opened
    await _burst(connections, 25)
    assert after_first > 10
    assert opened == after_first
    assert connections.idle >= 25


async def test_connections_unused_for_a_while_are_closed(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections = CausalOrdering("pool", url=db_url).backend.connections
    await connections.close_idle()
    monkeypatch.setattr(connections, "idle_seconds", 0.2)
    await _burst(connections, 12)
    assert connections.idle == 12
    await eventually(lambda: connections.idle == 0, what="the unused connections to close")


async def test_a_postgresql_worker_opens_at_most_31_connections(
    postgres_url: str, scope: str
) -> None:
    """The README's sizing: per database and event loop, at most 30 connections for
    statements however many tasks ask, and one more that LISTENs for wake-ups while a
    follower waits for a leader in flight; counted by the server."""
    name = f"sizing-{uuid4().hex[:8]}"
    url = make_url(postgres_url).update_query_dict({"application_name": name})
    ordering = CausalOrdering(scope, url=url.render_as_string(hide_password=False))
    backend = ordering.backend
    assert isinstance(backend, PostgresBackend)
    connections = backend.connections
    released = asyncio.Event()

    async def hold() -> None:
        async with connections.held():
            await released.wait()

    async def opened() -> int:
        rows = await run_sql(
            postgres_url,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = :name",
            {"name": name},
        )
        return int(rows[0]["n"])

    async def all_open() -> bool:
        return await opened() == 31

    holders = [asyncio.create_task(hold()) for _ in range(40)]
    try:
        async with backend.notifications.waiter(scope, uuid4()) as waiter:
            assert waiter.woken_by_completion  # its LISTEN connection is open
            await eventually(all_open, what="30 connections for statements and the LISTEN one")
            await asyncio.sleep(0.2)  # ten tasks still wait for a slot: none opens one
            assert await opened() == 31
    finally:
        released.set()
        await asyncio.gather(*holders)


async def test_postgresql_completions_are_durable_unless_the_url_trades_it(
    postgres_url: str, clock: MutableClock, scope: str
) -> None:
    """A completion waits for PostgreSQL's WAL flush unless the URL says
    ``synchronous_commit=off`` (docs/guarantees.md: what a database crash then costs);
    the store, its migrations and its version check work the same either way."""

    async def setting(url: str, name: str) -> str:
        ordering = CausalOrdering(scope, url=url, clock=clock)
        event = make_event(clock)
        async with ordering.event_is_processing(event):
            pass
        assert await ordering.event_has_been_seen(event.id)
        value: str = await ordering.backend.connections.run(
            lambda connection: connection.fetchval(f"SHOW {name}")
        )
        return value

    assert await setting(postgres_url, "synchronous_commit") == "on"
    separator = "&" if "?" in postgres_url else "?"
    trading = f"{postgres_url}{separator}synchronous_commit=off&application_name=billing"
    assert await setting(trading, "synchronous_commit") == "off"
    # the URL's settings win over the store's own defaults
    assert await setting(postgres_url, "application_name") == "ordering"
    assert await setting(trading, "application_name") == "billing"
    # the same URL serves the migrations and the version check
    await asyncio.to_thread(upgrade, trading)
    assert await current_revision(trading) == CODE_REVISION
