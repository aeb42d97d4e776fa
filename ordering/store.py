"""Every SQL statement the ordering runs, and the connection handling around them.

One method per operation; each is one statement where the database allows it.

Why no follower is ever stranded
--------------------------------
A follower F parks on leader L while L may be completing on another worker.  Both
sides serialize on L:

* PostgreSQL: ``ordering_park_follower`` and ``ordering_complete_event`` (see the
  first migration) both start with ``pg_advisory_xact_lock`` on (scope, L).  Inside a
  PL/pgSQL function each statement takes a fresh snapshot, so whichever runs second
  sees what the first committed: either F sees L seen (and does not park), or L sees
  F's row (and claims it).  A single SQL statement could not do this: its snapshot
  is taken before it waits for any lock.
* SQLite: both run as ``BEGIN IMMEDIATE`` transactions, which take the database's
  single write lock before reading anything.

Parking also deletes F's own lease in the same transaction, so when L claims F it can
lease F at once and hand it to the handler: the two never meet halfway.

How statements run
------------------
Each statement is written once, with ``:name`` parameters, and rendered per dialect
(``$1`` for asyncpg).  Connections come from SQLAlchemy's engine and pool, but the hot
path runs on the driver connections underneath: on PostgreSQL through asyncpg's own
prepared-statement cache (SQLAlchemy's execute path cost more client CPU than the round
trip), on SQLite on the event loop's thread (see ``Store._sqlite``).  Either way
SQLAlchemy's cursor events are fired for every statement, so hooks (the benchmark's
counters) see them all.  Connections are kept checked out in a small free list per
store, so an operation does not pay for a pool checkout and return.

Retries
-------
Connection failures are retried a bounded number of times.  A failure while
connecting is always safe to retry (nothing was sent).  After a statement may have
been sent, only idempotent operations are retried; every write here is written to be
idempotent for its caller's token (a lease or claim already ours is taken again, an
upsert writes the same row), except ``take_lost_followers``, whose DELETE hands rows
out once and so is never repeated blindly.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .engine import SQLITE_BUSY_TIMEOUT_S, create_engine, safe_url
from .exceptions import SchemaError, StoreUnavailable
from .notify import Notifications, Waiter
from .schema import SCHEMA_REVISION, VERSION_TABLE

logger = logging.getLogger(__name__)

T = TypeVar("T")
Params = Mapping[str, Any]

_PARAM = re.compile(r"(?<![:\w]):(\w+)")


class Statement:
    """One SQL statement, written once with ``:name`` parameters.

    PostgreSQL gets it with numbered parameters; SQLite takes the named form as is.
    A parameter called ``ids`` is a list, expanded in place into ``(a, b, ...)``.
    """

    def __init__(self, sql: str) -> None:
        self.sql = " ".join(sql.split())
        self.names = list(dict.fromkeys(_PARAM.findall(self.sql)))
        self.expands = "ids" in self.names
        self.postgres = (
            self.sql
            if self.expands
            else _PARAM.sub(lambda m: f"${self.names.index(m.group(1)) + 1}", self.sql)
        )

    def for_postgres(self, params: Params) -> tuple[str, tuple[Any, ...]]:
        if not self.expands:
            return self.postgres, tuple(params.get(name) for name in self.names)
        args: list[Any] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) == "ids":
                ids = list(params["ids"])
                start = len(args) + 1
                args.extend(ids)
                return "(" + ", ".join(f"${start + i}" for i in range(len(ids))) + ")"
            args.append(params.get(match.group(1)))
            return f"${len(args)}"

        return _PARAM.sub(number, self.sql), tuple(args)

    def for_sqlite(self, params: Params) -> tuple[str, dict[str, Any]]:
        converted = {name: _sqlite_value(params.get(name)) for name in self.names if name != "ids"}
        if not self.expands:
            return self.sql, converted
        ids = [_sqlite_value(v) for v in params["ids"]]
        converted.update({f"ids_{i}": v for i, v in enumerate(ids)})
        listed = "(" + ", ".join(f":ids_{i}" for i in range(len(ids))) + ")"
        return self.sql.replace(":ids", listed), converted


def _sqlite_value(value: Any) -> Any:
    """Values as SQLAlchemy's SQLite types store them: UUIDs as 32 hex digits, times as
    fixed-width UTC text (so that text order is time order)."""
    if isinstance(value, UUID):
        return value.hex
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only takes aware UTC datetimes")
        if value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        return value.isoformat(" ", "microseconds")[:26]
    return value


def _sql(sql: str) -> Statement:
    return Statement(sql)


# -- statements, both dialects -------------------------------------------------
# Events are read back as CAST(event AS TEXT): the JSON text, whichever the dialect
# (the asyncpg driver would otherwise decode JSONB into dicts), for model_validate_json.

# Take the lease (or take over an expired one, or one already ours) unless the event
# was seen already, and in the same statement say whether the leader was seen or is
# being processed.  Returns no row when someone else holds a live lease, or when the
# event was seen (SQLite serializes writers, so checking seen first is safe there;
# PostgreSQL runs PG_BEGIN, which checks it after taking the lease, and commits the
# lease without waiting for the WAL flush).
BEGIN = _sql("""
INSERT INTO ordering_processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
SELECT :scope, :event_id, :owner, :now, :expires_at
WHERE NOT (:refuse_seen AND EXISTS (
    SELECT 1 FROM ordering_seen_events s
    WHERE s.scope = :scope AND s.event_id = :event_id AND s.seen_at > :seen_after))
