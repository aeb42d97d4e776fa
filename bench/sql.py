"""Running the workloads on the SQL store, with its statements counted."""

from __future__ import annotations

import cProfile
import gc
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from ordering import CausalOrdering, EventArrivedEarly, ReceivedEvent

from .counting import SqlCounter
from .cpu import ServerCpu, process_cpu_s
from .results import Construction, WorkloadResult
from .workloads import WORKLOADS, Consumer, check_causal, deliver, make_specs, materialize

#: Each workload, and the in-order one with a new CausalOrdering per call.
PER_CALL = "in-order, new CausalOrdering per call"


def new_scope(label: str) -> str:
    return f"bench-{label.split(',')[0]}-{uuid.uuid4().hex[:10]}"


def _always(ordering: CausalOrdering[ReceivedEvent]) -> Callable[[], Any]:
    return lambda: ordering


async def warm_up(url: str, seed: int) -> None:
    """Open the pool, check the schema and prepare every hot-path statement once, so
    the timed runs see a warm statement cache (asyncpg prepares on first use)."""
    for workload in WORKLOADS:
        specs = make_specs(workload, 50, seed)
        ordering = CausalOrdering(new_scope("warmup"), url=url)
        consumer = Consumer(_always(ordering), EventArrivedEarly)
        await deliver(consumer, materialize(specs, ReceivedEvent))
        check_causal(consumer.handled, specs)


async def run_workload(
    url: str,
    dialect: str,
    workload: str,
    events: int,
    seed: int,
    *,
    per_call: bool = False,
    scope: str | None = None,
    profiler: cProfile.Profile | None = None,
    count: bool = True,
) -> WorkloadResult:
    """One workload on a fresh scope (or ``scope``); with ``count``, its statements are
    counted through SQLAlchemy's hooks in a pass of their own first (on another fresh
    scope), so that the listeners' cost stays out of the timed pass."""
    counts = None
    if count:
        counts = await _count_statements(url, workload, events, seed, per_call=per_call)
    specs = make_specs(workload, events, seed)
    scope = scope or new_scope(workload)
    ordering = CausalOrdering(scope, url=url)
    ordering_for: Callable[[], Any] = (
        (lambda: CausalOrdering(scope, url=url)) if per_call else (lambda: ordering)
    )
    consumer = Consumer(ordering_for, EventArrivedEarly)
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
        PER_CALL if per_call else workload,
        len(specs),
        timing,
        consumer.parked,
        counts,
    )
    result.client_cpu_us_per_event = client_cpu / result.events * 1e6
    if server is not None and server.readable and server_cpu is not None:
        result.server_cpu_us_per_event = server_cpu / result.events * 1e6
    return result


async def _count_statements(
    url: str, workload: str, events: int, seed: int, *, per_call: bool
) -> Any:
    """The statements, transactions and hops of one pass of the workload, counted."""
    scope = new_scope(workload)
    ordering = CausalOrdering(scope, url=url)
    ordering_for: Callable[[], Any] = (
        (lambda: CausalOrdering(scope, url=url)) if per_call else (lambda: ordering)
    )
    consumer = Consumer(ordering_for, EventArrivedEarly)
    counter = SqlCounter(ordering.store.engine)
    with counter.attached():
        await deliver(consumer, materialize(make_specs(workload, events, seed), ReceivedEvent))
    return counter.counts


async def measure_construction(url: str, dialect: str, count: int) -> Construction:
    """What ``CausalOrdering(scope)`` costs, and that instances share one engine."""
    engines_before = _live_engines()
    clock = time.perf_counter_ns
    scopes = [f"bench-construct-{i}" for i in range(count)]
    started = clock()
    for scope in scopes:
        CausalOrdering(scope, url=url)
    construct_ns = clock() - started
    started = clock()
    engines = set()
    for scope in scopes:
        engines.add(id(CausalOrdering(scope, url=url).store.engine))
    store_ns = clock() - started
    return Construction(
        dialect=dialect,
        constructions=count,
        construct_us=construct_ns / count / 1000,
        construct_and_store_us=store_ns / count / 1000,
        distinct_engines=len(engines),
        engines_before=engines_before,
        engines_after=_live_engines(),
    )


def _live_engines() -> int:
    """Engines alive in this process, found without relying on the library's internals."""
    return sum(isinstance(o, AsyncEngine) for o in gc.get_objects())
