"""Counting what the store sends to its database, through SQLAlchemy's event hooks.

* statements: every cursor execution (``before_cursor_execute`` on the store's engine),
  including an explicit ``BEGIN``/``COMMIT``.
* transactions: the engines run in AUTOCOMMIT, so a statement outside an explicit
  ``BEGIN ... COMMIT`` is a transaction of its own, and each explicit ``BEGIN`` opens
  one (SQLite's multi-statement writes are ``BEGIN IMMEDIATE ... COMMIT``).  Should an
  engine not run in AUTOCOMMIT, SQLAlchemy's ``begin`` events are counted instead.
* round trips: on PostgreSQL one per statement (asyncpg with a warm statement cache
  sends Bind/Execute/Sync in one go); on SQLite the same count stands for thread hops,
  as the brief of issue 4 defines it.
* thread hops (SQLite only, measured): every call aiosqlite hands to its worker thread
  (``aiosqlite.Connection._execute`` is its one choke point).  SQLAlchemy's adapter
  opens a cursor, executes, fetches and closes it, so one statement costs several.
* checkouts / connects: the pool handing out a connection / opening a new one.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiosqlite
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

    def minus(self, before: Counts) -> Counts:
        return Counts(
            statements=self.statements - before.statements,
            transactions=self.transactions - before.transactions,
            checkouts=self.checkouts - before.checkouts,
            connects=self.connects - before.connects,
            thread_hops=self.thread_hops - before.thread_hops,
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


class SqlCounter:
    """Counts statements, transactions and connections of one engine while attached."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine.sync_engine
        self.counts = Counts()
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
    original: Callable[..., Awaitable[Any]] = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        counts.thread_hops += 1
        return await original(self, fn, *args, **kwargs)

    setattr(aiosqlite.Connection, "_execute", counted)  # noqa: B010
    try:
        yield
    finally:
        setattr(aiosqlite.Connection, "_execute", original)  # noqa: B010
