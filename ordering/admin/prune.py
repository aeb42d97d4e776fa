"""``ordering prune``: delete what the store no longer reads, in short batches."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..constants import SEEN_EXPIRATION
from ..models import utc_now
from .database import aware, open_backend

logger = logging.getLogger("ordering.admin")

#: Rows deleted per statement: small enough that each batch holds its locks for
#: milliseconds, large enough that a big backlog is a few hundred round trips.
DEFAULT_BATCH_SIZE = 1000


@dataclass(frozen=True)
class PruneResult:
    """Rows deleted by ``prune`` (or, for a dry run, the rows it would delete)."""

    seen_events: int
    leases: int
    dry_run: bool = False

    @property
    def total(self) -> int:
        return self.seen_events + self.leases


async def prune(
    url: str | None = None,
    *,
    scope: str | None = None,
    now: datetime | None = None,
    seen_expiration: timedelta = SEEN_EXPIRATION,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    schema: str | None = None,
) -> PruneResult:
    """Delete seen events past their expiry and expired leases, at once.

    The store does the same by itself while workers run (ordering/retention.py); this
    is for a database whose workers turned that off (``prune_interval=0``), and for
    seen rows written before schema revision 0006, which carry no expiry: those are
    deleted once older than ``seen_expiration`` (pass the longest any worker of those
    releases used).  Rows with an expiry go by it, whatever ``seen_expiration`` says.

    Safe while workers run: every batch is one short transaction of at most
    ``batch_size`` rows, so no lock is held for long, and only rows the store no
    longer reads are deleted (a lease at or past its expiry may be taken over: the
    rules of ordering/sql/<dialect>/rules.sql).  Waiting followers are never pruned:
    the lost-follower sweep (``get_lost_followers``) hands them out.

    ``progress(done, total)`` is called after each batch that deleted rows; ``total``
    is counted first.
    Returns the rows deleted (or, with ``dry_run``, the rows that would be).
    """
    now = aware(now or utc_now())
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be at least 1, not {batch_size}")
    if seen_expiration <= timedelta(0):
        raise ValueError(f"seen expiration must be positive, not {seen_expiration}")
    backend = await open_backend(url, schema=schema)
    seen_after = now - seen_expiration
    counts: tuple[tuple[str, dict[str, Any]], ...] = (
        ("count_prunable_seen", {"now": now, "seen_after": seen_after}),
        ("count_prunable_leases", {"now": now}),
    )
    #: (what, statement, values): expired seen rows, those without an expiry, leases
    batches: tuple[tuple[str, str, dict[str, Any]], ...] = (
        ("seen events", "prune_expired_seen", {"now": now}),
        ("seen events without an expiry", "prune_seen", {"seen_after": seen_after}),
        ("leases", "prune_leases", {"now": now}),
    )
    counted: list[int] = []
    if dry_run or progress is not None:
        for count, params in counts:
            (row,) = await backend.query(count, scope=scope, **params)
            counted.append(int(row[0]))
    if dry_run:
        return PruneResult(counted[0], counted[1], dry_run=True)
    total = sum(counted)
    deleted: list[int] = []
    done = 0
    for label, batch, params in batches:
        removed = 0
        while True:
            rows = await backend.write(batch, scope=scope, batch_size=batch_size, **params)
            removed += len(rows)
            done += len(rows)
            if progress is not None and rows:
                progress(done, max(total, done))
            if len(rows) < batch_size:
                break
        logger.info("pruned %d %s", removed, label, extra={"scope": scope})
        deleted.append(removed)
    return PruneResult(deleted[0] + deleted[1], deleted[2])
