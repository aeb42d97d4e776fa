"""Concurrent calls share round trips: the Batcher on its own, and PostgreSQL's begin and
complete under many consumers at once (SQLite runs each call to the end on the loop, so
nothing there is ever batched)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from uuid import UUID, uuid4

from ordering import StoreUnavailable
from ordering.backends import BeginRequest, Begun, Claim, CompleteRequest, backend_for
from ordering.backends.batching import Batcher

from .helpers import MutableClock, eventually, statements_of


class Recorder:
    """A ``send`` that records its batches and answers each request by doubling it,
    refusing the value 13 and, when asked, the whole batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.lost = False

    async def __call__(self, requests: Sequence[int]) -> list[int]:
        self.batches.append(list(requests))
        await self.gate.wait()
        if self.lost:
            raise StoreUnavailable("the database is gone")
        if 13 in requests:
            raise ValueError("13 is refused")
        return [r * 2 for r in requests]


async def _started(recorder: Recorder, batches: int) -> None:
    await eventually(lambda: len(recorder.batches) >= batches, what=f"{batches} batches sent")


async def test_a_call_alone_goes_at_once_and_the_rest_go_together() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder)
    first = asyncio.ensure_future(batcher.submit(1))
    await _started(recorder, 1)
    rest = [asyncio.ensure_future(batcher.submit(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    recorder.gate.set()
    assert await asyncio.gather(first, *rest) == [2, 4, 6, 8]
    assert recorder.batches == [[1], [2, 3, 4]]


async def test_each_caller_gets_its_own_error() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder)
    first = asyncio.ensure_future(batcher.submit(1))
    await _started(recorder, 1)
    rest = [asyncio.ensure_future(batcher.submit(n)) for n in (2, 13, 4)]
    await asyncio.sleep(0)
    recorder.gate.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert results[:2] == [2, 4] and results[3] == 8
    assert isinstance(results[2], ValueError)
    # the failing batch was tried again call by call
    assert recorder.batches == [[1], [2, 13, 4], [2], [13], [4]]


async def test_a_lost_database_reaches_every_caller_of_the_batch() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder)
    first = asyncio.ensure_future(batcher.submit(1))
    await _started(recorder, 1)
    rest = [asyncio.ensure_future(batcher.submit(n)) for n in (2, 3)]
    await asyncio.sleep(0)
    recorder.lost = True
    recorder.gate.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert recorder.batches == [[1], [2, 3]]  # not retried one by one


async def test_a_cancelled_caller_is_not_sent_and_an_orphaned_answer_is_handed_back() -> None:
    recorder = Recorder()
    orphans: list[tuple[int, int]] = []
    batcher: Batcher[int, int] = Batcher(recorder, orphaned=lambda r, a: orphans.append((r, a)))
    first = asyncio.ensure_future(batcher.submit(1))
    await _started(recorder, 1)
    queued = asyncio.ensure_future(batcher.submit(2))
    kept = asyncio.ensure_future(batcher.submit(3))
    await asyncio.sleep(0)
    queued.cancel()
    recorder.gate.set()
    assert await first == 2 and await kept == 6
    assert recorder.batches == [[1], [3]]
    # A caller cancelled while its batch is in flight: its answer goes to ``orphaned``.
    first_gate, second_gate = asyncio.Event(), asyncio.Event()
    recorder.gate = first_gate
    lead = asyncio.ensure_future(batcher.submit(5))
    await _started(recorder, 3)
    in_flight = asyncio.ensure_future(batcher.submit(7))
    await asyncio.sleep(0)
    recorder.gate = second_gate  # the batch of 7 will wait on this one
    first_gate.set()
    assert await lead == 10
    await _started(recorder, 4)
    assert recorder.batches[-1] == [7]
    in_flight.cancel()
    second_gate.set()
    await eventually(lambda: bool(orphans), what="the orphaned answer handed back")
    assert orphans == [(7, 14)]
    assert in_flight.cancelled()


async def test_postgresql_begins_at_once_share_round_trips_and_one_wins_each_event(
    postgres_url: str, clock: MutableClock
) -> None:
    backend = backend_for(postgres_url)
    scope = f"batch-{uuid4().hex[:8]}"
    now = clock()
    contested = uuid4()
    others = [uuid4() for _ in range(30)]

    def begin(event_id: UUID, owner: str) -> BeginRequest:
        return BeginRequest(
            scope=scope,
            event_id=event_id,
            follows=None,
            owner=owner,
            now=now,
            expires_at=now + timedelta(minutes=1),
            seen_after=now - timedelta(minutes=30),
        )

    with statements_of(backend) as log:
        answers = await asyncio.gather(
            *(backend.begin(begin(contested, f"rival-{n}")) for n in range(10)),
            *(backend.begin(begin(event_id, "one")) for event_id in others),
        )
    rivals, own = answers[:10], answers[10:]
    assert sum(isinstance(a, Begun) for a in rivals) == 1
    assert all(a == Begun(False, False) for a in own)
    assert log.count("begin_batch") >= 1, log.names
    assert log.count("begin") + log.count("begin_batch") < len(answers)

    completions = await asyncio.gather(
        *(
            backend.complete(
                CompleteRequest(
                    scope=scope,
                    event_id=event_id,
                    lease_owner="one",
                    now=now,
                    claim=Claim(owner="c", until=now + timedelta(minutes=1)),
                    is_follower=False,
                )
            )
            for event_id in others
        )
    )
    assert completions == [[] for _ in others]
    seen = await asyncio.gather(
        *(
            backend.seen(scope=scope, event_id=e, seen_after=now - timedelta(minutes=30))
            for e in others
        )
    )
    assert all(seen)
    await backend.clear(scope=scope)
