"""Every wait of the store ends within one deadline: the fault kinds of production.

Each test makes a fault with real parts (a port nothing listens on, a server that
never answers, a proxy that stops passing bytes mid-statement, a lock held by another
session or process, a network namespace whose link goes down), makes calls with a
deadline of DEADLINE seconds and checks that the call raised StoreUnavailable within
it, that the event was not marked seen, that no lease it took outlives
lease_duration, and that the next call works once the fault is gone.  Each prints the
time it measured (``pytest tests/test_deadlines.py -s``): docs/guarantees.md quotes
those figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from ordering import CausalOrdering, ReceivedEvent, StoreUnavailable
from ordering.migrate import upgrade
from ordering.schema import resolve_schema
from ordering.urls import asyncpg_dsn

from .conftest import IN_CI
from .helpers import MutableClock, make_event, real_clock, run_sql
from .netfaults import Proxy, can_make_namespaces, closed_port, namespace, silent_server

#: The deadline of the calls under test, in seconds.
DEADLINE = 2.0
#: What a loaded 2-core machine may add to it: the loop's own scheduling, a thread
#: finishing its SQLite wait, closing what timed out.
SLACK = 0.75

REPO = Path(__file__).resolve().parent.parent


async def _no_followers(event: ReceivedEvent, depth: int = 0) -> None:
    raise AssertionError(f"no event in these tests follows another: {event.id}")


def _with_address(url: str, host: str, port: int) -> str:
    return make_url(url).set(host=host, port=port).render_as_string(hide_password=False)


def _report(fault: str, seconds: float, error: BaseException | None = None) -> None:
    detail = f": {str(error).splitlines()[0]}" if error else ""
    print(f"\ndeadline {DEADLINE:g} s, {fault}: raised after {seconds:.2f} s{detail}")


async def _raises_within_deadline(fault: str, call: Any) -> StoreUnavailable:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        await call
    took = time.monotonic() - started
    _report(fault, took, raised.value)
    assert took <= DEADLINE + SLACK, f"{fault}: the call took {took:.2f} s"
    return raised.value


def _ordering(url: str, scope: str, clock: MutableClock | None = None) -> CausalOrdering[Any]:
    return CausalOrdering(
        scope, url=url, clock=clock or real_clock(), deadline=timedelta(seconds=DEADLINE)
    )


async def _seen_and_leases(url: str, scope: str, event: ReceivedEvent) -> tuple[int, list[Any]]:
    """Counted beside the store, over a connection of the test's own."""
    seen = await run_sql(
        url,
        "SELECT count(*) AS n FROM {seen_events} WHERE scope = :scope AND event_id = :event",
        {"scope": scope, "event": event.id},
    )
    leases = await run_sql(
        url,
        "SELECT expires_at FROM {processing_leases} WHERE scope = :scope AND event_id = :event",
        {"scope": scope, "event": event.id},
    )
    return int(seen[0]["n"]), [row["expires_at"] for row in leases]


async def _assert_left_clean(
    url: str, scope: str, event: ReceivedEvent, ordering: CausalOrdering[Any]
) -> None:
    """The event is not seen, and a lease the call took expires within lease_duration
    of its taking; once the fault is gone, the event can be handled."""
    seen, leases = await _seen_and_leases(url, scope, event)
    assert seen == 0, "a call that raised StoreUnavailable marked its event seen"
    for expires_at in leases:
        # SQLite keeps times as UTC text (ordering/backends/sqlite.py)
        expires = (
            datetime.fromisoformat(expires_at).replace(tzinfo=UTC)
            if isinstance(expires_at, str)
            else expires_at
        )
        assert expires <= ordering.clock() + ordering.lease_duration
    clock = ordering.clock
    assert isinstance(clock, MutableClock)
    clock.advance(ordering.lease_duration)  # any lease left behind has expired
    async with ordering.preceding_event_confirmed(_no_followers, event):
        pass
    assert await ordering.event_has_been_seen(event) is True


# -- the server cannot be reached -----------------------------------------------------


async def test_refused_connections_raise_within_the_deadline(postgres_url: str) -> None:
    url = _with_address(postgres_url, "127.0.0.1", closed_port())
    ordering = _ordering(url, "refused")
    error = await _raises_within_deadline(
        "connection refused", ordering.event_has_been_seen(make_event(real_clock()))
    )
    assert "attempts" in str(error)  # it tried again, with backoff, before giving up
    assert "deadline of 2 s" in str(error)


