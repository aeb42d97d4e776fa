"""Running the workloads on the SQL store, with its statements counted."""

from __future__ import annotations

import cProfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from ordering import CausalOrdering, EventArrivedEarly, ReceivedEvent

from .counting import Counts, counter_for, live_shared_objects, shared_accessor
from .cpu import ServerCpu, process_cpu_s
from .results import Construction, WorkloadResult
from .workloads import (
    PER_CALL,
    PREFECT_CALLS,
    WARM_UP_CONSUMERS,
    WORKLOADS,
    Consumer,
    check_causal,
    deliver,
    deliver_among_consumers,
    make_consumer,
    make_specs,
    materialize,
)

__all__ = [
    "PER_CALL",
    "PREFECT_CALLS",
    "measure_construction",
    "run_consumers",
    "run_workload",
    "warm_up",
]


def new_scope(label: str) -> str:
    return f"bench-{label.split(',')[0]}-{uuid.uuid4().hex[:10]}"


def _always(ordering: CausalOrdering[ReceivedEvent]) -> Callable[[], Any]:
    return lambda: ordering


async def warm_up(url: str, seed: int) -> None:
    """Open the pool, check the database's revision and prepare every hot-path statement once, the
    batched ones included, so that the timed runs see a warm statement cache (asyncpg
    prepares on first use)."""
    for workload in WORKLOADS:
        specs = make_specs(workload, 50, seed)
        ordering = CausalOrdering(new_scope("warmup"), url=url)
        consumer = Consumer(_always(ordering), EventArrivedEarly)
        await deliver(consumer, materialize(specs, ReceivedEvent))
        check_causal(consumer.handled, specs)
    await run_consumers(url, "warm-up", WARM_UP_CONSUMERS, 4 * WARM_UP_CONSUMERS, seed)


async def run_workload(
    url: str,
    dialect: str,
    workload: str,
    events: int,
    seed: int,
    *,
    per_call: bool = False,
    prefect_calls: bool = False,
    scope: str | None = None,
    profiler: cProfile.Profile | None = None,
    count: bool = True,
    notes: list[str] | None = None,
) -> WorkloadResult:
    """One workload on a fresh scope (or ``scope``); with ``count``, its statements are
    counted in a pass of their own first (on another fresh scope), so that the
    counters' cost stays out of the timed pass.  When they cannot be counted, the
    row says n/a and the reason goes to ``notes``."""
    counts: Counts | None = None
    uncounted = ""
    if count:
        counts, why = await _count_statements(
            url, workload, events, seed, per_call=per_call, prefect_calls=prefect_calls
        )
        if counts is None:
            uncounted = "n/a"
            if notes is not None and why and f"statements not counted: {why}" not in notes:
                notes.append(f"statements not counted: {why}")
    specs = make_specs(workload, events, seed)
    the_scope = scope or new_scope(workload)
    consumer = make_consumer(
        lambda: CausalOrdering(the_scope, url=url),
        EventArrivedEarly,
        per_call=per_call,
        prefect_calls=prefect_calls,
    )
    models = materialize(specs, ReceivedEvent)
    server = ServerCpu(url) if dialect == "postgresql" else None
    server_before = await server.snapshot() if server else {}
    cpu_before = process_cpu_s()
    timing = await deliver(consumer, models, profiler)
    client_cpu = process_cpu_s() - cpu_before
    server_cpu = ServerCpu.spent(server_before, await server.snapshot()) if server else None
    check_causal(consumer.handled, specs)
    result = WorkloadResult.build(
        "ordering",
        dialect,
        PREFECT_CALLS if prefect_calls else PER_CALL if per_call else workload,
        len(specs),
        timing,
        consumer.parked,
        counts,
    )
    result.counting = result.counting or uncounted
    result.client_cpu_us_per_event = client_cpu / result.events * 1e6
    if server is not None and server.readable and server_cpu is not None:
        result.server_cpu_us_per_event = server_cpu / result.events * 1e6
    return result


async def _count_statements(
    url: str, workload: str, events: int, seed: int, *, per_call: bool, prefect_calls: bool
) -> tuple[Counts | None, str | None]:
    """The statements, transactions and hops of one pass of the workload, counted; or
    ``None`` and why, when the library offers no way in."""
    scope = new_scope(workload)
    ordering = CausalOrdering(scope, url=url)
    await ordering.event_has_been_seen(uuid.uuid4())  # its backend now exists on this loop
    counter, why = counter_for(ordering)
    if counter is None:
        return None, why
    consumer = make_consumer(
        lambda: CausalOrdering(scope, url=url),
        EventArrivedEarly,
        per_call=per_call,
        prefect_calls=prefect_calls,
    )
    with counter.attached():
        await deliver(consumer, materialize(make_specs(workload, events, seed), ReceivedEvent))
    return counter.counts, None


async def run_consumers(
    url: str,
    dialect: str,
    consumers: int,
    events: int,
    seed: int,
    workload: str = "independent",
    prefect_calls: bool = False,
) -> WorkloadResult:
    """``deliver_among_consumers`` with CausalOrdering instances on one scope (instances
    on one URL share the backend and its pool)."""
    scope = new_scope(workload)
    run = await deliver_among_consumers(
        lambda: CausalOrdering(scope, url=url),
        EventArrivedEarly,
        ReceivedEvent,
        consumers=consumers,
        workload=workload,
        events=events,
        seed=seed,
        prefect_calls=prefect_calls,
    )
    return WorkloadResult.of_consumers("ordering", dialect, run)


async def measure_construction(url: str, dialect: str, count: int) -> Construction:
    """What ``CausalOrdering(scope)`` costs, and that instances share one backend (or
    engine); the sharing is n/a when the library does not show what it shares."""
    engines_before = live_shared_objects()
    clock = time.perf_counter_ns
    scopes = [f"bench-construct-{i}" for i in range(count)]
    started = clock()
    for scope in scopes:
        CausalOrdering(scope, url=url)
    construct_ns = clock() - started
    accessor = shared_accessor(CausalOrdering(scopes[0], url=url))
    shared: set[int] = set()
    started = clock()
    if accessor is not None:
        for scope in scopes:
            shared.add(id(accessor(CausalOrdering(scope, url=url))))
    store_ns = clock() - started
    return Construction(
        dialect=dialect,
        constructions=count,
        construct_us=construct_ns / count / 1000,
        construct_and_store_us=None if accessor is None else store_ns / count / 1000,
        distinct_engines=None if accessor is None else len(shared),
        engines_before=engines_before,
        engines_after=live_shared_objects(),
    )
