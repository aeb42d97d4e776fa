"""The SQLite backend, on the standard library's sqlite3 module.

SQLite's write lock is per database, so every operation that writes more than one
row runs as one ``BEGIN IMMEDIATE`` transaction: the lock is taken before anything is
read, which is what serializes a follower parking with its leader completing (either
sees the other's commit), and a transaction never fails half-way with "database is
locked" when it turns from reader into writer.

Where statements run: on the event loop's own thread, with SQLite's busy timeout at
zero, so they never wait there.  An operation is a few hundred microseconds of SQLite
work, less than the two thread switches a hop to a worker thread costs.  When another
connection holds the write lock, the same operation is run again in a worker thread,
which waits out the lock (the busy timeout) without blocking the loop.  WAL
checkpoints run in a worker thread too: the store's connections turn SQLite's
automatic checkpoint off, as it would run (and fsync) inside a commit on the loop.

Several consumers on one loop: a write yields to the loop once it has committed, and the
completions that other consumers ask for meanwhile are written together, in one
transaction, when it returns (see batching.py).

Storage: ids are 32 hex digits and times fixed-width UTC text (``YYYY-MM-DD
HH:MM:SS.ffffff``, so that text order is time order), the layout the tables were
created with; ``_encode`` and ``_DECODERS`` are the one place that knows it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from sqlalchemy.engine import make_url

from .. import sql
from ..notify import Waiter, Wakeups
from ..schema import CODE_REVISION
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

T = TypeVar("T")

#: Write operations between two WAL checkpoints (a few pages each: some MB of WAL).
#: A checkpoint holds the write lock while it copies and syncs, so fewer, larger ones
#: cost the writers less.
CHECKPOINT_EVERY = 512

_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def _encode(value: Any) -> Any:
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is UUID:
        return value.hex
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only takes aware UTC datetimes")
        if value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        return value.isoformat(" ", "microseconds")[:26]
    if isinstance(value, (list, tuple)):
        return json.dumps([_encode(item) for item in value])
    if isinstance(value, UUID):
        return value.hex
    return value


def _decode_uuid(value: Any) -> UUID | None:
    return None if value is None else UUID(hex=value)


def _decode_time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


_DECODERS: dict[type, Callable[[Any], Any]] = {UUID: _decode_uuid, datetime: _decode_time}


def _is_busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.OperationalError)
        and code is not None
        and (code & 0xFF in _BUSY_CODES)
    )


Execute = Callable[[str, dict[str, Any]], list[Any]]


class _Statements:
    """``execute(name, params)`` for one operation on one connection."""

    __slots__ = ("_backend", "_connection", "wrote")

    def __init__(self, backend: SqliteBackend, connection: sqlite3.Connection) -> None:
        self._backend = backend
        self._connection = connection
        self.wrote = False

    def _send(self, name: str, text: str, args: Sequence[Any]) -> list[Any]:
        if self._backend.listeners:
            for listener in self._backend.listeners:
                listener(name, text)
        return self._connection.execute(text, args).fetchall()

    def __call__(self, name: str, params: dict[str, Any]) -> list[Any]:
        query = self._backend.queries[name]
        if name in self._backend.writers:
            self.wrote = True
        return self._send(name, query.sql, [_encode(v) for v in query.args(params)])

    def transaction(self, work: Callable[[Execute], T]) -> T:
        self._send("begin_immediate", "BEGIN IMMEDIATE", ())
        try:
            result = work(self)
        except BaseException:
            self._connection.rollback()
            raise
        self._send("commit", "COMMIT", ())
        return result


class SqliteConnections(Connections[sqlite3.Connection]):
    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        database = make_url(url).database
        assert database, "the URL was checked to name a file"
        self.path = Path(database)

    def busy_seconds(self) -> float:
        """How long a statement may wait for another connection's lock: until a moment
        before the attempt's time is up, so that its outcome (done, or busy and rolled
        back) is known rather than cut off."""
        return min(seconds_left(), self.attempt_seconds) * 0.9

    async def connect(self) -> sqlite3.Connection:
        # In a worker thread: opening may wait for another connection's lock (setting
        # WAL mode), which must not hold up the loop.
        return await _in_thread(_open, self.path, self.busy_seconds())

    async def close(self, connection: sqlite3.Connection) -> None:
        self.discard(connection)

    def discard(self, connection: sqlite3.Connection) -> None:
        try:
            connection.close()
        except sqlite3.Error:
            logger.debug("closing a SQLite connection failed", exc_info=True)

    def close_now(self, connection: sqlite3.Connection) -> None:
        self.discard(connection)

    def is_usable(self, connection: sqlite3.Connection) -> bool:
        return True

    def is_database_error(self, exc: BaseException) -> bool:
        return isinstance(exc, (sqlite3.Error, OSError))

    def is_transient(self, exc: BaseException) -> bool:
        return _is_busy(exc) or isinstance(exc, TimeoutError)

    def changed_nothing(self, exc: BaseException, connection: sqlite3.Connection | None) -> bool:
        return _is_busy(exc)  # a busy statement did nothing; its transaction rolled back

    def safe_url(self) -> str:
        return self.url


class SqliteBackend(Backend):
    dialect = "sqlite"
    connections: SqliteConnections

    def __init__(
        self,
        url: str,
        *,
        queries: dict[str, sql.Query] | None = None,
        code_revision: str = CODE_REVISION,
        **options: Any,
    ) -> None:
        super().__init__(url, queries or sql.queries("sqlite"), code_revision)
        self.connections = SqliteConnections(url, **options)
        self.connections.before_first_use = self.check_version
        self.writers = frozenset(
            name for name, query in self.queries.items() if not query.sql.startswith("SELECT")
        )
        self._writes = 0
        self._checkpointing: asyncio.Task[None] | None = None
        # Completions asked for while another one yields to the loop share the next
        # transaction (see batching.py and _run).
        self._completions = Batcher(self._complete, deadline=self.connections.deadline)
        #: This process's followers waiting for a leader in flight, by (scope, leader):
        #: the leader's completion (or parking) here wakes them; one in another process
        #: is found by their polling.
        self._wakeups: Wakeups[tuple[str, UUID]] = Wakeups()

    async def dispose(self) -> None:
        await self.stop_pruning()
        await self._settle_later()
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        await self.connections.aclose()

    # -- running statements -------------------------------------------------------

    async def _run(
        self,
        work: Callable[[Execute], T],
        *,
        write: bool = False,
        idempotent: bool = True,
        name: str = "other",
    ) -> T:
        """Run ``work`` with an ``execute(name, params)`` that returns rows; with
        ``write`` the whole of it is one BEGIN IMMEDIATE transaction (a single
        statement is a transaction of its own anyway)."""

        waited = False

        async def operation(connection: sqlite3.Connection) -> T:
            nonlocal waited
            statements = _Statements(self, connection)

            def attempt() -> T:
                return statements.transaction(work) if write else work(statements)

            # Our own checkpoint needs a moment with no transaction open.  Between two
            # statements on the loop it would catch one only by luck (its busy handler
            # polls) and the WAL would grow meanwhile: let it finish first, here, with
            # nothing awaited between this and the attempt.
            while (checkpoint := self._checkpointing) is not None:
                waited = True
                await asyncio.shield(checkpoint)
            try:
                result = attempt()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                # another connection's lock: waited out in a worker thread (SQLite's
                # busy timeout), not on the loop
                waited = True
                seconds = self.connections.busy_seconds()
                result = await _in_thread(_waiting_out_locks, connection, attempt, seconds)
            if statements.wrote:
                self._note_write()
            return result

        result = await self.connections.run(operation, idempotent=idempotent, name=name)
        if write and not waited:
            # An operation that never waited must still let other tasks run (the
            # checkpoint, lease renewals, other consumers): one turn of the loop per
            # write, so once per event, with the connection already given back.
            await asyncio.sleep(0)
        return result

    async def _fetch(self, name: str, *, idempotent: bool = True, **params: Any) -> Rows:
        return await self._run(
            lambda execute: execute(name, params), idempotent=idempotent, name=name
        )

    async def query(
        self, name: str, /, *, types: Sequence[type] | None = None, **params: Any
    ) -> Rows:
        rows = await self._fetch(name, **params)
        if types is None:
            return rows
        decoders = [_DECODERS.get(kind) for kind in types]
        return [
            tuple(value if d is None else d(value) for d, value in zip(decoders, row, strict=True))
            for row in rows
        ]

    async def write(self, name: str, /, **params: Any) -> Rows:
        return await self._run(lambda execute: execute(name, params), write=True, name=name)

    def _note_write(self) -> None:
        self._writes += 1
        if self._writes >= CHECKPOINT_EVERY and self._checkpointing is None:
            self._writes = 0
            self._checkpointing = asyncio.get_running_loop().create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        """Move the WAL into the database file, in a worker thread, on a connection of
        its own.  RESTART, not PASSIVE: a PASSIVE checkpoint copies the frames but the
        WAL was seen to keep growing (writers did not start it over), while RESTART
        waits out the readers so that the next writer does."""
        try:
            seconds = self.connections.attempt_seconds / 2  # operations wait for it
            await _in_thread(_checkpoint, self.connections.path, seconds)
        except Exception:
            logger.warning("WAL checkpoint failed; the next one will try again", exc_info=True)
        finally:
            self._checkpointing = None

    async def check_version(self) -> None:
        def read(execute: Execute) -> tuple[str | None, str | None]:
            ours, compatibility, _ = execute("schema_tables", {})[0]
            if not ours:
                return None, None
            revision = execute("schema_revision", {})
            oldest = execute("oldest_code_served", {}) if compatibility else []
            return (revision[0][0] if revision else None), (oldest[0][0] if oldest else None)

        revision, oldest = await self._run(read, name="check_version")
        require_served_revision(self.url, revision, oldest, code_revision=self.code_revision)

    # -- the hot path ---------------------------------------------------------------

    async def begin(self, request: BeginRequest) -> Begun | Refused:
        params = request.params()

        def work(execute: Execute) -> Begun | Refused:
            rows = execute("begin", params)
            if rows:
                return Begun(bool(rows[0][0]), bool(rows[0][1]))
            seen = {
                "scope": request.scope,
                "event_id": request.event_id,
                "seen_after": request.seen_after,
            }
            if request.refuse_seen and execute("seen", seen)[0][0]:
                return Refused.ALREADY_SEEN
            rows = execute("take_over", params)
            if rows:
                return Begun(bool(rows[0][0]), bool(rows[0][1]), took_over=True)
            return Refused.HELD_ELSEWHERE

        return await self._run(work, name="begin")

    async def complete(self, request: CompleteRequest) -> list[str]:
        return await self._completions.submit(request)

    async def _complete(self, requests: Sequence[CompleteRequest]) -> list[list[str]]:
        """Complete each request, all in one transaction."""

        def work(execute: Execute) -> list[list[str]]:
            return [_complete_one(execute, request) for request in requests]

        released = await self._run(
            work, write=True, name="complete" if len(requests) == 1 else "complete_batch"
        )
        for request in requests:
            self._wake(request.scope, request.event_id)
        return released

    async def park(self, request: ParkRequest) -> bool:
        scope, event_id, owner = request.scope, request.event_id, request.lease_owner

        def work(execute: Execute) -> bool:
            leader_seen = execute(
                "seen",
                {"scope": scope, "event_id": request.leader_id, "seen_after": request.seen_after},
            )[0][0]
            if leader_seen:
                still = {"scope": scope, "event_id": event_id, "owner": owner}
                return not execute("still_leased", still)[0][0]
            execute(
                "record_follower",
                {
                    "scope": scope,
                    "event_id": event_id,
                    "leader_id": request.leader_id,
                    "occurred": request.occurred,
                    "received": request.received,
                    "event": request.event_json,
                },
            )
            if owner is not None:
                execute("release", {"scope": scope, "event_id": event_id, "owner": owner})
            return True

        parked = await self._run(work, write=True, name="park")
        if parked:
            self._wake(scope, event_id)  # no longer in flight: its own waiters park too
        return parked

    # -- leases and leaders ---------------------------------------------------------

    async def renew(self, *, scope: str, owner: str, expires_at: datetime) -> None:
        params = {"scope": scope, "owner": owner, "expires_at": expires_at}

        def work(execute: Execute) -> None:
            execute("renew_leases", params)
            execute("renew_claims", params)

        await self._run(work, write=True, name="renew")

    def leader_waiter(
        self, *, scope: str, leader_id: UUID, notify: bool
    ) -> AbstractAsyncContextManager[Waiter]:
        return self._waiter((scope, leader_id)) if notify else _polling()

    @asynccontextmanager
    async def _waiter(self, key: tuple[str, UUID]) -> AsyncIterator[Waiter]:
        with self._wakeups.registered(key) as woken:
            yield Waiter(woken)

    def _wake(self, scope: str, event_id: UUID) -> None:
        self._wakeups.wake((scope, event_id))

    # -- followers ------------------------------------------------------------------

    async def unclaim(self, *, scope: str, owner: str, ids: Sequence[UUID], now: datetime) -> None:
        if not ids:
            return
        listed = list(ids)

        def work(execute: Execute) -> None:
            execute(
                "unclaim_followers", {"scope": scope, "owner": owner, "ids": listed, "now": now}
            )
            execute("unclaim_leases", {"scope": scope, "owner": owner, "ids": listed})

        await self._run(work, write=True, name="unclaim")

    async def clear(self, *, scope: str | None) -> None:
        def work(execute: Execute) -> None:
            for name in ("clear_seen", "clear_leases", "clear_followers"):
                execute(name, {"scope": scope})

        await self._run(work, write=True, name="clear")


def _complete_one(execute: Execute, request: CompleteRequest) -> list[str]:
    """Complete's statements for one event (the caller holds the transaction)."""
    # The values its statements share, stored once.
    scope, event_id, now = request.scope, _encode(request.event_id), _encode(request.now)
    claim, owner = request.claim, request.lease_owner
    event = {"scope": scope, "event_id": event_id}
    execute("record_seen", {**event, "now": now, "seen_until": _encode(request.seen_until)})
    if owner is not None:
        execute("release", {**event, "owner": owner})
    if request.is_follower:
        execute("forget_follower", event)
    if claim is None:
        return []
    params = {**event, "now": now, "claim_owner": claim.owner, "claim_until": claim.until}
    claimed = [row[0] for row in execute("claim", params)]
    if claimed:
        execute("lease_claimed", params)
    return claimed


