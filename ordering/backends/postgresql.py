"""The PostgreSQL backend, on asyncpg.

Each operation is one statement, so one round trip and one transaction; the three of
the hot path call the functions of definitions.sql (``begin_event_v1``,
``complete_event_v1``, ``park_follower_v1``).  Concurrent calls of ``begin`` and
``complete`` share one round trip and one commit (``begin_events_v2``,
``complete_events_v2``; see batching.py), and concurrent seen checks one round trip
(``seen_batch``).  Statements go through asyncpg's own
prepared-statement cache.  Every connection's search_path is the store's schema, so
neither the SQL files nor the functions name it.

Why no follower is ever stranded: see ``park_follower_v1`` in definitions.sql (parking and
completion serialize on an advisory lock on the leader, and each statement of a
PL/pgSQL function reads with a fresh snapshot).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
from sqlalchemy.engine import make_url

from .. import sql
from ..hosts import connect_in_order
from ..notify import Notifications, Waiter
from ..schema import CODE_REVISION, resolve_schema
from ..urls import asyncpg_dsns, safe_url
from .base import (
    Backend,
    BeginRequest,
    Begun,
    CompleteRequest,
    ParkRequest,
    Refused,
    Rows,
    require_served_revision,
)
from .batching import Batcher
from .pool import Connections, seconds_left

logger = logging.getLogger(__name__)

#: Errors that say the connection (or the server) went away, or that the statement
#: lost a race or ran out of time and may simply be run again, by SQLSTATE class or code.
_TRANSIENT_SQLSTATE_CLASSES = ("08",)  # connection exception
_TRANSIENT_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown: terminated by an administrator
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: starting up or shutting down
        "40P01",  # deadlock_detected: the other side went ahead
        "40001",  # serialization_failure
        "53300",  # too_many_connections
        "55P03",  # lock_not_available: lock_timeout, another session holds the lock
        "57014",  # query_canceled: statement_timeout
        "25006",  # read_only_sql_transaction: the server is (now) a standby
    }
)

#: Errors after which the server certainly rolled the statement back.
_ROLLED_BACK_SQLSTATES = frozenset({"40P01", "40001", "55P03", "57014", "25006"})


def _bound() -> float | None:
    """asyncpg's ``timeout=`` for a statement: what is left of the attempt's time."""
    left = seconds_left()
    return None if left == float("inf") else max(left, 0.001)


def _sqlstate(exc: BaseException) -> str | None:
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) else None


#: Server settings of the store's sessions unless the URL's query sets them (asyncpg
#: passes the query's settings on, and these would take precedence).
_DEFAULT_SETTINGS = {"application_name": "ordering", "jit": "off"}


class PostgresConnections(Connections[asyncpg.Connection]):
    def __init__(self, url: str, schema: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._dsns = asyncpg_dsns(url)  # one per host: see hosts.connect_in_order
        self._safe_url = safe_url(url)
        given = make_url(url).query
        self._settings = {k: v for k, v in _DEFAULT_SETTINGS.items() if k not in given}
        self._settings["search_path"] = schema  # the URL may not set it (urls.py)
        # The server ends a statement (or its wait for a lock) before the attempt's
        # time is up, and rolls it back: see Connections.attempt_seconds.
        for setting in ("statement_timeout", "lock_timeout"):
            if setting not in given:
                self._settings[setting] = str(self.server_timeout_ms)

    async def connect(self) -> asyncpg.Connection:
        return await connect_in_order(
            self._dsns,
            min(self.attempt_seconds, seconds_left()) or 0.001,
            server_settings=self._settings,
        )

    async def close(self, connection: asyncpg.Connection) -> None:
        try:
            await connection.close(timeout=1)
        except Exception:
            connection.terminate()

    def discard(self, connection: asyncpg.Connection) -> None:
        connection.terminate()

    def is_usable(self, connection: asyncpg.Connection) -> bool:
        return not connection.is_closed()

    def is_database_error(self, exc: BaseException) -> bool:
        return isinstance(
            exc,
            (
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.exceptions.InternalClientError,
                OSError,
                TimeoutError,
            ),
        )

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
            return False
        if isinstance(
            exc,
            (
                asyncpg.InterfaceError,
                asyncpg.exceptions.InternalClientError,
                OSError,
                TimeoutError,
            ),
        ):
            # a refused or reset connection, a closed connection, a stuck protocol
            return True
        code = _sqlstate(exc)
        return code is not None and (
            code in _TRANSIENT_SQLSTATES or code[:2] in _TRANSIENT_SQLSTATE_CLASSES
        )

    def changed_nothing(self, exc: BaseException, connection: asyncpg.Connection | None) -> bool:
        # asyncpg refuses a statement on a connection it knows is closed, or whose
        # protocol is stuck after the server's FATAL, before sending anything: an
        # InterfaceError or an InternalClientError, never a server error.
        if connection is None or isinstance(
            exc, (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)
        ):
            return True
        return _sqlstate(exc) in _ROLLED_BACK_SQLSTATES

    def safe_url(self) -> str:
        return self._safe_url


class PostgresBackend(Backend):
    dialect = "postgresql"
    connections: PostgresConnections

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        queries: dict[str, sql.Query] | None = None,
        code_revision: str = CODE_REVISION,
        **options: Any,
    ) -> None:
        super().__init__(url, queries or sql.queries("postgresql"), code_revision)
        self.schema = resolve_schema(schema)
        self.connections = PostgresConnections(url, self.schema, **options)
        self.connections.before_first_use = self.check_version
        self.notifications = Notifications(
            self.connections.connect, timeout=self.connections.attempt_seconds
        )
        # Concurrent consumers share round trips and commits (see batching.py).
        deadline = self.connections.deadline
        self._begins = Batcher(
            self._begin, orphaned=self._give_back_orphan, max_in_flight=2, deadline=deadline
        )
        self._completions = Batcher(self._complete, max_in_flight=2, deadline=deadline)
        self._seen_checks = Batcher(self._seen, max_in_flight=2, deadline=deadline)

    async def dispose(self) -> None:
        await self.stop_pruning()
        await self._settle_later()
        await self.notifications.close()
        await self.connections.aclose()

    # -- running statements -------------------------------------------------------

    async def _fetch(self, name: str, *, idempotent: bool = True, **params: Any) -> Rows:
        query = self.queries[name]
        args = query.args(params)

        async def run(connection: asyncpg.Connection) -> Rows:
            for listener in self.listeners:
                listener(query.name, query.sql)
            rows: Rows = await connection.fetch(query.sql, *args, timeout=_bound())
            return rows

        return await self.connections.run(run, idempotent=idempotent, name=name)

    async def query(
        self, name: str, /, *, types: Sequence[type] | None = None, **params: Any
    ) -> Rows:
        return await self._fetch(name, **params)  # asyncpg decodes to Python types

    async def write(self, name: str, /, **params: Any) -> Rows:
        return await self._fetch(name, **params)  # one statement: its own transaction

    async def check_version(self) -> None:
        queries = self.queries

        async def read(connection: asyncpg.Connection) -> tuple[str | None, str | None]:
            async def value(name: str) -> Any:
                return await connection.fetchval(queries[name].sql, timeout=_bound())

            ours, compatibility, first_release = await connection.fetchrow(
                queries["schema_tables"].sql, timeout=_bound()
            )
            if not ours:
                if first_release:  # laid out by the first release: migrating moves it
                    return await value("first_release_revision"), None
                return None, None
            revision = await value("schema_revision")
            oldest = await value("oldest_code_served") if compatibility else None
            return revision, oldest

        revision, oldest = await self.connections.run(read, name="check_version")
        require_served_revision(
            self.connections.safe_url(), revision, oldest, code_revision=self.code_revision
        )

    # -- the hot path ---------------------------------------------------------------

    async def begin(self, request: BeginRequest) -> Begun | Refused:
        return await self._begins.submit(request)

    async def complete(self, request: CompleteRequest) -> list[str]:
        return await self._completions.submit(request)

    async def seen(self, *, scope: str, event_id: UUID, seen_after: datetime) -> bool:
        return await self._seen_checks.submit((scope, event_id, seen_after))

    async def _seen(self, requests: Sequence[tuple[str, UUID, datetime]]) -> list[bool]:
        if len(requests) == 1:
            ((scope, event_id, seen_after),) = requests
            return [await super().seen(scope=scope, event_id=event_id, seen_after=seen_after)]
        scopes, event_ids, seen_afters = zip(*requests, strict=True)
        rows = await self._fetch(
            "seen_batch", scope=list(scopes), event_id=list(event_ids), seen_after=list(seen_afters)
        )
        seen_items = {item for (item,) in rows}
        return [item in seen_items for item in range(1, len(requests) + 1)]

    async def _begin(self, requests: Sequence[BeginRequest]) -> list[Begun | Refused]:
        if len(requests) == 1:
            rows = await self._fetch("begin", **requests[0].params())
            return [_begun(*rows[0]) if rows else Refused.HELD_ELSEWHERE]
        rows = await self._fetch("begin_batch", **_columns(r.params() for r in requests))
        answers: list[Begun | Refused] = [Refused.HELD_ELSEWHERE] * len(requests)
        for item, *flags in rows:
            answers[item - 1] = _begun(*flags)
        return answers

    async def _complete(self, requests: Sequence[CompleteRequest]) -> list[list[str]]:
        if len(requests) == 1:
            rows = await self._fetch("complete", **requests[0].params())
            return [[row[0] for row in rows]]
        rows = await self._fetch("complete_batch", **_columns(r.params() for r in requests))
        answers: list[list[str]] = [[] for _ in requests]
        for item, released in rows:
            answers[item - 1].append(released)
        return answers

    def _give_back_orphan(self, request: BeginRequest, answer: Begun | Refused) -> None:
        """A caller cancelled while its lease was being taken: give the lease back."""
        if isinstance(answer, Begun):
            self.later(
                self.release(scope=request.scope, event_id=request.event_id, owner=request.owner)
            )

    async def park(self, request: ParkRequest) -> bool:
        rows = await self._fetch(
            "park",
            scope=request.scope,
            event_id=request.event_id,
            leader_id=request.leader_id,
            occurred=request.occurred,
            received=request.received,
            event=request.event_json,
            owner=request.lease_owner,
            seen_after=request.seen_after,
        )
        return bool(rows[0][0])

    # -- leases and leaders ---------------------------------------------------------

    async def renew(self, *, scope: str, owner: str, expires_at: datetime) -> None:
        await self._fetch("renew", scope=scope, owner=owner, expires_at=expires_at)

    def leader_waiter(
        self, *, scope: str, leader_id: UUID, notify: bool
    ) -> AbstractAsyncContextManager[Waiter]:
        return self._waiter(scope, leader_id, notify)

    @asynccontextmanager
    async def _waiter(self, scope: str, leader_id: UUID, notify: bool) -> AsyncIterator[Waiter]:
        if not notify:
            yield Waiter(None)
            return
        async with self.notifications.waiter(scope, leader_id) as waiter:
            yield waiter

    # -- followers ------------------------------------------------------------------

    async def unclaim(self, *, scope: str, owner: str, ids: Sequence[UUID], now: datetime) -> None:
        if ids:
            await self._fetch("unclaim", scope=scope, owner=owner, ids=list(ids), now=now)

    async def take_lost_followers(
        self, *, scope: str, cutoff: datetime, now: datetime, owner: str, hold_until: datetime
    ) -> list[str]:
        # A statement that may not be repeated, with its reply lost (a timeout, a
        # dropped connection), would lose the followers it deleted: two that may be.
        rows = await self._fetch(
            "take_lost_claim", scope=scope, cutoff=cutoff, now=now, owner=owner, until=hold_until
        )
        if rows:
            ids = [row[0] for row in rows]
            await self._fetch("take_lost_forget", scope=scope, owner=owner, ids=ids)
        return [row[1] for row in rows]

    async def clear(self, *, scope: str | None) -> None:
        await self._fetch("clear", scope=scope)


def _begun(
    already_seen: bool, leader_seen: bool, leader_in_flight: bool, took_over: bool
) -> Begun | Refused:
    """What a row of the begin (or begin_batch) statement says."""
    if already_seen:
        return Refused.ALREADY_SEEN
    return Begun(bool(leader_seen), bool(leader_in_flight), bool(took_over))


def _columns(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Statement values for many events: each parameter an array, one element per event."""
    columns: dict[str, list[Any]] = {}
    for row in rows:
        for name, value in row.items():
            columns.setdefault(name, []).append(value)
    return columns
