"""The handler's own table: one row per handling, numbered by the database.

The row is the handler's side effect, committed before the ordering marks the event
seen, so a crash between the two leaves a row for an event that will be handled
again: exactly the at-least-once cost the checker accounts for.  Each handler call
writes its own ``attempt`` id, so that the rows of interrupted calls (which the
workers and the test report) can be told from those of calls that completed.  The number comes
from the database (an identity column on PostgreSQL, AUTOINCREMENT on SQLite), so
rows written by different processes are ordered by one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ordering.migrate import engine_for
from ordering.urls import resolve_url

TABLE = "fault_handled"

_CREATE = {
    "postgresql": f"""
CREATE TABLE {TABLE} (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL,
    attempt text NOT NULL,
    worker text NOT NULL,
    depth integer NOT NULL,
    phase text NOT NULL
)""",
    "sqlite": f"""
CREATE TABLE {TABLE} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    attempt TEXT NOT NULL,
    worker TEXT NOT NULL,
    depth INTEGER NOT NULL,
    phase TEXT NOT NULL
)""",
}

_INSERT = text(
    f"INSERT INTO {TABLE} (event_id, attempt, worker, depth, phase) "
    "VALUES (:event_id, :attempt, :worker, :depth, :phase) RETURNING seq"
)

_SELECT = text(f"SELECT seq, event_id, attempt, worker, depth, phase FROM {TABLE} ORDER BY seq")

_COUNT_DISTINCT = text(f"SELECT COUNT(DISTINCT event_id) FROM {TABLE}")


#: How long a statement on SQLite waits for another process's write lock.
SQLITE_BUSY_TIMEOUT_S = 30.0


def open_engine(url: str) -> AsyncEngine:
    """An engine for the tests' own statements (the handler's table, the checks),
    beside the store's connections: autocommit, and on SQLite the store's WAL mode and
    a patient busy timeout, since worker processes write to the same file."""
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url, isolation_level="AUTOCOMMIT", connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}
        )
        event.listen(engine.sync_engine, "connect", _wal)
        return engine
    # As the store connects: several hosts and URL settings work (see urls.py).
    return engine_for(resolve_url(url), isolation_level="AUTOCOMMIT", pool_size=10, max_overflow=20)


def _wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


@dataclass(frozen=True)
class Handling:
    """One row: which event, which handler call, by whom, how deep, in which phase,
    in what global order."""

    seq: int
    event_id: UUID
    attempt: str
    worker: str
    depth: int
    phase: str


async def create_table(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.exec_driver_sql(_CREATE[engine.dialect.name])


async def record(
    engine: AsyncEngine, event_id: UUID, attempt: str, worker: str, depth: int, phase: str
) -> int:
    """Write one handling (its own transaction) and return its sequence number."""
    params = {
        "event_id": str(event_id),
        "attempt": attempt,
        "worker": worker,
        "depth": depth,
        "phase": phase,
    }
    async with engine.connect() as connection:
        seq = (await connection.execute(_INSERT, params)).scalar_one()
        await connection.commit()
        return int(seq)


async def read_all(engine: AsyncEngine) -> list[Handling]:
    async with engine.connect() as connection:
        rows = (await connection.execute(_SELECT)).all()
    return [Handling(int(r[0]), UUID(str(r[1])), r[2], r[3], int(r[4]), r[5]) for r in rows]


async def distinct_events(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(_COUNT_DISTINCT)).scalar_one())
