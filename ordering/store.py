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
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from sqlalchemy import String, TextClause, Uuid, bindparam, text
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .engine import create_engine, safe_url
from .exceptions import SchemaError, StoreUnavailable
from .schema import SCHEMA_REVISION, VERSION_TABLE, UTCDateTime

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PARAM_TYPES: dict[str, Any] = {
    "scope": String(),
    "owner": String(),
    "claim_owner": String(),
    "event_id": Uuid(),
    "follows": Uuid(),
    "leader_id": Uuid(),
    "now": UTCDateTime(),
    "expires_at": UTCDateTime(),
    "seen_after": UTCDateTime(),
    "claim_until": UTCDateTime(),
    "cutoff": UTCDateTime(),
    "occurred": UTCDateTime(),
    "received": UTCDateTime(),
}
_EXPANDING = {"ids": Uuid()}
_PARAM = re.compile(r"(?<!:):(\w+)")


def _sql(statement: str) -> TextClause:
    """A text statement whose parameters are typed by name (UUIDs and UTC times)."""
    binds = []
    for name in sorted(set(_PARAM.findall(statement))):
        if name in _EXPANDING:
            binds.append(bindparam(name, type_=_EXPANDING[name], expanding=True))
        elif name in _PARAM_TYPES:
            binds.append(bindparam(name, type_=_PARAM_TYPES[name]))
    return text(statement).bindparams(*binds)


# -- statements, both dialects -------------------------------------------------
# Events are read back as CAST(event AS TEXT): the JSON text, whichever the dialect
# (the asyncpg driver would otherwise decode JSONB into dicts), for model_validate_json.

