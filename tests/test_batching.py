"""Concurrent calls share round trips and commits: the Batcher on its own, completions
under many consumers at once on both dialects, and PostgreSQL's begins, seen checks and
set-based batch forms.  (SQLite's begins are not shared: one is a single statement,
run to the end on the loop.)"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from ordering import StoreUnavailable
from ordering.backends import (
    BeginRequest,
    Begun,
    Claim,
    CompleteRequest,
    ParkRequest,
    Refused,
    backend_for,
)
from ordering.backends.base import Rows
from ordering.backends.batching import Batcher
from ordering.backends.postgresql import _columns

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


async def _behind_one(
    batcher: Batcher[int, int], recorder: Recorder, first: int, *rest: int
) -> list[asyncio.Future[int]]:
    """Submit ``first`` and wait until it is sent, then ``rest``, queued behind it once
    the loop has turned; the calls, in that order."""
    sent = len(recorder.batches)
    calls: list[asyncio.Future[int]] = [asyncio.ensure_future(batcher.submit(first))]
    await _started(recorder, sent + 1)
    calls += [asyncio.ensure_future(batcher.submit(n)) for n in rest]
    await asyncio.sleep(0)
    return calls


async def test_a_call_alone_goes_at_once_and_the_rest_go_together() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder)
    calls = await _behind_one(batcher, recorder, 1, 2, 3, 4)
    recorder.gate.set()
    assert await asyncio.gather(*calls) == [2, 4, 6, 8]
    assert recorder.batches == [[1], [2, 3, 4]]


async def test_once_calls_have_had_company_a_turn_of_the_loop_goes_together() -> None:
    """Consumers woken by one answer call again in one turn of the loop: after a round
    trip that had company, even the first of them waits for the end of the turn, so all
    of them share the next round trip.  A round trip alone brings back sending at once."""
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder)
    calls = await _behind_one(batcher, recorder, 1, 2, 3)
    recorder.gate.set()
    assert await asyncio.gather(*calls) == [2, 4, 6]
    # Nothing is in flight now, but 2 and 3 had company: a turn's calls go together.
    recorder.gate = asyncio.Event()
    turn = [asyncio.ensure_future(batcher.submit(n)) for n in (4, 5, 6)]
    await _started(recorder, 3)
    recorder.gate.set()
    assert await asyncio.gather(*turn) == [8, 10, 12]
    # A call alone waits for the end of its turn once more, and goes alone: the next
    # one goes at once.
    assert await batcher.submit(7) == 14
    assert await batcher.submit(8) == 16
    assert recorder.batches == [[1], [2, 3], [4, 5, 6], [7], [8]]


async def test_each_caller_gets_its_own_error() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder)
    calls = await _behind_one(batcher, recorder, 1, 2, 13, 4)
    recorder.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[:2] == [2, 4] and results[3] == 8
    assert isinstance(results[2], ValueError)
    # the failing batch was tried again call by call
    assert recorder.batches == [[1], [2, 13, 4], [2], [13], [4]]


async def test_a_lost_database_reaches_every_caller_of_the_batch() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder)
    calls = await _behind_one(batcher, recorder, 1, 2, 3)
    recorder.lost = True
    recorder.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert recorder.batches == [[1], [2, 3]]  # not retried one by one


async def test_a_cancelled_caller_is_not_sent_and_an_orphaned_answer_is_handed_back() -> None:
    recorder = Recorder()
    orphans: list[tuple[int, int]] = []
    batcher: Batcher[int, int] = Batcher(recorder, orphaned=lambda r, a: orphans.append((r, a)))
    first, queued, kept = await _behind_one(batcher, recorder, 1, 2, 3)
    queued.cancel()
    recorder.gate.set()
    assert await first == 2 and await kept == 6
    assert recorder.batches == [[1], [3]]
    # A caller cancelled while its batch is in flight: its answer goes to ``orphaned``.
    first_gate, second_gate = asyncio.Event(), asyncio.Event()
    recorder.gate = first_gate
    lead, in_flight = await _behind_one(batcher, recorder, 5, 7)
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


def _lease(
    scope: str, event_id: UUID, owner: str, now: datetime, *, follows: UUID | None = None
) -> BeginRequest:
    """Take a one-minute lease at ``now``; seen counts for 30 minutes."""
    return BeginRequest(
        scope=scope,
        event_id=event_id,
        follows=follows,
        owner=owner,
        now=now,
        expires_at=now + timedelta(minutes=1),
        seen_after=now - timedelta(minutes=30),
    )


def _batch_call(
    function: str, requests: Sequence[BeginRequest | CompleteRequest]
) -> tuple[str, list[Any]]:
    """A set-based function called directly on the requests: its statement and its
    values (each parameter an array, one element per request)."""
    columns = _columns(request.params() for request in requests)
    if function in ("complete_events_v1", "complete_events_v2"):
        del columns["seen_until"]  # the forms before revision 0006 write no expiry
    holes = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
    return f"SELECT * FROM {function}({holes})", list(columns.values())


def _parked(scope: str, follower: UUID, leader: UUID, now: datetime, event: str) -> ParkRequest:
    """Park ``follower`` on ``leader``, keeping whatever lease it holds."""
    return ParkRequest(
        scope=scope,
        event_id=follower,
        leader_id=leader,
        occurred=now,
        received=now,
        event_json=event,
        lease_owner=None,
        seen_after=now - timedelta(minutes=30),
    )


async def test_completions_at_once_share_commits_and_each_gets_its_own_followers(
    db_url: str, clock: MutableClock
) -> None:
    backend = backend_for(db_url)
    scope = f"batch-{uuid4().hex[:8]}"
    now = clock()
    later = now + timedelta(minutes=1)
    seen_after = now - timedelta(minutes=30)
    leaders = [uuid4() for _ in range(20)]
    followers = {leaders[n]: uuid4() for n in (2, 7, 11)}
    for leader in leaders:
        assert await backend.begin(_lease(scope, leader, "o", now)) == Begun(False, False)
    for leader, follower in followers.items():
        assert await backend.park(_parked(scope, follower, leader, now, f'{{"id": "{follower}"}}'))

    with statements_of(backend) as log:
        released = await asyncio.gather(
            *(
                backend.complete(
                    CompleteRequest(
                        scope=scope,
                        event_id=leader,
                        lease_owner="o",
                        now=now,
                        claim=Claim(owner=f"claim-{n}", until=later),
                        is_follower=False,
                    )
                )
                for n, leader in enumerate(leaders)
            )
        )

    transactions = log.count("commit") + log.count("complete") + log.count("complete_batch")
    assert 1 < transactions < len(leaders), log.names
    for leader, answer in zip(leaders, released, strict=True):
        assert answer == ([f'{{"id": "{followers[leader]}"}}'] if leader in followers else [])
    seen = [await backend.seen(scope=scope, event_id=e, seen_after=seen_after) for e in leaders]
    assert seen == [True] * len(leaders)
    await backend.clear(scope=scope)


async def test_postgresql_begins_at_once_share_round_trips_and_one_wins_each_event(
    postgres_url: str, clock: MutableClock
) -> None:
    backend = backend_for(postgres_url)
    scope = f"batch-{uuid4().hex[:8]}"
    now = clock()
    contested = uuid4()
    others = [uuid4() for _ in range(30)]

    def begin(event_id: UUID, owner: str) -> BeginRequest:
        return _lease(scope, event_id, owner, now)

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


async def test_begin_tells_a_lease_taken_over_from_a_fresh_one_or_its_own(
    db_url: str, clock: MutableClock
) -> None:
    """Only a lease another owner let expire is taken over: not a fresh lease, not an
    owner's own taken again (a retried statement), not a live one (refused).  One call
    alone and a dozen at once (on PostgreSQL a batch) answer alike."""
    backend = backend_for(db_url)
    scope = f"takeover-{uuid4().hex[:8]}"
    now = clock()
    expired, live, own = uuid4(), uuid4(), uuid4()
    many = [uuid4() for _ in range(12)]
    for event_id in [expired, *many]:
        stale = _lease(scope, event_id, "dead", now - timedelta(minutes=5))
        assert await backend.begin(stale) == Begun(False, False)
    assert await backend.begin(_lease(scope, live, "alive", now)) == Begun(False, False)
    assert await backend.begin(_lease(scope, own, "n", now)) == Begun(False, False)

    assert await backend.begin(_lease(scope, expired, "n", now)) == Begun(False, False, True)
    assert await backend.begin(_lease(scope, own, "n", now)) == Begun(False, False, False)
    assert await backend.begin(_lease(scope, live, "n", now)) is Refused.HELD_ELSEWHERE
    assert await backend.begin(_lease(scope, uuid4(), "n", now)) == Begun(False, False, False)

    with statements_of(backend) as log:
        answers = await asyncio.gather(
            *(backend.begin(_lease(scope, event_id, "m", now)) for event_id in many),
            *(backend.begin(_lease(scope, uuid4(), "m", now)) for _ in range(4)),
        )
    assert answers == [Begun(False, False, True)] * 12 + [Begun(False, False, False)] * 4
    if db_url.startswith("postgresql"):
        assert log.count("begin_batch") >= 1, log.names
    await backend.clear(scope=scope)


async def test_postgresql_seen_checks_at_once_share_a_round_trip_each_with_its_own_answer(
    postgres_url: str, clock: MutableClock
) -> None:
    """Consumers that check "seen" before each event (Prefect's pattern) check at the
    same moment: the checks share round trips, and each hears about its own event."""
    backend = backend_for(postgres_url)
    scope = f"batch-{uuid4().hex[:8]}"
    now = clock()
    seen = [uuid4() for _ in range(10)]
    for event_id in seen:
        await backend.record_seen(scope=scope, event_id=event_id, now=now)
    expired, elsewhere = uuid4(), uuid4()
    await backend.record_seen(scope=scope, event_id=expired, now=now - timedelta(hours=2))
    await backend.record_seen(scope=f"{scope}-other", event_id=elsewhere, now=now)
    asked = [*seen, *(uuid4() for _ in range(10)), expired, elsewhere]
    random.Random(7).shuffle(asked)

    with statements_of(backend) as log:
        answers = await asyncio.gather(
            *(
                backend.seen(scope=scope, event_id=e, seen_after=now - timedelta(hours=1))
                for e in asked
            )
        )

    assert answers == [e in seen for e in asked]
    assert log.count("seen_batch") >= 1, log.names
    assert log.count("seen") + log.count("seen_batch") < len(asked)
    await backend.clear(scope=scope)
    await backend.clear(scope=f"{scope}-other")


@pytest.mark.parametrize("padding", [0, 8], ids=["small", "large"])
async def test_postgresql_set_based_batches_answer_what_the_per_event_forms_answer(
    postgres_url: str, clock: MutableClock, padding: int
) -> None:
    """The same batches, on the same rows, through ``begin_events_v1`` and
    ``complete_events_v1`` (a function call per event, kept for earlier releases'
    workers) and through the forms this code calls, ``begin_events_v2`` and
    ``complete_events_v3`` (a few statements for the lot, from 8 events on): the same
    answers and the same rows afterwards.  Padded with independent events, both
    batches are set-based; unpadded, the completions are few enough to go one call
    per event."""
    backend = backend_for(postgres_url)
    now = clock()
    later = now + timedelta(minutes=1)
    padded = [f"P{n}" for n in range(padding)]
    fresh = [f"{name}-new" for name in padded]
    core = ["A", "B", "C", "D", "E", "F", "G", "H", "X", "Y", "Z", "W", "F1", "F2", "F3", "F4"]
    ids = {name: uuid4() for name in [*core, *padded, *fresh]}

    def begin(scope: str, name: str, owner: str, follows: str | None = None) -> BeginRequest:
        return _lease(scope, ids[name], owner, now, follows=ids[follows] if follows else None)

    def complete(scope: str, name: str, owner: str, claim: str | None) -> CompleteRequest:
        return CompleteRequest(
            scope=scope,
            event_id=ids[name],
            lease_owner=owner,
            now=now,
            claim=Claim(owner=claim, until=later) if claim else None,
            is_follower=name == "W",
        )

    async def fetch(statement: str, *args: object) -> Rows:
        return await backend.connections.run(lambda c: c.fetch(statement, *args))

    async def prepare(scope: str) -> None:
        """A seen, B leased live by someone else, C leased but expired; followers F1
        and F2 parked on X, F3 on Y, F4 on Z and claimed live by someone else; W, a
        follower of H, parked and leased again to complete."""
        leased = [("A", "a"), ("X", "o"), ("Y", "o"), ("Z", "o"), ("W", "o")]
        for name, owner in leased + [(name, "o") for name in padded]:
            assert await backend.begin(begin(scope, name, owner)) == Begun(False, False)
        assert await backend.complete(complete(scope, "A", "a", None)) == []
        assert await backend.begin(begin(scope, "B", "other")) == Begun(False, False)
        stale = _lease(scope, ids["C"], "other", now - timedelta(minutes=5))  # expired
        assert await backend.begin(stale) == Begun(False, False)
        for follower, leader in (("F1", "X"), ("F2", "X"), ("F3", "Y"), ("F4", "Z"), ("W", "H")):
            event = f'{{"id": "{ids[follower]}", "name": "{follower}"}}'
            assert await backend.park(_parked(scope, ids[follower], ids[leader], now, event))
        await fetch(
            "UPDATE waiting_followers SET claimed_by = 'someone', claimed_until = $3 "
            "WHERE scope = $1 AND follower_id = $2",
            scope,
            ids["F4"],
            later,
        )

    async def batch(function: str, requests: Sequence[BeginRequest | CompleteRequest]) -> Rows:
        statement, values = _batch_call(function, requests)
        return await fetch(statement, *values)

    async def rows(scope: str) -> list[tuple[object, ...]]:
        found = []
        for table, columns in (
            ("seen_events", "event_id, seen_at"),
            ("processing_leases", "event_id, owner, expires_at, has_waiters"),
            ("waiting_followers", "follower_id, leader_id, claimed_by, claimed_until"),
        ):
            statement = f"SELECT {columns} FROM {table} WHERE scope = $1 ORDER BY 1, 2"
            found += [(table, *row) for row in await fetch(statement, scope)]
        return found

    outcomes = []
    for begins, completes in (("v1", "v1"), ("v2", "v3")):
        scope = f"batch-{begins}-{uuid4().hex[:8]}"
        await prepare(scope)
        begun = await batch(
            f"begin_events_{begins}",
            [
                begin(scope, "A", "n"),  # seen already: refused, no lease left behind
                begin(scope, "B", "n"),  # held elsewhere
                begin(scope, "C", "n"),  # an expired lease: taken over
                begin(scope, "D", "n", follows="A"),  # its leader seen
                begin(scope, "E", "n", follows="B"),  # its leader in flight
                begin(scope, "F", "n", follows="G"),  # its leader unknown
                begin(scope, "D", "m", follows="A"),  # twice in one batch: held
                begin(scope, "H", "n", follows="C"),  # its leader leased in this batch
                *(begin(scope, name, "n") for name in fresh),
            ],
        )
        completed = await batch(
            f"complete_events_{completes}",
            [
                complete(scope, "X", "o", "c1"),  # releases F1 and F2
                complete(scope, "Y", "o", None),  # no claim: F3 stays parked
                complete(scope, "Z", "o", "c3"),  # F4 is claimed by someone else
                complete(scope, "W", "o", "c4"),  # a follower: its own row goes
                *(complete(scope, name, "o", "c5") for name in padded),
            ],
        )
        released = sorted((item, event) for item, event in completed)
        outcomes.append((sorted(tuple(r) for r in begun), released, await rows(scope)))
        await backend.clear(scope=scope)

    (begun_v1, released_v1, rows_v1), (begun_v2, released_v2, rows_v2) = outcomes
    assert begun_v2 == begun_v1
    assert begun_v1 == [
        (1, True, False, False),
        (3, False, False, False),
        (4, False, True, False),
        (5, False, False, True),
        (6, False, False, False),
        (8, False, False, True),
    ] + [(9 + n, False, False, False) for n in range(padding)]
    assert released_v2 == released_v1
    assert [(item, '"F1"' in e or '"F2"' in e) for item, e in released_v1] == [(1, True)] * 2
    assert rows_v2 == rows_v1


async def test_postgresql_batches_of_the_same_events_in_any_order_never_deadlock(
    postgres_url: str, clock: MutableClock
) -> None:
    """Consumers' calls reach a batch in whatever order they came.  Four connections
    at once, each with a batch of the same fifty events in an order of its own, a
    hundred times over, begins then completions: each event is leased by exactly one
    of them and none is ever chosen as a deadlock victim.  The set-based functions
    take their row locks (and completion's advisory locks) in key order; a begin that
    inserted in arrival order deadlocked in about one round in eight here.  Raw
    connections: the store itself would retry a deadlock and hide it."""
    backend = backend_for(postgres_url)
    scope = f"order-{uuid4().hex[:8]}"
    now = clock()
    shuffle = random.Random(7).sample
    connections = [await backend.connections.connect() for _ in range(4)]

    async def batch(
        connection: Any, function: str, requests: Sequence[BeginRequest | CompleteRequest]
    ) -> Rows:
        statement, values = _batch_call(function, requests)
        rows: Rows = await connection.fetch(statement, *values)
        return rows

    try:
        for _ in range(100):
            events = [uuid4() for _ in range(50)]
            orders = [shuffle(events, len(events)) for _ in connections]
            begun = await asyncio.gather(
                *(
                    batch(
                        c,
                        "begin_events_v2",
                        [_lease(scope, e, f"o{n}", now) for e in order],
                    )
                    for n, (c, order) in enumerate(zip(connections, orders, strict=True))
                )
            )
            leased = [
                order[row[0] - 1] for rows, order in zip(begun, orders, strict=True) for row in rows
            ]
            assert sorted(leased) == sorted(events)  # each event leased once, by one of them
            await asyncio.gather(
                *(
                    batch(
                        c,
                        "complete_events_v3",
                        [
                            CompleteRequest(
                                scope=scope,
                                event_id=e,
                                lease_owner=f"o{n}",
                                now=now,
                                claim=None,
                                is_follower=False,
                            )
                            for e in order
                        ],
                    )
                    for n, (c, order) in enumerate(zip(connections, orders, strict=True))
                )
            )
        left = await connections[0].fetchval(
            "SELECT count(*) FROM processing_leases WHERE scope = $1", scope
        )
        assert left == 0
    finally:
        for connection in connections:
            await backend.connections.close(connection)
        await backend.clear(scope=scope)
