"""Alembic environment: async engines, both dialects, only the store's own objects.

On PostgreSQL everything of ours lives in a schema of its own (``ordering`` unless
$ORDERING_SCHEMA or the config's ``ordering_schema`` says otherwise), alembic's
version table included; migrations run with the search_path set to it, so they never
touch the host application's objects.  A database migrated by a release that kept our
objects in ``public`` (with ``ordering_`` names) is moved into the schema first, in
the same transaction (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ordering.migrate import engine_for
from ordering.schema import POSTGRES_VERSION_TABLE, SQLITE_VERSION_TABLE, resolve_schema
from ordering.urls import resolve_url

config = context.config

#: The first release's version table, in public, on PostgreSQL.
LEGACY_VERSION_TABLE = "ordering_alembic_version"

#: Everything the first release created in public (by revisions 0001 and 0002): only
#: these move, never a host object that merely has a similar name.
LEGACY_OBJECTS = (
    ("TABLE", LEGACY_VERSION_TABLE),
    ("TABLE", "ordering_seen_events"),
    ("TABLE", "ordering_processing_leases"),
    ("TABLE", "ordering_waiting_followers"),
    ("VIEW", "ordering_waiting"),
    ("VIEW", "ordering_stuck"),
    ("VIEW", "ordering_held_leases"),
    (
        "FUNCTION",
        "ordering_begin_event(text, uuid, uuid, text, timestamptz, timestamptz, "
        "timestamptz, boolean)",
    ),
    (
        "FUNCTION",
        "ordering_complete_event(text, uuid, text, timestamptz, text, timestamptz, boolean)",
    ),
    (
        "FUNCTION",
        "ordering_park_follower(text, uuid, uuid, timestamptz, timestamptz, jsonb, text, "
        "timestamptz)",
    ),
)


def _url() -> str:
    return resolve_url(config.get_main_option("sqlalchemy.url") or None)


def _schema() -> str:
    return resolve_schema(config.attributes.get("ordering_schema"))


def _configure(dialect: str, **kwargs: Any) -> None:
    if dialect == "postgresql":
        kwargs.update(version_table=POSTGRES_VERSION_TABLE, version_table_schema=_schema())
    else:
        kwargs.update(version_table=SQLITE_VERSION_TABLE, render_as_batch=True)
    context.configure(**kwargs)


def _enter_schema(execute: Any) -> None:
    schema = _schema()
    execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    execute(f'SET search_path TO "{schema}"')


def _move_legacy_objects(connection: Connection) -> None:
    """Move the store's objects from public into the schema, once."""
    schema = _schema()
    legacy = connection.scalar(text("SELECT to_regclass('public.ordering_alembic_version')"))
    if legacy is None:
        return
    if connection.scalar(text(f"SELECT to_regclass('\"{schema}\".{POSTGRES_VERSION_TABLE}')")):
        return
    for kind, name in LEGACY_OBJECTS:
        found = connection.scalar(
            text(
                "SELECT to_regprocedure(:name)"
                if kind == "FUNCTION"
                else "SELECT to_regclass(:name)"
            ),
            {"name": f"public.{name}"},
        )
        if found is not None:  # a database at 0001 has no views yet
            connection.exec_driver_sql(f'ALTER {kind} public.{name} SET SCHEMA "{schema}"')
    connection.execute(
        text(f'ALTER TABLE "{schema}".{LEGACY_VERSION_TABLE} RENAME TO {POSTGRES_VERSION_TABLE}')
    )


def _run(connection: Connection) -> None:
    dialect = connection.dialect.name
    if dialect == "postgresql":
        _enter_schema(lambda sql: connection.execute(text(sql)))
        _move_legacy_objects(connection)
    _configure(dialect, connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = engine_for(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    url = _url()
    dialect = "postgresql" if url.startswith("postgresql") else "sqlite"
    _configure(dialect, url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        if dialect == "postgresql":
            _enter_schema(context.execute)
        context.run_migrations()
else:
    asyncio.run(_run_async())
