"""A worker process: a user's consumer written with ``OrderedConsumer``, fed from a
file instead of a broker, plus the final sweep.

    python -m tests.fault.worker run --url URL --scope S --name w0 --queue Q --run-dir D \
        [--consumers N]
    python -m tests.fault.worker sweep --url URL --scope S --name sweep --run-dir D \
        --clock-offset-seconds 960

The worker talks to the test through files in the run directory:

* ``<name>.acks``: the id of every delivery it is done with (handled, already seen,
  or parked because it arrived early), one per line, written as it goes; what a
  killed worker had not acknowledged is redelivered to another worker, as a broker
  would.
* ``<name>.done``: the attempt id of every handler call that went through
  ``preceding_event_confirmed`` to the end, written as it goes (for a worker killed
  at a random moment, the checker tells its completed calls from those in flight).
* ``<name>.drained``: exists while its queue is empty.
* ``<name>.blocked``: written by the handler of ``--block-on`` just before it hangs
  (event id, depth, phase), so that the test can kill the worker at exactly that
  point.
* ``<name>.paused`` / ``<name>.resume``: with ``--pause-before-confirm``, the worker
  stops after that event's seen check until the test writes ``<name>.resume``.
* ``stop``: the test asks every worker to finish once its queue is empty.
* ``<name>.result.json``: what the worker did, written when it exits.
* ``<name>.library``: the file of the ``ordering`` package it imported, written at
  the start.

A previous release's ``ordering`` runs this module too (tests/fault/test_previous_release.py):
it uses only what that release has.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import logging
import os
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine

import ordering as ordering_package
from ordering import (
    CausalOrdering,
    EventArrivedEarly,
    EventBeingProcessed,
    OrderedConsumer,
    Outcome,
    ReceivedEvent,
    StoreUnavailable,
    Verdict,
    dispose,
)
from ordering.models import utc_now

from . import handled
from .workload import read_queue

logger = logging.getLogger("fault.worker")

#: How often a running worker asks for lost followers (claims whose holder died).
LOST_POLL_SECONDS = 1.0
#: How long a worker waits before retrying an event that another worker holds.
REQUEUE_SLEEP_SECONDS = 0.05
#: How long a worker waits after an error before trying the event again.
ERROR_SLEEP_SECONDS = 0.2
IDLE_SLEEP_SECONDS = 0.1
#: A bound on the final sweep's rounds, so that a bug cannot make it spin forever.
SWEEP_ROUNDS = 10

#: Where the handling in progress came from: a delivery, the lost-follower poll, or the
#: final sweep.  The checker uses it to tell "re-handled while running" from "left
#: until the lookback had passed".
phase: contextvars.ContextVar[str] = contextvars.ContextVar("fault_phase", default="run")
#: The handler call in progress: its attempt id, and its depth (0: a delivery or a lost
#: follower; more: a follower a leader released).
_attempt: contextvars.ContextVar[tuple[str, int]] = contextvars.ContextVar("fault_attempt")


class RecordFailed(Exception):
    """The handler could not write its own row (the database went away)."""


class HandlerFailed(Exception):
    """The user's code failed on this event (``--fail-once-on``)."""


@dataclass
class Stats:
    """What one worker did; written to ``<name>.result.json``."""

    deliveries: int = 0
    recorded: int = 0
    skipped_seen: int = 0
    arrived_early: int = 0
    being_processed: int = 0
    lost_followers: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    #: Statements sent, by name (``begin_batch``: one round trip for several callers).
    statements: Counter[str] = field(default_factory=Counter)
    #: Handler calls (attempt id -> event id) that failed after they may have written
    #: their row, before the ordering marked the event seen: it will be handled again.
    interrupted: dict[str, str] = field(default_factory=dict)

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] += 1
        if self.errors[name] <= 3:  # a few of each kind
            self.error_samples.append(f"{name}: {exc}"[:500])

    def as_json(self) -> str:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        # A Counter is a dict to json, but asdict() would mangle it.
        data["errors"] = dict(self.errors)
        data["statements"] = dict(self.statements)
        return json.dumps(data, indent=2, sort_keys=True)


@dataclass
class Faults:
    """Where the test wants this worker to misbehave, each keyed by an event id."""

    #: Hang in the handler, after writing the row, so that the test kills us there...
    block_on: UUID | None = None
    #: ... unless this many handlers (of any worker) already hang on it.
    block_times: int = 1
    #: Stop between the event's seen check and preceding_event_confirmed.
    pause_before_confirm: UUID | None = None
    #: Raise from the handler the first time it gets the event.
    fail_once_on: UUID | None = None


