"""Prefect-side helpers for tests/test_prefect.py, and a small command line run as a
separate process by the restart test and for the construction-cost figure.

Imports Prefect: only import this module once Prefect is known to be importable.

    python -m tests.prefect_support park      # park followers, print the leader as JSON
    python -m tests.prefect_support release   # read the leader on stdin, print handled names
    python -m tests.prefect_support bench     # print the cost of building the ordering
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

from prefect.server.events.ordering import EventArrivedEarly, get_triggers_causal_ordering
from prefect.server.events.schemas.events import ReceivedEvent

from .helpers import make_event

#: The import path Prefect's setting takes to use our ordering.
OUR_ORDERING = "ordering.prefect"


def prefect_event(
    clock: Callable[[], datetime],
    name: str,
    *,
    follows: UUID | None = None,
    occurred: datetime | None = None,
) -> ReceivedEvent:
    """A Prefect ``ReceivedEvent``, received now by ``clock``: ours, read back through
    the JSON both share."""
    ours = make_event(clock, name=name, follows=follows, occurred=occurred)
    return ReceivedEvent.model_validate_json(ours.model_dump_json())


def causal_graph(clock: Callable[[], datetime]) -> list[ReceivedEvent]:
    """A small graph, in causal order: a root with two branches, one of them a chain,
    and a separate pair.  Names say what each follows: b.a follows a."""
    start = clock()

    def at(seconds: int) -> datetime:
        return start + timedelta(seconds=seconds)

    a = prefect_event(clock, "a", occurred=at(0))
    b = prefect_event(clock, "b.a", follows=a.id, occurred=at(1))
    c = prefect_event(clock, "c.b", follows=b.id, occurred=at(2))
    d = prefect_event(clock, "d.a", follows=a.id, occurred=at(3))
    e = prefect_event(clock, "e.c", follows=c.id, occurred=at(4))
    x = prefect_event(clock, "x", occurred=at(5))
    y = prefect_event(clock, "y.x", follows=x.id, occurred=at(6))
    return [a, b, c, d, e, x, y]


@dataclass
class PrefectConsumer:
    """Prefect's triggers consumer, reduced to its ordering: like
    ``prefect.server.events.triggers.reactive_evaluation``, the handler asks Prefect's
    accessor for the ordering on every call and re-enters ``preceding_event_confirmed``.
    (Not ``OrderedConsumer``, which holds one ordering: this stands for Prefect's code.)"""

    handled: list[ReceivedEvent] = field(default_factory=list)

    async def handler(self, event: ReceivedEvent, depth: int = 0) -> None:
        ordering = get_triggers_causal_ordering()
        async with ordering.preceding_event_confirmed(self.handler, event, depth):
            self.handled.append(event)

    async def consume(self, event: ReceivedEvent) -> bool:
        """Top-level delivery; False when the event arrived early (it is stored)."""
        try:
            await self.handler(event)
        except EventArrivedEarly:
            return False
        return True

    @property
    def names(self) -> list[str]:
        return [e.event for e in self.handled]


# -- the separate processes ---------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


async def park() -> int:
    """Park a chain leader -> f1 -> f2 (followers delivered, leader not); print the
    leader as JSON for the process that releases them."""
    leader = prefect_event(_utc_now, "leader")
    f1 = prefect_event(_utc_now, "f1", follows=leader.id)
    f2 = prefect_event(_utc_now, "f2", follows=f1.id)
    consumer = PrefectConsumer()
    parked = [not await consumer.consume(event) for event in (f2, f1)]
    print(json.dumps({"leader": leader.model_dump(mode="json"), "parked": parked}))
    return 0


async def release() -> int:
    """Deliver the leader read from stdin; print the names handled, in order."""
    leader = ReceivedEvent.model_validate(json.loads(sys.stdin.read())["leader"])
    consumer = PrefectConsumer()
    await consumer.consume(leader)
    print(json.dumps(consumer.names))
    return 0


async def bench(number: int) -> int:
    """The cost of Prefect building our ordering once per event, beside the core
    ordering and Prefect's in-memory one, and proof that building opens nothing: the
    backend registry stays empty, and orderings that touch the database share one
    backend."""
    from prefect.server.events.ordering import memory

    from ordering import CausalOrdering as CoreOrdering
    from ordering.backends import _registry
    from ordering.prefect import CausalOrdering, database_url

    def per_call(build: Callable[[], object]) -> str:
        # The best of five rounds: the machine is shared, and the minimum is the
        # figure least disturbed by other work.
        rounds = timeit.repeat(build, number=number // 5, repeat=5)
        return f"{min(rounds) / (number // 5) * 1e6:8.2f} µs"

    url = database_url()
    before = len(_registry.current())
    ours = per_call(lambda: CausalOrdering(scope="triggers"))
    after = len(_registry.current())
    backends = {id(CausalOrdering(scope="triggers").backend) for _ in range(1000)}
    print(f"{number:,} constructions each (best of 5 rounds), per construction:")
    print(f"  ordering.prefect.CausalOrdering(scope='triggers')  {ours}")
    print(f"  get_triggers_causal_ordering() (Prefect's accessor) {per_call(_accessor)}")
    print(
        f"  ordering.CausalOrdering('triggers', url=...)       "
        f"{per_call(lambda: CoreOrdering('triggers', url=url))}"
    )
    print(
        f"  Prefect's memory CausalOrdering(scope='triggers')  "
        f"{per_call(lambda: memory.CausalOrdering(scope='triggers'))}"
    )
    print(f"backends on this loop: {before} before, {after} after the constructions")
    print(f"distinct backends behind 1,000 orderings that touched the database: {len(backends)}")
    return 0


def _accessor() -> object:
    return get_triggers_causal_ordering()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.prefect_support")
    parser.add_argument("command", choices=["park", "release", "bench"])
    parser.add_argument("--number", type=int, default=100_000)
    args = parser.parse_args(argv)
    if args.command == "park":
        return asyncio.run(park())
    if args.command == "release":
        return asyncio.run(release())
    return asyncio.run(bench(args.number))


if __name__ == "__main__":
    sys.exit(main())
