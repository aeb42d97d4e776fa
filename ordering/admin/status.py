"""``ordering status``: what each scope holds, counted by the database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

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

    @property
    def lost(self) -> int:
        return self.waiting_past_lookback + self.waiting_claim_expired

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
    now = aware(now or utc_now())
    backend = await open_backend(url, schema=schema)
    scopes: dict[str, ScopeStatus] = {}
    if scope is not None:
        scopes[scope] = ScopeStatus(scope)

    def entry(name: str) -> ScopeStatus:
        return scopes.setdefault(name, ScopeStatus(name))

    for name, live, expired in await backend.query(
        "seen_counts", scope=scope, seen_after=now - seen_expiration
    ):
        entry(name).seen_live, entry(name).seen_expired = live, expired
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
