"""The operator's side, from Python: status, followers, prune, replay and the SQL audit
views, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from ordering import (
    LEASE_DURATION,
    PRECEDING_EVENT_LOOKBACK,
    SEEN_EXPIRATION,
    CausalOrdering,
    ReceivedEvent,
    admin,
)
from ordering.models import utc_now

from .helpers import (
    Consumer,
    MutableClock,
    assert_causal,
    make_chain,
    make_event,
    run_sql,
    sql_value,
)

SECOND = timedelta(seconds=1)


async def claim(ordering: CausalOrdering[Any], event: ReceivedEvent, until: datetime) -> None:
    """Mark a waiting follower claimed, as a leader's completion does (tests set the
    claim directly to choose its expiry)."""
    await run_sql(
        ordering.url,
        "UPDATE {waiting_followers} SET claimed_by = :owner, claimed_until = :until"
        " WHERE scope = :scope AND follower_id = :follower_id",
        {"owner": "worker-x:1", "until": until, "scope": ordering.scope, "follower_id": event.id},
    )
    claimed = await sql_value(
        ordering.url,
        "SELECT count(*) FROM {waiting_followers}"
        " WHERE scope = :scope AND follower_id = :follower_id AND claimed_by = :owner",
        {"owner": "worker-x:1", "scope": ordering.scope, "follower_id": event.id},
    )
    assert claimed == 1, f"no waiting follower {event.id} to claim"


async def populate(ordering: CausalOrdering[Any], clock: MutableClock) -> dict[str, Any]:
    """Rows in every state, with known counts.

    At the start: 2 seen events and 2 leases that will have expired, and a follower
    that will be past the lookback.  Thirty-one minutes later: 3 seen events, 1 live
    lease, and 3 fresh followers (one unclaimed, one claimed, one whose claim expired).
    """
    start = clock()
    for _ in range(2):
        await ordering.record_event_as_seen(make_event(clock))
        assert await ordering.record_event_as_processing(make_event(clock))
    old_leader = uuid4()
    old = make_event(clock, name="old.follower", follows=old_leader)
    await ordering.record_follower(old)

    clock.advance(SEEN_EXPIRATION + SECOND)
    for _ in range(3):
        await ordering.record_event_as_seen(make_event(clock))
    assert await ordering.record_event_as_processing(make_event(clock))
    fresh = [make_event(clock, name=f"fresh.{i}", follows=uuid4()) for i in range(3)]
    for event in fresh:
        await ordering.record_follower(event)
    await claim(ordering, fresh[1], clock() + LEASE_DURATION)
    await claim(ordering, fresh[2], clock() - SECOND)
    return {"start": start, "old": old, "old_leader": old_leader, "fresh": fresh}


# -- status -----------------------------------------------------------------------


async def test_status_counts_every_state(
    ordering: CausalOrdering[ReceivedEvent], clock: MutableClock, db_url: str
) -> None:
    rows = await populate(ordering, clock)
    [found] = await admin.status(db_url, scope=ordering.scope, now=clock())
    assert (found.seen_live, found.seen_expired) == (3, 2)
    assert (found.leases_live, found.leases_expired) == (1, 2)
    assert (found.waiting_unclaimed, found.waiting_claimed) == (2, 1)
    assert found.waiting_claim_expired == 1
    assert found.waiting_past_lookback == 1
    assert found.lost == 2
    oldest = found.oldest_waiting
    assert oldest is not None
    assert (oldest.follower_id, oldest.leader_id) == (rows["old"].id, rows["old_leader"])
    assert oldest.event == "old.follower"
    assert oldest.age == SEEN_EXPIRATION + SECOND
    as_json = found.to_json()
    assert as_json["waiting"] == {
        "unclaimed": 2,
        "claimed": 1,
        "claim_expired": 1,
        "past_lookback": 1,
        "lost": 2,
    }
    json.dumps(as_json)  # serializable as it is


async def test_status_follows_the_clock_it_is_given(
    ordering: CausalOrdering[ReceivedEvent], clock: MutableClock, db_url: str
) -> None:
    await populate(ordering, clock)
    [earlier] = await admin.status(db_url, scope=ordering.scope, now=clock() - 2 * SECOND)
    assert (earlier.seen_live, earlier.seen_expired) == (5, 0)  # the first two not yet expired
    [later] = await admin.status(db_url, scope=ordering.scope, now=clock() + SEEN_EXPIRATION)
    assert (later.seen_live, later.seen_expired) == (0, 5)
    assert later.waiting_past_lookback == 2  # the unclaimed ones, now all past the lookback


async def test_status_keeps_scopes_apart(db_url: str, clock: MutableClock) -> None:
    one = CausalOrdering(f"one-{uuid4().hex[:8]}", url=db_url, clock=clock)
    two = CausalOrdering(f"two-{uuid4().hex[:8]}", url=db_url, clock=clock)
    try:
        await one.record_event_as_seen(make_event(clock))
        await two.record_event_as_seen(make_event(clock))
        await two.record_event_as_seen(make_event(clock))
        every = {s.scope: s for s in await admin.status(db_url, now=clock())}
        assert every[one.scope].seen_live == 1
        assert every[two.scope].seen_live == 2
        [nothing] = await admin.status(db_url, scope="no-such-scope", now=clock())
        assert nothing.to_json()["seen"] == {"live": 0, "expired": 0}
        assert nothing.oldest_waiting is None
    finally:
        await one.clear()
        await two.clear()


# -- followers --------------------------------------------------------------------


async def test_followers_come_in_occurred_order_and_filter(
    ordering: CausalOrdering[ReceivedEvent], clock: MutableClock, db_url: str
) -> None:
    leader = uuid4()
    events = [
        make_event(clock, name=f"f{i}", follows=leader, occurred=clock() - i * SECOND)
        for i in range(4)
    ]
    other = make_event(clock, name="other", follows=uuid4(), occurred=clock() - 10 * SECOND)
    for event in [*events, other]:
        await ordering.record_follower(event)

    listed = await admin.list_followers(db_url, scope=ordering.scope, now=clock())
    assert [f.event_name for f in listed] == ["other", "f3", "f2", "f1", "f0"]
    assert listed[0].event["id"] == str(other.id)  # the stored event, as JSON

    theirs = await admin.list_followers(db_url, scope=ordering.scope, leader=leader, now=clock())
    assert [f.follower_id for f in theirs] == [e.id for e in reversed(events)]
    limited = await admin.list_followers(db_url, scope=ordering.scope, limit=2, now=clock())
    assert [f.event_name for f in limited] == ["other", "f3"]


async def test_lost_followers_are_exactly_what_get_lost_followers_takes(
    ordering: CausalOrdering[ReceivedEvent], clock: MutableClock, db_url: str
) -> None:
    rows = await populate(ordering, clock)
    now = clock()
    listed = await admin.list_followers(db_url, scope=ordering.scope, lost=True, now=now)
    assert {f.follower_id for f in listed} == {rows["old"].id, rows["fresh"][2].id}
    assert [f.state(now) for f in listed] == ["waiting", "claim expired"]
    # Listing took nothing; the sweep now takes the same ones, in the same order.
    taken = await ordering.get_lost_followers()
    assert [e.id for e in taken] == [f.follower_id for f in listed]


# -- prune ------------------------------------------------------------------------


async def test_prune_deletes_only_expired_seen_events_and_leases(
    ordering: CausalOrdering[ReceivedEvent], clock: MutableClock, db_url: str
) -> None:
    await populate(ordering, clock)
    live = make_event(clock)
    await ordering.record_event_as_seen(live)

    result = await admin.prune(db_url, scope=ordering.scope, now=clock())
    assert (result.seen_events, result.leases, result.dry_run) == (2, 2, False)

    [after] = await admin.status(db_url, scope=ordering.scope, now=clock())
    assert (after.seen_live, after.seen_expired) == (4, 0)
    assert (after.leases_live, after.leases_expired) == (1, 0)
    # Waiting followers are the lost-follower sweep's to hand out, never pruned.
    assert after.waiting_unclaimed + after.waiting_claimed + after.waiting_claim_expired == 4
    assert await ordering.event_has_been_seen(live)
    again = await admin.prune(db_url, scope=ordering.scope, now=clock())
    assert again.total == 0


async def test_prune_dry_run_counts_and_deletes_nothing(
    ordering: CausalOrdering[ReceivedEvent], clock: MutableClock, db_url: str
) -> None:
    await populate(ordering, clock)
    result = await admin.prune(db_url, scope=ordering.scope, now=clock(), dry_run=True)
    assert (result.seen_events, result.leases, result.dry_run) == (2, 2, True)
    [after] = await admin.status(db_url, scope=ordering.scope, now=clock())
    assert (after.seen_expired, after.leases_expired) == (2, 2)


async def test_prune_works_in_batches_and_reports_progress(
    ordering: CausalOrdering[ReceivedEvent], clock: MutableClock, db_url: str
) -> None:
    for _ in range(7):
        await ordering.record_event_as_seen(make_event(clock))
    assert await ordering.record_event_as_processing(make_event(clock))
    clock.advance(SEEN_EXPIRATION + SECOND)
    calls: list[tuple[int, int]] = []
    result = await admin.prune(
        db_url,
        scope=ordering.scope,
        now=clock(),
        batch_size=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert (result.seen_events, result.leases) == (7, 1)
    # Seen events in batches of 2, 2, 2, 1; then the lease, 1 (a short batch ends each).
    assert calls == [(2, 8), (4, 8), (6, 8), (7, 8), (8, 8)]


async def test_prune_goes_by_each_rows_expiry_and_seen_expiration_for_rows_without(
    ordering: CausalOrdering[ReceivedEvent], clock: MutableClock, db_url: str
) -> None:
    """Rows this release wrote carry their expiry, whatever --seen-expiration says; a row
    an earlier release wrote (none) is kept while younger than the seen expiration."""
    await populate(ordering, clock)
    await run_sql(
        db_url,
        "INSERT INTO {seen_events} (scope, event_id, seen_at) VALUES (:scope, :id, :at)",
        {"scope": ordering.scope, "id": uuid4(), "at": clock() - timedelta(hours=1)},
    )
    result = await admin.prune(
        db_url, scope=ordering.scope, now=clock(), seen_expiration=timedelta(hours=2)
    )
    assert (result.seen_events, result.leases) == (2, 2)
    result = await admin.prune(db_url, scope=ordering.scope, now=clock())
    assert (result.seen_events, result.leases) == (1, 0)


async def test_prune_of_one_scope_leaves_the_others(
    ordering: CausalOrdering[ReceivedEvent], clock: MutableClock, db_url: str
) -> None:
    other = CausalOrdering(f"other-{uuid4().hex[:8]}", url=db_url, clock=clock)
    try:
        await ordering.record_event_as_seen(make_event(clock))
        await other.record_event_as_seen(make_event(clock))
        clock.advance(SEEN_EXPIRATION + SECOND)
        result = await admin.prune(db_url, scope=ordering.scope, now=clock())
        assert result.seen_events == 1
        [kept] = await admin.status(db_url, scope=other.scope, now=clock())
        assert kept.seen_expired == 1
    finally:
        await other.clear()


async def test_prune_runs_safely_beside_a_working_consumer(
    ordering: CausalOrdering[ReceivedEvent], clock: MutableClock, db_url: str
) -> None:
    """Batches interleave with a consumer handling a jumbled chain on the same database:
    neither fails, the chain comes out in order, and only the expired rows go."""
    for _ in range(60):
        await ordering.record_event_as_seen(make_event(clock))
    clock.advance(SEEN_EXPIRATION + SECOND)
    chain = make_chain(clock, 30)
    jumbled = chain[:]
    random.Random(5).shuffle(jumbled)
    consumer = Consumer(ordering)

    async def consume() -> None:
        for event in jumbled:
            await consumer.consume(event)
            await asyncio.sleep(0)

    pruned, _ = await asyncio.gather(
        admin.prune(db_url, scope=ordering.scope, now=clock(), batch_size=3), consume()
    )
    assert pruned.seen_events == 60
    assert_causal(consumer.handled, chain)
    [after] = await admin.status(db_url, scope=ordering.scope, now=clock())
    assert (after.seen_live, after.seen_expired) == (30, 0)


async def test_prune_refuses_nonsense_before_touching_anything(db_url: str) -> None:
    with pytest.raises(ValueError, match="batch size"):
        await admin.prune(db_url, batch_size=0)
    with pytest.raises(ValueError, match="seen expiration"):
        await admin.prune(db_url, seen_expiration=timedelta(0))
    with pytest.raises(ValueError, match="naive"):
        await admin.prune(db_url, now=datetime(2026, 1, 1))


# -- replay -----------------------------------------------------------------------

PREFECT_LINE = json.dumps(
    {
        "occurred": "2024-05-01T12:00:00.123456Z",
        "event": "prefect.flow-run.Completed",
        "resource": {
            "prefect.resource.id": "prefect.flow-run.5d6f0e5c-5b3a-4c55-8f2e-0d9f1a2b3c4d",
            "prefect.resource.name": "crimson-otter",
            "prefect.state-type": "COMPLETED",
        },
        "related": [
            {
                "prefect.resource.id": "prefect.flow.9a8b7c6d-1e2f-4a3b-8c9d-0e1f2a3b4c5d",
                "prefect.resource.role": "flow",
                "prefect.resource.name": "etl",
            }
        ],
        "payload": {"intended": {"from": "RUNNING", "to": "COMPLETED"}},
        "id": "0b1f6a1e-8d7a-4d6e-9d3b-4a9b3f0f6c11",
        "follows": "8d9f2c4b-5b7e-4f0a-9a35-2c8e1f6b7d22",
        "received": "2024-05-01T12:00:00.234567Z",
    }
)


def test_prefect_event_json_is_read_as_it_is() -> None:
    event = admin.parse_line(1, PREFECT_LINE.encode())
    assert isinstance(event, ReceivedEvent)
    assert event.follows == UUID("8d9f2c4b-5b7e-4f0a-9a35-2c8e1f6b7d22")
    assert event.received == datetime(2024, 5, 1, 12, 0, 0, 234567, tzinfo=UTC)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b'{"event": ', "invalid JSON: Expecting value at column 11"),
        (b"[1, 2]", "not a JSON object but list"),
        (b'{"event": "x"}', "missing fields 'id', 'occurred', 'received', 'resource'"),
        (
            PREFECT_LINE.replace("2024-05-01T12:00:00.123456Z", "2024-05-01T12:00:00").encode(),
            "occurred: naive datetime",
        ),
        (PREFECT_LINE.replace('"0b1f6a1e', '"zzz').encode(), "id: Input should be a valid UUID"),
        (b"\xff\xfe{}", "not UTF-8 text"),
    ],
)
def test_bad_lines_say_what_is_wrong(line: bytes, problem: str) -> None:
    found = admin.parse_line(7, line)
    assert isinstance(found, admin.LineProblem)
    assert str(found).startswith(f"line 7: {problem}")


def test_blank_lines_are_not_events() -> None:
    assert admin.parse_line(1, b"  \n") is None
    assert admin.check_lines([(1, b"\n"), (2, PREFECT_LINE.encode()), (3, b"nope")]) == [
        admin.LineProblem(3, "invalid JSON: Expecting value at column 1")
    ]


def lines(events: list[ReceivedEvent]) -> list[tuple[int, bytes]]:
    return [(n, e.model_dump_json().encode()) for n, e in enumerate(events, 1)]


async def test_replay_continues_where_the_last_run_left_off(db_url: str, scope: str) -> None:
    clock = MutableClock(datetime(2026, 1, 5, 9, 0, tzinfo=UTC))
    chain = make_chain(clock, 5)
    run_one = [chain[4], chain[2], chain[1]]  # followers first: all wait
    run_two = [chain[3], chain[0]]  # the root leader comes last
    written: list[ReceivedEvent] = []
    try:
        first = await admin.replay(lines(run_one), written.append, url=db_url, scope=scope)
        assert (first.written, first.parked, first.waiting) == (0, 3, 3)
        second = await admin.replay(lines(run_two), written.append, url=db_url, scope=scope)
        assert (second.written, second.parked, second.waiting) == (5, 1, 0)
        assert [e.id for e in written] == [e.id for e in chain]
        # Replaying everything again writes nothing twice.
        third = await admin.replay(lines(chain), written.append, url=db_url, scope=scope)
        assert (third.written, third.already_seen) == (0, 5)
    finally:
        await CausalOrdering(scope, url=db_url).clear()


async def test_replay_judges_events_by_their_own_time(db_url: str, scope: str) -> None:
    """A file from last year still waits for leaders: time is the events' received."""
    clock = MutableClock(utc_now() - timedelta(days=365))
    chain = make_chain(clock, 3)
    written: list[ReceivedEvent] = []
    try:
        await admin.replay(lines(chain[::-1]), written.append, url=db_url, scope=scope)
        assert [e.id for e in written] == [e.id for e in chain]
    finally:
        await CausalOrdering(scope, url=db_url).clear()