ON CONFLICT (scope, event_id) DO UPDATE
SET owner = excluded.owner, acquired_at = excluded.acquired_at, expires_at = excluded.expires_at,
    has_waiters = false
WHERE l.expires_at <= excluded.acquired_at OR l.owner = excluded.owner
RETURNING
    EXISTS (SELECT 1 FROM ordering_seen_events s
            WHERE s.scope = :scope AND s.event_id = :follows AND s.seen_at > :seen_after),
    EXISTS (SELECT 1 FROM ordering_processing_leases p
            WHERE p.scope = :scope AND p.event_id = :follows AND p.expires_at > :now)
""")

SEEN = _sql("""
SELECT EXISTS (SELECT 1 FROM ordering_seen_events
               WHERE scope = :scope AND event_id = :event_id AND seen_at > :seen_after)
""")

LEADER_STATUS = _sql("""
SELECT
    EXISTS (SELECT 1 FROM ordering_seen_events s
            WHERE s.scope = :scope AND s.event_id = :follows AND s.seen_at > :seen_after),
    EXISTS (SELECT 1 FROM ordering_processing_leases p
            WHERE p.scope = :scope AND p.event_id = :follows AND p.expires_at > :now)
""")

RELEASE = _sql("""
DELETE FROM ordering_processing_leases
WHERE scope = :scope AND event_id = :event_id AND owner = :owner
""")

# A follower waiting for this leader in flight asks to be notified when it completes.
MARK_WAITING = _sql("""
UPDATE ordering_processing_leases SET has_waiters = true
WHERE scope = :scope AND event_id = :leader_id AND expires_at > :now
RETURNING 1
""")

RENEW_LEASES = _sql("""
UPDATE ordering_processing_leases SET expires_at = :expires_at
WHERE scope = :scope AND owner = :owner
""")

RENEW_CLAIMS = _sql("""
UPDATE ordering_waiting_followers SET claimed_until = :expires_at
WHERE scope = :scope AND claimed_by = :owner
""")

RECORD_SEEN = _sql("""
INSERT INTO ordering_seen_events (scope, event_id, seen_at) VALUES (:scope, :event_id, :now)
ON CONFLICT (scope, event_id) DO UPDATE SET seen_at = excluded.seen_at
""")

FORGET_OWN_FOLLOWER_ROW = _sql("""
DELETE FROM ordering_waiting_followers WHERE scope = :scope AND follower_id = :event_id
""")

RECORD_FOLLOWER = _sql("""
INSERT INTO ordering_waiting_followers (scope, follower_id, leader_id, occurred, received, event)
VALUES (:scope, :event_id, :leader_id, :occurred, :received, :event)
ON CONFLICT (scope, follower_id) DO NOTHING
""")

FOLLOWERS_OF = _sql("""
SELECT CAST(event AS TEXT) FROM ordering_waiting_followers
WHERE scope = :scope AND leader_id = :leader_id
ORDER BY occurred, received, follower_id
""")

FOLLOWERS_BY_ID = _sql("""
SELECT CAST(event AS TEXT) FROM ordering_waiting_followers
WHERE scope = :scope AND follower_id IN :ids
ORDER BY occurred, received, follower_id
""")

# Unclaimed followers past the lookback, and claimed ones whose claimer died.
TAKE_LOST = _sql("""
DELETE FROM ordering_waiting_followers
WHERE scope = :scope
  AND ((claimed_until IS NULL AND received <= :cutoff) OR claimed_until <= :now)