async def test_a_server_that_never_answers_is_given_up_within_the_deadline(
    postgres_url: str,
) -> None:
    with silent_server() as port:
        ordering = _ordering(_with_address(postgres_url, "127.0.0.1", port), "silent")
        await _raises_within_deadline(
            "a server that accepts and never answers",
            ordering.event_has_been_seen(make_event(real_clock())),
        )


async def test_a_server_that_stops_answering_mid_statement(postgres_url: str, scope: str) -> None:
    """The body runs, then the server stops answering: completing the event fails
    within the deadline, the event is not seen, and after the server is back (its old
    connections dead, as after a restart) the event is handled."""
    target = make_url(postgres_url)
    clock = real_clock()
    with Proxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
        ordering = _ordering(_with_address(postgres_url, "127.0.0.1", proxy.port), scope, clock)
        async with ordering.preceding_event_confirmed(_no_followers, make_event(clock)):
            pass  # the path works, and the pool keeps its connection
        event = make_event(clock)

        async def handle_while_the_server_stops() -> None:
            async with ordering.preceding_event_confirmed(_no_followers, event):
                proxy.freeze()

        await _raises_within_deadline(
            "a server that stops answering mid-statement", handle_while_the_server_stops()
        )
        proxy.thaw()
        await _assert_left_clean(postgres_url, scope, event, ordering)


# -- a lock held by someone else ------------------------------------------------------


@asynccontextmanager
async def _postgres_table_locked(url: str) -> AsyncIterator[None]:
    """The seen table locked by another session, as an ALTER or a VACUUM FULL does."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute(
            f"LOCK TABLE {resolve_schema(None)}.seen_events IN ACCESS EXCLUSIVE MODE"
        )
        yield
        await transaction.rollback()
    finally:
        await connection.close()


@asynccontextmanager
async def _sqlite_file_locked(url: str) -> AsyncIterator[None]:
    """The SQLite file's write lock held by another process."""
    path = make_url(url).database
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sqlite3, sys\n"
        f"c = sqlite3.connect({path!r}, isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 30)
        assert line == b"locked\n", f"the lock holder did not start: {line!r}"
        yield
    finally:
        holder.kill()
        await holder.wait()


def _locked(url: str) -> Any:
    return _sqlite_file_locked(url) if url.startswith("sqlite") else _postgres_table_locked(url)


async def test_a_lock_held_elsewhere_before_the_event_begins(db_url: str, scope: str) -> None:
    """On PostgreSQL another session holds the seen table; on SQLite another process
    holds the file's write lock.  Taking the event's lease waits for it, within the
    deadline; once the lock is let go, the event is handled."""
    clock = real_clock()
    ordering = _ordering(db_url, scope, clock)
    await ordering.event_has_been_seen(make_event(clock))  # the version check, beforehand
    event = make_event(clock)

    async def handle() -> None:
        async with ordering.preceding_event_confirmed(_no_followers, event):
            pass

    kind = "another process's write lock" if db_url.startswith("sqlite") else "a table lock"
    async with _locked(db_url):
        await _raises_within_deadline(f"{kind}, before the event begins", handle())
    await _assert_left_clean(db_url, scope, event, ordering)
    if not db_url.startswith("sqlite"):
        assert await _waiting_sessions(db_url) == 0


async def test_a_lock_held_elsewhere_when_the_event_completes(db_url: str, scope: str) -> None:
    """The lock is taken while the body runs: completing the event waits for it within
    the deadline and changes nothing; on PostgreSQL the server has given up the
    statement by then (its own timeouts end before the caller's), so letting the lock
    go afterwards applies nothing late."""
    clock = real_clock()
    ordering = _ordering(db_url, scope, clock)
    event = make_event(clock)
    kind = "another process's write lock" if db_url.startswith("sqlite") else "a table lock"
    async with _locked_during_the_body(db_url, ordering, event) as handle:
        await _raises_within_deadline(f"{kind}, when the event completes", handle)
    await asyncio.sleep(0.2)  # time for a statement left waiting on the server to land
    await _assert_left_clean(db_url, scope, event, ordering)


@asynccontextmanager
async def _locked_during_the_body(
    url: str, ordering: CausalOrdering[Any], event: ReceivedEvent
) -> AsyncIterator[Any]:
    locks: list[Any] = []

    async def handle() -> None:
        async with ordering.preceding_event_confirmed(_no_followers, event):
            lock = _locked(url)
            await lock.__aenter__()
            locks.append(lock)

    try:
        yield handle()
    finally:
        for lock in locks:
            await lock.__aexit__(None, None, None)


async def _waiting_sessions(url: str) -> int:
    """The store's sessions still running a statement on the server."""
    rows = await run_sql(
        url,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'ordering' "
        "AND state = 'active' AND datname = current_database()",
    )
    return int(rows[0]["n"])