async def test_flush_lost_writes_orphans_and_cycles_once(db_url: str, scope: str) -> None:
    clock = MutableClock(datetime(2026, 1, 5, 9, 0, tzinfo=UTC))
    orphan = make_event(clock, name="orphan", follows=uuid4())
    later = clock() + SECOND
    after_orphan = make_event(clock, name="after-orphan", follows=orphan.id, occurred=later)
    a_id, b_id = uuid4(), uuid4()
    a = make_event(clock, name="cycle-a", id=a_id, follows=b_id)
    b = make_event(clock, name="cycle-b", id=b_id, follows=a_id, occurred=clock() + SECOND)
    written: list[ReceivedEvent] = []
    try:
        report = await admin.replay(
            lines([after_orphan, b, orphan, a]), written.append, url=db_url, scope=scope
        )
        assert (report.written, report.waiting) == (0, 4)
        flushed = await admin.replay([], written.append, url=db_url, scope=scope, flush_lost=True)
        assert (flushed.flushed, flushed.waiting) == (4, 0)
        names = [e.event for e in written]
        assert sorted(names) == ["after-orphan", "cycle-a", "cycle-b", "orphan"]
        assert names.index("orphan") < names.index("after-orphan")
    finally:
        await CausalOrdering(scope, url=db_url).clear()


