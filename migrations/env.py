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
from sqlalchemy.ext.asyncio import create_async_engine

from ordering.engine import resolve_url
from ordering.schema import POSTGRES_VERSION_TABLE, SQLITE_VERSION_TABLE, resolve_schema

config = context.config

#: The first release's version table, in public, on PostgreSQL.
LEGACY_VERSION_TABLE = "ordering_alembic_version"


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
    objects = connection.execute(
        text(
            """
            SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' ELSE 'TABLE' END, c.relname::text
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v')
              AND c.relname LIKE 'ordering\\_%'
            UNION ALL
            SELECT 'FUNCTION', p.oid::regprocedure::text
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'public' AND p.proname LIKE 'ordering\\_%'
            """
        )
    ).all()
    for kind, name in objects:
        # a function comes as its qualified signature, the others as bare names
        qualified = name if kind == "FUNCTION" else f'public."{name}"'
        connection.exec_driver_sql(f'ALTER {kind} {qualified} SET SCHEMA "{schema}"')
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
    engine = create_async_engine(_url())
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
