"""Database URLs: which one to use, checked once, and how each driver is given it."""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

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
    the rest as server settings, e.g. ``?synchronous_commit=off``."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def engine_for(url: str, **options: Any) -> AsyncEngine:
    """A SQLAlchemy engine on a checked URL (``options`` go to ``create_async_engine``),
    for migrations, schema reads and tools.  On PostgreSQL it connects as the store
    does (see ``asyncpg_dsn``): SQLAlchemy would pass a server setting in the query to
    asyncpg as an unknown keyword."""
    if not url.startswith("postgresql"):
        return create_async_engine(url, **options)
    dsn = asyncpg_dsn(url)
    return create_async_engine(url, async_creator=lambda: asyncpg.connect(dsn), **options)
