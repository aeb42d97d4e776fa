"""Process models: forked, forkserver and spawned workers, a fork after the parent used
the store, threads each running a loop of its own, and uvloop.

The rule under test is the first guarantee: one worker at a time holds an event.  Lease
owners name their process, and a lease may be taken again by its own owner, so two
processes that made the same owners (forked after ``ordering`` was imported) would both
hold the same event.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import sys
import threading
from collections import Counter
from collections.abc import Coroutine
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest

from ordering import (
    CausalOrdering,
    EventAlreadyProcessed,
    EventBeingProcessed,
    ReceivedEvent,
    dispose,
)

from .helpers import make_event, real_clock, run_in_threads

#: How long the worker that holds an event keeps it: long enough that the other
#: worker, released by the same barrier, asks while it is held.
HOLD_SECONDS = 0.3
ROUNDS = 4

# multiprocessing's fork in a process with threads (the test runner's, not the store's)
# is deprecated from Python 3.12 on; the children here touch no lock those threads hold.
fork_with_threads = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
)


async def _no_followers(event: ReceivedEvent, depth: int = 0) -> None:
    raise AssertionError(f"no event in these tests follows another: {event.id}")


async def _contend(
    url: str, scope: str, events: list[ReceivedEvent], barrier: Barrier, report: Any
) -> None:
    """Deliver each event once, in step with the other workers (the barrier)."""
    ordering = CausalOrdering(scope, url=url)
    for event in events:
        # Blocking the loop for it: a child running its parent's loop has that loop's
        # default executor without its threads (the store uses threads of its own).
        barrier.wait()
        try:
            async with ordering.preceding_event_confirmed(_no_followers, event):
                report.put((os.getpid(), str(event.id), "held"))
                await asyncio.sleep(HOLD_SECONDS)
        except EventAlreadyProcessed:
            report.put((os.getpid(), str(event.id), "already processed"))
        except EventBeingProcessed:
            report.put((os.getpid(), str(event.id), "refused"))
    report.put((os.getpid(), "", "pool", _pool_ids(ordering)))
    await dispose()


def _pool_ids(ordering: CausalOrdering[Any]) -> list[int]:
    """Ids of the connection objects the ordering's pool holds (the same numbers in a
    forked child for the objects it inherited)."""
    return [id(connection) for connection, _ in ordering.backend.connections._idle]


async def _waking_often(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` while a timer wakes the loop every 10 ms."""

    async def tick() -> None:
        while True:  # noqa: ASYNC110 (the timer is the point: it wakes the loop)
            await asyncio.sleep(0.01)

    ticking = asyncio.ensure_future(tick())
    try:
        await work
    finally:
        ticking.cancel()


