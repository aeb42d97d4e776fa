"""Follower wake-up on PostgreSQL: how long after its in-flight leader completes does
a follower go ahead?

The leader runs in another process, as it would on another worker: it takes its
lease, says so, holds it inside its body for a random 100-300 ms and then completes,
noting the time.  The follower arrives while the leader is in flight, finds it so and
waits; the time it enters its body, minus the leader's completion time, is the added
latency (``time.monotonic`` is one clock for every process on Linux).  With polling
every ``poll_interval`` seconds it averages half the interval; a notification should
bring it down to a few milliseconds.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any

from ordering import CausalOrdering, ReceivedEvent, dispose

from .results import Wakeup
from .workloads import percentile

HOLD_S = (0.1, 0.3)

#: The configurations compared: polling alone, with no notification (polling every
#: 250 ms) and whatever the library does by default (LISTEN/NOTIFY, polling kept as the
#: fallback), so the table shows what the notification saves.
CONFIGURATIONS: list[tuple[str, dict[str, Any]]] = [
    ("polling only, every 250 ms", {"poll_interval": 0.25, "notify": False}),
    ("default: LISTEN/NOTIFY", {}),
]


def _event(event_id: uuid.UUID, follows: uuid.UUID | None) -> ReceivedEvent:
    now = datetime.now(UTC)
    return ReceivedEvent(
        occurred=now + timedelta(microseconds=1 if follows else 0),
        event="bench.wakeup",
        resource={"prefect.resource.id": "bench.wakeup"},
        id=event_id,
        follows=follows,
        received=now,
    )


async def _nothing(event: Any, depth: int = 0) -> None:
    return None


async def _lead(url: str, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    try:
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command[0] == "stop":
                return
            _, scope, leader_id, hold, kwargs = command
            ordering = CausalOrdering(scope, url=url, **kwargs)
            async with ordering.preceding_event_confirmed(_nothing, _event(leader_id, None)):
                pipe.send(("in-flight",))
                await asyncio.sleep(hold)
            pipe.send(("done", time.monotonic()))
    finally:
        await dispose()


def _leader_process(url: str, pipe: Connection) -> None:
    asyncio.run(_lead(url, pipe))


async def _follow(
    url: str, pipe: Connection, label: str, kwargs: dict[str, Any], samples: int, seed: int
) -> Wakeup:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    added_ns: list[int] = []
    scope = f"bench-wakeup-{uuid.uuid4().hex[:10]}"
    ordering = CausalOrdering(scope, url=url, **kwargs)
    for _ in range(samples):
        leader_id, follower_id = uuid.uuid4(), uuid.uuid4()
        pipe.send(("lead", scope, leader_id, rng.uniform(*HOLD_S), kwargs))
        reply = await loop.run_in_executor(None, pipe.recv)
        assert reply == ("in-flight",), reply
        async with ordering.preceding_event_confirmed(_nothing, _event(follower_id, leader_id)):
            went = time.monotonic()
        _, done = await loop.run_in_executor(None, pipe.recv)
        added_ns.append(int((went - done) * 1e9))
    return Wakeup(
        configuration=label,
        poll_interval=kwargs.get("poll_interval", ordering.poll_interval),
        samples=samples,
        added_p50_ms=percentile(added_ns, 0.5),
        added_p90_ms=percentile(added_ns, 0.9),
        added_max_ms=max(added_ns) / 1e6,
        hold_s=HOLD_S,
    )


async def _follow_all(url: str, pipe: Connection, samples: int, seed: int) -> list[Wakeup]:
    try:
        # first a warm-up sample, so connection set-up is not measured
        await _follow(url, pipe, "warm-up", {}, 1, seed)
        return [
            await _follow(url, pipe, label, kwargs, samples, seed)
            for label, kwargs in CONFIGURATIONS
        ]
    finally:
        await dispose()


def measure(url: str, samples: int, seed: int) -> list[Wakeup]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    leader = context.Process(target=_leader_process, args=(url, theirs), daemon=True)
    leader.start()
    try:
        return asyncio.run(_follow_all(url, ours, samples, seed))
    finally:
        ours.send(("stop",))
        leader.join(timeout=30)
        if leader.is_alive():
            leader.terminate()