RETURNING CAST(event AS TEXT)
""")

# A released follower that was not handled (its handler failed, or the depth limit cut
# it off) keeps its row with its claim expired now: the next get_lost_followers hands
# it out again, without waiting for the lookback (its leader is seen already).
UNCLAIM = _sql("""
UPDATE ordering_waiting_followers SET claimed_until = :now
WHERE scope = :scope AND claimed_by = :owner AND follower_id IN :ids
""")

RELEASE_CLAIMED = _sql("""
DELETE FROM ordering_processing_leases
WHERE scope = :scope AND owner = :owner AND event_id IN :ids
""")

CLEAR_SCOPE = tuple(
    _sql(f"DELETE FROM {table} WHERE scope = :scope")
    for table in (
        "ordering_seen_events",
        "ordering_processing_leases",
        "ordering_waiting_followers",
    )
)
CLEAR_ALL = tuple(
    _sql(f"DELETE FROM {table}")
    for table in (
        "ordering_seen_events",
        "ordering_processing_leases",
        "ordering_waiting_followers",
    )
)

SCHEMA_VERSION = _sql(f"SELECT version_num FROM {VERSION_TABLE}")

# -- PostgreSQL: one round trip each, through the functions of the first migration --

PG_BEGIN = _sql("""
SELECT already_seen, leader_seen, leader_in_flight FROM ordering_begin_event(
    :scope, :event_id, :follows, :owner, :now, :expires_at, :seen_after, :refuse_seen)
""")

PG_COMPLETE = _sql("""
SELECT released_event FROM ordering_complete_event(
    :scope, :event_id, :owner, :now, :claim_owner, :claim_until, :is_follower)
""")

PG_PARK = _sql("""
SELECT ordering_park_follower(
    :scope, :event_id, :leader_id, :occurred, :received, :event, :owner, :seen_after)
""")

# -- SQLite: the same work as the functions, inside BEGIN IMMEDIATE --------------

# Parking gives up the lease: if ours is gone, an earlier attempt of this very park
# committed (its reply was lost), and the event is parked, not free to go.
SQLITE_STILL_LEASED = _sql("""
SELECT :owner = '' OR EXISTS (SELECT 1 FROM ordering_processing_leases
                              WHERE scope = :scope AND event_id = :event_id AND owner = :owner)
""")

SQLITE_CLAIM = _sql("""
UPDATE ordering_waiting_followers AS f
SET claimed_by = :claim_owner, claimed_until = :claim_until
WHERE f.scope = :scope AND f.leader_id = :event_id
  AND (f.claimed_until IS NULL OR f.claimed_until <= :now OR f.claimed_by = :claim_owner)
  AND NOT EXISTS (SELECT 1 FROM ordering_processing_leases l
                  WHERE l.scope = :scope AND l.event_id = f.follower_id
                    AND l.expires_at > :now AND l.owner <> :claim_owner)