class Worker(OrderedConsumer[ReceivedEvent]):
    """The consumer a user writes with ``OrderedConsumer``, watched closely: each
    handler call gets an attempt id (its row names it, and ``<name>.done`` lists it
    once the call went through ``preceding_event_confirmed`` to the end), and the
    outcome of each delivery is counted."""

    def __init__(
        self,
        ordering: CausalOrdering[ReceivedEvent],
        engine: AsyncEngine,
        name: str,
        run_dir: Path,
        faults: Faults | None = None,
        *,
        sweep: bool = True,
    ) -> None:
        super().__init__(
            ordering,
            self.record_handling,
            sweep_interval=timedelta(seconds=LOST_POLL_SECONDS) if sweep else None,
            retry_after=timedelta(seconds=REQUEUE_SLEEP_SECONDS),
        )
        self.engine = engine
        self.name = name
        self.run_dir = run_dir
        self.faults = faults or Faults()
        self.stats = Stats()
        self._acks = (run_dir / f"{name}.acks").open("a", buffering=1)
        self._done = (run_dir / f"{name}.done").open("a", buffering=1)
        #: When each delivery was acknowledged (the failover test measures the pause).
        self._ack_times = (run_dir / f"{name}.ack-times").open("a", buffering=1)
        #: Followers get_lost_followers handed out (and so took out of the store).
        self._taken = (run_dir / f"{name}.taken").open("a", buffering=1)
        hand_out = self.ordering.get_lost_followers

        async def handed_out() -> list[ReceivedEvent]:
            found = await hand_out()
            self._taken.writelines(f"{follower.id}\n" for follower in found)
            return found

        self.ordering.get_lost_followers = handed_out  # type: ignore[method-assign]

    # -- the user's code, watched ------------------------------------------------------

    async def handle(self, event: ReceivedEvent, depth: int = 0) -> None:
        attempt = uuid.uuid4().hex
        token = _attempt.set((attempt, depth))
        try:
            if depth == 0 and event.id == self.faults.pause_before_confirm:
                await self._pause()  # after the seen check, before confirming
            await super().handle(event, depth)
        except BaseException as exc:
            self._note_interruption(exc, event, attempt)
            raise
        finally:
            _attempt.reset(token)
        self._done.write(f"{attempt} {event.id}\n")

    async def record_handling(self, event: ReceivedEvent) -> None:
        """The handler a user gives the consumer: its side effect is one durable row."""
        attempt, depth = _attempt.get()
        await self.record(event, depth, attempt)

    def on_outcome(self, event: ReceivedEvent, outcome: Outcome) -> None:
        super().on_outcome(event, outcome)
        counter = _COUNTED.get(outcome.verdict)
        if counter is not None:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        if outcome.error is not None and outcome.verdict is not Verdict.BUSY:
            logger.warning("delivery of %s failed: %r", event.id, outcome.error)
            self.stats.error(outcome.error)

    async def sweep(self) -> int:
        """A round of the lost-follower sweep, its handlings marked as such."""
        token = phase.set("lost" if phase.get() == "run" else phase.get())
        try:
            taken = await super().sweep()
        finally:
            phase.reset(token)
        self.stats.lost_followers += taken
        return taken

    async def consume(self, event: ReceivedEvent) -> bool:
        """One delivery; False: deliver it again later (after a pause, as a broker
        that redelivers a nacked message after a delay would)."""
        self.stats.deliveries += 1
        outcome = await self.deliver(event)
        if outcome.acknowledge:
            return True
        delay = outcome.retry_after if outcome.verdict is Verdict.BUSY else None
        await asyncio.sleep(ERROR_SLEEP_SECONDS if delay is None else delay)
        return False

    # -- the durable side effect -----------------------------------------------------

    async def record(self, event: ReceivedEvent, depth: int, attempt: str) -> None:
        if event.id == self.faults.fail_once_on:
            self.faults.fail_once_on = None
            raise HandlerFailed(f"the handler failed on {event.id} at depth {depth}")
        try:
            await handled.record(self.engine, event.id, attempt, self.name, depth, phase.get())
        except Exception as exc:
            raise RecordFailed(f"could not record {event.id}: {exc!r}") from exc
        self.stats.recorded += 1
        if event.id == self.faults.block_on:
            await self._block(event, depth, attempt)

    async def _block(self, event: ReceivedEvent, depth: int, attempt: str) -> None:
        """Hang (holding whatever the ordering gave us) until the test kills us."""
        if len(list(self.run_dir.glob("*.blocked"))) >= self.faults.block_times:
            return
        blocked = f"{event.id} {depth} {phase.get()} {attempt}\n"
        (self.run_dir / f"{self.name}.blocked").write_text(blocked)
        logger.warning("blocking in the handler of %s at depth %d", event.id, depth)
        await asyncio.Event().wait()

    async def _pause(self) -> None:
        """Stop between the seen check and preceding_event_confirmed until the test
        says go: the window in which another worker may complete the same event."""
        (self.run_dir / f"{self.name}.paused").touch()
        resume = self.run_dir / f"{self.name}.resume"
        while not resume.exists():  # noqa: ASYNC110 (the signal is a file from the test)
            await asyncio.sleep(0.02)

    def _note_interruption(self, exc: BaseException, event: ReceivedEvent, attempt: str) -> None:
        """Report a handler call that failed: its row, if it wrote one (even an INSERT
        that raised may have committed), is not a completed handling.  A failure that a
        follower's handler raised, after this event was completed, is the follower's."""
        if isinstance(exc, (EventArrivedEarly, EventBeingProcessed)):
            return  # raised before the body ran: no row
        if getattr(exc, "_fault_raised_by", None) is None:
            setattr(exc, "_fault_raised_by", event.id)  # noqa: B010
            logger.warning("handling %s failed: %r", event.id, exc)
            self.stats.interrupted[attempt] = str(event.id)

    # -- the loop ----------------------------------------------------------------------

    def ack(self, event: ReceivedEvent) -> None:
        self._acks.write(f"{event.id}\n")
        self._ack_times.write(f"{time.time():.6f}\n")

    async def run(self, queue: list[ReceivedEvent], consumers: int = 1) -> None:
        """Deliver the queue with ``consumers`` tasks at once, as a consumer with that
        much prefetch does (their calls then share round trips); the consumer's own
        sweep hands out lost followers meanwhile."""
        pending = deque(queue)
        drained = self.run_dir / f"{self.name}.drained"
        stop = self.run_dir / "stop"
        busy = 0  # tasks handling a delivery

        async def consume_until_stopped() -> None:
            nonlocal busy
            while True:
                if pending:
                    drained.unlink(missing_ok=True)
                    event = pending.popleft()
                    busy += 1
                    try:
                        done = await self.consume(event)
                    finally:
                        busy -= 1
                    if done:
                        self.ack(event)
                    else:
                        pending.append(event)
                    continue
                if not busy:
                    drained.touch()
                    if stop.exists():
                        return
                await asyncio.sleep(IDLE_SLEEP_SECONDS)

        async with self, asyncio.TaskGroup() as group:
            for _ in range(consumers):
                group.create_task(consume_until_stopped())

    async def final_sweep(self) -> None:
        """The final sweep: with the clock past the lookback, hand out what is left.

        Rounds repeat while they find something, since handling a lost follower
        can release (and so hand out) its own followers, never strand new ones.
        """
        token = phase.set("sweep")
        try:
            for _ in range(SWEEP_ROUNDS):
                try:
                    found = await self.sweep()
                except StoreUnavailable as exc:
                    self.stats.error(exc)
                    continue
                if not found and not self._lost:
                    return
        finally:
            phase.reset(token)
            await self.aclose()

    def close(self) -> None:
        self._acks.close()
        self._done.close()
        self._ack_times.close()
        self._taken.close()