# Take the lease (or take over an expired one, or one already ours) and, in the same
# statement, say whether the leader was seen or is being processed.  Returns no row
# when someone else holds a live lease.
BEGIN = _sql("""
INSERT INTO ordering_processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
VALUES (:scope, :event_id, :owner, :now, :expires_at)
ON CONFLICT (scope, event_id) DO UPDATE
SET owner = excluded.owner, acquired_at = excluded.acquired_at, expires_at = excluded.expires_at
WHERE l.expires_at <= excluded.acquired_at OR l.owner = excluded.owner
RETURNING
    EXISTS (SELECT 1 FROM ordering_seen_events s
            WHERE s.scope = :scope AND s.event_id = :follows AND s.seen_at > :seen_after),
    EXISTS (SELECT 1 FROM ordering_processing_leases p
            WHERE p.scope = :scope AND p.event_id = :follows AND p.expires_at > :now)
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

UNCLAIM = _sql("""
UPDATE ordering_waiting_followers SET claimed_by = NULL, claimed_until = NULL
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

SCHEMA_VERSION = text(f"SELECT version_num FROM {VERSION_TABLE}")

# -- PostgreSQL: one round trip each, through the functions of the first migration --

PG_COMPLETE = _sql("""
SELECT released_event FROM ordering_complete_event(
    :scope, :event_id, :owner, :now, :claim_owner, :claim_until)
""")

PG_PARK = _sql("""
SELECT ordering_park_follower(
    :scope, :event_id, :leader_id, :occurred, :received, :event, :owner, :seen_after)
""")

# -- SQLite: the same work as the functions, inside BEGIN IMMEDIATE --------------

SQLITE_LEADER_SEEN = _sql("""
SELECT EXISTS (SELECT 1 FROM ordering_seen_events
               WHERE scope = :scope AND event_id = :leader_id AND seen_at > :seen_after)
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
)


def is_transient(exc: BaseException) -> bool:
    """A lost or refused connection, or a busy SQLite file: worth trying again."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (ConnectionError, OSError, asyncio.TimeoutError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, (DBAPIError, OSError)) and any(t in message for t in _TRANSIENT_TEXT)


def _missing_table(exc: DBAPIError) -> bool:
    message = str(exc).lower()
    return "no such table" in message or "does not exist" in message


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
    ) -> None:
        self.url = url
        self.engine = engine or create_engine(url)
        self.dialect = self.engine.dialect.name
        self.is_postgres = self.dialect == "postgresql"
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self._schema_checked = False

    async def dispose(self) -> None:
        await self.engine.dispose()

    # -- connection handling ----------------------------------------------------

    async def _run(
        self, operation: Callable[[AsyncConnection], Awaitable[T]], *, idempotent: bool = True
    ) -> T:
        if not self._schema_checked:
            await self.check_schema()
        return await self._with_retries(operation, idempotent=idempotent)

    async def _with_retries(
        self, operation: Callable[[AsyncConnection], Awaitable[T]], *, idempotent: bool
    ) -> T:
        delay = self.retry_backoff
        for attempt in range(self.retries + 1):
            connection = self.engine.connect()
            sent = False
            try:
                await connection.start()
                sent = True
                return await operation(connection)
            except (TimeoutError, DBAPIError, OSError) as exc:
                if not is_transient(exc):
                    raise
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
                    "database operation failed (%s), retrying in %.2fs (attempt %d of %d)",
                    type(exc).__name__,
                    delay,
                    attempt + 1,
                    self.retries,
                    extra={"url": safe_url(self.url), "attempt": attempt + 1},
                )
            finally:
                await _close_quietly(connection)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_backoff_max)
        raise AssertionError("unreachable")  # pragma: no cover

    async def check_schema(self) -> None:
        """Fail with the command to run when the schema is missing or not at our revision."""

        async def read(connection: AsyncConnection) -> str | None:
            try:
                return (await connection.execute(SCHEMA_VERSION)).scalar()
            except (ProgrammingError, OperationalError) as exc:
                if _missing_table(exc):
                    return None
                raise

        found = await self._with_retries(read, idempotent=True)
        if found != SCHEMA_REVISION:
            state = "has no ordering schema" if found is None else f"is at revision {found}"
            raise SchemaError(
                f"the database {safe_url(self.url)} {state}; this code needs revision "
                f"{SCHEMA_REVISION}: run `ordering migrate --url '{safe_url(self.url)}'` "
                "(or `alembic upgrade head` with ORDERING_DATABASE_URL set)"
            )
        self._schema_checked = True

    @asynccontextmanager
    async def _sqlite_write(self, connection: AsyncConnection) -> AsyncIterator[None]:
        """A write transaction that takes SQLite's write lock before it reads anything."""
        await connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            try:
                await connection.exec_driver_sql("ROLLBACK")
            except BaseException:
                await connection.invalidate()
            raise
        await connection.exec_driver_sql("COMMIT")

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
    ) -> tuple[bool, bool, bool] | None:
        """Lease the event: None when someone else holds it, else
        (True, leader seen, leader in flight)."""
        params = {
            "scope": scope,
            "event_id": event_id,
            "follows": follows,
            "owner": owner,
            "now": now,
            "expires_at": expires_at,
            "seen_after": seen_after,
        }

        async def run(connection: AsyncConnection) -> tuple[bool, bool, bool] | None:
            row = (await connection.execute(BEGIN, params)).first()
            return None if row is None else (True, bool(row[0]), bool(row[1]))

        return await self._run(run)

    async def leader_status(
        self, scope: str, leader_id: UUID, now: datetime, seen_after: datetime
    ) -> tuple[bool, bool]:
        """(leader seen, leader holds a live lease)."""
        params = {"scope": scope, "follows": leader_id, "now": now, "seen_after": seen_after}

        async def run(connection: AsyncConnection) -> tuple[bool, bool]:
            row = (await connection.execute(LEADER_STATUS, params)).one()
            return bool(row[0]), bool(row[1])

        return await self._run(run)

    async def release(self, scope: str, event_id: UUID, owner: str) -> None:
        params = {"scope": scope, "event_id": event_id, "owner": owner}
        await self._run(lambda c: c.execute(RELEASE, params))

    async def renew(self, scope: str, owner: str, expires_at: datetime) -> None:
        """Push back the expiry of every lease and claim this owner holds."""
        params = {"scope": scope, "owner": owner, "expires_at": expires_at}

        async def run(connection: AsyncConnection) -> None:
            await connection.execute(RENEW_LEASES, params)
            await connection.execute(RENEW_CLAIMS, params)

        await self._run(run)

    # -- seen events ------------------------------------------------------------

    async def record_seen(self, scope: str, event_id: UUID, now: datetime) -> None:
        params = {"scope": scope, "event_id": event_id, "now": now}
        await self._run(lambda c: c.execute(RECORD_SEEN, params))

    async def complete(
        self,
        scope: str,
        event_id: UUID,
        owner: str | None,
        now: datetime,
        claim_owner: str | None,
        claim_until: datetime,
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
        }
        if self.is_postgres:

            async def run(connection: AsyncConnection) -> list[str]:
                return list((await connection.execute(PG_COMPLETE, params)).scalars())

        else:

            async def run(connection: AsyncConnection) -> list[str]:
                async with self._sqlite_write(connection):
                    await connection.execute(RECORD_SEEN, params)
                    if owner is not None:
                        await connection.execute(RELEASE, params)
                    await connection.execute(FORGET_OWN_FOLLOWER_ROW, params)
                    if claim_owner is None:
                        return []
                    claimed = list((await connection.execute(SQLITE_CLAIM, params)).scalars())
                    if claimed:
                        await connection.execute(SQLITE_LEASE_CLAIMED, params)
                    return claimed

        return await self._run(run)

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

            async def run(connection: AsyncConnection) -> bool:
                return bool((await connection.execute(PG_PARK, params)).scalar())

        else:

            async def run(connection: AsyncConnection) -> bool:
                async with self._sqlite_write(connection):
                    if (await connection.execute(SQLITE_LEADER_SEEN, params)).scalar():
                        return False
                    await connection.execute(RECORD_FOLLOWER, params)
                    await connection.execute(RELEASE, params)
                    return True

        return await self._run(run)

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
        await self._run(lambda c: c.execute(RECORD_FOLLOWER, params))

    async def forget_follower(self, scope: str, event_id: UUID) -> None:
        params = {"scope": scope, "event_id": event_id}
        await self._run(lambda c: c.execute(FORGET_OWN_FOLLOWER_ROW, params))

    async def followers_of(self, scope: str, leader_id: UUID) -> list[str]:
        params = {"scope": scope, "leader_id": leader_id}

        async def run(connection: AsyncConnection) -> list[str]:
            return list((await connection.execute(FOLLOWERS_OF, params)).scalars())

        return await self._run(run)

    async def followers_by_id(self, scope: str, ids: Sequence[UUID]) -> list[str]:
        if not ids:
            return []
        params = {"scope": scope, "ids": list(ids)}

        async def run(connection: AsyncConnection) -> list[str]:
            return list((await connection.execute(FOLLOWERS_BY_ID, params)).scalars())

        return await self._run(run)

    async def take_lost_followers(self, scope: str, cutoff: datetime, now: datetime) -> list[str]:
        """Delete and return followers past the lookback or whose claimer died."""
        params = {"scope": scope, "cutoff": cutoff, "now": now}

        async def run(connection: AsyncConnection) -> list[str]:
            return list((await connection.execute(TAKE_LOST, params)).scalars())

        return await self._run(run, idempotent=False)

    async def unclaim(self, scope: str, owner: str, ids: Sequence[UUID]) -> None:
        """Give back claimed followers (and their leases) that were not handled."""
        if not ids:
            return
        params = {"scope": scope, "owner": owner, "ids": list(ids)}

        async def run(connection: AsyncConnection) -> None:
            await connection.execute(UNCLAIM, params)
            await connection.execute(RELEASE_CLAIMED, params)

        await self._run(run)

    # -- housekeeping -----------------------------------------------------------

    async def clear(self, scope: str | None) -> None:
        statements = CLEAR_ALL if scope is None else CLEAR_SCOPE
        params = {"scope": scope}

        async def run(connection: AsyncConnection) -> None:
            for statement in statements:
                await connection.execute(statement, params)

        await self._run(run)


async def _close_quietly(connection: AsyncConnection) -> None:
    try:
        await connection.close()
    except Exception:  # the connection is already broken; the pool drops it
        logger.debug("closing a broken connection failed", exc_info=True)
