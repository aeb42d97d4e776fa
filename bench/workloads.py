"""The three workloads, delivered through the consumer pattern a user writes.

* in-order: chains of 10 events, each following the one before it, chains interleaved,
  each chain delivered in causal order;
* jumbled: the same chains, each chain's order shuffled, so followers arrive before
  their leaders and park until the leader releases them;
* independent: events that follow nothing.

Every event goes through ``async with ordering.preceding_event_confirmed(handler, event)``;
the handler re-enters ``preceding_event_confirmed`` for released followers, and an event
that arrives early is caught as ``EventArrivedEarly``.  Events are delivered one at a
time, so the latency of one top-level call is the store's per-event cost.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

WORKLOADS = ("in-order", "jumbled", "independent")
CHAIN_LENGTH = 10
#: In-order again, constructing the ordering for every call.
PER_CALL = "in-order, new CausalOrdering per call"
#: In-order through the calls Prefect's triggers service makes for each message.
PREFECT_CALLS = "in-order, Prefect's calls (seen check, new CausalOrdering per call)"
#: Consumer tasks in the warm-up's concurrent pass, at four events each: with this many,
#: every connection the consumers table goes on to use has sent the batched statements
#: (a connection's first batch costs milliseconds: asyncpg looks up the array types,
#: PostgreSQL compiles the batch functions).
WARM_UP_CONSUMERS = 64

#: What the consumers tables run, each split among C consumer tasks: (workload, whether
#: each task makes Prefect's calls).
CONSUMER_RUNS: tuple[tuple[str, bool], ...] = (
    ("independent", False),
    ("independent", True),
    ("jumbled", False),
)


def consumer_kind(workload: str, prefect_calls: bool) -> str:
    return f"{workload}, Prefect's calls" if prefect_calls else workload


def consumer_label(consumers: int, workload: str, prefect_calls: bool) -> str:
    plural = "s" if consumers != 1 else ""
    return f"{consumer_kind(workload, prefect_calls)}, {consumers} consumer{plural}"


def kind_of(label: str) -> str:
    """A consumers run's label without its count of consumers."""
    return label.rsplit(", ", 1)[0]


@dataclass(frozen=True)
class Spec:
    """One event to deliver, before it is made into a model of some implementation."""

    id: UUID
    follows: UUID | None
    occurred: datetime
    chain: int


