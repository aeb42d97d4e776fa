"""Counting what the store sends to its database.

Two ways in, whichever the installed library offers (``counter_for`` picks, at run
time; without either the counts are reported as n/a):

* the backend's statement listeners (``ordering.backends``): ``fn(name, sql)`` is
  called once per statement sent to the database, ``begin``/``commit`` included;
* SQLAlchemy's event hooks on the store's engine, as described below.

* statements: every cursor execution (``before_cursor_execute`` on the store's engine),
  including an explicit ``BEGIN``/``COMMIT``.
* transactions: the engines run in AUTOCOMMIT, so a statement outside an explicit
  ``BEGIN ... COMMIT`` is a transaction of its own, and each explicit ``BEGIN`` opens
  one (SQLite's multi-statement writes are ``BEGIN IMMEDIATE ... COMMIT``).  Should an
  engine not run in AUTOCOMMIT, SQLAlchemy's ``begin`` events are counted instead.
* round trips: on PostgreSQL one per statement (asyncpg with a warm statement cache
  sends Bind/Execute/Sync in one go); on SQLite the same count stands for thread hops,
  by convention.
* thread hops (SQLite only, measured): every call aiosqlite hands to its worker thread
  (``aiosqlite.Connection._execute`` is its one choke point).  SQLAlchemy's adapter
  opens a cursor, executes, fetches and closes it, so one statement costs several.
* checkouts / connects: the pool handing out a connection / opening a new one.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import importlib.util
import operator
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

_IN_TRANSACTION = "bench_in_explicit_transaction"


@dataclass
class Counts:
    statements: int = 0
    transactions: int = 0
    checkouts: int = 0
    connects: int = 0
    thread_hops: int = 0
    by_statement: dict[str, int] = field(default_factory=dict)
    #: how they were counted ("sqlalchemy", "backend listeners", "redis client")
    method: str = ""
    #: measured round trips, when they are not one per statement (Redis pipelines)
    round_trips: int | None = None
    #: whether the transactions, thread hops and checkouts were counted at all
    transactions_counted: bool = True
    thread_hops_counted: bool = True
    checkouts_counted: bool = True

    def minus(self, before: Counts) -> Counts:
        return Counts(
            statements=self.statements - before.statements,
            transactions=self.transactions - before.transactions,
            checkouts=self.checkouts - before.checkouts,
            connects=self.connects - before.connects,
            thread_hops=self.thread_hops - before.thread_hops,
            method=self.method,
            round_trips=(
                None if self.round_trips is None else self.round_trips - (before.round_trips or 0)
            ),
            transactions_counted=self.transactions_counted,
            thread_hops_counted=self.thread_hops_counted,
            checkouts_counted=self.checkouts_counted,
            by_statement={
                name: count - before.by_statement.get(name, 0)
                for name, count in self.by_statement.items()
                if count != before.by_statement.get(name, 0)
            },
        )

    def copy(self) -> Counts:
        return self.minus(Counts())


def _autocommit(engine: Engine) -> bool:
    # The level the engine was created with; SQLAlchemy keeps it on the dialect.
    return getattr(engine.dialect, "_on_connect_isolation_level", None) == "AUTOCOMMIT"


_TARGET = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+([A-Za-z_][\w.]*)", re.IGNORECASE)
_CALL = re.compile(r"^\s*SELECT\s+([A-Za-z_][\w.]*)\s*\(", re.IGNORECASE)


def statement_name(statement: str) -> str:
    """A short name for a statement (verb and table or function), for the breakdown."""
    words = statement.split(None, 2)
    if not words:
        return "?"
    head = words[0].upper()
    if head == "BEGIN":
        return " ".join(w.upper() for w in words[:2])
    if head in ("COMMIT", "ROLLBACK", "END"):
        return "COMMIT" if head == "END" else head
    call = _CALL.match(statement)
    if call and call.group(1).upper() not in ("EXISTS", "COUNT"):
        return f"SELECT {call.group(1)}()"
    target = _TARGET.search(statement)
    return f"{head} {target.group(1)}" if target else head


def _in_transaction(cursor: Any, info: dict[Any, Any]) -> bool:
    """Whether a statement runs inside an explicit transaction.  A raw sqlite3 cursor
    knows for sure (even after a ROLLBACK that was not sent as a statement); otherwise
    the BEGIN and COMMIT statements seen on this connection tell."""
    raw = getattr(cursor, "connection", None)
    if isinstance(raw, sqlite3.Connection):
        return raw.in_transaction
    return bool(info.get(_IN_TRANSACTION, False))


class Counter(Protocol):
    counts: Counts

    def attached(self) -> AbstractContextManager[Any]: ...


@functools.cache
def _backends_module_present() -> bool:
    try:
        return importlib.util.find_spec("ordering.backends") is not None
    except (ImportError, ValueError):
        return False


def _has_listeners(candidate: Any) -> bool:
    return isinstance(getattr(candidate, "listeners", None), list)


def _attribute(target: Any, name: str) -> Any:
    try:
        return getattr(target, name, None)
    except Exception:  # a property that cannot answer outside its event loop, say
        return None


def _is_backend(candidate: Any) -> bool:
    module = getattr(type(candidate), "__module__", None)
    return (
        isinstance(module, str)
        and module.startswith("ordering.backends")
        and _has_listeners(candidate)
    )


#: Attributes of an ordering instance that may hold its backend.
_BACKEND_ATTRIBUTES = ("backend", "store", "_backend")


def find_backends(ordering: Any) -> list[Any]:
    """The backend(s) that take statement listeners: the instance's own if it shows
    it, else every live backend object of the library (the instance's among them once
    it has run something on this event loop).  Empty without ``ordering.backends``."""
    if not _backends_module_present():
        return []
    for name in _BACKEND_ATTRIBUTES:
        candidate = _attribute(ordering, name)
        if _has_listeners(candidate):
            return [candidate]
    return [o for o in gc.get_objects() if _is_backend(o)]


def shared_accessor(ordering: Any) -> Callable[[Any], Any] | None:
    """How to get from an instance to what instances on one URL share, for the
    construction check: its backend, or (before the backends) its store's engine.
    ``None`` when the instance shows neither."""
    for name in _BACKEND_ATTRIBUTES:
        if _has_listeners(_attribute(ordering, name)):
            return operator.attrgetter(name)
    if isinstance(_attribute(_attribute(ordering, "store"), "engine"), AsyncEngine):
        return operator.attrgetter("store.engine")
    return None


def live_shared_objects() -> int:
    """Engines and backend objects alive in this process."""
    return sum(isinstance(o, AsyncEngine) or _is_backend(o) for o in gc.get_objects())


def counter_for(ordering: Any) -> tuple[Counter | None, str | None]:
    """A counter for the statements of ``ordering``, or ``None`` and why not.  Call it
    after the instance has run something on the current event loop, so that its
    backend exists.  A backend with ``listeners`` wins; else the SQLAlchemy engine of
    the store the instance shows (before the backends)."""
    backends = find_backends(ordering)
    if backends:
        return ListenerCounter(backends), None
    engine = _attribute(_attribute(ordering, "store"), "engine")
    if isinstance(engine, AsyncEngine):
        return SqlCounter(engine), None
    if _backends_module_present():
        return None, "no backend object of ordering.backends with a `listeners` list was found"
    return None, "neither backend listeners nor a SQLAlchemy engine to count statements on"


class ListenerCounter:
    """Counts statements and transactions through the backends' ``listeners``: each
    statement outside an explicit ``BEGIN ... COMMIT`` is a transaction of its own,
    each ``BEGIN`` opens one (told by the SQL text; counting assumes one statement at
    a time, as the counting passes deliver)."""

    def __init__(self, backends: list[Any]) -> None:
        self.backends = backends
        self.counts = Counts(
            method="backend listeners", thread_hops_counted=False, checkouts_counted=False
        )
        self._in_transaction = False

    def _listen(self, name: str, sql: str) -> None:
        counts = self.counts
        counts.statements += 1
        counts.by_statement[name] = counts.by_statement.get(name, 0) + 1
        # by the SQL, not the name: an operation may be called "begin" (its lease)
        verb = (sql.split(None, 1) or [""])[0].upper().rstrip(";")
        if verb == "BEGIN":
            self._in_transaction = True
            counts.transactions += 1
        elif verb in ("COMMIT", "END", "ROLLBACK"):
            self._in_transaction = False
        elif not self._in_transaction:
            counts.transactions += 1

    def snapshot(self) -> Counts:
        return self.counts.copy()

    @contextmanager
    def attached(self) -> Iterator[ListenerCounter]:
        for backend in self.backends:
            backend.listeners.append(self._listen)
        try:
            yield self
        finally:
            for backend in self.backends:
                with contextlib.suppress(ValueError):
                    backend.listeners.remove(self._listen)


class SqlCounter:
    """Counts statements, transactions and connections of one engine while attached."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine.sync_engine
        self.counts = Counts(
            method="sqlalchemy", thread_hops_counted=self.engine.dialect.name == "sqlite"
        )
        self.autocommit = _autocommit(self.engine)
        self._name_cache: dict[str, str] = {}

    def _before_cursor_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        counts = self.counts
        counts.statements += 1
        name = self._name_cache.get(statement)
        if name is None:
            name = self._name_cache[statement] = statement_name(statement)
        counts.by_statement[name] = counts.by_statement.get(name, 0) + 1
        if not self.autocommit:
            return
        info = conn.info
        if name.startswith("BEGIN"):
            info[_IN_TRANSACTION] = True
            counts.transactions += 1
        elif name in ("COMMIT", "ROLLBACK"):
            info[_IN_TRANSACTION] = False
        elif not _in_transaction(cursor, info):
            counts.transactions += 1

    def _begin(self, conn: Connection) -> None:
        self.counts.transactions += 1

    def _checkout(self, *_args: Any) -> None:
        self.counts.checkouts += 1

    def _connect(self, *_args: Any) -> None:
        self.counts.connects += 1

    def snapshot(self) -> Counts:
        return self.counts.copy()

    @contextmanager
    def attached(self) -> Iterator[SqlCounter]:
        listeners: list[tuple[Any, str, Callable[..., None]]] = [
            (self.engine, "before_cursor_execute", self._before_cursor_execute),
            (self.engine.pool, "checkout", self._checkout),
            (self.engine.pool, "connect", self._connect),
        ]
        if not self.autocommit:
            listeners.append((self.engine, "begin", self._begin))
        for target, name, function in listeners:
            event.listen(target, name, function)
        try:
            with (
                _count_thread_hops(self.counts)
                if self.engine.dialect.name == "sqlite"
                else _nothing()
            ):
                yield self
        finally:
            for target, name, function in listeners:
                event.remove(target, name, function)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _count_thread_hops(counts: Counts) -> Iterator[None]:
    """Count the calls aiosqlite sends to its worker thread (each is one hop and back)."""
    try:
        connection_class: Any = importlib.import_module("aiosqlite").Connection
    except ImportError:
        counts.thread_hops_counted = False
        yield
        return
    original: Callable[..., Awaitable[Any]] = connection_class._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        counts.thread_hops += 1
        return await original(self, fn, *args, **kwargs)

    setattr(connection_class, "_execute", counted)  # noqa: B010
    try:
        yield
    finally:
        setattr(connection_class, "_execute", original)  # noqa: B010
