"""The consumer's entry point: wait_for_leader and preceding_event_confirmed."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import timedelta

import pytest

from ordering import (
    MAX_DEPTH_OF_PRECEDING_EVENT,
    PRECEDING_EVENT_LOOKBACK,
    CausalOrdering,
    EventAlreadyProcessed,
    EventArrivedEarly,
    EventBeingProcessed,
    MaxDepthExceeded,
    ReceivedEvent,
)
from ordering.backends import BeginRequest, Begun, Claim, CompleteRequest, ParkRequest

from .helpers import (
    Consumer,
    MutableClock,
    assert_causal,
    eventually,
    make_chain,
    make_event,
    rows_of_scope,
    sql_value,
    statements_of,
)

Ordering = CausalOrdering[ReceivedEvent]


async def _rows_left(ordering: Ordering) -> tuple[int, int]:
    """(waiting followers, live or expired leases) left in the scope."""
    rows = await rows_of_scope(ordering.url, ordering.scope)
    return rows.followers, rows.leases


async def _marked_by_a_waiter(ordering: Ordering, leader: ReceivedEvent) -> bool:
    """Whether a follower waiting for the leader marked its lease (PostgreSQL), so that
    the leader's completion notifies."""
    marked = await sql_value(
        ordering.url,
        "SELECT count(*) FROM {processing_leases}"
        " WHERE scope = :scope AND event_id = :event_id AND has_waiters",
        {"scope": ordering.scope, "event_id": leader.id},
    )
    return bool(marked)


@pytest.mark.parametrize("reenter", [True, False], ids=["handler-reenters", "plain-handler"])
@pytest.mark.parametrize("delivery", ["in-order", "jumbled", "backwards"])
async def test_chains_are_handled_in_causal_order(
    ordering: Ordering, clock: MutableClock, delivery: str, reenter: bool
) -> None:
    chains = [make_chain(clock, 6, name=f"c{i}") for i in range(5)]
    events = [e for chain in chains for e in chain]
    if delivery == "in-order":
        order = [chain[i] for i in range(6) for chain in chains]
    elif delivery == "backwards":
        order = events[::-1]
    else:
        order = events[:]
        random.Random(42).shuffle(order)
    consumer = Consumer(ordering, reenter=reenter)
    for event in order:
        await consumer.consume(event)
    assert_causal(consumer.handled, events)
    assert await _rows_left(ordering) == (0, 0)
    for event in events:
        assert await ordering.event_has_been_seen(event)


@pytest.mark.parametrize("reenter", [True, False], ids=["handler-reenters", "plain-handler"])
async def test_spr_c_arriving_p_s_r_c_finishes_in_one_pass(
    ordering: Ordering, clock: MutableClock, reenter: bool
) -> None:
    """S <- P <- R <- C delivered as P, S, R, C: S releases P, and P, released rather than
    delivered, must count as seen so that R and C go straight through."""
    s, p, r, c = make_chain(clock, 4, name="x")
    consumer = Consumer(ordering, reenter=reenter)
    assert not await consumer.consume(p)
    assert await consumer.consume(s)
    assert consumer.handled == [s, p]
    assert consumer.depths == [0, 1]
    assert await ordering.event_has_been_seen(p)
    assert await consumer.consume(r)
    assert await consumer.consume(c)
    assert consumer.handled == [s, p, r, c]
    assert await _rows_left(ordering) == (0, 0)


async def test_released_followers_get_increasing_depth(
    ordering: Ordering, clock: MutableClock
) -> None:
    chain = make_chain(clock, 5)
    consumer = Consumer(ordering)
    for event in chain[:0:-1]:
        assert not await consumer.consume(event)
    assert await consumer.consume(chain[0])
    assert consumer.handled == chain
    assert consumer.depths == [0, 1, 2, 3, 4]


async def test_wait_for_leader_goes_at_once_when_it_may(
    ordering: Ordering, clock: MutableClock
) -> None:
    leader = make_event(clock)
    await ordering.wait_for_leader(leader)  # follows nothing
    old = make_event(clock, follows=leader.id, received=clock() - PRECEDING_EVENT_LOOKBACK)
    await ordering.wait_for_leader(old)  # too old to wait for anything
    await ordering.record_event_as_seen(leader)
    await ordering.wait_for_leader(make_event(clock, follows=leader.id))
    assert await ordering.get_followers(leader) == []


async def test_wait_for_leader_parks_an_early_event(
    ordering: Ordering, clock: MutableClock
) -> None:
    leader = make_event(clock)
    follower = make_event(clock, follows=leader.id)
    with pytest.raises(EventArrivedEarly) as raised:
        await ordering.wait_for_leader(follower)
    assert raised.value.event is follower
    assert await ordering.get_followers(leader) == [follower]