@pytest.mark.parametrize("claim_for", [timedelta(minutes=1), timedelta(minutes=20)])
async def test_flush_lost_waits_out_the_lookback_and_every_claim(
    db_url: str, scope: str, claim_for: timedelta
) -> None:
    """The flush comes once every follower has waited out the lookback (a follower
    handed out earlier, from an ended claim, would park again when delivered) and
    every claim has ended.  The time shows as the flushed event's seen_at."""
    clock = MutableClock(datetime(2026, 1, 5, 9, 0, tzinfo=UTC))
    claimed = make_event(clock, name="claimed", follows=uuid4())
    claim_end = clock() + claim_for
    written: list[ReceivedEvent] = []
    try:
        await admin.replay(lines([claimed]), written.append, url=db_url, scope=scope)
        await run_sql(
            db_url,
            "UPDATE {waiting_followers} SET claimed_by = 'stopped', claimed_until = :until"
            " WHERE scope = :scope AND follower_id = :id",
            {"until": claim_end, "scope": scope, "id": claimed.id},
        )
        flushed = await admin.replay([], written.append, url=db_url, scope=scope, flush_lost=True)
        assert (flushed.flushed, flushed.waiting) == (1, 0)
        assert written == [claimed]
        seen_at = max(claimed.received + PRECEDING_EVENT_LOOKBACK, claim_end)
        seen_then = await sql_value(
            db_url,
            "SELECT count(*) FROM {seen_events} WHERE scope = :scope AND seen_at = :at",
            {"scope": scope, "at": seen_at},
        )
        assert seen_then == 1
    finally:
        await CausalOrdering(scope, url=db_url).clear()


