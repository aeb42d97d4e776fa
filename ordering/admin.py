"""Operating the store: schema check, status, followers, prune and replay.

The database side of the ``ordering`` command line, callable from Python as well (a
service can schedule ``await prune(url)``).  The hot path's statements live in
``store.py``; these are the operator's, run rarely and never inside a worker's
transaction.

Every function takes ``now`` (default: the wall clock) because the store's notion of
time is the clock its orderings were given: tests and investigations pass their own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import ValidationError
from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    and_,
    case,
    delete,
    func,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import ReturningDelete

from . import migrate
from .causal import CausalOrdering
from .constants import PRECEDING_EVENT_LOOKBACK, SEEN_EXPIRATION
from .engine import resolve_url, safe_url
from .exceptions import EventArrivedEarly, EventBeingProcessed, SchemaError, StoreUnavailable
from .models import ReceivedEvent, utc_now
from .schema import processing_leases, seen_events, waiting_followers
from .store import Store

logger = logging.getLogger(__name__)

#: The scope ``ordering replay`` uses unless told otherwise.
DEFAULT_REPLAY_SCOPE = "replay"

#: Rows deleted per statement by ``prune``: small enough that each batch holds its
#: locks for milliseconds, large enough that a big backlog is a few hundred round trips.
DEFAULT_BATCH_SIZE = 1000

# The store needs a scope to build an ordering; the operator's statements name their own.
_ADMIN_SCOPE = "ordering-admin"


# -- opening the database ----------------------------------------------------------


def _migrate_hint(url: str) -> str:
    return f"run `ordering migrate --url '{safe_url(url)}'`"


def _missing_sqlite_file(url: str) -> Path | None:
    """The SQLite file the URL names, if it does not exist (connecting would create it)."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database:
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


async def open_store(url: str | None = None) -> Store:
    """The shared store for ``url`` (the one the orderings of this event loop use),
    checked to be at the schema revision this code expects.

    Raises SchemaError, naming ``ordering migrate``, when the schema is missing or
    behind; a SQLite file that does not exist is reported, not created.
    """
    url = resolve_url(url)
    missing = _missing_sqlite_file(url)
    if missing is not None:
        raise SchemaError(f"the SQLite database {missing} does not exist: {_migrate_hint(url)}")
    store = CausalOrdering(_ADMIN_SCOPE, url=url).store
    try:
        # One attempt, not the store's patient retries: a person or a scheduler asked,
        # and an unreachable database should say so now, with its URL.
        async with store.engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")
    except Exception as exc:  # drivers raise their own classes when connecting
        raise _unreachable(url, exc) from exc
    await store.check_schema()
    return store


def _unreachable(url: str, exc: BaseException) -> StoreUnavailable:
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    reason = lines[0] if lines else type(cause).__name__
    return StoreUnavailable(f"cannot open the database {safe_url(url)}: {reason}")


