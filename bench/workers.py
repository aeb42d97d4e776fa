"""Several worker processes on one PostgreSQL database.

The workload's chains (or independent events) are dealt out to the workers, each
worker delivering its share in order through the consumer pattern.  Every worker
warms up, then all start together at a barrier; total events/s is all events over the
span from the first start to the last finish, compared with one worker doing all of
them the same way.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
import uuid
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from typing import Any

from ordering import CausalOrdering, EventArrivedEarly, ReceivedEvent, dispose

from .memory import rss_kib
from .results import WorkersRun
from .sql import warm_up
from .workloads import Consumer, Spec, check_causal, deliver, make_specs, materialize

WORKLOADS = ("in-order", "independent")
BARRIER_TIMEOUT_S = 120.0


def deal(specs: Sequence[Spec], workers: int) -> list[list[Spec]]:
    """Whole chains to each worker, so each worker's share keeps its causal order."""
    shares: list[list[Spec]] = [[] for _ in range(workers)]
    for spec in specs:
        shares[spec.chain % workers].append(spec)
    return shares


async def _work(url: str, scope: str, share: list[Spec], barrier: Barrier, seed: int) -> Any:
    try:
        await warm_up(url, seed)
        ordering = CausalOrdering(scope, url=url)
        consumer = Consumer(lambda: ordering, EventArrivedEarly)
        events = materialize(share, ReceivedEvent)
        barrier.wait(timeout=BARRIER_TIMEOUT_S)
        started = time.monotonic()
        await deliver(consumer, events)
        finished = time.monotonic()
        check_causal(consumer.handled, share)
        return len(share), started, finished, rss_kib()
    finally:
        await dispose()


def _worker(url: str, scope: str, share: list[Spec], barrier: Barrier, seed: int, out: Any) -> None:
    out.put(asyncio.run(_work(url, scope, share, barrier, seed)))


def _run(url: str, workload: str, workers: int, events: int, seed: int) -> WorkersRun:
    context = multiprocessing.get_context("spawn")
    specs = make_specs(workload, events, seed)
    scope = f"bench-workers-{uuid.uuid4().hex[:10]}"
    barrier = context.Barrier(workers)
    out = context.Queue()
    processes = [
        context.Process(target=_worker, args=(url, scope, share, barrier, seed, out))
        for share in deal(specs, workers)
    ]
    for process in processes:
        process.start()
    reports = _collect(out, processes)
    for process in processes:
        process.join(timeout=60)
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"worker processes failed with exit codes {failed}")
    span = max(r[2] for r in reports) - min(r[1] for r in reports)
    return WorkersRun(
        workload=workload,
        workers=workers,
        events=sum(r[0] for r in reports),
        seconds=span,
        events_per_s=sum(r[0] for r in reports) / span,
        per_worker_events_per_s=[r[0] / (r[2] - r[1]) for r in reports],
        rss_kib=[r[3] for r in reports],
    )


def _collect(out: Any, processes: Sequence[BaseProcess]) -> list[Any]:
    """Each worker's report; fails as soon as a worker dies instead of waiting on it."""
    reports: list[Any] = []
    while len(reports) < len(processes):
        try:
            reports.append(out.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"worker processes failed with exit codes {dead}") from None
    return reports


def measure(url: str, workers: int, events: int, seed: int) -> list[WorkersRun]:
    runs: list[WorkersRun] = []
    for workload in WORKLOADS:
        for count in dict.fromkeys((1, workers)):
            runs.append(_run(url, workload, count, events, seed))
    return runs
