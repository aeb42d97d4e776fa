"""A reference row: Prefect's own in-memory ordering through the same workloads.

Only when ``prefect`` is importable in the interpreter running the bench; it is never
installed for this (run the bench from an environment that has both packages to get
the row).  It keeps everything in dicts of one process, so it is the ceiling a SQL
store cannot reach, not a target.
"""

from __future__ import annotations

import importlib
import importlib.util
import uuid
from collections.abc import Sequence

from .results import WorkloadResult
from .workloads import Consumer, check_causal, deliver, make_specs, materialize

MODULE = "prefect.server.events.ordering.memory"


def prefect_available() -> bool:
    try:
        return importlib.util.find_spec(MODULE) is not None
    except ModuleNotFoundError:
        return False


async def run_prefect_memory(
    workloads: Sequence[str], events: int, seed: int
) -> tuple[list[WorkloadResult], str | None]:
    if not prefect_available():
        return [], "Prefect's in-memory reference skipped: prefect is not importable here"
    # imported by name: prefect is optional and untyped for this checkout's mypy
    EventArrivedEarly = importlib.import_module("prefect.server.events.ordering").EventArrivedEarly
    CausalOrdering = importlib.import_module(MODULE).CausalOrdering
    ReceivedEvent = importlib.import_module("prefect.server.events.schemas.events").ReceivedEvent

    # warm imports and code paths, as the SQL runs are warmed
    for workload in workloads:
        await _run(CausalOrdering, EventArrivedEarly, ReceivedEvent, workload, 50, seed)
    rows = [
        await _run(CausalOrdering, EventArrivedEarly, ReceivedEvent, workload, events, seed)
        for workload in workloads
    ]
    return rows, None


async def _run(
    ordering_class: type,
    arrived_early: type[BaseException],
    model: type,
    workload: str,
    events: int,
    seed: int,
) -> WorkloadResult:
    specs = make_specs(workload, events, seed)
    ordering = ordering_class(f"bench-{workload}-{uuid.uuid4().hex[:10]}")
    consumer = Consumer(lambda: ordering, arrived_early)
    timing = await deliver(consumer, materialize(specs, model))
    check_causal(consumer.handled, specs)
    return WorkloadResult.build(
        "prefect memory", None, workload, len(specs), timing, consumer.parked, None
    )
