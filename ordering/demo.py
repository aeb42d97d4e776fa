"""`ordering demo`: a jumbled stream of events, handled in causal order, through the store."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from . import admin
from .causal import CausalOrdering, dispose
from .consumer import OrderedConsumer, Verdict
from .models import ReceivedEvent
from .urls import safe_url

SCOPE = "demo"


def demo_events(chains: int = 3, length: int = 4) -> list[ReceivedEvent]:
    """Causal chains (each step follows the one before) and one orphan whose leader
    never arrives."""
    start = datetime.now(UTC) - timedelta(seconds=60)
    events: list[ReceivedEvent] = []
    for c in range(chains):
        leader: UUID | None = None
        for step in range(length):
            event = ReceivedEvent(
                occurred=start + timedelta(seconds=step),
                event=f"order-{c + 1}.step-{step + 1}",
                resource={"prefect.resource.id": f"demo.order.{c + 1}"},
                follows=leader,
            )
            events.append(event)
            leader = event.id
    events.append(
        ReceivedEvent(
            occurred=start,
            event="orphan.step-2",
            resource={"prefect.resource.id": "demo.orphan"},
            follows=uuid4(),  # a leader that never comes
        )
    )
    return events


async def run_demo(url: str, *, seed: int = 7) -> int:
    ordering = CausalOrdering(SCOPE, url=url)
    await ordering.clear()
    events = demo_events()
    names = {e.id: e.event for e in events}
    delivery = events[:]
    random.Random(seed).shuffle(delivery)
    handled: list[ReceivedEvent] = []
    delivered: ReceivedEvent | None = None

    async def handle(event: ReceivedEvent) -> None:
        handled.append(event)
        if event is not delivered:
            print(f"      -> released {event.event} (its leader has now been handled)")

    print(f"ordering demo on {safe_url(url)}, scope {SCOPE!r}")
    print(f"\nDelivering {len(delivery)} events in a jumbled order:")
    # The consumer a broker callback would use (README, "Use it in a consumer"); the
    # demo has no lost followers to sweep before the lookback, so no background sweep.
    async with OrderedConsumer(ordering, handle, sweep_interval=None) as consumer:
        for delivered in delivery:
            leader = names.get(delivered.follows) if delivered.follows else None
            print(
                f"  {delivered.event:<16} "
                + (
                    f"follows {leader}"
                    if leader
                    else "follows nothing"
                    if delivered.follows is None
                    else "follows an event that never arrives"
                )
            )
            outcome = await consumer.deliver(delivered)
            if outcome.verdict is Verdict.PARKED:
                print("      parked: its leader has not been handled yet")
            elif not outcome.acknowledge:
                print(f"      {outcome.verdict.value}: {outcome.error!r}")

    print("\nHandled, in this order:")
    position = {e.id: i for i, e in enumerate(handled)}
    in_order = True
    for i, event in enumerate(handled, 1):
        note = ""
        if event.follows in position:
            ok = position[event.follows] < position[event.id]
            in_order &= ok
            note = f"after {names[event.follows]} (#{position[event.follows] + 1})" + (
                "" if ok else "  OUT OF ORDER"
            )
        print(f"  {i:>2}. {event.event:<16} {note}")
    print(
        f"\nEvery handled event came after its leader: {'yes' if in_order else 'NO'} "
        f"({len(handled)} of {len(events)} handled; the orphan waits for its leader)"
    )

    (scope_status,) = await admin.status(ordering.url, scope=SCOPE)
    counts = {
        "seen events": scope_status.seen_live + scope_status.seen_expired,
        "processing leases": scope_status.leases_live + scope_status.leases_expired,
        "waiting followers": scope_status.waiting_unclaimed
        + scope_status.waiting_claimed
        + scope_status.waiting_claim_expired,
    }
    print(f"\nThe tables now hold, for scope {SCOPE!r}:")
    for label, count in counts.items():
        print(f"  {label:<18} {count}")
    print(
        "  (the orphan stays among the waiting followers until the 15-minute lookback "
        "passes;\n   get_lost_followers() then hands it out)"
    )
    await dispose()
    return 0 if in_order and len(handled) == len(events) - 1 else 1