async def test_replay_skips_bad_lines_and_reports_them(db_url: str, scope: str) -> None:
    clock = MutableClock(datetime(2026, 1, 5, 9, 0, tzinfo=UTC))
    good = make_event(clock)
    seen: list[admin.LineProblem] = []
    written: list[ReceivedEvent] = []
    try:
        report = await admin.replay(
            [(1, b"{oops"), (2, good.model_dump_json().encode()), (3, b'{"id": 1}')],
            written.append,
            url=db_url,
            scope=scope,
            on_problem=seen.append,
        )
        assert [p.number for p in seen] == [1, 3]
        assert (report.lines, report.bad, report.written) == (3, 2, 1)
    finally:
        await CausalOrdering(scope, url=db_url).clear()


# -- the SQL audit views ----------------------------------------------------------


async def test_audit_views_answer_in_database_time(
    ordering: CausalOrdering[ReceivedEvent], db_url: str
) -> None:
    """The views cannot see an ordering's clock: rows are written relative to the real
    time, which is what the database's own clock reads."""
    clock = MutableClock(utc_now() - PRECEDING_EVENT_LOOKBACK - timedelta(minutes=5))
    ordering.clock = clock
    handled_leader = make_event(clock, name="handled.leader")
    await ordering.record_event_as_seen(handled_leader)
    never = make_event(clock, name="waits.for.nobody", follows=uuid4())
    left = make_event(clock, name="left.behind", follows=handled_leader.id)
    await ordering.record_follower(never)
    await ordering.record_follower(left)
    assert await ordering.record_event_as_processing(make_event(clock))  # expired by now

    clock.now = utc_now()
    fresh = make_event(clock, name="fresh", follows=uuid4())
    claimed = make_event(clock, name="being.handled", follows=uuid4())
    abandoned = make_event(clock, name="abandoned", follows=uuid4())
    for event in (fresh, claimed, abandoned):
        await ordering.record_follower(event)
    await claim(ordering, claimed, clock() + timedelta(minutes=5))
    await claim(ordering, abandoned, clock() - timedelta(minutes=1))
    assert await ordering.record_event_as_processing(make_event(clock))  # live

    async def query(sql: str) -> list[dict[str, Any]]:
        return await run_sql(db_url, sql, {"scope": ordering.scope})

    waiting = {
        row["event_name"]: row
        for row in await query("SELECT * FROM {waiting} WHERE scope = :scope")
    }
    assert {name: row["state"] for name, row in waiting.items()} == {
        "waits.for.nobody": "waiting",
        "left.behind": "waiting",
        "fresh": "waiting",
        "being.handled": "claimed",
        "abandoned": "claim expired",
    }
    assert bool(waiting["left.behind"]["past_lookback"])
    assert not waiting["fresh"]["past_lookback"]
    assert waiting["left.behind"]["leader_seen_at"] is not None
    assert waiting["waits.for.nobody"]["leader_seen_at"] is None
    assert str(waiting["fresh"]["follower_id"]) == str(fresh.id)
    assert str(waiting["fresh"]["leader_id"]) == str(fresh.follows)
    assert waiting["being.handled"]["claimed_by"] == "worker-x:1"
    # Twenty minutes, give or take the time this test takes.
    assert 19 * 60 <= waiting["left.behind"]["waiting_seconds"] <= 25 * 60

    stuck = {
        row["event_name"]: row["reason"]
        for row in await query("SELECT * FROM {stuck} WHERE scope = :scope")
    }
    assert stuck == {
        "waits.for.nobody": "its leader never arrived",
        "left.behind": "its leader was handled but did not release it",
        "abandoned": "claimed by a worker that stopped before handling it",
    }
    # The stuck view is what get_lost_followers() takes at the real time.
    ordering.clock = utc_now
    taken = await ordering.get_lost_followers()
    assert {e.event for e in taken} == set(stuck)

    leases = await query(
        "SELECT state, held_by, held_seconds FROM {held_leases} WHERE scope = :scope "
        "ORDER BY held_seconds DESC"
    )
    assert [row["state"] for row in leases] == ["expired", "live"]
    assert all(row["held_by"] for row in leases)


#: The queries docs/audit.md shows for reaching into the stored event (the audit
#: view ``waiting``: ``ordering.waiting`` on PostgreSQL, ``ordering_waiting`` on SQLite).
JSON_QUERIES = {
    "postgresql": (
        "SELECT event->'resource'->>'prefect.resource.id' FROM {waiting} "
        "WHERE scope = :scope AND event->>'event' = 'query.me'"
    ),
    "sqlite": (
        "SELECT json_extract(event, '$.resource.\"prefect.resource.id\"') FROM {waiting} "
        "WHERE scope = :scope AND json_extract(event, '$.event') = 'query.me'"
    ),
}


async def test_event_json_can_be_queried_in_sql(
    ordering: CausalOrdering[ReceivedEvent], clock: MutableClock
) -> None:
    """Into the stored event: JSONB on PostgreSQL, JSON text on SQLite."""
    event = make_event(clock, name="query.me", follows=uuid4())
    await ordering.record_follower(event)
    query = JSON_QUERIES[ordering.backend.dialect]
    found = await sql_value(ordering.url, query, {"scope": ordering.scope})
    assert found == "test.resource.query.me"
