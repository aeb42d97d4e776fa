"""Shared fixtures: every test that takes ``db_url`` (or ``ordering``) runs on SQLite and
on PostgreSQL.  PostgreSQL tests get a fresh database per run; under CI an unreachable
server fails the run instead of skipping."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from ordering import CausalOrdering, ReceivedEvent, dispose
from ordering.migrate import upgrade

from .helpers import MutableClock

PG_URL = os.environ.get(
    "ORDERING_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


async def _pg_admin(sql: str) -> None:
    import asyncpg

    url = make_url(PG_URL)
    connection = await asyncpg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        database=url.database or "postgres",
        timeout=10,
    )
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def fresh_postgres_database(prefix: str = "ordering_test") -> str:
    """Create an empty database for this run and return its URL (the caller drops it)."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        message = f"PostgreSQL at {make_url(PG_URL).render_as_string()} is unreachable: {exc!r}"
        if IN_CI:
            pytest.fail(message + " (CI=true: this is a failure, not a skip)")
        pytest.skip(message)
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = fresh_postgres_database()
    upgrade(url)
    yield url
    drop_postgres_database(url)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "ordering.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A migrated database URL; every test using it runs once per dialect."""
    fixture = {"sqlite": "sqlite_url", "postgresql": "postgres_url"}[request.param]
    return str(request.getfixturevalue(fixture))


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with nothing in it, this test's alone (for migrations and the CLI)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    url = fresh_postgres_database("ordering_empty")
    yield url
    drop_postgres_database(url)


@pytest.fixture
def clock() -> MutableClock:
    return MutableClock(datetime(2026, 11, 28, 12, 0, tzinfo=UTC))


@pytest.fixture
def scope() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def ordering(
    db_url: str, clock: MutableClock, scope: str
) -> AsyncIterator[CausalOrdering[ReceivedEvent]]:
    ordering = CausalOrdering(scope, url=db_url, clock=clock)
    yield ordering
    await ordering.clear()


@pytest.fixture(autouse=True)
async def _close_pools() -> AsyncIterator[None]:
    yield
    await dispose()


__all__ = ["IN_CI", "PG_URL", "timedelta"]
