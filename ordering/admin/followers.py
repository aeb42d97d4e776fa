"""``ordering followers``: the waiting followers, as an operator reads them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from ..constants import PRECEDING_EVENT_LOOKBACK, lookback_cutoff
from ..events import as_uuid
from ..models import utc_now
from .database import aware, open_backend


@dataclass(frozen=True)
class WaitingFollower:
    """One waiting follower.  ``lost``: whether ``get_lost_followers()`` would hand it
    out, judged by the database with the store's lost rule at the time and lookback
    the listing was asked for."""

    scope: str
    follower_id: UUID
    leader_id: UUID
    occurred: datetime
    received: datetime
    claimed_by: str | None
    claimed_until: datetime | None
    event: dict[str, Any]
    lost: bool

    @property
    def event_name(self) -> str | None:
        name = self.event.get("event")
        return name if isinstance(name, str) else None

    def state(self, now: datetime) -> str:
        if self.claimed_until is None:
            return "waiting"
        return "claimed" if self.claimed_until > now else "claim expired"

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "follower_id": str(self.follower_id),
            "leader_id": str(self.leader_id),
            "event_name": self.event_name,
            "occurred": self.occurred.isoformat(),
            "received": self.received.isoformat(),
            "waiting_seconds": (now - self.received).total_seconds(),
            "state": self.state(now),
            "lost": self.lost,
            "claimed_by": self.claimed_by,
            "claimed_until": None if self.claimed_until is None else self.claimed_until.isoformat(),
            "event": self.event,
        }


async def list_followers(
    url: str | None = None,
    *,
    scope: str | None = None,
    leader: UUID | str | None = None,
    lost: bool = False,
    now: datetime | None = None,
    lookback: timedelta = PRECEDING_EVENT_LOOKBACK,
    limit: int | None = None,
    schema: str | None = None,
) -> list[WaitingFollower]:
    """Waiting followers in the order they occurred; with ``lost``, only those that
    ``get_lost_followers()`` would hand out at ``now``.  Reads only: nothing is taken."""
    now = aware(now or utc_now())
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    leader_id = None if leader is None else as_uuid(leader, "leader")
    backend = await open_backend(url, schema=schema)
    rows = await backend.query(
        "list_followers",
        scope=scope,
        leader_id=leader_id,
        lost_only=lost,
        cutoff=lookback_cutoff(now, lookback),
        now=now,
        row_limit=limit,
        types=(str, UUID, UUID, datetime, datetime, str, datetime, str, bool),
    )
    return [
        WaitingFollower(
            scope=row[0],
            follower_id=row[1],
            leader_id=row[2],
            occurred=row[3],
            received=row[4],
            claimed_by=row[5],
            claimed_until=row[6],
            event=json.loads(row[7]),
            lost=bool(row[8]),
        )
        for row in rows
    ]