@asynccontextmanager
async def _write_transaction(store: Store, connection: AsyncConnection) -> AsyncIterator[None]:
    """One short write transaction.  On SQLite it takes the write lock up front
    (BEGIN IMMEDIATE), as the store does, so that it waits its turn behind a worker
    instead of failing with "database is locked" when its read turns into a write.
    On PostgreSQL the engine's autocommit makes each statement its own transaction."""
    if store.is_postgres:
        yield
        return
    await connection.exec_driver_sql("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        await connection.exec_driver_sql("ROLLBACK")
        raise
    await connection.exec_driver_sql("COMMIT")


# -- schema ------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaState:
    """Where the database's schema is, against the migrations this code ships."""

    url: str
    current: str | None
    head: str
    missing_file: Path | None = None

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    def describe(self) -> str:
        where = safe_url(self.url)
        if self.missing_file is not None:
            return (
                f"the SQLite database {self.missing_file} does not exist: {_migrate_hint(self.url)}"
            )
        if self.at_head:
            return f"{where} is at revision {self.current}, the head: nothing to migrate"
        if self.current is None:
            return f"{where} has no ordering schema: {_migrate_hint(self.url)}"
        if self.current < self.head:
            return (
                f"{where} is at revision {self.current}, behind the code's {self.head}: "
                f"{_migrate_hint(self.url)}"
            )
        return (
            f"{where} is at revision {self.current}, which this code does not know "
            f"(its head is {self.head}): a newer version of the package migrated it"
        )


async def schema_state(url: str | None = None) -> SchemaState:
    """The database's revision and the head, without creating a missing SQLite file."""
    url = resolve_url(url)
    head = migrate.head_revision()
    missing = _missing_sqlite_file(url)
    if missing is not None:
        return SchemaState(url, None, head, missing_file=missing)
    try:
        current = await migrate.current_revision(url)
    except Exception as exc:  # drivers raise their own classes when connecting
        raise _unreachable(url, exc) from exc
    return SchemaState(url, current, head)


# -- status ------------------------------------------------------------------------


@dataclass(frozen=True)
class OldestWaiting:
    """The follower that has waited longest in a scope, and the leader it waits for."""

    follower_id: UUID
    leader_id: UUID
    event: str | None
    received: datetime
    age: timedelta


@dataclass
class ScopeStatus:
    """What one scope holds.  Waiting followers are counted once each: unclaimed,
    claimed (a worker is handling them now) or claim expired (that worker stopped);
    ``past_lookback`` are the unclaimed ones older than the lookback.  Together with
    ``claim_expired`` they are what ``get_lost_followers()`` would hand out now."""

    scope: str
    seen_live: int = 0
    seen_expired: int = 0
    leases_live: int = 0
    leases_expired: int = 0
    waiting_unclaimed: int = 0
    waiting_claimed: int = 0
    waiting_claim_expired: int = 0
    waiting_past_lookback: int = 0
    oldest_waiting: OldestWaiting | None = None

    @property
    def lost(self) -> int:
        return self.waiting_past_lookback + self.waiting_claim_expired

    def to_json(self) -> dict[str, Any]:
        oldest = self.oldest_waiting
        return {
            "scope": self.scope,
            "seen": {"live": self.seen_live, "expired": self.seen_expired},
            "leases": {"live": self.leases_live, "expired": self.leases_expired},
            "waiting": {
                "unclaimed": self.waiting_unclaimed,
                "claimed": self.waiting_claimed,
                "claim_expired": self.waiting_claim_expired,
                "past_lookback": self.waiting_past_lookback,
                "lost": self.lost,
            },
            "oldest_waiting": None
            if oldest is None
            else {
                "follower_id": str(oldest.follower_id),
                "leader_id": str(oldest.leader_id),
                "event": oldest.event,
                "received": oldest.received.isoformat(),
                "age_seconds": oldest.age.total_seconds(),
            },
        }


def _in_scope(table: Table, scope: str | None) -> ColumnElement[bool]:
    return table.c.scope == scope if scope is not None else true()


def _count_if(condition: ColumnElement[bool]) -> Any:
    return func.count(case((condition, 1)))


def _seen_counts(scope: str | None, seen_after: datetime) -> Select[Any]:
    t = seen_events
    return (
        select(t.c.scope, _count_if(t.c.seen_at > seen_after), _count_if(t.c.seen_at <= seen_after))
        .where(_in_scope(t, scope))
        .group_by(t.c.scope)
    )


def _lease_counts(scope: str | None, now: datetime) -> Select[Any]:
    t = processing_leases
    return (
        select(t.c.scope, _count_if(t.c.expires_at > now), _count_if(t.c.expires_at <= now))
        .where(_in_scope(t, scope))
        .group_by(t.c.scope)
    )


def _waiting_counts(scope: str | None, now: datetime, cutoff: datetime) -> Select[Any]:
    t = waiting_followers
    unclaimed = t.c.claimed_by.is_(None)
    return (
        select(
            t.c.scope,
            _count_if(unclaimed),
            _count_if(t.c.claimed_until > now),
            _count_if(t.c.claimed_until <= now),
            _count_if(and_(unclaimed, t.c.received <= cutoff)),
        )
        .where(_in_scope(t, scope))
        .group_by(t.c.scope)
    )


def _oldest_waiting(scope: str | None) -> Select[Any]:
    t = waiting_followers
    ranked = (
        select(
            t.c.scope,
            t.c.follower_id,
            t.c.leader_id,
            t.c.received,
            t.c.event,
            func.row_number()
            .over(partition_by=t.c.scope, order_by=(t.c.received, t.c.follower_id))
            .label("rank"),
        )
        .where(_in_scope(t, scope))
        .subquery()
    )
    return select(
        ranked.c.scope, ranked.c.follower_id, ranked.c.leader_id, ranked.c.received, ranked.c.event
    ).where(ranked.c.rank == 1)


async def status(
    url: str | None = None,
    *,
    scope: str | None = None,
    now: datetime | None = None,
    seen_expiration: timedelta = SEEN_EXPIRATION,
    lookback: timedelta = PRECEDING_EVENT_LOOKBACK,
) -> list[ScopeStatus]:
    """Per scope (every scope with rows, or just ``scope``), what the tables hold."""
    now = _aware(now or utc_now())
    store = await open_store(url)
    scopes: dict[str, ScopeStatus] = {}
    if scope is not None:
        scopes[scope] = ScopeStatus(scope)

    def entry(name: str) -> ScopeStatus:
        return scopes.setdefault(name, ScopeStatus(name))

    async with store.engine.connect() as connection:
        for name, live, expired in await connection.execute(
            _seen_counts(scope, now - seen_expiration)
        ):
            entry(name).seen_live, entry(name).seen_expired = live, expired
        for name, live, expired in await connection.execute(_lease_counts(scope, now)):
            entry(name).leases_live, entry(name).leases_expired = live, expired
        for name, unclaimed, claimed, claim_expired, past in await connection.execute(
            _waiting_counts(scope, now, now - lookback)
        ):
            e = entry(name)
            e.waiting_unclaimed, e.waiting_claimed = unclaimed, claimed
            e.waiting_claim_expired, e.waiting_past_lookback = claim_expired, past
        for name, follower_id, leader_id, received, event in await connection.execute(
            _oldest_waiting(scope)
        ):
            entry(name).oldest_waiting = OldestWaiting(
                follower_id, leader_id, _event_name(event), received, now - received
            )
    return [scopes[name] for name in sorted(scopes)]


def _event_name(event: Any) -> str | None:
    if isinstance(event, str):  # JSON text, should a driver not decode it
        event = json.loads(event)
    name = event.get("event") if isinstance(event, dict) else None
    return name if isinstance(name, str) else None


# -- followers ---------------------------------------------------------------------


@dataclass(frozen=True)
class WaitingFollower:
    """One row of ordering_waiting_followers, as an operator reads it."""

    scope: str
    follower_id: UUID
    leader_id: UUID
    occurred: datetime
    received: datetime
    claimed_by: str | None
    claimed_until: datetime | None
    event: dict[str, Any]

    @property
    def event_name(self) -> str | None:
        return _event_name(self.event)

    def state(self, now: datetime) -> str:
        if self.claimed_until is None:
            return "waiting"
        return "claimed" if self.claimed_until > now else "claim expired"

    def is_lost(self, now: datetime, lookback: timedelta = PRECEDING_EVENT_LOOKBACK) -> bool:
        """Whether ``get_lost_followers()`` would hand it out at ``now``."""
        if self.claimed_until is None:
            return self.received <= now - lookback
        return self.claimed_until <= now

    def to_json(
        self, now: datetime, lookback: timedelta = PRECEDING_EVENT_LOOKBACK
    ) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "follower_id": str(self.follower_id),
            "leader_id": str(self.leader_id),
            "event_name": self.event_name,
            "occurred": self.occurred.isoformat(),
            "received": self.received.isoformat(),
            "waiting_seconds": (now - self.received).total_seconds(),
            "state": self.state(now),
            "lost": self.is_lost(now, lookback),
            "claimed_by": self.claimed_by,
            "claimed_until": None if self.claimed_until is None else self.claimed_until.isoformat(),
            "event": self.event,
        }