# -- a network path that drops packets ------------------------------------------------


@pytest.fixture
def network_namespace() -> Iterator[Any]:
    why_not = can_make_namespaces()
    if why_not is not None:
        if IN_CI:
            pytest.fail(f"network namespaces cannot be made: {why_not} (CI=true)")
        pytest.skip(why_not)
    with namespace() as made:
        yield made


def test_a_network_path_that_drops_packets(
    postgres_url: str, scope: str, network_namespace: Any
) -> None:
    """A worker in a network namespace reaches PostgreSQL over a veth pair.  With the
    link taken down (packets dropped: no reset, no error), its call raises within the
    deadline; with the link back, its next call works."""
    target = make_url(postgres_url)
    with Proxy(
        target.host or "127.0.0.1",
        target.port or 5432,
        listen_host=network_namespace.host_address,
    ) as proxy:
        address = _with_address(postgres_url, network_namespace.host_address, proxy.port)
        url = make_url(address).update_query_dict({"deadline": f"{DEADLINE:g}"})
        with subprocess.Popen(
            network_namespace.command(
                sys.executable,
                "-m",
                "tests.deadline_worker",
                url.render_as_string(hide_password=False),
                scope,
            ),
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        ) as worker:
            try:
                assert _ask(worker)["outcome"] == "handled"  # the path works
                network_namespace.link(up=False)
                dropped = _ask(worker)
                _report("a network path that drops packets", dropped["seconds"])
                assert dropped["outcome"].startswith("unavailable"), dropped
                assert dropped["seconds"] <= DEADLINE + SLACK
                network_namespace.link(up=True)
                assert _ask(worker)["outcome"] == "handled"  # the next call works
            finally:
                if worker.stdin is not None:
                    worker.stdin.close()
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
        event_id = dropped["event"]
        seen, _ = asyncio.run(_seen_and_leases(postgres_url, scope, _stub(event_id)))
        assert seen == 0


def _ask(worker: subprocess.Popen[str]) -> dict[str, Any]:
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write("handle\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    assert line, f"the worker ended (exit code {worker.poll()})"
    answer: dict[str, Any] = json.loads(line)
    return answer


def _stub(event_id: str) -> ReceivedEvent:
    from uuid import UUID

    return make_event(real_clock(), id=UUID(event_id))


# -- how the deadline is set ----------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan", "10s"])
def test_a_bad_deadline_in_the_url_is_refused_naming_it(value: str) -> None:
    for url in (
        f"sqlite+aiosqlite:///ordering.db?deadline={value}",
        f"postgresql+asyncpg://app@db/app?deadline={value}",
    ):
        with pytest.raises(ValueError, match="deadline= must be a positive number of seconds"):
            CausalOrdering("s", url=url)


@pytest.mark.parametrize("value", [timedelta(0), timedelta(seconds=-1)])
def test_a_bad_deadline_argument_is_refused_naming_it(value: timedelta) -> None:
    with pytest.raises(ValueError, match="deadline must be positive"):
        CausalOrdering("s", url="sqlite+aiosqlite:///ordering.db", deadline=value)


def test_the_deadline_comes_from_the_argument_else_the_url_else_ten_seconds() -> None:
    base = "postgresql+asyncpg://app@db/app"
    assert CausalOrdering("s", url=base).deadline == timedelta(seconds=10)
    assert CausalOrdering("s", url=f"{base}?deadline=2.5").deadline == timedelta(seconds=2.5)
    chosen = CausalOrdering("s", url=f"{base}?deadline=2.5", deadline=timedelta(seconds=30))
    assert chosen.deadline == timedelta(seconds=30)


def test_a_deadline_as_long_as_the_lease_is_refused() -> None:
    for given in ({"deadline": timedelta(seconds=5)}, {"url": "sqlite:///o.db?deadline=5"}):
        with pytest.raises(ValueError, match="must be shorter than lease_duration"):
            CausalOrdering("s", lease_duration=timedelta(seconds=5), **given)


async def test_the_url_deadline_reaches_the_store_migrations_and_checks_not_the_server(
    empty_url: str, scope: str
) -> None:
    """``?deadline=`` is the store's own: on PostgreSQL it is not sent to the server as
    a setting (which would refuse it), on SQLite not given to the driver."""
    url = make_url(empty_url).update_query_dict({"deadline": "7"})
    text = url.render_as_string(hide_password=False)
    await asyncio.get_running_loop().run_in_executor(None, upgrade, text)
    ordering = CausalOrdering(scope, url=text)
    assert ordering.backend.connections.deadline == 7
    assert await ordering.event_has_been_seen(make_event(real_clock())) is False
