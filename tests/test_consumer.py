"""OrderedConsumer: verdicts, followers, the background sweep and shutdown."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import pytest

from ordering import (
    PRECEDING_EVENT_LOOKBACK,
    CausalOrdering,
    OrderedConsumer,
    Outcome,
    ReceivedEvent,
    StoreUnavailable,
    Verdict,
)

from .helpers import MutableClock, eventually, make_chain, make_event, rows_of_scope

Ordering = CausalOrdering[ReceivedEvent]


class Recorder:
    """A user's handler: records what it is given; can fail or hang on chosen events."""

    def __init__(self) -> None:
        self.handled: list[UUID] = []
        self.fail_on: set[UUID] = set()
        self.hang_on: set[UUID] = set()
        self.hanging = asyncio.Event()

    async def __call__(self, event: ReceivedEvent) -> None:
        if event.id in self.fail_on:
            self.fail_on.discard(event.id)
            raise RuntimeError(f"the handler failed on {event.event}")
        if event.id in self.hang_on:
            self.hanging.set()
            await asyncio.Event().wait()
        self.handled.append(event.id)


def consumer_of(
    ordering: Ordering, recorder: Recorder, **kwargs: timedelta | None
) -> OrderedConsumer[ReceivedEvent]:
    kwargs.setdefault("sweep_interval", None)
    return OrderedConsumer(ordering, recorder, **kwargs)  # type: ignore[arg-type]


async def test_a_jumbled_chain_is_handled_in_order_and_each_delivery_gets_a_verdict(
    ordering: Ordering, clock: MutableClock
) -> None:
    chain = make_chain(clock, 4)
    recorder = Recorder()
    async with consumer_of(ordering, recorder) as consumer:
        verdicts = [(await consumer.deliver(e)).verdict for e in reversed(chain)]
        again = await consumer.deliver(chain[2])
    assert verdicts == [Verdict.PARKED] * 3 + [Verdict.HANDLED]
    assert all(v.acknowledge for v in verdicts)
    assert recorder.handled == [e.id for e in chain]
    assert again == Outcome(Verdict.DUPLICATE)
    assert await rows_of_scope(ordering.url, ordering.scope) == (4, 0, 0)


async def test_an_event_another_worker_holds_is_to_be_redelivered(
    ordering: Ordering, clock: MutableClock
) -> None:
    event = make_event(clock)
    recorder = Recorder()
    assert await ordering.record_event_as_processing(event)  # "another worker" holds it
    async with consumer_of(ordering, recorder, retry_after=timedelta(seconds=2)) as consumer:
        busy = await consumer.deliver(event)
        await ordering.forget_event_is_processing(event)
        later = await consumer.deliver(event)
    assert (busy.verdict, busy.acknowledge, busy.retry_after) == (Verdict.BUSY, False, 2.0)
    assert later.verdict is Verdict.HANDLED
    assert recorder.handled == [event.id]


async def test_a_failing_handler_gets_failed_and_the_event_is_not_seen(
    ordering: Ordering, clock: MutableClock, caplog: pytest.LogCaptureFixture
) -> None:
    event = make_event(clock)
    recorder = Recorder()
    recorder.fail_on.add(event.id)
    async with consumer_of(ordering, recorder) as consumer:
        with caplog.at_level(logging.ERROR, logger="ordering.consumer"):
            failed = await consumer.deliver(event)
        assert not await ordering.event_has_been_seen(event)
        retried = await consumer.deliver(event)
    assert failed.verdict is Verdict.FAILED and not failed.acknowledge
    assert isinstance(failed.error, RuntimeError)
    [record] = [r for r in caplog.records if r.name == "ordering.consumer"]
    assert record.__dict__["event_id"] == event.id and record.exc_info
    assert retried.verdict is Verdict.HANDLED
    assert recorder.handled == [event.id]
    assert (await rows_of_scope(ordering.url, ordering.scope)).leases == 0


async def test_a_follower_that_fails_is_handed_out_by_the_sweep_once_its_claim_expires(
    ordering: Ordering, clock: MutableClock
) -> None:
    leader, follower, last = make_chain(clock, 3)
    recorder = Recorder()
    recorder.fail_on.add(follower.id)
    async with consumer_of(ordering, recorder) as consumer:
        assert (await consumer.deliver(last)).verdict is Verdict.PARKED
        assert (await consumer.deliver(follower)).verdict is Verdict.PARKED
        # The leader was marked seen before its follower failed: acknowledge it.
        assert (await consumer.deliver(leader)).verdict is Verdict.HANDLED
        assert recorder.handled == [leader.id]
        clock.advance(ordering.lease_duration + timedelta(seconds=1))
        assert await consumer.sweep() == 1
    assert recorder.handled == [leader.id, follower.id, last.id]
    assert await rows_of_scope(ordering.url, ordering.scope) == (3, 0, 0)


async def test_the_background_sweep_hands_out_a_follower_whose_leader_never_came(
    ordering: Ordering, clock: MutableClock
) -> None:
    orphan = make_event(clock, follows=make_event(clock).id)
    recorder = Recorder()
    consumer = consumer_of(ordering, recorder, sweep_interval=timedelta(milliseconds=50))
    async with consumer:
        assert (await consumer.deliver(orphan)).verdict is Verdict.PARKED
        clock.advance(PRECEDING_EVENT_LOOKBACK)
        await eventually(lambda: recorder.handled == [orphan.id], what="the sweep to hand it out")
    assert await rows_of_scope(ordering.url, ordering.scope) == (1, 0, 0)