RETURNING event
""")

SQLITE_LEASE_CLAIMED = _sql("""
INSERT INTO ordering_processing_leases (scope, event_id, owner, acquired_at, expires_at)
SELECT scope, follower_id, :claim_owner, :now, :claim_until FROM ordering_waiting_followers
WHERE scope = :scope AND leader_id = :event_id AND claimed_by = :claim_owner
ON CONFLICT (scope, event_id) DO UPDATE
SET owner = excluded.owner, acquired_at = excluded.acquired_at, expires_at = excluded.expires_at
""")


# -- errors ---------------------------------------------------------------------

_TRANSIENT_TEXT = (
    "database is locked",
    "connection was closed",
    "connection is closed",
    "terminating connection",
    "server closed the connection",
    "connection refused",
    "could not connect",
    "the database system is",  # starting up / shutting down / in recovery mode
    "cannot connect now",
    "connection reset",
    "broken pipe",
    "connection does not exist",
)


#: PostgreSQL errors that say the connection (or the server) went away, or that the
#: statement lost a race and may simply be run again.
_TRANSIENT_POSTGRES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08, and "connection does not exist"
    asyncpg.exceptions.AdminShutdownError,  # 57P01: terminated by an administrator
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.exceptions.DeadlockDetectedError,  # 40P01: the other side went ahead
    asyncpg.exceptions.SerializationError,  # 40001
)


def is_transient(exc: BaseException) -> bool:
    """A lost or refused connection, or a busy SQLite file: worth trying again."""
    if (isinstance(exc, DBAPIError) and exc.connection_invalidated) or _never_sent(exc):
        return True
    if isinstance(exc, (ConnectionError, asyncio.TimeoutError, *_TRANSIENT_POSTGRES)):
        return True
    message = str(exc).lower()
    return isinstance(exc, (DBAPIError, OSError, sqlite3.Error, asyncpg.InterfaceError)) and any(
        t in message for t in _TRANSIENT_TEXT
    )


def _is_missing_table(exc: BaseException) -> bool:
    message = str(exc).lower()
    return "no such table" in message or ("relation" in message and "does not exist" in message)


_DATABASE_ERRORS = (
    DBAPIError,
    OSError,
    sqlite3.Error,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


def _never_sent(exc: BaseException) -> bool:
    """asyncpg refused the statement before it left the client: the connection was
    closed, or took the server's FATAL while idle and its protocol is stuck."""
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return "cannot switch to state" in str(exc)
    return isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc)


@dataclass(frozen=True, slots=True)
class Begun:
    """The lease is ours; what ``begin`` saw of the leader."""

    leader_seen: bool
    leader_in_flight: bool


class Refused(enum.Enum):
    """Why ``begin`` did not lease the event."""

    HELD_ELSEWHERE = "another holder has a live lease"
    ALREADY_SEEN = "the event was processed already"


@dataclass(eq=False)
class _Connection:
    """A connection kept checked out of the pool, with its driver's connection."""

    connection: AsyncConnection
    driver: Any


Rows = list[tuple[Any, ...]]
SqliteWork = Callable[[Callable[[Statement, Params], Rows]], T]