#: The counters of Stats that a delivery's verdict adds to.
_COUNTED = {
    Verdict.DUPLICATE: "skipped_seen",
    Verdict.PARKED: "arrived_early",
    Verdict.BUSY: "being_processed",
}


def offset_clock(seconds: float) -> Callable[[], datetime]:
    """The real time, moved by ``seconds``: the sweep runs "after the lookback"."""
    offset = timedelta(seconds=seconds)
    return lambda: utc_now() + offset


async def main_async(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    (run_dir / f"{args.name}.library").write_text(str(ordering_package.__file__))
    ordering = CausalOrdering(
        args.scope,
        url=args.url,
        clock=offset_clock(args.clock_offset_seconds),
        lease_duration=timedelta(seconds=args.lease_seconds),
    )
    engine = handled.open_engine(args.url)
    faults = Faults(
        block_on=args.block_on,
        block_times=args.block_times,
        pause_before_confirm=args.pause_before_confirm,
        fail_once_on=args.fail_once_on,
    )
    worker = Worker(ordering, engine, args.name, run_dir, faults, sweep=args.mode == "run")
    ordering.backend.listeners.append(lambda name, _sql: worker.stats.statements.update([name]))
    try:
        if args.mode == "run":
            await worker.run(read_queue(Path(args.queue)), args.consumers)
        else:
            await worker.final_sweep()
    finally:
        worker.close()
        (run_dir / f"{args.name}.result.json").write_text(worker.stats.as_json())
        await engine.dispose()
        await dispose()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fault.worker")
    parser.add_argument("mode", choices=["run", "sweep"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--scope", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--queue", help="JSON list of deliveries (run mode)")
    parser.add_argument("--lease-seconds", type=float, default=60.0)
    parser.add_argument(
        "--consumers", type=int, default=1, help="deliveries handled at once (run mode)"
    )
    parser.add_argument("--clock-offset-seconds", type=float, default=0.0)
    parser.add_argument("--block-on", type=UUID, help="hang in the handler of this event")
    parser.add_argument(
        "--block-times", type=int, default=1, help="...unless this many handlers hang on it"
    )
    parser.add_argument(
        "--pause-before-confirm",
        type=UUID,
        help="after the seen check of this event, wait for <name>.resume",
    )
    parser.add_argument(
        "--fail-once-on", type=UUID, help="the handler raises the first time it gets this event"
    )
    args = parser.parse_args(argv)
    if args.mode == "run" and not args.queue:
        parser.error("run needs --queue")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        filename=str(Path(args.run_dir) / f"{args.name}.log"),
        level=os.environ.get("ORDERING_FAULT_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
