"""Running the alembic migrations from code and from the command line, and the
SQLAlchemy engine they (and the tools that read a database's revision) connect with."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import hosts
from .schema import POSTGRES_VERSION_TABLE, SQLITE_VERSION_TABLE, resolve_schema
from .sql import statements
from .urls import asyncpg_dsns, driver_url, resolve_url, url_deadline

_PACKAGE = Path(__file__).resolve().parent


def migrations_dir() -> Path:
    """The migrations: shipped inside the wheel, or beside the package in a checkout."""
    for candidate in (_PACKAGE / "_migrations", _PACKAGE.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("the ordering migrations are missing from this installation")


def snapshot(revision: str, dialect: str) -> list[str]:
    """The statements of ``snapshots/<revision>_<dialect>.sql`` in the migrations: what
    a revision creates, written out whole, for its migration to run one by one."""
    return statements(
        (migrations_dir() / "snapshots" / f"{revision}_{dialect}.sql").read_text("utf-8")
    )


def alembic_config(
    url: str | None = None,
    *,
    schema: str | None = None,
    extra_versions: Path | None = None,
) -> Config:
    """Alembic's configuration for ``url``; ``extra_versions`` adds a folder of
    revisions beside the shipped ones (tests use it for a later release's)."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", resolve_url(url).replace("%", "%%"))
    if extra_versions is not None:
        config.set_main_option("path_separator", "os")
        versions = os.pathsep.join([str(migrations_dir() / "versions"), str(extra_versions)])
        config.set_main_option("version_locations", versions.replace("%", "%%"))
    config.attributes["ordering_schema"] = resolve_schema(schema)
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def upgrade(url: str | None = None, revision: str = "head", *, schema: str | None = None) -> None:
    """Bring the database to ``revision`` (synchronous: not from inside an event loop)."""
    command.upgrade(alembic_config(url, schema=schema), revision)


def downgrade(url: str | None = None, revision: str = "base", *, schema: str | None = None) -> None:
    command.downgrade(alembic_config(url, schema=schema), revision)


def upgrade_sql(
    url: str | None = None, revision: str = "head", *, schema: str | None = None
) -> str:
    """The SQL that ``upgrade`` would run, for a DBA to review."""
    config = alembic_config(url, schema=schema)
    buffer = io.StringIO()
    config.output_buffer = buffer
    command.upgrade(config, revision, sql=True)
    return buffer.getvalue()


def _current(connection: Connection, schema: str) -> str | None:
    if connection.dialect.name == "postgresql":
        opts = {"version_table": POSTGRES_VERSION_TABLE, "version_table_schema": schema}
        # A database still laid out by the first release keeps its table in public.
        if connection.scalar(text(f"SELECT to_regclass('\"{schema}\".alembic_version')")) is None:
            opts = {"version_table": "ordering_alembic_version", "version_table_schema": "public"}
    else:
        opts = {"version_table": SQLITE_VERSION_TABLE}
    return MigrationContext.configure(connection, opts=opts).get_current_revision()


def _oldest_served(connection: Connection, schema: str) -> str | None:
    table = (
        f'"{schema}".code_compatibility'
        if connection.dialect.name == "postgresql"
        else "ordering_code_compatibility"
    )
    exists = (
        f"SELECT to_regclass('{table}') IS NOT NULL"
        if connection.dialect.name == "postgresql"
        else "SELECT count(*) FROM sqlite_master WHERE name = 'ordering_code_compatibility'"
    )
    if not connection.scalar(text(exists)):
        return None
    found = connection.scalar(text(f"SELECT oldest_code_revision FROM {table}"))
    return None if found is None else str(found)


async def current_revision(url: str | None = None, *, schema: str | None = None) -> str | None:
    """The revision the database is at, or None for an empty database."""
    revision, _ = await database_revisions(url, schema=schema)
    return revision


async def database_revisions(
    url: str | None = None, *, schema: str | None = None
) -> tuple[str | None, str | None]:
    """(the revision the database is at, the oldest code revision it serves)."""
    chosen = resolve_schema(schema)
    engine = engine_for(resolve_url(url))
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: (_current(sync, chosen), _oldest_served(sync, chosen))
            )
    finally:
        await engine.dispose()


def engine_for(url: str, **options: Any) -> AsyncEngine:
    """A SQLAlchemy engine on a checked URL (``options`` go to ``create_async_engine``),
    for migrations, revision reads and tools; the store itself does not use one.  On
    PostgreSQL it connects as the store does (see ``urls.asyncpg_dsn``): SQLAlchemy
    would pass a server setting in the query to asyncpg as an unknown keyword.
    Connecting waits at most the URL's deadline; the statements of a migration may take
    longer, and are not bounded."""
    if not url.startswith("postgresql"):
        return create_async_engine(driver_url(url), **options)
    dsns = asyncpg_dsns(url)
    timeout = url_deadline(url)
    return create_async_engine(
        driver_url(url),
        async_creator=lambda: hosts.connect_in_order(dsns, timeout),
        **options,
    )
