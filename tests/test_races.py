"""Races across connections and processes: leaders and followers at the same moment,
and state shared by instances and processes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
from datetime import timedelta

from ordering import CausalOrdering

from .helpers import (
    Consumer,
    MutableClock,
    make_event,
    real_clock,
    rows_of_scope,
    run_in_threads,
)

PAIRS = 300


def test_leaders_and_followers_racing_strand_no_follower(db_url: str, scope: str) -> None:
    """Hundreds of leader/follower pairs, leaders on one backend and followers on another,
    each pair processed at the same moment: every follower is handled exactly once,
    after its leader, and no follower is left waiting."""
    clock = real_clock()
    leaders = [make_event(clock, name=f"leader-{i}") for i in range(PAIRS)]
    followers = [
        make_event(clock, name=f"follower-{i}", follows=leader.id)
        for i, leader in enumerate(leaders)
    ]

    pair_start = threading.Barrier(2)

    async def work(side: int) -> list[str]:
        ordering = CausalOrdering(scope, url=db_url, poll_interval=0.005)
        consumer = Consumer(ordering)
        jitter = random.Random(side)
        loop = asyncio.get_running_loop()
        for event in leaders if side == 0 else followers:
            await loop.run_in_executor(None, pair_start.wait)  # both sides start the pair together
            await asyncio.sleep(jitter.random() * 0.003)
            await consumer.consume(event)
        return consumer.names

    by_leaders, by_followers = run_in_threads(2, work)
    handled = by_leaders + by_followers
    released = sum(name.startswith("follower") for name in by_leaders)
    print(f"{released} of {PAIRS} followers were released by their leader")
    assert sorted(handled) == sorted(e.event for e in leaders + followers)  # each exactly once
    for i in range(PAIRS):
        if f"follower-{i}" in by_leaders:  # released by its leader: after it
            assert by_leaders.index(f"leader-{i}") < by_leaders.index(f"follower-{i}")

    async def leftovers(_: int) -> tuple[int, int]:
        rows = await rows_of_scope(db_url, scope)
        await CausalOrdering(scope, url=db_url).clear()
        return rows.followers, rows.leases

    assert run_in_threads(1, leftovers) == [(0, 0)]


CHECK_FROM_ANOTHER_PROCESS = """
import asyncio, json, sys
from uuid import UUID
from datetime import datetime
from ordering import CausalOrdering

async def main():
    url, scope, now, seen, follower, leader, leased = sys.argv[1:]
    ordering = CausalOrdering(scope, url=url, clock=lambda: datetime.fromisoformat(now))
    result = {
        "seen": await ordering.event_has_been_seen(UUID(seen)),
        "processing": await ordering.event_has_started_processing(UUID(leased)),
        "followers": [str(f.id) for f in await ordering.followers_by_id([UUID(follower)])],
    }
    print(json.dumps(result))

asyncio.run(main())
"""


async def test_state_survives_into_a_new_instance_and_another_process(
    db_url: str, clock: MutableClock, scope: str
) -> None:
    first = CausalOrdering(scope, url=db_url, clock=clock)
    seen = make_event(clock, name="seen")
    leader = make_event(clock, name="leader")
    follower = make_event(clock, name="follower", follows=leader.id)
    leased = make_event(clock, name="leased")
    await first.record_event_as_seen(seen)
    await first.record_follower(follower)
    assert await first.record_event_as_processing(leased)

    second = CausalOrdering(scope, url=db_url, clock=clock)
    assert await second.event_has_been_seen(seen)
    assert await second.get_followers(leader) == [follower]
    assert await second.event_has_started_processing(leased)
    assert not await second.record_event_as_processing(leased)

    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            CHECK_FROM_ANOTHER_PROCESS,
            db_url,
            scope,
            (clock() + timedelta(seconds=1)).isoformat(),
            str(seen.id),
            str(follower.id),
            str(leader.id),
            str(leased.id),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "seen": True,
        "processing": True,
        "followers": [str(follower.id)],
    }
    await first.clear()
