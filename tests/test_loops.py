"""Event loops that end leave nothing behind: a program that calls ``asyncio.run()``
again and again, or starts threads that each run a loop, keeps neither the loops nor
their connections (file descriptors here, sessions on the server)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable

from ordering import CausalOrdering, ReceivedEvent, dispose

from .helpers import make_event, real_clock, sql_value

RUNS = 20

#: How long the server may take to end the session of a connection closed under it.
SESSION_END_SECONDS = 5.0

LoopRef = weakref.ReferenceType[asyncio.AbstractEventLoop]


async def _nothing(event: ReceivedEvent, depth: int = 0) -> None:
    return None


async def _use(url: str, scope: str) -> LoopRef:
    """Handle a few events at once (so that the pool holds several connections) and
    leave without disposing of anything, as a program's ``main()`` would."""
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(scope, url=url)
    clock = real_clock()

    async def handle(i: int) -> None:
        async with ordering.preceding_event_confirmed(_nothing, make_event(clock, name=f"{i}")):
            await asyncio.sleep(0.01)

    await asyncio.gather(*(handle(i) for i in range(3)))
    return weakref.ref(asyncio.get_running_loop())


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def _sessions(url: str) -> int:
    return asyncio.run(_sessions_now(url))


async def _sessions_now(url: str) -> int:
    """The store's sessions on the test's PostgreSQL database (0 on SQLite)."""
    if not url.startswith("postgresql"):
        return 0
    count = await sql_value(
        url,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'ordering'",
    )
    return int(count)


def _in_threads(count: int, run: Callable[[], LoopRef]) -> list[LoopRef]:
    found: list[LoopRef] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            found.append(run())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return found


def _assert_nothing_left(url: str, loops: list[LoopRef], files: int, sessions: int) -> None:
    gc.collect()
    assert [ref for ref in loops if ref() is not None] == [], "a loop that ended is still alive"
    assert _open_files() <= files, "the connections of loops that ended are still open"
    # A connection closed without a word (its loop is gone) ends its server session only
    # once the server reads the closed socket: give it a moment, not forever.
    deadline = time.monotonic() + SESSION_END_SECONDS
    while (left := _sessions(url)) > sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left <= sessions, "the server still has sessions of loops that ended"


def _baseline(url: str, scope: str) -> tuple[int, int]:
    asyncio.run(_use(url, scope))  # the first run imports and migrates what it needs
    gc.collect()
    return _open_files(), _sessions(url)


def test_runs_of_asyncio_run_leave_no_loop_nor_connection(db_url: str, scope: str) -> None:
    files, sessions = _baseline(db_url, scope)
    loops = [asyncio.run(_use(db_url, scope)) for _ in range(RUNS)]
    _assert_nothing_left(db_url, loops, files, sessions)


def test_threads_with_loops_of_their_own_leave_no_loop_nor_connection(
    db_url: str, scope: str
) -> None:
    files, sessions = _baseline(db_url, scope)
    loops = _in_threads(8, lambda: asyncio.run(_use(db_url, scope)))
    _assert_nothing_left(db_url, loops, files, sessions)


def test_a_loop_closed_without_shutting_down_leaves_nothing_once_collected(
    db_url: str, scope: str
) -> None:
    """A loop closed without ``shutdown_asyncgens()`` can no longer close its
    connections with a word to the server: they are released with the loop (asyncpg's
    own finalizer then warns of each), and SQLite's closed at once."""

    def run() -> LoopRef:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(_use(db_url, scope))
        finally:
            loop.close()

    files, sessions = _baseline(db_url, scope)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        loops = _in_threads(4, run)
        loops.append(run())
        _assert_nothing_left(db_url, loops, files, sessions)


async def test_operations_under_way_when_the_store_is_disposed_close_their_connections(
    db_url: str, scope: str
) -> None:
    """``dispose()`` while calls are still running (a metrics refresh, a consumer being
    stopped): the connections those calls give back afterwards are closed, not kept
    by a pool nobody will use again."""
    clock = real_clock()
    await CausalOrdering(scope, url=db_url).event_has_been_seen(make_event(clock))
    await dispose()
    gc.collect()
    files = _open_files()
    sessions = await _sessions_now(db_url)

    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(scope, url=db_url)
    calls = [asyncio.create_task(ordering.event_has_been_seen(make_event(clock))) for _ in range(8)]
    await asyncio.sleep(0.005)  # connecting or querying
    assert not all(call.done() for call in calls), "no call was under way at dispose()"
    await dispose()
    assert await asyncio.gather(*calls) == [False] * 8
    gc.collect()
    assert _open_files() <= files, "a call that ended after dispose() kept its connection"
    assert await _sessions_now(db_url) <= sessions