def make_chains(events: int, start: datetime, length: int = CHAIN_LENGTH) -> list[list[Spec]]:
    """``events // length`` chains of ``length`` events, each following the one before."""
    chains: list[list[Spec]] = []
    for chain in range(max(1, events // length)):
        links: list[Spec] = []
        for position in range(length):
            links.append(
                Spec(
                    id=uuid.uuid4(),
                    follows=links[-1].id if links else None,
                    occurred=start + timedelta(seconds=position, microseconds=chain),
                    chain=chain,
                )
            )
        chains.append(links)
    return chains


def interleave(chains: Sequence[Sequence[Spec]]) -> list[Spec]:
    """The k-th event of every chain, then the (k+1)-th, and so on."""
    longest = max((len(c) for c in chains), default=0)
    return [chain[k] for k in range(longest) for chain in chains if k < len(chain)]


def make_specs(workload: str, events: int, seed: int) -> list[Spec]:
    """The events of one workload, in delivery order (reproducible for a given seed)."""
    start = datetime.now(UTC)
    if workload == "independent":
        return [
            Spec(id=uuid.uuid4(), follows=None, occurred=start + timedelta(microseconds=i), chain=i)
            for i in range(events)
        ]
    chains = make_chains(events, start)
    if workload == "in-order":
        return interleave(chains)
    if workload == "jumbled":
        rng = random.Random(seed)
        shuffled = [rng.sample(chain, len(chain)) for chain in chains]
        return interleave(shuffled)
    raise ValueError(f"unknown workload {workload!r}: choose from {', '.join(WORKLOADS)}")


def materialize(specs: Sequence[Spec], model: type[Any]) -> list[Any]:
    """Event models of one implementation (ours or Prefect's), received just now."""
    received = datetime.now(UTC)
    return [
        model(
            occurred=spec.occurred,
            event="bench.event",
            resource={"prefect.resource.id": f"bench.resource.{spec.chain}"},
            id=spec.id,
            follows=spec.follows,
            received=received,
        )
        for spec in specs
    ]


class Consumer:
    """The consumer a user writes; ``ordering_for`` gives the ordering for each call
    (the same instance, or a new one per event as Prefect's server constructs them).

    Not ``OrderedConsumer``: the same calls must drive ours and the peers (Prefect's
    in-memory and Redis orderings), and the figures are of preceding_event_confirmed."""

    def __init__(self, ordering_for: Callable[[], Any], arrived_early: type[BaseException]):
        self.ordering_for = ordering_for
        self.arrived_early = arrived_early
        self.handled: list[UUID] = []
        self.parked = 0

    async def handler(self, event: Any, depth: int = 0) -> None:
        async with self.ordering_for().preceding_event_confirmed(self.handler, event, depth=depth):
            self.handled.append(event.id)

    async def consume(self, event: Any) -> None:
        try:
            async with self.ordering_for().preceding_event_confirmed(self.handler, event):
                self.handled.append(event.id)
        except self.arrived_early:
            self.parked += 1


class PrefectConsumer(Consumer):
    """The calls Prefect's triggers service makes per message: ``event_has_been_seen``
    on a long-lived instance first (a seen event is skipped), then
    ``preceding_event_confirmed`` on an instance ``ordering_for`` makes for the call."""

    def __init__(
        self,
        ordering_for: Callable[[], Any],
        arrived_early: type[BaseException],
        seen: Callable[[UUID], Awaitable[bool]],
    ):
        super().__init__(ordering_for, arrived_early)
        self.seen = seen
        self.skipped = 0

    async def consume(self, event: Any) -> None:
        if await self.seen(event.id):
            self.skipped += 1
            return
        await super().consume(event)


def make_consumer(
    new_ordering: Callable[[], Any],
    arrived_early: type[BaseException],
    *,
    per_call: bool = False,
    prefect_calls: bool = False,
) -> Consumer:
    """The consumer for one run: one instance for every call, a new one per call, or
    Prefect's calls (a seen check on a long-lived instance, then a new one per call).
    The same for ours and for a peer."""
    if prefect_calls:
        long_lived = new_ordering()
        return PrefectConsumer(new_ordering, arrived_early, long_lived.event_has_been_seen)
    if per_call:
        return Consumer(new_ordering, arrived_early)
    ordering = new_ordering()
    return Consumer(lambda: ordering, arrived_early)


@dataclass
class Timing:
    seconds: float
    latencies_ns: list[int]
    #: when each call started, on ``time.monotonic_ns`` (one clock for all processes)
    starts_ns: list[int]


async def deliver(
    consumer: Consumer, events: Sequence[Any], profiler: cProfile.Profile | None = None
) -> Timing:
    """Deliver the events one after another, timing each top-level call (and
    profiling only the deliveries when given a profiler)."""
    gc.collect()
    latencies: list[int] = []
    starts: list[int] = []
    clock = time.monotonic_ns
    if profiler is not None:
        profiler.enable()
    started = clock()
    for event in events:
        before = clock()
        await consumer.consume(event)
        latencies.append(clock() - before)
        starts.append(before)
    finished = clock()
    if profiler is not None:
        profiler.disable()
    return Timing((finished - started) / 1e9, latencies, starts)


@dataclass
class ConsumersRun:
    """What ``deliver_among_consumers`` measured."""

    label: str
    consumers: int
    events: int
    timing: Timing
    parked: int


async def deliver_among_consumers(
    new_ordering: Callable[[], Any],
    arrived_early: type[BaseException],
    model: type[Any],
    *,
    consumers: int,
    workload: str,
    events: int,
    seed: int,
    prefect_calls: bool = False,
) -> ConsumersRun:
    """``events`` of ``workload`` dealt to ``consumers`` tasks of this event loop, each
    with an ordering of its own from ``new_ordering`` (the same for ours and the peer),
    delivering its share one event after another; with ``prefect_calls``, each event as
    Prefect's services deliver it (see make_consumer).  The causal order is checked
    across all the tasks, on one list of what they handled."""
    specs = make_specs(workload, events, seed)
    shares = split(materialize(specs, model), consumers)
    tasks = [
        make_consumer(new_ordering, arrived_early, prefect_calls=prefect_calls) for _ in shares
    ]
    handled: list[UUID] = []
    for task in tasks:
        task.handled = handled
    timing = await deliver_concurrently(tasks, shares)
    check_causal(handled, specs)
    label = consumer_label(consumers, workload, prefect_calls)
    return ConsumersRun(label, consumers, len(specs), timing, sum(t.parked for t in tasks))


def split(events: Sequence[Any], consumers: int) -> list[list[Any]]:
    """The events dealt round-robin to ``consumers`` shares (none of them empty)."""
    count = max(1, min(consumers, len(events)))
    return [list(events[i::count]) for i in range(count)]


async def deliver_concurrently(
    consumers: Sequence[Consumer], shares: Sequence[Sequence[Any]]
) -> Timing:
    """Each consumer delivers its share one event after another, all consumers at once
    as tasks of this event loop; the time is from the start to the last one's end."""
    gc.collect()
    clock = time.monotonic_ns
    latencies: list[int] = []
    starts: list[int] = []

    async def run(consumer: Consumer, events: Sequence[Any]) -> None:
        for event in events:
            before = clock()
            await consumer.consume(event)
            latencies.append(clock() - before)
            starts.append(before)

    started = clock()
    async with asyncio.TaskGroup() as group:
        for consumer, events in zip(consumers, shares, strict=True):
            group.create_task(run(consumer, events))
    finished = clock()
    return Timing((finished - started) / 1e9, latencies, starts)


def check_causal(handled: Sequence[UUID], specs: Sequence[Spec]) -> None:
    """Every event handled exactly once, each after the event it follows: a bench that
    measured a broken ordering would be worse than none."""
    position = {event_id: i for i, event_id in enumerate(handled)}
    if len(position) != len(handled):
        raise AssertionError("an event was handled twice")
    missing = len({s.id for s in specs} - position.keys())
    if missing:
        raise AssertionError(f"{missing} of {len(specs)} events were never handled")
    for spec in specs:
        if spec.follows is not None and position[spec.follows] > position[spec.id]:
            raise AssertionError(f"event {spec.id} was handled before its leader")


def percentile(values_ns: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    if not values_ns:
        return math.nan
    ordered = sorted(values_ns)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1] / 1e6
