"""A connection that lands on a read-only server (a node that became a standby, reached
through a virtual IP or a pooler that still points at it) counts as a lost connection:
the store drops it and retries on a fresh one, even for an operation that is not safe
to repeat, since a statement refused as read-only changed nothing.

The database is made read-only for new sessions (``default_transaction_read_only``),
which refuses writes with the same SQLSTATE 25006 as a standby; once the store has
logged a retry it is made writable again, as a promotion would, and the call must
succeed on a fresh connection.  (A failover between two real servers is in
tests/failover.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from ordering import CausalOrdering, ReceivedEvent
from ordering.migrate import upgrade
from ordering.urls import asyncpg_dsn

from .conftest import drop_postgres_database, fresh_postgres_database


@pytest.fixture
async def read_only_url() -> AsyncIterator[str]:
    url = await asyncio.to_thread(fresh_postgres_database, "ordering_read_only")
    await asyncio.to_thread(upgrade, url)
    await _alter(url, "SET default_transaction_read_only = on")
    yield url
    await asyncio.to_thread(drop_postgres_database, url)


async def _alter(url: str, change: str) -> None:
    """Change the database's settings for new sessions, from the server's admin DB."""
    name = make_url(url).database
    admin = await asyncpg.connect(
        asyncpg_dsn(make_url(url).set(database="postgres").render_as_string(hide_password=False)),
        timeout=10,
    )
    try:
        await admin.execute(f'ALTER DATABASE "{name}" {change}')
    finally:
        await admin.close()


def _event() -> ReceivedEvent:
    return ReceivedEvent(
        occurred=datetime.now(UTC), event="read-only.test", resource={"prefect.resource.id": "r"}
    )


async def _when_retried_make_writable(
    url: str, call: Awaitable[Any], caplog: pytest.LogCaptureFixture
) -> Any:
    task = asyncio.ensure_future(call)
    deadline = asyncio.get_running_loop().time() + 10
    while "read-only transaction" not in caplog.text:
        assert not task.done(), f"the call ended without a retry: {task.result()!r}"
        assert asyncio.get_running_loop().time() < deadline, "no retry logged within 10s"
        await asyncio.sleep(0.02)
    await _alter(url, "RESET default_transaction_read_only")
    return await asyncio.wait_for(task, 30)


Call = Callable[[CausalOrdering[ReceivedEvent], ReceivedEvent], Awaitable[Any]]

CALLS: dict[str, Call] = {
    "record-as-seen": lambda ordering, event: ordering.record_event_as_seen(event),
    # Takes the followers it hands out: not safe to repeat once sent, unless refused.
    "get-lost-followers": lambda ordering, _event: ordering.get_lost_followers(),
}


@pytest.mark.parametrize("name", CALLS)
async def test_a_write_refused_as_read_only_is_retried_on_a_fresh_connection(
    read_only_url: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    ordering = CausalOrdering("read-only", url=read_only_url)
    event = _event()
    with caplog.at_level(logging.WARNING, logger="ordering"):
        await _when_retried_make_writable(read_only_url, CALLS[name](ordering, event), caplog)
    assert "ReadOnlySQLTransactionError" in caplog.text
    if name == "record-as-seen":
        assert await ordering.event_has_been_seen(event)
