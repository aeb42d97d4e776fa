"""Database URLs: which one to use, checked once; and one shared backend per URL and loop."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import hosts

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite+aiosqlite:///ordering.db"
URL_ENV = "ORDERING_DATABASE_URL"

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
    chosen = hosts.canonical_url(chosen)  # several hosts: one form, target_session_attrs
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
    if parsed.drivername.startswith("postgresql") and "search_path" in parsed.query:
        raise ValueError(
            "the URL sets search_path, which the store sets to its own schema: "
            "name the schema with schema= or $ORDERING_SCHEMA instead"
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


def asyncpg_dsn(url: str) -> str:
    """What asyncpg connects to for a checked PostgreSQL URL: the same URL, query and
    all.  asyncpg reads connection options from the query (``sslmode``) and passes on
    the rest as server settings, e.g. ``?synchronous_commit=off``.  Several hosts go
    into the netloc (see hosts.py)."""
    return hosts.asyncpg_dsn(make_url(url).set(drivername="postgresql"))


def engine_for(url: str, **options: Any) -> AsyncEngine:
    """A SQLAlchemy engine on a checked URL (``options`` go to ``create_async_engine``),
    for migrations, schema reads and tools.  On PostgreSQL it connects as the store
    does (see ``asyncpg_dsn``): SQLAlchemy would pass a server setting in the query to
    asyncpg as an unknown keyword."""
    if not url.startswith("postgresql"):
        return create_async_engine(url, **options)
    dsn = asyncpg_dsn(url)
    return create_async_engine(url, async_creator=lambda: asyncpg.connect(dsn), **options)


T = TypeVar("T")


class Registry(Generic[T]):
    """Hands out one shared object per (event loop, URL); built lazily, cheap to look up.

    Async connections belong to the loop that opened them, so each loop gets its own
    backend; a loop that is gone takes its backends with it.
    """

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, T]] = (
            weakref.WeakKeyDictionary()
        )
        self.urls_opened: set[str] = set()

    def get(self, url: str, factory: Callable[[str], T]) -> T:
        loop = asyncio.get_running_loop()
        per_loop = self._by_loop.get(loop)
        if per_loop is None:
            per_loop = self._by_loop[loop] = {}
        found = per_loop.get(url)
        if found is None:
            found = per_loop[url] = factory(url)
            self.urls_opened.add(url)
        return found

    def current(self) -> list[T]:
        """The objects built for the running loop."""
        loop = asyncio.get_running_loop()
        return list(self._by_loop.get(loop, {}).values())

    def forget_current(self) -> list[T]:
        """Hand over the running loop's objects and forget their URLs (the caller closes
        them; a database dropped since must not be visited by clear_all_scopes)."""
        loop = asyncio.get_running_loop()
        gone = self._by_loop.pop(loop, {})
        still_open = {url for per_loop in self._by_loop.values() for url in per_loop}
        self.urls_opened -= set(gone) - still_open
        return list(gone.values())
