"""The workload: causal chains delivered in a seeded random order, with redeliveries."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from uuid import UUID

from ordering import ReceivedEvent


@dataclass
class Workload:
    """The events, and the queue of deliveries each worker receives."""

    events: list[ReceivedEvent]
    queues: list[list[ReceivedEvent]]
    duplicates: int
    seed: int
    leader_of: dict[UUID, UUID] = field(default_factory=dict)


def make_chains(
    chains: int, length: int, received: datetime, rng: random.Random
) -> list[ReceivedEvent]:
    """``chains`` chains of ``length`` events, each following the one before it.

    All were received at ``received`` (well inside the lookback); they occurred a
    second apart, so the ordering's occurred-order ties never decide anything.
    """
    events: list[ReceivedEvent] = []
    for c in range(chains):
        previous: UUID | None = None
        for i in range(length):
            event = ReceivedEvent(
                occurred=received - timedelta(seconds=length - i),
                event=f"fault.chain-{c}.step-{i}",
                resource={"prefect.resource.id": f"fault.resource.{c}"},
                id=UUID(int=rng.getrandbits(128), version=4),
                follows=previous,
                received=received,
            )
            events.append(event)
            previous = event.id
    return events


def deliver(
    events: list[ReceivedEvent],
    *,
    workers: int,
    duplicate_fraction: float,
    seed: int,
    pinned: dict[int, list[ReceivedEvent]] | None = None,
    soon: float = 0.0,
) -> Workload:
    """Shuffle the deliveries and deal them round-robin to ``workers`` queues.

    A ``duplicate_fraction`` of the events is delivered a second time (redelivery),
    to a random place in the stream, except that a ``soon`` fraction of those come
    right after the original (a consumer slow to acknowledge): most likely to another
    worker at the same moment, the racy case.  ``pinned`` events go first, in the given order,
    to the given worker's queue and are not duplicated at random: the tests that
    pin them need to know exactly who gets them (an event pinned to two workers is
    a redelivery the test controls).
    """
    rng = random.Random(seed)
    pinned = pinned or {}
    pinned_ids = {e.id for queue in pinned.values() for e in queue}
    free = [e for e in events if e.id not in pinned_ids]
    duplicated = rng.sample(free, round(len(free) * duplicate_fraction))
    stream = list(free)
    rng.shuffle(stream)
    for event in duplicated:
        if rng.random() < soon:
            position = stream.index(event) + 1 + rng.randrange(2 * workers)
        else:
            position = rng.randrange(len(stream) + 1)
        stream.insert(min(position, len(stream)), event)
    queues: list[list[ReceivedEvent]] = [list(pinned.get(w, [])) for w in range(workers)]
    for i, event in enumerate(stream):
        queues[i % workers].append(event)
    leader_of = {e.id: e.follows for e in events if e.follows is not None}
    pinned_copies = sum(len(queue) for queue in pinned.values()) - len(pinned_ids)
    return Workload(events, queues, len(duplicated) + pinned_copies, seed, leader_of)


def write_queue(path: Path, queue: list[ReceivedEvent]) -> None:
    path.write_text(json.dumps([e.model_dump(mode="json") for e in queue]))


def read_queue(path: Path) -> list[ReceivedEvent]:
    return [ReceivedEvent.model_validate(e) for e in json.loads(path.read_text())]