async def test_a_failing_sweep_is_logged_and_tried_again(
    tmp_path: Path, clock: MutableClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A database without the store's schema: every sweep fails, and the sweep goes on."""
    unmigrated = CausalOrdering("s", url=f"sqlite+aiosqlite:///{tmp_path / 'none.db'}", clock=clock)
    consumer = consumer_of(unmigrated, Recorder(), sweep_interval=timedelta(milliseconds=20))

    def failures() -> int:
        return sum("sweep failed" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="ordering.consumer"):
        async with consumer:
            await eventually(lambda: failures() >= 2, what="two failed sweeps")
    assert all(r.__dict__["scope"] == "s" for r in caplog.records if "sweep" in r.getMessage())


async def test_an_unreachable_store_gets_unavailable_and_the_sweep_goes_on(
    clock: MutableClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens on the port: each call raises StoreUnavailable within its deadline."""
    unreachable = CausalOrdering(
        "s",
        url="postgresql+asyncpg://postgres@127.0.0.1:1/none",
        clock=clock,
        deadline=timedelta(milliseconds=300),
    )
    consumer = consumer_of(unreachable, Recorder(), sweep_interval=timedelta(milliseconds=20))

    def failures() -> int:
        return sum("sweep failed" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="ordering.consumer"):
        async with consumer:
            outcome = await consumer.deliver(make_event(clock))
            await eventually(lambda: failures() >= 2, what="two failed sweeps")
    assert (outcome.verdict, outcome.acknowledge) == (Verdict.UNAVAILABLE, False)
    assert isinstance(outcome.error, StoreUnavailable)
    sweeps = [r for r in caplog.records if "sweep failed" in r.getMessage()]
    assert {r.__dict__["error"] for r in sweeps} == {"StoreUnavailable"}


async def test_close_waits_for_a_handling_in_flight(
    ordering: Ordering, clock: MutableClock
) -> None:
    event = make_event(clock)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(e: ReceivedEvent) -> None:
        started.set()
        await release.wait()

    consumer = OrderedConsumer(ordering, slow, sweep_interval=None)
    delivery = asyncio.create_task(consumer.deliver(event))
    await started.wait()
    closing = asyncio.create_task(consumer.aclose())
    await asyncio.sleep(0.05)
    assert not closing.done(), "close did not wait for the handling"
    release.set()
    await closing
    assert (await delivery).verdict is Verdict.HANDLED
    with pytest.raises(RuntimeError, match="is closed"):
        await consumer.deliver(event)


async def test_close_cancels_a_handling_past_its_timeout_and_releases_its_lease(
    ordering: Ordering, clock: MutableClock
) -> None:
    event = make_event(clock)
    recorder = Recorder()
    recorder.hang_on.add(event.id)
    consumer = consumer_of(ordering, recorder, close_timeout=timedelta(milliseconds=100))
    delivery = asyncio.create_task(consumer.deliver(event))
    await recorder.hanging.wait()
    assert (await rows_of_scope(ordering.url, ordering.scope)).leases == 1
    await consumer.aclose()
    stopped = await delivery
    assert (stopped.verdict, stopped.acknowledge) == (Verdict.STOPPED, False)
    assert await rows_of_scope(ordering.url, ordering.scope) == (0, 0, 0)


async def test_a_cancelled_caller_cancels_its_handling(
    ordering: Ordering, clock: MutableClock
) -> None:
    event = make_event(clock)
    recorder = Recorder()
    recorder.hang_on.add(event.id)
    async with consumer_of(ordering, recorder) as consumer:
        delivery = asyncio.create_task(consumer.deliver(event))
        await recorder.hanging.wait()
        delivery.cancel()
        with pytest.raises(asyncio.CancelledError):
            await delivery
        assert await rows_of_scope(ordering.url, ordering.scope) == (0, 0, 0)
        recorder.hang_on.clear()
        assert (await consumer.deliver(event)).verdict is Verdict.HANDLED


async def test_lost_followers_not_yet_handled_at_close_are_stored_again(
    ordering: Ordering, clock: MutableClock
) -> None:
    orphan = make_event(clock, follows=make_event(clock).id)
    recorder = Recorder()
    recorder.hang_on.add(orphan.id)
    consumer = consumer_of(
        ordering,
        recorder,
        sweep_interval=timedelta(milliseconds=20),
        close_timeout=timedelta(milliseconds=100),
    )
    async with consumer:
        await consumer.deliver(orphan)
        clock.advance(PRECEDING_EVENT_LOOKBACK)
        await recorder.hanging.wait()
        assert (await rows_of_scope(ordering.url, ordering.scope)).followers == 0
    assert await rows_of_scope(ordering.url, ordering.scope) == (0, 0, 1)
    assert [e.id for e in await ordering.get_lost_followers()] == [orphan.id]


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("sweep_interval", timedelta(0), "sweep_interval must be a positive timedelta"),
        ("retry_after", 1.0, "retry_after must be a positive timedelta"),
        ("close_timeout", timedelta(seconds=-1), "close_timeout must be a positive timedelta"),
    ],
)
def test_bad_arguments_are_refused_by_name(argument: str, value: object, message: str) -> None:
    ordering = CausalOrdering("s", url="sqlite+aiosqlite:///unused.db")
    with pytest.raises(ValueError, match=message):
        OrderedConsumer(ordering, Recorder(), **{argument: value})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a CausalOrdering"):
        OrderedConsumer(object(), Recorder())  # type: ignore[arg-type]