class Store:
    """The database side of every ordering on one URL (and event loop)."""

    def __init__(
        self,
        url: str,
        *,
        engine: AsyncEngine | None = None,
        retries: int = 8,
        retry_backoff: float = 0.05,
        retry_backoff_max: float = 2.0,
        idle_connections: int = 10,
    ) -> None:
        self.url = url
        self.engine = engine or create_engine(url)
        self.dialect = self.engine.dialect.name
        self.is_postgres = self.dialect == "postgresql"
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.idle_connections = idle_connections
        self._idle: list[_Connection] = []
        self._schema_checked = False
        self._writes = 0
        self._checkpointing: asyncio.Task[None] | None = None
        self.notifications = Notifications(self.engine) if self.is_postgres else None

    async def dispose(self) -> None:
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        if self.notifications is not None:
            await self.notifications.close()
        await self._close_idle()
        await self.engine.dispose()

    # -- connections ------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        if self._idle:
            return self._idle.pop()
        connection = self.engine.connect()
        await connection.start()
        try:
            driver = (await connection.get_raw_connection()).driver_connection
            assert driver is not None
            if not self.is_postgres:
                # The store checkpoints the WAL itself, off the event loop (_checkpoint);
                # this connection never goes back to the pool (_give_back discards it).
                driver._conn.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            await _discard(connection)
            raise
        return _Connection(connection, driver)

    async def _give_back(self, held: _Connection) -> None:
        if len(self._idle) < self.idle_connections and not held.connection.invalidated:
            self._idle.append(held)
        else:
            await _discard(held.connection)

    async def _close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for held in idle:
            await _discard(held.connection)

    async def _run(
        self, operation: Callable[[_Connection], Awaitable[T]], *, idempotent: bool = True
    ) -> T:
        """Run an operation on a connection, retrying lost connections within bounds."""
        if not self._schema_checked:
            await self.check_schema()
        return await self._with_retries(operation, idempotent=idempotent)

    async def _with_retries(
        self, operation: Callable[[_Connection], Awaitable[T]], *, idempotent: bool
    ) -> T:
        delay = self.retry_backoff
        for attempt in range(self.retries + 1):
            held: _Connection | None = None
            try:
                held = await self._acquire()
                result = await operation(held)
            except _DATABASE_ERRORS as exc:
                if held is not None:
                    await _discard(held.connection)
                if not is_transient(exc):
                    raise
                sent = held is not None and not _never_sent(exc)
                # The server may have dropped every connection: the idle ones are dead too.
                await self._close_idle()
                if sent and not idempotent:
                    raise StoreUnavailable(
                        f"lost the connection to {safe_url(self.url)} during an operation "
                        f"that is not safe to repeat: {exc}"
                    ) from exc
                if attempt == self.retries:
                    raise StoreUnavailable(
                        f"{safe_url(self.url)} is unavailable after {attempt + 1} attempts: {exc}"
                    ) from exc
                logger.warning(
                    "database operation failed (%s: %s), retrying in %.2fs (attempt %d of %d)",
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                    delay,
                    attempt + 1,
                    self.retries,
                    extra={"url": safe_url(self.url), "attempt": attempt + 1},
                )
            except BaseException:
                # Cancelled or failed mid-operation: the connection's state is unknown.
                if held is not None:
                    await _discard(held.connection)
                raise
            else:
                await self._give_back(held)
                return result
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_backoff_max)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- running statements -------------------------------------------------------

    async def _fetch(
        self, statement: Statement, params: Params, *, idempotent: bool = True
    ) -> Rows:
        """One statement, its own transaction; returns its rows."""
        if self.is_postgres:

            async def run(held: _Connection) -> Rows:
                sql, args = statement.for_postgres(params)
                sync_connection = held.connection.sync_connection
                announce = _announcer(sync_connection) if sync_connection is not None else None
                after = announce(sql, args, None) if announce else None
                # asyncpg directly, through its own prepared-statement cache: SQLAlchemy's
                # execute path costs more client CPU than the round trip itself.
                rows = await held.driver.fetch(sql, *args)
                if after:
                    after(None)
                return [tuple(row) for row in rows]

            return await self._run(run, idempotent=idempotent)
        return await self._sqlite(lambda execute: execute(statement, params), idempotent=idempotent)

    async def _sqlite(
        self, work: SqliteWork[T], *, write: bool = False, idempotent: bool = True
    ) -> T:
        """Run ``work`` against SQLite: ``work`` gets an ``execute(statement, params)``
        that returns rows; with ``write`` the whole of it is one BEGIN IMMEDIATE
        transaction.

        It runs on the event loop's own thread, with SQLite's busy timeout at zero, so it
        never waits there: an operation is a few hundred microseconds of SQLite work,
        less than the two thread switches a hop to aiosqlite's worker costs (about
        150us each on a small VM).  When another process holds the write lock, the same
        work goes to aiosqlite's worker thread, which waits out the lock (busy timeout)
        without blocking the loop.  WAL checkpoints are kept off the loop the same way
        (see ``_checkpoint``).
        """

        async def run(held: _Connection) -> T:
            driver = held.driver
            connection: sqlite3.Connection = driver._conn
            sync_connection = held.connection.sync_connection
            assert sync_connection is not None
            announce = _announcer(sync_connection)

            def execute(statement: Statement, params: Params) -> Rows:
                sql, args = statement.for_sqlite(params)
                return _sqlite_execute(connection, sql, args, announce)

            def attempt() -> T:
                if not write:
                    return work(execute)
                _sqlite_execute(connection, "BEGIN IMMEDIATE", {}, announce)
                try:
                    result = work(execute)
                except BaseException:
                    connection.rollback()
                    raise
                _sqlite_execute(connection, "COMMIT", {}, announce)
                return result

            try:
                result = _without_waiting(connection, attempt)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                # aiosqlite's own executor entry point: one hop for the whole operation.
                result = await driver._execute(attempt)
            else:
                # An operation that never waited must still let other tasks run (the
                # checkpoint, lease renewals, other consumers): one turn of the loop.
                await asyncio.sleep(0)
            if write:
                self._note_write()
            return result

        return await self._run(run, idempotent=idempotent)

    def _note_write(self) -> None:
        self._writes += 1
        if self._writes % CHECKPOINT_EVERY == 0 and self._checkpointing is None:
            self._checkpointing = asyncio.get_running_loop().create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        """Move the WAL into the database file, in aiosqlite's thread, on a connection
        of its own: the store's connections turn SQLite's automatic checkpoint off, as
        it would run (and fsync) inside a commit on the event loop.  RESTART, not
        PASSIVE: a PASSIVE checkpoint copies the frames but the WAL was seen to keep
        growing (writers did not start it over), while RESTART waits out the readers
        so the next writer does; the store's own writers meanwhile get SQLITE_BUSY and
        wait in aiosqlite's thread, not on the loop."""
        try:
            held = await self._acquire()
            try:
                await held.driver._execute(
                    lambda: held.driver._conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                )
            finally:
                await self._give_back(held)
        except Exception:
            logger.warning("WAL checkpoint failed; the next one will try again", exc_info=True)
        finally:
            self._checkpointing = None

    async def check_schema(self) -> None:
        """Fail with the command to run when the schema is missing or not at our revision."""

        async def read(held: _Connection) -> Rows:
            try:
                if self.is_postgres:
                    result = await held.connection.exec_driver_sql(SCHEMA_VERSION.postgres, ())
                    return [tuple(row) for row in result.all()]
                sql = SCHEMA_VERSION.sql
                return await held.driver._execute(  # type: ignore[no-any-return]
                    lambda: _sqlite_execute(held.driver._conn, sql, {}, None)
                )
            except _DATABASE_ERRORS as exc:
                if _is_missing_table(exc):
                    return []
                raise

        rows = await self._with_retries(read, idempotent=True)
        found = rows[0][0] if rows else None
        if found != SCHEMA_REVISION:
            state = "has no ordering schema" if found is None else f"is at revision {found}"
            raise SchemaError(
                f"the database {safe_url(self.url)} {state}; this code needs revision "
                f"{SCHEMA_REVISION}: run `ordering migrate --url '{safe_url(self.url)}'` "
                "(or `alembic upgrade head` with ORDERING_DATABASE_URL set)"
            )
        self._schema_checked = True

    # -- processing leases ------------------------------------------------------

    async def begin(
        self,
        scope: str,
        event_id: UUID,
        follows: UUID | None,
        owner: str,
        now: datetime,
        expires_at: datetime,
        seen_after: datetime,
        *,
        refuse_seen: bool = True,
    ) -> Begun | Refused:
        """Lease the event, and look at its leader in the same round trip.

        Refused when someone else holds a live lease, or (with ``refuse_seen``) when
        the event itself was seen already.
        """
        params = {
            "scope": scope,
            "event_id": event_id,
            "follows": follows,
            "owner": owner,
            "now": now,
            "expires_at": expires_at,
            "seen_after": seen_after,
            "refuse_seen": refuse_seen,
        }
        if self.is_postgres:
            rows = await self._fetch(PG_BEGIN, params)
            if not rows:
                return Refused.HELD_ELSEWHERE
            already_seen, leader_seen, leader_in_flight = rows[0]
            if already_seen:
                return Refused.ALREADY_SEEN
            return Begun(bool(leader_seen), bool(leader_in_flight))

        def work(execute: Callable[[Statement, Params], Rows]) -> Begun | Refused:
            rows = execute(BEGIN, params)
            if rows:
                return Begun(bool(rows[0][0]), bool(rows[0][1]))
            if refuse_seen and execute(SEEN, params)[0][0]:
                return Refused.ALREADY_SEEN
            return Refused.HELD_ELSEWHERE

        return await self._sqlite(work)

    async def leader_status(
        self, scope: str, leader_id: UUID, now: datetime, seen_after: datetime
    ) -> tuple[bool, bool]:
        """(leader seen, leader holds a live lease)."""
        params = {"scope": scope, "follows": leader_id, "now": now, "seen_after": seen_after}
        (row,) = await self._fetch(LEADER_STATUS, params)
        return bool(row[0]), bool(row[1])

    @asynccontextmanager
    async def leader_waiter(
        self, scope: str, leader_id: UUID, *, notify: bool = True
    ) -> AsyncIterator[Waiter]:
        """A waiter woken when the leader completes (PostgreSQL) or after each timeout."""
        if self.notifications is None or not notify:
            yield Waiter(None)
            return
        async with self.notifications.waiter(scope, leader_id) as waiter:
            yield waiter

    async def mark_waiting(self, scope: str, leader_id: UUID, now: datetime) -> bool:
        """Ask the leader's completion to notify; False when it holds no live lease."""
        params = {"scope": scope, "leader_id": leader_id, "now": now}
        return bool(await self._fetch(MARK_WAITING, params))

    async def seen(self, scope: str, event_id: UUID, seen_after: datetime) -> bool:
        params = {"scope": scope, "event_id": event_id, "seen_after": seen_after}
        return bool((await self._fetch(SEEN, params))[0][0])

    async def release(self, scope: str, event_id: UUID, owner: str) -> None:
        await self._fetch(RELEASE, {"scope": scope, "event_id": event_id, "owner": owner})

    async def renew(self, scope: str, owner: str, expires_at: datetime) -> None:
        """Push back the expiry of every lease and claim this owner holds."""
        params = {"scope": scope, "owner": owner, "expires_at": expires_at}
        await self._fetch(RENEW_LEASES, params)
        await self._fetch(RENEW_CLAIMS, params)

    # -- seen events ------------------------------------------------------------

    async def record_seen(self, scope: str, event_id: UUID, now: datetime) -> None:
        await self._fetch(RECORD_SEEN, {"scope": scope, "event_id": event_id, "now": now})

    async def complete(
        self,
        scope: str,
        event_id: UUID,
        owner: str | None,
        now: datetime,
        claim_owner: str | None,
        claim_until: datetime,
        *,
        is_follower: bool = True,
    ) -> list[str]:
        """Mark seen, release our lease, drop our own follower row and, when
        ``claim_owner`` is given, claim and lease the followers waiting on this event.

        One transaction; returns the claimed followers' JSON.
        """
        params = {
            "scope": scope,
            "event_id": event_id,
            "owner": owner,
            "now": now,
            "claim_owner": claim_owner,
            "claim_until": claim_until,
            "is_follower": is_follower,
        }
        if self.is_postgres:
            return [row[0] for row in await self._fetch(PG_COMPLETE, params)]

        def work(execute: Callable[[Statement, Params], Rows]) -> list[str]:
            execute(RECORD_SEEN, params)
            if owner is not None:
                execute(RELEASE, params)
            if is_follower:  # only an event that follows another can have parked
                execute(FORGET_OWN_FOLLOWER_ROW, params)
            if claim_owner is None:
                return []
            claimed = [row[0] for row in execute(SQLITE_CLAIM, params)]
            if claimed:
                execute(SQLITE_LEASE_CLAIMED, params)
            return claimed

        return await self._sqlite(work, write=True)

    # -- followers --------------------------------------------------------------

    async def park(
        self,
        scope: str,
        event_id: UUID,
        leader_id: UUID,
        occurred: datetime,
        received: datetime,
        event_json: str,
        owner: str,
        seen_after: datetime,
    ) -> bool:
        """Park the event as a follower unless its leader has been seen meanwhile.

        Parking releases the event's lease in the same transaction.  Returns whether
        it parked; False means the leader was seen and the event may go ahead.
        """
        params = {
            "scope": scope,
            "event_id": event_id,
            "leader_id": leader_id,
            "occurred": occurred,
            "received": received,
            "event": event_json,
            "owner": owner,
            "seen_after": seen_after,
        }
        if self.is_postgres:
            return bool((await self._fetch(PG_PARK, params))[0][0])

        def work(execute: Callable[[Statement, Params], Rows]) -> bool:
            if execute(SEEN, {**params, "event_id": leader_id})[0][0]:
                return not execute(SQLITE_STILL_LEASED, params)[0][0]
            execute(RECORD_FOLLOWER, params)
            execute(RELEASE, params)
            return True

        return await self._sqlite(work, write=True)

    async def record_follower(
        self,
        scope: str,
        event_id: UUID,
        leader_id: UUID,
        occurred: datetime,
        received: datetime,
        event_json: str,
    ) -> None:
        params = {
            "scope": scope,
            "event_id": event_id,
            "leader_id": leader_id,
            "occurred": occurred,
            "received": received,
            "event": event_json,
        }
        await self._fetch(RECORD_FOLLOWER, params)

    async def forget_follower(self, scope: str, event_id: UUID) -> None:
        await self._fetch(FORGET_OWN_FOLLOWER_ROW, {"scope": scope, "event_id": event_id})

    async def followers_of(self, scope: str, leader_id: UUID) -> list[str]:
        rows = await self._fetch(FOLLOWERS_OF, {"scope": scope, "leader_id": leader_id})
        return [row[0] for row in rows]

    async def followers_by_id(self, scope: str, ids: Sequence[UUID]) -> list[str]:
        if not ids:
            return []
        rows = await self._fetch(FOLLOWERS_BY_ID, {"scope": scope, "ids": list(ids)})
        return [row[0] for row in rows]

    async def take_lost_followers(self, scope: str, cutoff: datetime, now: datetime) -> list[str]:
        """Delete and return followers past the lookback or whose claimer died."""
        params = {"scope": scope, "cutoff": cutoff, "now": now}
        return [row[0] for row in await self._fetch(TAKE_LOST, params, idempotent=False)]

    async def unclaim(self, scope: str, owner: str, ids: Sequence[UUID], now: datetime) -> None:
        """Give back claimed followers that were not handled (and their leases): their
        claims expire now, so the lost-follower sweep hands them out again."""
        if not ids:
            return
        params = {"scope": scope, "owner": owner, "ids": list(ids), "now": now}
        await self._fetch(UNCLAIM, params)
        await self._fetch(RELEASE_CLAIMED, params)

    # -- housekeeping -----------------------------------------------------------

    async def clear(self, scope: str | None) -> None:
        for statement in CLEAR_ALL if scope is None else CLEAR_SCOPE:
            await self._fetch(statement, {"scope": scope})