async def _leader_in_flight(
    ordering: Ordering, consumer: Consumer, leader: ReceivedEvent, may_finish: asyncio.Event
) -> asyncio.Task[None]:
    """The leader, inside its body (holding its lease) until ``may_finish`` is set."""
    inside = asyncio.Event()

    async def slow_leader() -> None:
        async with ordering.preceding_event_confirmed(consumer.handler, leader):
            inside.set()
            await may_finish.wait()
            consumer.handled.append(leader)

    task = asyncio.create_task(slow_leader())
    await inside.wait()
    return task


async def test_a_follower_waits_for_a_leader_in_flight(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    ordering = CausalOrdering(scope, url=db_url, clock=clock, poll_interval=0.02)
    leader = make_event(clock)
    follower = make_event(clock, follows=leader.id)
    consumer = Consumer(ordering)
    leader_may_finish = asyncio.Event()
    task = await _leader_in_flight(ordering, consumer, leader, leader_may_finish)
    with statements_of(ordering.backend) as sent:
        follower_task = asyncio.create_task(consumer.consume(follower))
        # It looked at its leader twice: it found it in flight and chose to wait on.
        await eventually(
            lambda: sent.count("leader_status") >= 2, what="the follower to poll its leader"
        )
    assert not follower_task.done()  # waiting, not parked
    assert await ordering.get_followers(leader) == []
    leader_may_finish.set()
    await task
    assert await follower_task is True
    assert consumer.handled == [leader, follower]
    await ordering.clear()


async def test_a_leader_in_flight_that_never_finishes_parks_the_follower(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    ordering = CausalOrdering(
        scope,
        url=db_url,
        clock=clock,
        poll_interval=0.02,
        in_flight_event_timeout=timedelta(seconds=0.2),
    )
    leader = make_event(clock)
    follower = make_event(clock, follows=leader.id)
    assert await ordering.record_event_as_processing(leader)
    consumer = Consumer(ordering)
    assert not await consumer.consume(follower)
    assert await ordering.get_followers(leader) == [follower]
    # ...and the leader, once it is handled, releases it
    await ordering.forget_event_is_processing(leader)
    assert await consumer.consume(leader)
    assert consumer.handled == [leader, follower]
    await ordering.clear()


async def test_a_follower_parked_through_the_public_calls_is_handed_over(
    ordering: Ordering, clock: MutableClock
) -> None:
    """Prefect's own pattern (event_is_processing, then wait_for_leader): parking gives
    up the follower's lease, so its leader can take it over at once."""
    leader = make_event(clock, name="leader")
    follower = make_event(clock, name="follower", follows=leader.id)
    with pytest.raises(EventArrivedEarly):
        async with ordering.event_is_processing(follower):
            await ordering.wait_for_leader(follower)
    assert not await ordering.event_has_started_processing(follower)
    consumer = Consumer(ordering)
    assert await consumer.consume(leader)
    assert consumer.names == ["leader", "follower"]
    assert await _rows_left(ordering) == (0, 0)


async def test_a_redelivered_follower_in_flight_handles_itself(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    """When the leader completes while a redelivered copy of its follower holds the
    follower's lease, exactly one of them handles it, at once: the copy."""
    ordering = CausalOrdering(scope, url=db_url, clock=clock)
    leader = make_event(clock, name="leader")
    follower = make_event(clock, name="follower", follows=leader.id)
    first = Consumer(ordering)
    assert not await first.consume(follower)  # parked

    second = Consumer(ordering)
    copy_inside = asyncio.Event()
    copy_may_go = asyncio.Event()

    async def redelivered() -> None:
        async with ordering.event_is_processing(follower):
            copy_inside.set()
            await copy_may_go.wait()
            await ordering.wait_for_leader(follower)
            second.handled.append(follower)

    task = asyncio.create_task(redelivered())
    await copy_inside.wait()
    assert await first.consume(leader)
    assert first.names == ["leader"]  # the copy holds the follower: not handed out twice
    copy_may_go.set()
    await task
    assert second.names == ["follower"]
    await ordering.forget_follower(follower)
    assert await _rows_left(ordering) == (0, 0)
    await ordering.clear()


async def test_a_failing_follower_handler_keeps_the_follower(
    ordering: Ordering, clock: MutableClock
) -> None:
    leader, follower = make_chain(clock, 2)
    consumer = Consumer(ordering, fail_on={follower.id})
    assert not await consumer.consume(follower)
    with pytest.raises(RuntimeError, match="handler failed"):
        await consumer.consume(leader)
    assert await ordering.event_has_been_seen(leader)
    assert not await ordering.event_has_been_seen(follower)
    assert await ordering.get_followers(leader) == [follower]  # kept, its claim expired
    assert not await ordering.event_has_started_processing(follower)
    # its leader is seen, so the sweep hands it out again without waiting the lookback
    assert await ordering.get_lost_followers() == [follower]


async def test_followers_claimed_by_a_dead_worker_come_back_without_the_lookback(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    ordering = CausalOrdering(scope, url=db_url, clock=clock, lease_duration=timedelta(seconds=5))
    leader, follower = make_chain(clock, 2)
    await ordering.record_follower(follower)
    # a worker completes the leader, claims the follower, and dies before handling it
    now = clock()
    claimed = await ordering.backend.complete(
        CompleteRequest(
            scope=scope,
            event_id=leader.id,
            lease_owner=None,
            now=now,
            claim=Claim(owner="dead-worker", until=now + timedelta(seconds=5)),
            is_follower=False,
        )
    )
    assert [ReceivedEvent.model_validate_json(row) for row in claimed] == [follower]
    assert await ordering.get_lost_followers() == []
    assert await ordering.event_has_started_processing(follower)
    clock.advance(timedelta(seconds=5))
    assert await ordering.get_lost_followers() == [follower]
    consumer = Consumer(ordering)
    assert await consumer.consume(follower)  # its leader is seen: it goes
    assert await _rows_left(ordering) == (0, 0)
    await ordering.clear()


async def test_max_depth_stops_at_the_root_without_raising(
    ordering: Ordering, clock: MutableClock, caplog: pytest.LogCaptureFixture
) -> None:
    chain = make_chain(clock, MAX_DEPTH_OF_PRECEDING_EVENT + 5)
    consumer = Consumer(ordering)
    for event in chain[:0:-1]:
        assert not await consumer.consume(event)
    with caplog.at_level(logging.INFO, logger="ordering"):
        assert await consumer.consume(chain[0])
    handled = MAX_DEPTH_OF_PRECEDING_EVENT + 1
    assert consumer.handled == chain[:handled]
    assert "reached its max depth" in caplog.text
    remaining = chain[handled:]
    assert await ordering.followers_by_id([e.id for e in remaining]) == remaining
    clock.advance(PRECEDING_EVENT_LOOKBACK)
    lost = await ordering.get_lost_followers()
    assert lost == remaining  # nothing was dropped
    for event in lost:
        await consumer.consume(event)
    assert_causal(consumer.handled, chain)


async def test_a_call_beyond_the_max_depth_raises(ordering: Ordering, clock: MutableClock) -> None:
    event = make_event(clock)
    consumer = Consumer(ordering)
    with pytest.raises(MaxDepthExceeded) as raised:
        async with ordering.preceding_event_confirmed(
            consumer.handler, event, depth=MAX_DEPTH_OF_PRECEDING_EVENT + 1
        ):
            pass  # pragma: no cover
    assert raised.value.event is event
    assert not await ordering.event_has_started_processing(event)


async def test_the_lease_is_held_only_inside(ordering: Ordering, clock: MutableClock) -> None:
    event = make_event(clock)
    consumer = Consumer(ordering)
    async with ordering.preceding_event_confirmed(consumer.handler, event):
        assert await ordering.event_has_started_processing(event)
        assert not await ordering.event_has_been_seen(event)
    assert not await ordering.event_has_started_processing(event)
    assert await ordering.event_has_been_seen(event)


def _polling_slowly(
    db_url: str, scope: str, clock: MutableClock, waits_for: timedelta = timedelta(seconds=60)
) -> Ordering:
    """An ordering whose waiting followers poll only every 30 seconds: a follower that
    goes on within seconds was woken."""
    return CausalOrdering(
        scope, url=db_url, clock=clock, poll_interval=30.0, in_flight_event_timeout=waits_for
    )


async def test_the_leaders_completion_wakes_its_waiting_follower(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    """The leader's completion wakes the follower waiting on it (on PostgreSQL through
    LISTEN/NOTIFY, on SQLite within the process), so a follower with a 30-second poll
    interval still goes on at once."""
    ordering = _polling_slowly(db_url, scope, clock)
    leader = make_event(clock, name="leader")
    follower = make_event(clock, name="follower", follows=leader.id)
    consumer = Consumer(ordering)
    leader_may_finish = asyncio.Event()
    task = await _leader_in_flight(ordering, consumer, leader, leader_may_finish)
    with statements_of(ordering.backend) as sent:
        follower_task = asyncio.create_task(consumer.consume(follower))
        await eventually(lambda: sent.count("mark_waiting") >= 1, what="the follower to wait")
    if db_url.startswith("postgresql"):  # marked, so that the completion notifies
        await eventually(lambda: _marked_by_a_waiter(ordering, leader), what="the mark")
    assert not follower_task.done()
    leader_may_finish.set()
    await task
    async with asyncio.timeout(10):  # far below the 30-second poll: it was woken
        assert await follower_task is True
    assert consumer.names == ["leader", "follower"]
    await ordering.clear()


async def test_a_waiting_follower_is_woken_when_its_leader_parks(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    """a <- b <- c: b waits for a in flight, c waits for b.  b gives up waiting and
    parks; that wakes c (a 30-second poll interval notwithstanding), which parks too.
    a's completion then hands both out, in order."""
    ordering = _polling_slowly(db_url, scope, clock)
    impatient = _polling_slowly(db_url, scope, clock, waits_for=timedelta(seconds=1))
    a = make_event(clock, name="a")
    b = make_event(clock, name="b", follows=a.id)
    c = make_event(clock, name="c", follows=b.id)
    consumer = Consumer(ordering)
    a_may_finish = asyncio.Event()
    task_a = await _leader_in_flight(ordering, consumer, a, a_may_finish)
    with statements_of(ordering.backend) as sent:
        task_b = asyncio.create_task(Consumer(impatient).consume(b))
        await eventually(lambda: sent.count("mark_waiting") >= 1, what="b to wait for a")
        task_c = asyncio.create_task(consumer.consume(c))
        await eventually(lambda: sent.count("mark_waiting") >= 2, what="c to wait for b")
    async with asyncio.timeout(10):  # far below the 30-second poll: c was woken
        assert await task_b is False
        assert await task_c is False
    a_may_finish.set()
    await task_a
    assert consumer.names == ["a", "b", "c"]
    await ordering.clear()


async def test_an_event_processed_already_is_refused_not_handled_again(
    ordering: Ordering, clock: MutableClock
) -> None:
    """A redelivery that passed its consumer's "seen?" check just before the original
    completed must not be handled a second time."""
    event = make_event(clock)
    consumer = Consumer(ordering)
    assert await consumer.consume(event)
    with pytest.raises(EventAlreadyProcessed) as raised:
        await consumer.consume(event)
    assert isinstance(raised.value, EventBeingProcessed)  # consumers that retry those: fine
    assert consumer.handled == [event]
    assert not await ordering.event_has_started_processing(event)
    # Prefect's bare processing guard is about processing only
    assert await ordering.record_event_as_processing(event)


async def test_a_park_retried_after_its_reply_was_lost_still_parks(
    ordering: Ordering, clock: MutableClock
) -> None:
    """If a park committed but its reply was lost, and the leader completed meanwhile,
    the retried park must still say "parked": the leader has the follower now."""
    leader = make_event(clock)
    follower = make_event(clock, follows=leader.id)
    backend, now = ordering.backend, clock()
    begun = await backend.begin(
        BeginRequest(
            scope=ordering.scope,
            event_id=follower.id,
            follows=leader.id,
            owner="w1",
            now=now,
            expires_at=now + ordering.lease_duration,
            seen_after=now - ordering.seen_expiration,
        )
    )
    assert begun == Begun(leader_seen=False, leader_in_flight=False)
    park = ParkRequest(
        scope=ordering.scope,
        event_id=follower.id,
        leader_id=leader.id,
        occurred=follower.occurred,
        received=follower.received,
        event_json=follower.model_dump_json(),
        lease_owner="w1",
        seen_after=now - timedelta(minutes=30),
    )
    assert await backend.park(park) is True
    assert await ordering.get_followers(leader) == [follower]
    assert not await ordering.event_has_started_processing(follower)  # parking released it
    await ordering.record_event_as_seen(leader)
    assert await backend.park(park) is True  # the retry: still parked, not "go ahead"
    assert await ordering.get_followers(leader) == [follower]


async def test_postgres_notifies_only_for_a_leader_someone_waits_for(
    postgres_url: str, clock: MutableClock, scope: str
) -> None:
    """NOTIFY serializes the commits that send it, so completion sends one only for a
    lease that a waiting follower marked."""
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    listener = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )
    heard: list[str] = []
    await listener.add_listener("ordering_seen", lambda *args: heard.append(args[-1]))
    try:
        ordering = CausalOrdering(scope, url=postgres_url, clock=clock)
        consumer = Consumer(ordering)
        unwatched, watched = make_event(clock, name="unwatched"), make_event(clock, name="watched")
        assert await consumer.consume(unwatched)
        async with ordering.preceding_event_confirmed(consumer.handler, watched):
            marked = await ordering.backend.mark_waiting(
                scope=scope, leader_id=watched.id, now=clock()
            )
            assert marked is True
        # Notifications arrive in commit order: had the unwatched completion sent one,
        # it would be heard before the watched one.
        await eventually(lambda: bool(heard), what="the watched completion's notification")
        assert heard == [f"{scope}/{watched.id}"]
    finally:
        await listener.close()
        await ordering.clear()