@asynccontextmanager
async def _polling() -> AsyncIterator[Waiter]:
    yield Waiter(None)


def _open(path: Path, busy_seconds: float) -> sqlite3.Connection:
    connection = sqlite3.connect(
        path,
        timeout=busy_seconds,
        isolation_level=None,  # autocommit: the backend opens its transactions
        check_same_thread=False,  # used by the loop's thread and worker threads,
        # one at a time
    )
    try:
        # WAL lets readers run beside the writer; NORMAL skips an fsync per commit,
        # and in WAL mode a crash can then lose the last commits but never corrupts
        # the file.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA wal_autocheckpoint=0")
        # Statements on the loop's thread never wait for a lock: a busy database
        # sends the operation to a worker thread, which waits (_waiting_out_locks).
        connection.execute("PRAGMA busy_timeout=0")
    except BaseException:
        connection.close()
        raise
    return connection


def _waiting_out_locks(
    connection: sqlite3.Connection, attempt: Callable[[], T], seconds: float
) -> T:
    connection.execute(f"PRAGMA busy_timeout={max(1, int(seconds * 1000))}")
    try:
        return attempt()
    finally:
        connection.execute("PRAGMA busy_timeout=0")


def _checkpoint(path: Path, busy_seconds: float) -> None:
    connection = sqlite3.connect(path, timeout=busy_seconds, isolation_level=None)
    try:
        connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
    finally:
        connection.close()


_executor: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    """The store's own worker threads, not the loop's default executor: a process forked
    from one whose loop had started that executor's threads inherits the executor but
    not the threads, and work handed to it would wait forever.  A forked child makes
    its own (the parent's is left untouched)."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(thread_name_prefix="ordering-sqlite")
    return _executor


def _forget_threads_after_fork() -> None:
    global _executor
    _executor = None


os.register_at_fork(after_in_child=_forget_threads_after_fork)


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """Run ``function`` in a worker thread.  If the caller is cancelled meanwhile, wait
    for the thread to finish before passing the cancellation on: the connection it
    uses must not be closed under it."""
    future = asyncio.get_running_loop().run_in_executor(_threads(), function, *args)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result
