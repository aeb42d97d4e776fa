"""``ordering status``: what each scope holds, counted by the database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from ..backends import Backend
from ..constants import PRECEDING_EVENT_LOOKBACK, SEEN_EXPIRATION, lookback_cutoff
from ..models import utc_now
from .database import aware, open_backend


@dataclass(frozen=True)
class OldestWaiting:
    """The follower that has waited longest in a scope, and the leader it waits for."""

    follower_id: UUID
    leader_id: UUID
    event: str | None
    received: datetime
    age: timedelta


@dataclass
class ScopeStatus:
    """What one scope holds.  Waiting followers are counted once each: unclaimed,
    claimed (a worker is handling them now) or claim expired (that worker stopped);
    ``past_lookback`` are the unclaimed ones older than the lookback.  Together with
    ``claim_expired`` they are what ``get_lost_followers()`` would hand out now."""

    scope: str
    seen_live: int = 0
    seen_expired: int = 0
    leases_live: int = 0
    leases_expired: int = 0
    waiting_unclaimed: int = 0
    waiting_claimed: int = 0
    waiting_claim_expired: int = 0
    waiting_past_lookback: int = 0
    oldest_waiting: OldestWaiting | None = None
    #: Seen events seen after the ``since`` time asked for (0 when none was).
    seen_since: int = 0

    @property
    def lost(self) -> int:
        return self.waiting_past_lookback + self.waiting_claim_expired

    @property
    def seen(self) -> int:
        return self.seen_live + self.seen_expired

    @property
    def waiting(self) -> int:
        return self.waiting_unclaimed + self.waiting_claimed + self.waiting_claim_expired

    def to_json(self) -> dict[str, Any]:
        oldest = self.oldest_waiting
        return {
            "scope": self.scope,
            "seen": {"live": self.seen_live, "expired": self.seen_expired},
            "leases": {"live": self.leases_live, "expired": self.leases_expired},
            "waiting": {
                "unclaimed": self.waiting_unclaimed,
                "claimed": self.waiting_claimed,
                "claim_expired": self.waiting_claim_expired,
                "past_lookback": self.waiting_past_lookback,
                "lost": self.lost,
            },
            "oldest_waiting": None
            if oldest is None
            else {
                "follower_id": str(oldest.follower_id),
                "leader_id": str(oldest.leader_id),
                "event": oldest.event,
                "received": oldest.received.isoformat(),
                "age_seconds": oldest.age.total_seconds(),
            },
        }


async def status(
    url: str | None = None,
    *,
    scope: str | None = None,
    now: datetime | None = None,
    seen_expiration: timedelta = SEEN_EXPIRATION,
    lookback: timedelta = PRECEDING_EVENT_LOOKBACK,
    schema: str | None = None,
) -> list[ScopeStatus]:
    """Per scope (every scope with rows, or just ``scope``), what the tables hold."""
    backend = await open_backend(url, schema=schema)
    return await status_of(
        backend,
        scope=scope,
        now=aware(now or utc_now()),
        seen_expiration=seen_expiration,
        lookback=lookback,
    )


async def status_of(
    backend: Backend,
    *,
    scope: str | None,
    now: datetime,
    seen_expiration: timedelta = SEEN_EXPIRATION,
    lookback: timedelta = PRECEDING_EVENT_LOOKBACK,
    since: datetime | None = None,
) -> list[ScopeStatus]:
    """``status`` on an opened backend; with ``since``, each scope's ``seen_since``
    counts the events seen after it."""
    scopes: dict[str, ScopeStatus] = {}
    if scope is not None:
        scopes[scope] = ScopeStatus(scope)

    def entry(name: str) -> ScopeStatus:
        return scopes.setdefault(name, ScopeStatus(name))

    for name, live, expired, recent in await backend.query(
        "seen_counts", scope=scope, seen_after=now - seen_expiration, since=since or now
    ):
        e = entry(name)
        e.seen_live, e.seen_expired, e.seen_since = live, expired, recent if since else 0
    for name, live, expired in await backend.query("lease_counts", scope=scope, now=now):
        entry(name).leases_live, entry(name).leases_expired = live, expired
    for name, unclaimed, claimed, claim_expired, past in await backend.query(
        "waiting_counts", scope=scope, now=now, cutoff=lookback_cutoff(now, lookback)
    ):
        e = entry(name)
        e.waiting_unclaimed, e.waiting_claimed = unclaimed, claimed
        e.waiting_claim_expired, e.waiting_past_lookback = claim_expired, past
    for name, follower_id, leader_id, received, event_name in await backend.query(
        "oldest_waiting", scope=scope, types=(str, UUID, UUID, datetime, str)
    ):
        entry(name).oldest_waiting = OldestWaiting(
            follower_id, leader_id, event_name, received, now - received
        )
    return [scopes[name] for name in sorted(scopes)]


@dataclass(frozen=True)
class ScopeChange:
    """What changed in one scope between two refreshes of ``ordering status --watch``.

    ``pruned_per_second`` counts the seen events that left the table (the pruner's work,
    or ``ordering prune``'s): those there before plus those seen since, less those there
    now.  An event seen again while its row was there counts as seen, not as a new row,
    so each one makes the figure one too high; it never goes below 0."""

    seen_per_second: float
    pruned_per_second: float
    #: Followers waiting now, less those waiting at the refresh before.
    waiting: int


@dataclass(frozen=True)
class Refresh:
    """One refresh of ``ordering status --watch``."""

    now: datetime
    scopes: list[ScopeStatus]
    #: Seconds since the refresh before; None on the first.
    seconds: float | None = None
    #: By scope; empty on the first refresh.
    changes: dict[str, ScopeChange] = field(default_factory=dict)


def _changes(scopes: list[ScopeStatus], before: Refresh, seconds: float) -> dict[str, ScopeChange]:
    earlier = {s.scope: s for s in before.scopes}
    changes = {}
    for s in scopes:
        was = earlier.get(s.scope, ScopeStatus(s.scope))
        pruned = max(0, was.seen + s.seen_since - s.seen)
        changes[s.scope] = ScopeChange(
            seen_per_second=s.seen_since / seconds,
            pruned_per_second=pruned / seconds,
            waiting=s.waiting - was.waiting,
        )
    return changes


async def watch(
    url: str | None = None,
    *,
    every: float,
    scope: str | None = None,
    seen_expiration: timedelta = SEEN_EXPIRATION,
    lookback: timedelta = PRECEDING_EVENT_LOOKBACK,
    schema: str | None = None,
) -> AsyncIterator[Refresh]:
    """``status`` every ``every`` seconds, for ever, each refresh with what changed
    since the one before.  Each query has the store's deadline: a database that does
    not answer in time ends the watch with StoreUnavailable."""
    if not 0 < every < float("inf"):
        raise ValueError(f"every must be a positive number of seconds, not {every!r}")
    backend = await open_backend(url, schema=schema)
    loop = asyncio.get_running_loop()
    before: Refresh | None = None
    while True:
        started = loop.time()
        now = utc_now()
        scopes = await status_of(
            backend,
            scope=scope,
            now=now,
            seen_expiration=seen_expiration,
            lookback=lookback,
            since=None if before is None else before.now,
        )
        if before is None:
            refresh = Refresh(now, scopes)
        else:
            seconds = (now - before.now).total_seconds()
            refresh = Refresh(now, scopes, seconds, _changes(scopes, before, seconds))
        yield refresh
        before = refresh
        await asyncio.sleep(max(0.0, started + every - loop.time()))
