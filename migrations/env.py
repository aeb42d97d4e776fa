"""Alembic environment: async engines, both dialects, only the store's own tables."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from ordering.engine import resolve_url
from ordering.schema import VERSION_TABLE, metadata

config = context.config


def _url() -> str:
    return resolve_url(config.get_main_option("sqlalchemy.url") or None)


def _ours(name: str | None, type_: str, parent_names: Any) -> bool:
    """Autogenerate looks only at our tables: the database may hold a host app's too."""
    if type_ == "table":
        return name is not None and name.startswith("ordering_") and name != VERSION_TABLE
    return True


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=_ours,
        compare_type=True,
        render_as_batch=True,
        **kwargs,
    )


def _run(connection: Connection) -> None:
    _configure(connection=connection)
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
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