#: Write operations between two WAL checkpoints (about 8 pages each: ~4 MB of WAL).
CHECKPOINT_EVERY = 128


def _without_waiting(connection: sqlite3.Connection, attempt: Callable[[], T]) -> T:
    """Run ``attempt`` with SQLite's busy timeout at zero: fail at once, never block."""
    connection.execute("PRAGMA busy_timeout=0")
    try:
        return attempt()
    finally:
        connection.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    message = str(exc).lower()
    return "database is locked" in message or "database is busy" in message


def _announcer(connection: Any) -> Callable[[str, Any, Any], Callable[[Any], None]] | None:
    """Fire SQLAlchemy's cursor events for statements run on the raw SQLite connection,
    so that event hooks (the benchmark's counters, for one) see every statement."""
    dispatch = connection.dispatch
    if not (dispatch.before_cursor_execute or dispatch.after_cursor_execute):
        return None

    def announce(statement: str, parameters: Any, cursor: Any) -> Callable[[Any], None]:
        for listener in dispatch.before_cursor_execute:
            listener(connection, cursor, statement, parameters, None, False)

        def after(result_cursor: Any) -> None:
            for listener in dispatch.after_cursor_execute:
                listener(connection, result_cursor, statement, parameters, None, False)

        return after

    return announce


def _sqlite_execute(
    connection: sqlite3.Connection,
    sql: str,
    params: Mapping[str, Any],
    announce: Callable[[str, Any, Any], Callable[[Any], None]] | None,
) -> Rows:
    cursor = connection.cursor()
    try:
        after = announce(sql, params, cursor) if announce else None
        cursor.execute(sql, params)
        rows = cursor.fetchall() if cursor.description else []
        if after:
            after(cursor)
        return rows
    finally:
        cursor.close()


async def _discard(connection: AsyncConnection) -> None:
    """Drop a connection whose state is unknown, so that the pool never hands it out."""
    try:
        await connection.invalidate()
    except BaseException:
        logger.debug("invalidating a broken connection failed", exc_info=True)
    await _close_quietly(connection)


async def _close_quietly(connection: AsyncConnection) -> None:
    try:
        await connection.close()
    except Exception:  # the connection is already broken; the pool drops it
        logger.debug("closing a broken connection failed", exc_info=True)
