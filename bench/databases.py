"""The databases the bench runs on, made for one run and removed after it.

SQLite: a file in a temporary directory.  PostgreSQL: a fresh database on the server
named by ``--pg-url`` or $ORDERING_TEST_POSTGRES_URL (never the database in that URL
itself, which only serves to create and drop ours).  Both are migrated with
``ordering.migrate.upgrade``, as a user would.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from ordering.migrate import upgrade
from ordering.urls import asyncpg_dsn

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
PG_URL_ENV = "ORDERING_TEST_POSTGRES_URL"


class DatabaseUnavailable(RuntimeError):
    """The PostgreSQL server could not be reached to create the bench database."""


def safe_url(url: str) -> str:
    """The URL with its password hidden, for the report."""
    return make_url(url).render_as_string(hide_password=True)


def admin_url(pg_url: str | None) -> str:
    """The server URL to create bench databases on: the flag, the environment, the default."""
    return pg_url or os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL


async def asyncpg_connect(url: str) -> Any:
    """A plain asyncpg connection (no SQLAlchemy) to the database of a SQLAlchemy URL,
    with the server settings of its query, as the store's own connections have them
    (so the database's own limits are measured as durable as the store's commits)."""
    parsed = make_url(url)
    filled = parsed.set(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        username=parsed.username or "postgres",
        database=parsed.database or "postgres",
    )
    return await asyncpg.connect(
        asyncpg_dsn(filled.render_as_string(hide_password=False)), timeout=10
    )


async def _admin(url: str, sql: str) -> None:
    connection = await asyncpg_connect(url)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def create_postgres_database(admin: str, prefix: str = "ordering_bench") -> str:
    """Create an empty, migrated database and return its URL; the caller drops it."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        asyncio.run(_admin(admin, f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        shown = make_url(admin).render_as_string(hide_password=True)
        raise DatabaseUnavailable(
            f"cannot create a bench database on PostgreSQL at {shown}: {exc!r} "
            f"(set --pg-url or ${PG_URL_ENV}, or run with --dialect sqlite)"
        ) from exc
    url = make_url(admin).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
    except BaseException:
        drop_postgres_database(admin, url)
        raise
    return url


def drop_postgres_database(admin: str, url: str) -> None:
    name = make_url(url).database
    asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def postgres_database(admin: str) -> Iterator[str]:
    url = create_postgres_database(admin)
    try:
        yield url
    finally:
        drop_postgres_database(admin, url)


@contextmanager
def sqlite_database() -> Iterator[tuple[str, Path]]:
    """A migrated SQLite file database and its directory (for scratch files beside it)."""
    with tempfile.TemporaryDirectory(prefix="ordering-bench-") as directory:
        path = Path(directory) / "ordering.db"
        url = f"sqlite+aiosqlite:///{path}"
        upgrade(url)
        yield url, Path(directory)
