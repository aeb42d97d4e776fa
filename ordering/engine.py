"""Engines: one per database URL and event loop, tuned per dialect, shared by every scope."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite+aiosqlite:///ordering.db"
URL_ENV = "ORDERING_DATABASE_URL"

#: How long SQLite waits for another writer before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30.0

SUPPORTED_DRIVERS = {"sqlite+aiosqlite", "postgresql+asyncpg"}


def resolve_url(url: str | None = None) -> str:
    """The URL to use: the argument, else $ORDERING_DATABASE_URL, else the embedded default.

    Checked here, once, so that a typo fails with a message that names it.
    """
    return _checked_url(url or os.environ.get(URL_ENV) or DEFAULT_URL)


@functools.lru_cache(maxsize=64)
def _checked_url(chosen: str) -> str:
    """Parsing a URL costs tens of microseconds: done once per distinct URL, since an
    ordering may be constructed for every event."""
    try:
        parsed = make_url(chosen)
    except Exception:  # sqlalchemy's ArgumentError repeats the URL, password and all
        raise ValueError(f"not a database URL: {_mask_password(chosen)!r}") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    if parsed.drivername not in SUPPORTED_DRIVERS:
        raise ValueError(
            f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
            "use sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB"
        )
    if parsed.drivername.startswith("sqlite") and parsed.database in (None, "", ":memory:"):
        raise ValueError(
            "an in-memory SQLite database is not shared between connections: "
            "give a file, e.g. sqlite+aiosqlite:///ordering.db"
        )
    return parsed.render_as_string(hide_password=False)


def _mask_password(text: str) -> str:
    """Hide what looks like a password in a string that would not parse as a URL."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An engine with the settings the store relies on.

    Both dialects run in AUTOCOMMIT: on PostgreSQL every operation is one statement
    (an implicit transaction, one round trip); on SQLite the store opens its
    multi-statement transactions itself with BEGIN IMMEDIATE, so that a transaction
    that will write takes the write lock up front and never fails half-way with
    "database is locked" when it upgrades from reader to writer.
    """
    parsed: URL = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        engine = create_async_engine(
            parsed,
            isolation_level="AUTOCOMMIT",
            # check_same_thread: the store runs statements on the event loop's thread
            # as well as in aiosqlite's (one at a time; see Store._sqlite).
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            pool_reset_on_return=None,
            **kwargs,
        )
        event.listen(engine.sync_engine, "connect", _tune_sqlite)
        return engine
    return create_async_engine(
        parsed,
        isolation_level="AUTOCOMMIT",
        # Connections lost to a restart are detected on use and retried (see store.py);
        # a pre-ping would cost every operation an extra round trip.
        pool_pre_ping=False,
        pool_reset_on_return=None,
        pool_size=kwargs.pop("pool_size", 10),
        max_overflow=kwargs.pop("max_overflow", 20),
        connect_args={"server_settings": {"application_name": "ordering", "jit": "off"}},
        **kwargs,
    )


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the writer; NORMAL skips an fsync per commit, and in
    # WAL mode a crash can then lose the last commits but never corrupts the file.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.close()


class EngineRegistry:
    """Hands out one shared object per (event loop, URL); built lazily, cheap to look up.

    Async connections belong to the loop that opened them, so each loop gets its own
    engine; a loop that is gone takes its engines with it.
    """

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self.urls_opened: set[str] = set()

    def get(self, url: str, factory: Any) -> Any:
        loop = asyncio.get_running_loop()
        per_loop = self._by_loop.get(loop)
        if per_loop is None:
            per_loop = self._by_loop[loop] = {}
        found = per_loop.get(url)
        if found is None:
            found = per_loop[url] = factory(url)
            self.urls_opened.add(url)
        return found

    def current(self) -> list[Any]:
        """The objects built for the running loop."""
        loop = asyncio.get_running_loop()
        return list(self._by_loop.get(loop, {}).values())

    def forget_current(self) -> list[Any]:
        """Hand over the running loop's objects and forget their URLs (the caller closes
        them; a database dropped since must not be visited by clear_all_scopes)."""
        loop = asyncio.get_running_loop()
        gone = self._by_loop.pop(loop, {})
        still_open = {url for per_loop in self._by_loop.values() for url in per_loop}
        self.urls_opened -= set(gone) - still_open
        return list(gone.values())