def _followers_query(
    scope: str | None,
    leader: UUID | None,
    lost_at: tuple[datetime, datetime] | None,
    limit: int | None,
) -> Select[Any]:
    t = waiting_followers
    query = select(
        t.c.scope,
        t.c.follower_id,
        t.c.leader_id,
        t.c.occurred,
        t.c.received,
        t.c.claimed_by,
        t.c.claimed_until,
        t.c.event,
    ).where(_in_scope(t, scope))
    if leader is not None:
        query = query.where(t.c.leader_id == leader)
    if lost_at is not None:
        cutoff, now = lost_at
        # The same rows as TAKE_LOST in store.py, read instead of taken.
        query = query.where(
            or_(and_(t.c.claimed_until.is_(None), t.c.received <= cutoff), t.c.claimed_until <= now)
        )
    query = query.order_by(t.c.occurred, t.c.received, t.c.follower_id, t.c.scope)
    return query if limit is None else query.limit(limit)


async def list_followers(
    url: str | None = None,
    *,
    scope: str | None = None,
    leader: UUID | None = None,
    lost: bool = False,
    now: datetime | None = None,
    lookback: timedelta = PRECEDING_EVENT_LOOKBACK,
    limit: int | None = None,
) -> list[WaitingFollower]:
    """Waiting followers in the order they occurred; with ``lost``, only those that
    ``get_lost_followers()`` would hand out at ``now``.  Reads only: nothing is taken."""
    now = _aware(now or utc_now())
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    store = await open_store(url)
    query = _followers_query(scope, leader, (now - lookback, now) if lost else None, limit)
    async with store.engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    return [
        WaitingFollower(
            scope=row.scope,
            follower_id=row.follower_id,
            leader_id=row.leader_id,
            occurred=row.occurred,
            received=row.received,
            claimed_by=row.claimed_by,
            claimed_until=row.claimed_until,
            event=json.loads(row.event) if isinstance(row.event, str) else row.event,
        )
        for row in rows
    ]