def _worker(
    url: str,
    scope: str,
    event_json: list[str],
    barrier: Barrier,
    report: Any,
    loop_kind: str,
    parent_loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    """A worker process: the events, contended for with the others."""
    events = [ReceivedEvent.model_validate_json(text) for text in event_json]
    work = _contend(url, scope, events, barrier, report)
    if parent_loop is not None and sys.version_info < (3, 12):
        # The loop the parent made, inherited.  Its wake-up socket pair and its epoll
        # instance are the parent's, shared by all the children: a wake-up that a worker
        # thread (SQLite's) sends this child can be read by the other, leaving this one
        # asleep until its next timer.  A timer every few milliseconds bounds that wait;
        # it is the inherited loop's, not the store's, to share.
        parent_loop.run_until_complete(_waking_often(work))
    elif parent_loop is not None:
        # From Python 3.12 asyncio resets its own state in a forked child, and the
        # parent's loop is not to be run there: a fresh one, beside the inherited one.
        asyncio.run(work)
    elif loop_kind == "uvloop":
        import uvloop

        uvloop.run(work)
    else:
        asyncio.run(work)


def _outcomes(report: Any, workers: int) -> tuple[dict[str, Counter[str]], list[list[int]]]:
    by_event: dict[str, Counter[str]] = {}
    pools: list[list[int]] = []
    while len(pools) < workers:
        _pid, event, outcome, *rest = report.get(timeout=60)
        if outcome == "pool":
            pools.append(rest[0])
        else:
            by_event.setdefault(event, Counter())[outcome] += 1
    return by_event, pools


def _run_workers(
    method: str,
    url: str,
    scope: str,
    *,
    workers: int = 2,
    loop_kind: str = "asyncio",
    parent_loop: asyncio.AbstractEventLoop | None = None,
) -> tuple[dict[str, Counter[str]], list[list[int]]]:
    context = multiprocessing.get_context(method)
    clock = real_clock()
    events = [make_event(clock, name=f"contended-{i}") for i in range(ROUNDS)]
    barrier = context.Barrier(workers, timeout=60)
    report = context.Queue()
    processes = [
        context.Process(  # type: ignore[attr-defined]
            target=_worker,
            args=(
                url,
                scope,
                [e.model_dump_json() for e in events],
                barrier,
                report,
                loop_kind,
                parent_loop,
            ),
        )
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = _outcomes(report, workers)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert [p.exitcode for p in processes] == [0] * workers
    assert set(outcomes[0]) == {str(e.id) for e in events}
    return outcomes


def _assert_one_holder_each(by_event: dict[str, Counter[str]], workers: int) -> None:
    for event, outcomes in by_event.items():
        assert outcomes["held"] == 1, f"event {event}: {dict(outcomes)}"
        assert sum(outcomes.values()) == workers


@fork_with_threads
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_workers_of_any_start_method_never_hold_one_event_together(
    method: str, db_url: str, scope: str
) -> None:
    """Two workers deliver the same event at the same moment and the holder keeps it for
    a while: exactly one holds it, the other is refused, whatever made the processes."""
    import ordering.causal  # imported before the fork, as an application would

    assert ordering.causal  # the owners' process part is made at import
    by_event, _ = _run_workers(method, db_url, scope)
    _assert_one_holder_each(by_event, 2)


@fork_with_threads
def test_forked_uvloop_workers_never_hold_one_event_together(db_url: str, scope: str) -> None:
    pytest.importorskip("uvloop")
    by_event, _ = _run_workers("fork", db_url, scope, loop_kind="uvloop")
    _assert_one_holder_each(by_event, 2)


@fork_with_threads
def test_a_fork_after_the_parent_used_the_store_shares_nothing_with_it(
    db_url: str, scope: str
) -> None:
    """The parent handles events on a loop of its own, keeps that loop (and the
    connections its pool holds) and forks; the children run the inherited loop (on
    Python 3.11; from 3.12 a loop of their own).  They
    hold each event one at a time, open connections of their own rather than use the
    parent's, and the parent's connections work afterwards."""
    clock = real_clock()
    parent_loop = asyncio.new_event_loop()
    try:
        parent = CausalOrdering(scope, url=db_url)

        async def handle_some() -> list[int]:
            for i in range(3):
                async with parent.preceding_event_confirmed(
                    _no_followers, make_event(clock, name=f"parent-{i}")
                ):
                    pass
            return _pool_ids(parent)

        before = parent_loop.run_until_complete(handle_some())
        assert before, "the parent's pool keeps its connections between operations"
        by_event, pools = _run_workers("fork", db_url, scope, parent_loop=parent_loop)
        _assert_one_holder_each(by_event, 2)
        for pool in pools:
            assert pool, "each child's pool holds the connections it opened"
            assert not set(pool) & set(before), "a child used a connection of its parent"
        after = parent_loop.run_until_complete(handle_some())
        assert set(before) <= set(after), "the parent's connections were given up"
    finally:
        parent_loop.run_until_complete(dispose())
        parent_loop.close()


def test_threads_with_loops_of_their_own_never_hold_one_event_together(
    db_url: str, scope: str
) -> None:
    """Four threads, each with its own loop (and so its own backend, built at the same
    moment), deliver the same events in step: one holds each event at a time."""
    clock = real_clock()
    events = [make_event(clock, name=f"threaded-{i}") for i in range(ROUNDS)]
    in_step = threading.Barrier(4, timeout=60)
    report: queue.Queue[tuple[Any, ...]] = queue.Queue()

    class Step:
        def wait(self) -> None:
            in_step.wait()

    async def work(_: int) -> None:
        await _contend(db_url, scope, events, Step(), report)  # type: ignore[arg-type]

    run_in_threads(4, work)
    by_event, _ = _outcomes(report, 4)
    _assert_one_holder_each(by_event, 4)


@fork_with_threads
def test_owners_differ_between_threads_and_after_a_fork() -> None:
    """Owner tokens made in one process, in several threads and in a forked child are
    all different; the child's name its own process."""
    from ordering.causal import _new_owner

    made: list[str] = []
    threads = [
        threading.Thread(target=lambda: made.extend(_new_owner() for _ in range(100)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report two owners and leave at once
        os.write(write, f"{os.getpid()} {_new_owner()} {_new_owner()}".encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child_pid, *child_owners = os.read(read, 4096).decode().split()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(set(made)) == 400
    assert not set(child_owners) & set(made)
    assert all(f":{child_pid}:" in owner for owner in child_owners)
    assert all(f":{os.getpid()}:" in owner for owner in made)
