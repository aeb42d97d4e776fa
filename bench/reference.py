"""A reference row: Prefect's own in-memory ordering through the same workloads.

When ``prefect`` is importable in the interpreter running the bench, or from another
interpreter given with ``--prefect-python`` (one where prefect is installed; this
checkout is put on its PYTHONPATH).  Prefect is never installed for this.  Prefect's
ordering keeps everything in dicts of one process: a ceiling a SQL store cannot reach,
not a target.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

from .results import WorkloadResult
from .workloads import WORKLOADS, Consumer, check_causal, deliver, make_specs, materialize

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


def run_elsewhere(
    python: str, workloads: Sequence[str], events: int, seed: int
) -> tuple[list[WorkloadResult], str | None]:
    """The reference rows from another interpreter (one that has prefect), so that the
    SQL rows keep running in the development environment."""
    root = Path(__file__).resolve().parent.parent
    command = [python, "-m", "bench.reference", "--events", str(events), "--seed", str(seed)]
    for workload in workloads:
        command += ["--workload", workload]
    environment = {**os.environ, "PYTHONPATH": str(root)}
    try:
        done = subprocess.run(
            command, cwd=root, env=environment, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        return [], f"Prefect's in-memory reference failed under {python}: {exc} {detail[-500:]}"
    rows, note = json.loads(done.stdout)
    return [WorkloadResult(**row) for row in rows], note


def main() -> None:
    """``python -m bench.reference``: the reference rows as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.reference")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--workload", action="append", choices=WORKLOADS)
    args = parser.parse_args()
    rows, note = asyncio.run(run_prefect_memory(args.workload or WORKLOADS, args.events, args.seed))
    print(json.dumps([[dataclasses.asdict(row) for row in rows], note]))


if __name__ == "__main__":
    main()
