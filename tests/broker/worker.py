"""What the broker tests' consumer processes share: the fault tests' worker (see
tests/fault/worker.py) with a handler that fails once on chosen events, and a tally
of the messages it holds.

Besides the fault worker's files, a consumer process writes ``<name>.consuming`` once
it consumes, ``<name>.got`` and ``<name>.settled`` (one line per message received,
and per message acknowledged or sent back: the difference is what it holds) and,
when it stops on SIGTERM, ``<name>.broker.json`` (its counts of messages).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from uuid import UUID

from ordering import CausalOrdering, ReceivedEvent, dispose
from tests.fault import handled
from tests.fault.worker import HandlerFailed, Worker, phase

logger = logging.getLogger("broker.worker")

#: How long a stopping consumer waits for the messages it holds to be settled.
DRAIN_TIMEOUT_S = 30.0


class BrokerWorker(Worker):
    """The fault worker, whose handler fails the first time this process is
    delivered one of ``fail_once`` by the broker (never for a follower a leader
    released or the sweep handed out: the test wants the broker to redeliver, and a
    swept follower that failed is kept in memory, lost if its process is killed)."""

    fail_once: set[UUID]

    async def record(self, event: ReceivedEvent, depth: int, attempt: str) -> None:
        if depth == 0 and phase.get() == "run" and event.id in self.fail_once:
            self.fail_once.discard(event.id)
            raise HandlerFailed(f"the handler failed once on {event.id}")
        await super().record(event, depth, attempt)


class Tally:
    """The messages a consumer received, settled and holds."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.counts: Counter[str] = Counter()
        self.holding = 0
        self.idle = asyncio.Event()  # set while no message is held
        self.idle.set()
        self._got = (run_dir / f"{name}.got").open("a", buffering=1)
        self._settled = (run_dir / f"{name}.settled").open("a", buffering=1)

    @asynccontextmanager
    async def message(self, tag: object, redelivered: bool) -> AsyncIterator[None]:
        self.holding += 1
        self.idle.clear()
        self._got.write(f"{tag}\n")
        self.counts["received"] += 1
        self.counts["redelivered"] += redelivered
        try:
            yield
            self._settled.write(f"{tag}\n")
        finally:
            self.holding -= 1
            if not self.holding:
                self.idle.set()

    async def drained(self) -> None:
        """Wait (within DRAIN_TIMEOUT_S) until no message is held."""
        try:
            await asyncio.wait_for(self.idle.wait(), DRAIN_TIMEOUT_S)
        except TimeoutError:
            logger.error("%d messages still held after %s s", self.holding, DRAIN_TIMEOUT_S)

    def close(self) -> None:
        self._got.close()
        self._settled.close()


#: What a broker's loop is given: the worker, the tally, and an event set on SIGTERM.
Consume = Callable[[argparse.Namespace, BrokerWorker, Tally, asyncio.Event], Awaitable[None]]


async def serve(args: argparse.Namespace, consume: Consume) -> None:
    """Run ``consume`` with a started worker until it returns; write the results."""
    run_dir = Path(args.run_dir)
    ordering = CausalOrdering(
        args.scope, url=args.url, lease_duration=timedelta(seconds=args.lease_seconds)
    )
    engine = handled.open_engine(args.url)
    worker = BrokerWorker(ordering, engine, args.name, run_dir)
    worker.fail_once = set(args.fail_once_on)
    tally = Tally(run_dir, args.name)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with worker:
            await consume(args, worker, tally, stop)
    finally:
        worker.close()
        tally.close()
        (run_dir / f"{args.name}.result.json").write_text(worker.stats.as_json())
        (run_dir / f"{args.name}.broker.json").write_text(json.dumps(dict(tally.counts)))
        await engine.dispose()
        await dispose()


def parser(prog: str) -> argparse.ArgumentParser:
    """The options every consumer process takes; a broker's module adds its own."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--url", required=True, help="the store's database URL")
    parser.add_argument("--scope", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--lease-seconds", type=float, default=3.0)
    parser.add_argument("--fail-once-on", type=UUID, nargs="*", default=[])
    return parser


def main(args: argparse.Namespace, consume: Consume) -> None:
    logging.basicConfig(
        filename=str(Path(args.run_dir) / f"{args.name}.log"),
        level=os.environ.get("ORDERING_FAULT_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(serve(args, consume))
