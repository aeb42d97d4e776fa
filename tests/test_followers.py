"""Waiting followers: their order, recording and forgetting, scopes, and the
lost-follower sweep."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from uuid import uuid4

import pytest

from ordering import (
    PRECEDING_EVENT_LOOKBACK,
    CausalOrdering,
    EventArrivedEarly,
    ReceivedEvent,
    admin,
)
from ordering.migrate import upgrade

from .helpers import Consumer, MutableClock, make_event, real_clock, run_in_threads

Ordering = CausalOrdering[ReceivedEvent]


async def test_followers_come_back_in_occurred_order(
    ordering: Ordering, clock: MutableClock
) -> None:
    leader = make_event(clock, name="leader")
    t = clock()
    late = make_event(clock, name="late", follows=leader.id, occurred=t + timedelta(seconds=2))
    early = make_event(clock, name="early", follows=leader.id, occurred=t)
    # same occurred: ties go by received, then by id
    tie_b = make_event(
        clock,
        name="tie-b",
        follows=leader.id,
        occurred=t + timedelta(seconds=1),
        received=t + timedelta(seconds=1),
    )
    tie_a = make_event(
        clock, name="tie-a", follows=leader.id, occurred=t + timedelta(seconds=1), received=t
    )
    for follower in (late, tie_b, early, tie_a):
        await ordering.record_follower(follower)
    followers = await ordering.get_followers(leader)
    assert [f.event for f in followers] == ["early", "tie-a", "tie-b", "late"]
    assert followers[0] == early  # the whole event round-trips

    by_id = await ordering.followers_by_id([late.id, early.id, uuid4()])
    assert [f.event for f in by_id] == ["early", "late"]


async def test_recording_a_follower_twice_leaves_one_row(
    ordering: Ordering, clock: MutableClock
) -> None:
    leader = make_event(clock)
    follower = make_event(clock, follows=leader.id)
    await ordering.record_follower(follower)
    await ordering.record_follower(follower)
    assert await ordering.get_followers(leader) == [follower]
    await ordering.forget_follower(follower)
    assert await ordering.get_followers(leader) == []


async def test_only_followers_can_be_recorded(ordering: Ordering, clock: MutableClock) -> None:
    with pytest.raises(ValueError, match="does not follow"):
        await ordering.record_follower(make_event(clock))
    event = make_event(clock)
    itself = make_event(clock, id=event.id, follows=event.id)
    with pytest.raises(ValueError, match="does not follow"):
        await ordering.record_follower(itself)


async def test_lost_followers_after_the_lookback(ordering: Ordering, clock: MutableClock) -> None:
    leader = make_event(clock)
    older = make_event(
        clock, name="older", follows=leader.id, occurred=clock() - timedelta(seconds=5)
    )
    await ordering.record_follower(older)
    clock.advance(timedelta(minutes=1))
    newer = make_event(clock, name="newer", follows=leader.id)
    await ordering.record_follower(newer)

    clock.advance(PRECEDING_EVENT_LOOKBACK - timedelta(minutes=1, seconds=1))
    assert await ordering.get_lost_followers() == []
    clock.advance(timedelta(seconds=1))
    assert await ordering.get_lost_followers() == [older]
    assert await ordering.get_followers(leader) == [newer]  # removed, the other stays
    clock.advance(timedelta(minutes=1))
    assert await ordering.get_lost_followers() == [newer]
    assert await ordering.get_lost_followers() == []


def test_two_workers_sweeping_at_once_never_share_a_follower(db_url: str, scope: str) -> None:
    clock = real_clock()
    leader = make_event(clock)
    followers = [make_event(clock, follows=leader.id) for _ in range(300)]

    async def park(_: int) -> None:
        ordering = CausalOrdering(scope, url=db_url, clock=clock)
        for follower in followers:
            await ordering.record_follower(follower)

    run_in_threads(1, park)
    clock.advance(PRECEDING_EVENT_LOOKBACK)

    async def sweep(_: int) -> list[ReceivedEvent]:
        ordering = CausalOrdering(scope, url=db_url, clock=clock)
        taken: list[ReceivedEvent] = []
        while batch := await ordering.get_lost_followers():
            taken.extend(batch)
        return taken

    first, second = run_in_threads(2, sweep)
    ids = [f.id for f in first + second]
    assert len(ids) == len(set(ids)) == len(followers)

    async def cleanup(_: int) -> None:
        await CausalOrdering(scope, url=db_url).clear()

    run_in_threads(1, cleanup)


async def test_an_event_following_itself_does_not_wait(
    ordering: Ordering, clock: MutableClock
) -> None:
    event = make_event(clock)
    itself = make_event(clock, id=event.id, follows=event.id)
    consumer = Consumer(ordering)
    assert await consumer.consume(itself)
    assert consumer.handled == [itself]


async def test_a_cycle_waits_for_the_sweep_which_hands_each_out_once(
    ordering: Ordering, clock: MutableClock
) -> None:
    a_id, b_id = uuid4(), uuid4()
    a = make_event(clock, name="a", id=a_id, follows=b_id)
    b = make_event(clock, name="b", id=b_id, follows=a_id, occurred=clock() + timedelta(seconds=1))
    consumer = Consumer(ordering)
    assert not await consumer.consume(a)
    assert not await consumer.consume(b)
    assert consumer.handled == []
    clock.advance(PRECEDING_EVENT_LOOKBACK)
    lost = await ordering.get_lost_followers()
    assert [e.event for e in lost] == ["a", "b"]
    assert await ordering.get_lost_followers() == []
    # handed to the consumer, neither waits any more: both are past the lookback
    for event in lost:
        assert await consumer.consume(event)
    assert consumer.names == ["a", "b"]


async def test_scopes_never_see_each_other(db_url: str, clock: MutableClock) -> None:
    one = CausalOrdering(f"one-{uuid4().hex}", url=db_url, clock=clock)
    two = CausalOrdering(f"two-{uuid4().hex}", url=db_url, clock=clock)
    leader = make_event(clock)
    follower = make_event(clock, follows=leader.id)
    await one.record_event_as_seen(leader)
    await one.record_follower(follower)
    assert await one.record_event_as_processing(follower)

    assert not await two.event_has_been_seen(leader)
    assert await two.get_followers(leader) == []
    assert not await two.event_has_started_processing(follower)
    assert await two.record_event_as_processing(follower)

    await one.clear()
    assert not await one.event_has_been_seen(leader)
    assert await one.get_followers(leader) == []
    assert not await one.event_has_started_processing(follower)
    assert await two.event_has_started_processing(follower)  # clear() is per scope

    await two.record_event_as_seen(leader)
    await CausalOrdering.clear_all_scopes()
    assert not await two.event_has_been_seen(leader)
    assert not await two.event_has_started_processing(follower)


async def test_clear_all_scopes_reaches_an_ordering_in_a_schema_of_its_own(
    empty_url: str, clock: MutableClock
) -> None:
    """An ordering configured with its own PostgreSQL schema is cleared by
    clear_all_scopes() like any other (SQLite has no schemas: the same call)."""
    await asyncio.to_thread(upgrade, empty_url, schema="elsewhere")
    scope = f"s-{uuid4().hex[:8]}"
    ordering = CausalOrdering(scope, url=empty_url, clock=clock, schema="elsewhere")
    event = make_event(clock)
    await ordering.record_event_as_seen(event)
    await CausalOrdering.clear_all_scopes()
    assert not await ordering.event_has_been_seen(event)


async def test_a_follower_with_naive_times_is_refused_and_not_stored(
    ordering: Ordering, clock: MutableClock
) -> None:
    leader = make_event(clock)
    valid = make_event(clock, follows=leader.id)
    naive = ReceivedEvent.model_construct(
        **{**dict(valid), "occurred": clock().replace(tzinfo=None)}
    )
    with pytest.raises(ValueError, match="occurred must be an aware UTC datetime"):
        await ordering.record_follower(naive)
    assert await ordering.get_followers(leader) == []


async def test_an_event_past_the_lookback_goes_when_a_parked_copy_is_lost(
    db_url: str, ordering: Ordering, clock: MutableClock
) -> None:
    """The hot path judges an event not stored yet by the cutoff of the lost rule: up to
    the moment the database finds the parked follower lost, the event waits for its
    leader; from then on it goes at once."""
    leader = make_event(clock)
    follower = make_event(clock, follows=leader.id)
    await ordering.record_follower(follower)

    clock.advance(PRECEDING_EVENT_LOOKBACK - timedelta(microseconds=1))
    assert await admin.list_followers(db_url, scope=ordering.scope, lost=True, now=clock()) == []
    with pytest.raises(EventArrivedEarly):
        await ordering.wait_for_leader(follower)

    clock.advance(timedelta(microseconds=1))
    lost = await admin.list_followers(db_url, scope=ordering.scope, lost=True, now=clock())
    assert [f.follower_id for f in lost] == [follower.id]
    await ordering.wait_for_leader(follower)
