"""Test helpers: a clock tests can move, event factories, and a consumer like a user's."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID, uuid4

from ordering import CausalOrdering, EventArrivedEarly, ReceivedEvent
from ordering.causal import dispose_engines
from ordering.models import utc_now

T = TypeVar("T")


def real_clock() -> MutableClock:
    """A movable clock that starts at the real current time."""
    return MutableClock(utc_now())


class MutableClock:
    """A clock for CausalOrdering(clock=...): stands still until a test moves it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def make_event(
    clock: Callable[[], datetime],
    *,
    name: str = "test.event",
    follows: UUID | None = None,
    id: UUID | None = None,
    occurred: datetime | None = None,
    received: datetime | None = None,
) -> ReceivedEvent:
    now = clock()
    return ReceivedEvent(
        occurred=occurred or now,
        event=name,
        resource={"prefect.resource.id": f"test.resource.{name}"},
        id=id or uuid4(),
        follows=follows,
        received=received or now,
    )


def make_chain(clock: MutableClock, length: int, name: str = "chain") -> list[ReceivedEvent]:
    """Events each following the one before, occurring a second apart."""
    events: list[ReceivedEvent] = []
    for i in range(length):
        events.append(
            make_event(
                clock,
                name=f"{name}.{i}",
                follows=events[-1].id if events else None,
                occurred=clock() + timedelta(seconds=i),
            )
        )
    return events


@dataclass
class Consumer:
    """The consumer a user writes: the handler re-enters preceding_event_confirmed."""

    ordering: CausalOrdering[ReceivedEvent]
    reenter: bool = True
    handled: list[ReceivedEvent] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    fail_on: set[UUID] = field(default_factory=set)

    async def handler(self, event: ReceivedEvent, depth: int = 0) -> None:
        if self.reenter:
            async with self.ordering.preceding_event_confirmed(self.handler, event, depth=depth):
                self._handle(event, depth)
        else:
            self._handle(event, depth)

    def _handle(self, event: ReceivedEvent, depth: int) -> None:
        if event.id in self.fail_on:
            raise RuntimeError(f"handler failed on {event.event}")
        self.handled.append(event)
        self.depths.append(depth)

    async def consume(self, event: ReceivedEvent) -> bool:
        """Top-level delivery; False when the event arrived early and was parked."""
        try:
            async with self.ordering.preceding_event_confirmed(self.handler, event):
                self._handle(event, 0)
        except EventArrivedEarly:
            return False
        return True

    @property
    def names(self) -> list[str]:
        return [e.event for e in self.handled]


def assert_causal(handled: list[ReceivedEvent], events: list[Any]) -> None:
    """Every event handled exactly once, each after the event it follows."""
    position = {e.id: i for i, e in enumerate(handled)}
    assert len(position) == len(handled), "an event was handled twice"
    assert set(position) == {e.id for e in events}, "not every event was handled"
    for e in events:
        if e.follows is not None and e.follows in position:
            assert position[e.follows] < position[e.id], f"{e.event} was handled before its leader"


def run_in_threads(count: int, work: Callable[[int], Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``work(i)`` for i in range(count), each in its own thread and event loop, so
    each gets its own engine and connections: real concurrency against the database."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def target(i: int) -> None:
        async def main() -> T:
            try:
                await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
                return await work(i)
            finally:
                await dispose_engines()

        try:
            results[i] = asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
