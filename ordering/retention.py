"""Retention: the store deletes what it no longer reads, by itself, while workers run.

Each seen row carries its own expiry (``expires_at``: its writer's ``seen_at +
seen_expiration``, as a Redis key carries its TTL), and a processing lease its own
(``expires_at``).  Every backend an ordering uses runs a ``Pruner``: at each interval
(``?prune_interval=SECONDS`` in the URL, or ``prune_interval=`` of the ordering; 60 s
unless set, 0 turns it off) it deletes expired seen rows and dead leases in batches,
each batch a statement of its own, short and bounded by the call's deadline like any
other.  Waiting followers are never pruned: ``get_lost_followers`` hands them out.

One process of all those on a database prunes per interval: a round first takes the
pruner's turn, a lease row in ``processing_leases`` (scope ``PRUNER_SCOPE``) that lasts
one interval; whoever finds it live skips the round.  So a fleet of workers prunes
about once per interval, whichever worker comes first after the turn expired.

Seen rows written by releases before schema revision 0006 have no expiry; the pruner
leaves them alone (it cannot know how long their writers meant to remember them):
``ordering prune --seen-expiration`` removes them.

The pruner lives on the backend's event loop: a timer between rounds (nothing that
keeps a loop running), a task during one.  ``ordering.dispose()`` stops it; a forked
child builds backends afresh (ordering/loops.py), and so pruners of its own.  A round
that fails (the store unavailable) is logged, and the next interval tries again.

``on_pruned``, if set, is called with (table, rows) after each batch that deleted
rows, for a metrics layer to count "rows pruned"; ``Pruner.run_once`` returns the
round's counts (``PruneRound``) too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from . import metrics
from .loops import process_token

if TYPE_CHECKING:
    from .backends.base import Backend


logger = logging.getLogger("ordering.retention")

#: The scope and event id of the pruner's turn, a row of processing_leases.
PRUNER_SCOPE = "ordering.pruner"
PRUNER_ID = UUID("00000000-0000-0000-0000-0000000000ff")

#: Rows deleted per statement, by dialect.  PostgreSQL deletes a thousand rows in
#: milliseconds; a SQLite batch holds the database's write lock (and runs on the
#: event loop's thread), so it is kept smaller.
BATCH_SIZE = {"postgresql": 1000, "sqlite": 200}

#: What the metrics layer hooks in: called with (table, rows deleted) after each batch
#: that deleted rows.  An exception it raises is logged, never passed on.
on_pruned: Callable[[str, int], None] | None = None


def _report(table: str, rows: int) -> None:
    if not rows:
        return
    metrics.rows_pruned(table, rows)  # ordering.rows.pruned
    hook = on_pruned
    if hook is None:
        return
    try:
        hook(table, rows)
    except Exception:
        logger.warning("the on_pruned hook failed", exc_info=True)


@dataclass(frozen=True)
class PruneRound:
    """What one round did: rows deleted per table, or that it was another's turn."""

    seen_events: int = 0
    leases: int = 0
    batches: int = 0
    seconds: float = 0.0
    #: Another process held the pruner's turn: nothing was deleted.
    skipped: bool = False

    @property
    def total(self) -> int:
        return self.seen_events + self.leases


#: (table, statement, the values it takes besides scope and batch size, from ``now``)
_TARGETS: tuple[tuple[str, str, Callable[[datetime], dict[str, Any]]], ...] = (
    ("seen_events", "prune_expired_seen", lambda now: {"now": now}),
    ("processing_leases", "prune_leases", lambda now: {"now": now}),
)


_serial = itertools.count()


class Pruner:
    """Prunes one backend's database at each interval (see the module's docstring)."""

    def __init__(
        self,
        backend: Backend,
        *,
        interval: float,
        clock: Callable[[], datetime],
        batch_size: int | None = None,
    ) -> None:
        self.backend = backend
        #: Seconds between rounds; 0: off.
        self.interval = interval
        self.clock = clock
        self.batch_size = batch_size or BATCH_SIZE.get(backend.dialect, 1000)
        self.rounds = 0
        self.last: PruneRound | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._serial = next(_serial)
        #: A child forked with the loop inherits this pruner's timer: it must not fire
        #: there (the backend's connections are the parent's); the child has its own.
        self._pid = os.getpid()

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def start(self) -> None:
        """Schedule the first round (on the running loop) somewhere in the first
        interval, so that workers started together do not all try at once."""
        if self.enabled and not self._stopped and self._timer is None and self._task is None:
            self._schedule(random.uniform(self.interval / 2, self.interval))

    def _schedule(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        if not self._stopped and os.getpid() == self._pid:
            self._task = asyncio.get_running_loop().create_task(self._round_then_next())

    async def _round_then_next(self) -> None:
        try:
            await self.run_once()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning(
                "pruning %s failed (%s); trying again in %g s",
                self.backend.connections.safe_url(),
                f"{type(exc).__name__}: {exc}",
                self.interval,
            )
        finally:
            self._task = None
        if not self._stopped and os.getpid() == self._pid:
            self._schedule(self.interval)

    async def stop(self) -> None:
        """Cancel the timer and a round under way (its batch in flight rolls back or
        commits; either leaves the tables consistent)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _take_turn(self, owner: str, now: datetime) -> bool:
        rows = await self.backend.write(
            "take_pruner_lease",
            scope=PRUNER_SCOPE,
            event_id=PRUNER_ID,
            owner=owner,
            now=now,
            expires_at=now + timedelta(seconds=max(self.interval, 1.0)),
        )
        return bool(rows)

    async def run_once(self) -> PruneRound:
        """One round: take the turn, then delete in batches until nothing expired is
        left (keeping the turn while it runs).  Returns what it deleted."""
        started = time.monotonic()
        # Per pruner: two backends of one process on one database take turns too.
        owner = f"{process_token()}:pruner:{self._serial}"
        now = self.clock()
        if not await self._take_turn(owner, now):
            self.last = PruneRound(skipped=True)
            logger.debug("pruning skipped: another process has the turn")
            return self.last
        turn_taken = started
        deleted: dict[str, int] = {}
        batches = 0
        for table, statement, values in _TARGETS:
            removed = 0
            while True:
                if time.monotonic() - turn_taken > self.interval / 2:
                    # A long round keeps its turn; should another have taken it
                    # meanwhile, that one goes on instead.
                    if not await self._take_turn(owner, self.clock()):
                        break
                    turn_taken = time.monotonic()
                rows = await self.backend.write(
                    statement, scope=None, batch_size=self.batch_size, **values(now)
                )
                batches += 1
                removed += len(rows)
                _report(table, len(rows))
                if len(rows) < self.batch_size:
                    break
                await asyncio.sleep(0)  # let the workers' statements in between batches
            deleted[table] = deleted.get(table, 0) + removed
        result = PruneRound(
            seen_events=deleted.get("seen_events", 0),
            leases=deleted.get("processing_leases", 0),
            batches=batches,
            seconds=time.monotonic() - started,
        )
        self.rounds += 1
        self.last = result
        logger.info(
            "pruned %d expired seen events and %d expired leases in %d batches (%.2f s)",
            result.seen_events,
            result.leases,
            result.batches,
            result.seconds,
            extra={"url": self.backend.connections.safe_url()},
        )
        return result
