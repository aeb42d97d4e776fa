"""Test helpers: a clock tests can move, event factories, a consumer like a user's,
plain SQL on the store's tables, and waiting for a condition with a deadline."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeVar
from uuid import UUID, uuid4

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from ordering import CausalOrdering, EventArrivedEarly, ReceivedEvent, dispose
from ordering.backends import Backend
from ordering.models import utc_now
from ordering.schema import resolve_schema

T = TypeVar("T")


def real_clock() -> MutableClock:
    """A movable clock that starts at the real current time."""
    return MutableClock(utc_now())


class MutableClock:
    """A clock for CausalOrdering(clock=...): stands still until a test moves it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def make_event(
    clock: Callable[[], datetime],
    *,
    name: str = "test.event",
    follows: UUID | None = None,
    id: UUID | None = None,
    occurred: datetime | None = None,
    received: datetime | None = None,
) -> ReceivedEvent:
    now = clock()
    return ReceivedEvent(
        occurred=occurred or now,
        event=name,
        resource={"prefect.resource.id": f"test.resource.{name}"},
        id=id or uuid4(),
        follows=follows,
        received=received or now,
    )


def make_chain(clock: MutableClock, length: int, name: str = "chain") -> list[ReceivedEvent]:
    """Events each following the one before, occurring a second apart."""
    events: list[ReceivedEvent] = []
    for i in range(length):
        events.append(
            make_event(
                clock,
                name=f"{name}.{i}",
                follows=events[-1].id if events else None,
                occurred=clock() + timedelta(seconds=i),
            )
        )
    return events


@dataclass
class Consumer:
    """The consumer a user writes: the handler re-enters preceding_event_confirmed.

    Not ``OrderedConsumer``: the tests that use it check preceding_event_confirmed
    itself, so what it raises must reach them rather than become a verdict."""

    ordering: CausalOrdering[ReceivedEvent]
    reenter: bool = True
    handled: list[ReceivedEvent] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    fail_on: set[UUID] = field(default_factory=set)

    async def handler(self, event: ReceivedEvent, depth: int = 0) -> None:
        if self.reenter:
            async with self.ordering.preceding_event_confirmed(self.handler, event, depth=depth):
                self._handle(event, depth)
        else:
            self._handle(event, depth)

    def _handle(self, event: ReceivedEvent, depth: int) -> None:
        if event.id in self.fail_on:
            raise RuntimeError(f"handler failed on {event.event}")
        self.handled.append(event)
        self.depths.append(depth)

    async def consume(self, event: ReceivedEvent) -> bool:
        """Top-level delivery; False when the event arrived early and was parked."""
        try:
            async with self.ordering.preceding_event_confirmed(self.handler, event):
                self._handle(event, 0)
        except EventArrivedEarly:
            return False
        return True

    @property
    def names(self) -> list[str]:
        return [e.event for e in self.handled]


def assert_causal(handled: list[ReceivedEvent], events: list[Any]) -> None:
    """Every event handled exactly once, each after the event it follows."""
    position = {e.id: i for i, e in enumerate(handled)}
    assert len(position) == len(handled), "an event was handled twice"
    assert set(position) == {e.id for e in events}, "not every event was handled"
    for e in events:
        if e.follows is not None and e.follows in position:
            assert position[e.follows] < position[e.id], f"{e.event} was handled before its leader"