# -- prune -------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneResult:
    """Rows deleted by ``prune`` (or, for a dry run, the rows it would delete)."""

    seen_events: int
    leases: int
    dry_run: bool = False

    @property
    def total(self) -> int:
        return self.seen_events + self.leases


@dataclass(frozen=True)
class _Prunable:
    """Rows of one table that the store no longer reads."""

    label: str
    table: Table
    expired: ColumnElement[bool]

    def count(self) -> Select[Any]:
        return select(func.count()).select_from(self.table).where(self.expired)

    def delete_batch(self, batch_size: int) -> ReturningDelete[tuple[UUID]]:
        """Up to ``batch_size`` expired rows, in one short statement.

        The victims are chosen once, in a materialized CTE: as an IN subquery,
        PostgreSQL may scan it again for each row, and since its own deletions are
        skipped by the row lock, every scan would pick new rows past the LIMIT.
        On PostgreSQL, rows a worker has locked (it is refreshing that very row) are
        skipped rather than waited for, and the outer condition is checked again on
        the row as it is when deleted, so a row refreshed meanwhile is kept.  SQLite
        has no row locks: its batch runs under the database's write lock.
        """
        victims = (
            select(self.table.c.scope, self.table.c.event_id)
            .where(self.expired)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
            .cte("victims")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        key = tuple_(self.table.c.scope, self.table.c.event_id)
        # Counted by RETURNING: sqlite3 reports no rowcount for a statement that
        # starts with WITH.
        return (
            delete(self.table)
            .where(key.in_(select(victims.c.scope, victims.c.event_id)), self.expired)
            .returning(self.table.c.event_id)
        )


def _prunables(scope: str | None, now: datetime, seen_expiration: timedelta) -> list[_Prunable]:
    # A seen row at or before the cutoff no longer counts as seen (store.py reads
    # seen_at > now - seen_expiration); a lease at or past its expiry may be taken over.
    return [
        _Prunable(
            "seen events",
            seen_events,
            and_(_in_scope(seen_events, scope), seen_events.c.seen_at <= now - seen_expiration),
        ),
        _Prunable(
            "leases",
            processing_leases,
            and_(_in_scope(processing_leases, scope), processing_leases.c.expires_at <= now),
        ),
    ]


async def prune(
    url: str | None = None,
    *,
    scope: str | None = None,
    now: datetime | None = None,
    seen_expiration: timedelta = SEEN_EXPIRATION,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PruneResult:
    """Delete seen events older than ``seen_expiration`` and expired leases.

    Safe while workers run: every batch is one short transaction of at most
    ``batch_size`` rows, so no lock is held for long, and only rows the store no
    longer reads are deleted.  Waiting followers are never pruned: the lost-follower
    sweep (``get_lost_followers``) hands them out.  Pass the longest
    ``seen_expiration`` any ordering on this database uses.

    ``progress(done, total)`` is called after each batch; ``total`` is counted first.
    Returns the rows deleted (or, with ``dry_run``, the rows that would be).
    """
    now = _aware(now or utc_now())
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, not {batch_size}")
    if seen_expiration <= timedelta(0):
        raise ValueError(f"seen expiration must be positive, not {seen_expiration}")
    store = await open_store(url)
    targets = _prunables(scope, now, seen_expiration)
    counted: list[int] = []
    if dry_run or progress is not None:
        async with store.engine.connect() as connection:
            counted = [(await connection.execute(t.count())).scalar_one() for t in targets]
    if dry_run:
        return PruneResult(counted[0], counted[1], dry_run=True)
    total = sum(counted)
    deleted: list[int] = []
    done = 0
    for target in targets:
        removed = 0
        while True:
            async with (
                store.engine.connect() as connection,
                _write_transaction(store, connection),
            ):
                batch = len((await connection.execute(target.delete_batch(batch_size))).all())
            removed += batch
            done += batch
            if progress is not None:
                progress(done, max(total, done))
            if batch < batch_size:
                break
        logger.info("pruned %d %s", removed, target.label, extra={"scope": scope})
        deleted.append(removed)
    return PruneResult(deleted[0], deleted[1])


# -- replay ------------------------------------------------------------------------

#: What a line must carry to be replayed: without ``id`` a later line cannot refer to
#: it, and without ``received`` the model would stamp the replay's own time on it.
REPLAY_REQUIRED_FIELDS = ("id", "occurred", "received", "event", "resource")


@dataclass(frozen=True)
class LineProblem:
    """A line (or, with no number, a lost follower) that was not replayed, and why."""

    number: int | None
    problem: str

    def __str__(self) -> str:
        return self.problem if self.number is None else f"line {self.number}: {self.problem}"


def parse_line(number: int, raw: bytes | str) -> ReceivedEvent | LineProblem | None:
    """One line of a JSON-lines file: the event, what is wrong with it, or None if blank."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return LineProblem(number, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    text = raw.removeprefix("\ufeff")  # a byte order mark some editors write
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return LineProblem(number, f"invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(data, dict):
        return LineProblem(number, f"not a JSON object but {type(data).__name__}")
    missing = [name for name in REPLAY_REQUIRED_FIELDS if name not in data]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        return LineProblem(number, f"missing field{'s' if len(missing) > 1 else ''} {names}")
    try:
        return ReceivedEvent.model_validate(data)
    except ValidationError as exc:
        return LineProblem(number, _describe_validation(exc))


def _describe_validation(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "event"
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def check_lines(lines: Iterable[tuple[int, bytes | str]]) -> list[LineProblem]:
    """Every bad line of a file, without touching any database (for ``--strict``)."""
    return [parsed for n, raw in lines if isinstance(parsed := parse_line(n, raw), LineProblem)]


class ReplayClock:
    """Replay judges each event as of the moment it was received, as the worker that
    received it live would have: a follower waits for its leader even when the file
    is days old, and the lookback means fifteen minutes of the events' own time."""

    def __init__(self) -> None:
        self.now: datetime | None = None

    def __call__(self) -> datetime:
        return self.now if self.now is not None else utc_now()


@dataclass
class ReplayReport:
    """What a replay did; ``waiting`` is what the scope holds at the end."""

    scope: str
    lines: int = 0
    written: int = 0
    parked: int = 0
    already_seen: int = 0
    busy: int = 0
    bad: int = 0
    flushed: int = 0
    waiting: int = 0
    problems: list[LineProblem] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "lines": self.lines,
            "written": self.written,
            "parked": self.parked,
            "already_seen": self.already_seen,
            "busy": self.busy,
            "bad": self.bad,
            "flushed": self.flushed,
            "waiting": self.waiting,
        }


async def replay(
    lines: Iterable[tuple[int, bytes | str]],
    write: Callable[[ReceivedEvent], None],
    *,
    url: str | None = None,
    scope: str = DEFAULT_REPLAY_SCOPE,
    flush_lost: bool = False,
    on_problem: Callable[[LineProblem], None] | None = None,
) -> ReplayReport:
    """Put events through the store and ``write`` them in causal order.

    Each event goes through ``CausalOrdering.preceding_event_confirmed`` with a handler
    that writes it, so an event is written only after the event it follows; one that
    arrives first is parked in the database and written when its leader comes, in
    this run or a later one.  Events already seen are skipped, so a file can be
    replayed again with more lines appended.  ``flush_lost`` then moves the clock
    past the lookback and writes what still waits, through ``get_lost_followers``.

    Bad lines are passed to ``on_problem`` and skipped; they never reach the store.
    Use a scope of its own: live workers must not share it.
    """
    report = ReplayReport(scope)
    clock = ReplayClock()
    ordering = CausalOrdering(scope, url=url, clock=clock)
    store = await open_store(ordering.url)

    def problem(found: LineProblem) -> None:
        report.problems.append(found)
        if on_problem is not None:
            on_problem(found)

    async def handler(event: ReceivedEvent, depth: int = 0) -> None:
        async with ordering.preceding_event_confirmed(handler, event, depth=depth):
            write(event)
            report.written += 1

    async def deliver(event: ReceivedEvent, number: int | None) -> None:
        try:
            await handler(event)
        except EventArrivedEarly:
            report.parked += 1
        except EventBeingProcessed:
            report.busy += 1
            problem(
                LineProblem(
                    number, f"event {event.id} is being processed by another worker: not replayed"
                )
            )

    for number, raw in lines:
        parsed = parse_line(number, raw)
        if parsed is None:
            continue
        report.lines += 1
        if isinstance(parsed, LineProblem):
            report.bad += 1
            problem(parsed)
            continue
        clock.now = parsed.received
        if await ordering.event_has_been_seen(parsed):
            report.already_seen += 1
            continue
        await deliver(parsed, number)

    if flush_lost:
        flush_at = await _when_all_are_lost(store, scope, ordering.preceding_event_lookback)
        if flush_at is not None:
            clock.now = max(flush_at, clock.now) if clock.now else flush_at
            lost = await ordering.get_lost_followers()
            report.flushed = len(lost)
            for event in lost:
                await deliver(event, None)
    report.waiting = await _count_waiting(store, scope)
    return report


async def _when_all_are_lost(store: Store, scope: str, lookback: timedelta) -> datetime | None:
    """The earliest time at which ``get_lost_followers`` hands out every follower that
    waits in the scope now (past the lookback, or their claim expired); None if none."""
    t = waiting_followers
    query = select(func.max(t.c.received), func.max(t.c.claimed_until)).where(t.c.scope == scope)
    async with store.engine.connect() as connection:
        latest_received, latest_claim = (await connection.execute(query)).one()
    if latest_received is None:
        return None
    candidates: list[datetime] = [latest_received + lookback]
    if latest_claim is not None:
        candidates.append(latest_claim)
    return max(candidates)


async def _count_waiting(store: Store, scope: str) -> int:
    t = waiting_followers
    query = select(func.count()).select_from(t).where(t.c.scope == scope)
    async with store.engine.connect() as connection:
        return int((await connection.execute(query)).scalar_one())


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: give a timezone, e.g. UTC")
    return moment


__all__: Sequence[str] = (
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_REPLAY_SCOPE",
    "LineProblem",
    "OldestWaiting",
    "PruneResult",
    "ReplayClock",
    "ReplayReport",
    "SchemaState",
    "ScopeStatus",
    "WaitingFollower",
    "check_lines",
    "list_followers",
    "open_store",
    "parse_line",
    "prune",
    "replay",
    "schema_state",
    "status",
)