def run_in_threads(count: int, work: Callable[[int], Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``work(i)`` for i in range(count), each in its own thread and event loop, so
    each gets its own backend and connections: real concurrency against the database."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def target(i: int) -> None:
        async def main() -> T:
            try:
                await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
                return await work(i)
            finally:
                await dispose()

        try:
            results[i] = asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# -- plain SQL on the store's objects ------------------------------------------------

#: The store's objects that tests name in plain SQL as ``{name}``.
STORE_OBJECTS = (
    "seen_events",
    "processing_leases",
    "waiting_followers",
    "code_compatibility",
    "alembic_version",
    "waiting",
    "stuck",
    "held_leases",
)


def store_object(url: str, name: str, schema: str | None = None) -> str:
    """The store's object ``name`` as plain SQL names it: in the store's own schema on
    PostgreSQL (``ordering.seen_events``), prefixed on SQLite (``ordering_seen_events``)."""
    if url.startswith("sqlite"):
        return f"ordering_{name}"
    return f"{resolve_schema(schema)}.{name}"


def _stored(url: str, value: Any) -> Any:
    """A value as the store keeps it: on SQLite, ids as 32 hex digits and times as
    fixed-width UTC text; PostgreSQL's driver takes UUIDs and aware datetimes as they are."""
    if not url.startswith("sqlite"):
        return value
    if isinstance(value, UUID):
        return value.hex
    if isinstance(value, datetime):
        assert value.tzinfo is not None, f"a naive datetime in a test's SQL: {value!r}"
        return value.astimezone(UTC).isoformat(" ", "microseconds")[:26]
    return value


def _statement(url: str, sql: str) -> str:
    return sql.format_map({name: store_object(url, name) for name in STORE_OBJECTS})


async def run_sql(
    url: str,
    sql: str,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run one statement of plain SQL on the database, beside the store rather than
    through it, in a transaction of its own; return its rows (none for a write).

    ``{seen_events}``, ``{waiting}``, ... in ``sql`` name the store's objects for the
    URL's dialect (see ``store_object``); a list of parameter sets runs it for each."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            statement = text(_statement(url, sql))
            if isinstance(params, Sequence):
                rows = [{k: _stored(url, v) for k, v in p.items()} for p in params]
                await connection.execute(statement, rows)
                return []
            values = {k: _stored(url, v) for k, v in (params or {}).items()}
            result = await connection.execute(statement, values)
            if not result.returns_rows:
                return []
            return [dict(row) for row in result.mappings()]
    finally:
        await engine.dispose()


async def sql_value(url: str, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    """The one value the statement returns."""
    rows = await run_sql(url, sql, params)
    assert len(rows) == 1 and len(rows[0]) == 1, f"expected one value, got {rows}"
    return next(iter(rows[0].values()))


class ScopeRows(NamedTuple):
    """How many rows of each table a scope holds."""

    seen: int
    leases: int
    followers: int


async def rows_of_scope(url: str, scope: str) -> ScopeRows:
    """The rows the scope holds in each of the store's tables, counted in plain SQL."""
    [row] = await run_sql(
        url,
        "SELECT"
        " (SELECT count(*) FROM {seen_events} WHERE scope = :scope) AS seen,"
        " (SELECT count(*) FROM {processing_leases} WHERE scope = :scope) AS leases,"
        " (SELECT count(*) FROM {waiting_followers} WHERE scope = :scope) AS followers",
        {"scope": scope},
    )
    return ScopeRows(int(row["seen"]), int(row["leases"]), int(row["followers"]))


# -- waiting for what a test can observe -----------------------------------------------


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], *, what: str, within: float = 10.0
) -> None:
    """Return as soon as ``condition()`` holds; fail naming ``what`` after ``within``
    seconds.  For a test that waits on something it can observe, instead of sleeping."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.005)


class StatementLog:
    """The names of the statements a backend sent, in order (see ``Backend.listeners``).

    Listeners may be called from a worker thread (SQLite waiting out a lock); appending
    to a list is safe there."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, name: str, sql: str) -> None:
        self.names.append(name)

    def count(self, name: str) -> int:
        return self.names.count(name)


@contextmanager
def statements_of(backend: Backend) -> Iterator[StatementLog]:
    """Log the statements ``backend`` sends while the block runs."""
    log = StatementLog()
    backend.listeners.append(log)
    try:
        yield log
    finally:
        backend.listeners.remove(log)
