"""What the ordering asks of a database: the backend interface and its requests.

``CausalOrdering`` talks to a ``Backend``: a handful of operations, each taking named
values and answering with a small result.  One module per dialect implements it
(``postgresql.py``, ``sqlite.py``), each running the statements of its own SQL files
(``ordering/sql/<dialect>/``) through its connection pool (``pool.py``), where the
deadline, the retries and the mapping of driver errors live.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from ..exceptions import SchemaError
from ..notify import Waiter
from ..retention import Pruner
from ..schema import check_revision
from ..sql import Query
from ..urls import url_prune_interval
from .pool import Connections

logger = logging.getLogger("ordering.backends")

Row = Sequence[Any]
Rows = Sequence[Row]

#: Called once for every statement sent to the database, with its name and SQL.
StatementListener = Callable[[str, str], None]


# -- requests and answers ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BeginRequest:
    """Take the event's processing lease and look at its leader."""

    scope: str
    event_id: UUID
    follows: UUID | None
    owner: str
    now: datetime
    expires_at: datetime
    seen_after: datetime
    #: Refuse an event that was seen already (False: the lease is all that is asked).
    refuse_seen: bool = True

    def params(self) -> dict[str, Any]:
        """The values of the ``begin`` statement, by name."""
        return {
            "scope": self.scope,
            "event_id": self.event_id,
            "follows": self.follows,
            "owner": self.owner,
            "now": self.now,
            "expires_at": self.expires_at,
            "seen_after": self.seen_after,
            "refuse_seen": self.refuse_seen,
        }


@dataclass(frozen=True, slots=True)
class Begun:
    """The lease is ours; what ``begin`` saw of the leader."""

    leader_seen: bool
    leader_in_flight: bool
    #: The lease was another owner's and had expired: its worker died or stalled.
    took_over: bool = False


class Refused(enum.Enum):
    """Why ``begin`` did not lease the event.  Falsy, unlike ``Begun``."""

    HELD_ELSEWHERE = "another holder has a live lease"
    ALREADY_SEEN = "the event was processed already"

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """Who claims the followers a completion releases, and until when."""

    owner: str
    until: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class CompleteRequest:
    """Mark the event seen, release its lease, drop its own follower row and (with a
    claim) claim and lease the followers that waited for it: one transaction."""

    scope: str
    event_id: UUID
    #: The lease to release; None when the event was never leased by this caller.
    lease_owner: str | None
    now: datetime
    claim: Claim | None
    #: Whether the event follows another (only such an event can have a follower row).
    is_follower: bool = True
    #: When the seen row may be pruned (now + the writer's seen expiration); None
    #: leaves it to ``ordering prune --seen-expiration``, as rows of earlier releases.
    seen_until: datetime | None = None

    def params(self) -> dict[str, Any]:
        """The values of the ``complete`` statement, by name."""
        claim = self.claim
        return {
            "scope": self.scope,
            "event_id": self.event_id,
            "owner": self.lease_owner,
            "now": self.now,
            "claim_owner": claim.owner if claim else None,
            "claim_until": claim.until if claim else None,
            "is_follower": self.is_follower,
            "seen_until": self.seen_until,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ParkRequest:
    """Park the event as a follower of its leader unless the leader was seen meanwhile;
    parking gives up the event's own lease (held by ``lease_owner``) in the same
    transaction."""

    scope: str
    event_id: UUID
    leader_id: UUID
    occurred: datetime
    received: datetime
    event_json: str
    lease_owner: str | None
    seen_after: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class FollowerRow:
    """A follower recorded directly (``record_follower``)."""

    scope: str
    event_id: UUID
    leader_id: UUID
    occurred: datetime
    received: datetime
    event_json: str


@dataclass(frozen=True, slots=True)
class LeaderStatus:
    seen: bool
    in_flight: bool


# -- the interface -------------------------------------------------------------------


class Backend(abc.ABC):
    """The database side of every ordering on one URL (and event loop).

    The hot path is ``begin``, ``complete`` and ``park``: on PostgreSQL one round trip
    each, on SQLite one transaction each.  Everything else is one statement.
    """

    dialect: str
    connections: Connections[Any]

    def __init__(self, url: str, queries: dict[str, Query], code_revision: str) -> None:
        self.url = url
        #: This dialect's statements (tests may swap one).
        self.queries = queries
        #: The revision this code was written for (tests may pose as another release).
        self.code_revision = code_revision
        self.listeners: list[StatementListener] = []
        #: Deletes expired rows at the URL's prune interval (ordering/retention.py);
        #: made by the first ordering that uses this backend.
        self.pruner: Pruner | None = None
        #: Leases and claims being given back in the background (``later``).
        self._later: set[asyncio.Task[None]] = set()

    def start_pruning(self, clock: Callable[[], datetime]) -> Pruner:
        """This backend's pruner, started on the running loop if it was not yet."""
        if self.pruner is None:
            self.pruner = Pruner(self, interval=url_prune_interval(self.url), clock=clock)
            self.pruner.start()
        return self.pruner

    async def stop_pruning(self) -> None:
        if self.pruner is not None:
            await self.pruner.stop()

    def later(self, cleanup: Coroutine[Any, Any, None]) -> None:
        """Run ``cleanup`` (giving back a lease or claims) in the background, within its
        own deadline; a failure is logged.  ``dispose`` waits for what is under way."""
        task = asyncio.get_running_loop().create_task(_logged(cleanup))
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _settle_later(self) -> None:
        if self._later:
            await asyncio.gather(*self._later, return_exceptions=True)

    async def ping(self) -> None:
        """Open and close one connection, once, without retries: for a person or a
        scheduler who asked, and should hear at once that the database is not there."""
        connection = await self.connections.connect()
        await self.connections.close(connection)

    # the hot path
    @abc.abstractmethod
    async def begin(self, request: BeginRequest) -> Begun | Refused: ...

    @abc.abstractmethod
    async def complete(self, request: CompleteRequest) -> list[str]:
        """Returns the claimed followers' JSON, in no particular order."""

    @abc.abstractmethod
    async def park(self, request: ParkRequest) -> bool:
        """Whether it parked; False: the leader was seen, the event may go ahead."""

    # leases and leaders
    @abc.abstractmethod
    async def renew(self, *, scope: str, owner: str, expires_at: datetime) -> None:
        """Push back every lease and claim the owner holds."""

    @abc.abstractmethod
    def leader_waiter(
        self, *, scope: str, leader_id: UUID, notify: bool
    ) -> AbstractAsyncContextManager[Waiter]:
        """A waiter woken when the leader completes (where the database can say so)
        or else after each timeout."""

    # followers
    @abc.abstractmethod
    async def unclaim(self, *, scope: str, owner: str, ids: Sequence[UUID], now: datetime) -> None:
        """Give back claimed followers that were not handled, and their leases: their
        claims expire now, so the lost-follower sweep hands them out again."""

    # -- one statement each, the same on every dialect --------------------------

    @abc.abstractmethod
    async def _fetch(self, name: str, *, idempotent: bool = True, **params: Any) -> Rows:
        """Run the named statement of this dialect's queries.sql through the choke point."""

    async def leader_status(
        self, *, scope: str, leader_id: UUID, now: datetime, seen_after: datetime
    ) -> LeaderStatus:
        (row,) = await self._fetch(
            "leader_status", scope=scope, leader_id=leader_id, now=now, seen_after=seen_after
        )
        return LeaderStatus(bool(row[0]), bool(row[1]))

    async def seen(self, *, scope: str, event_id: UUID, seen_after: datetime) -> bool:
        (row,) = await self._fetch("seen", scope=scope, event_id=event_id, seen_after=seen_after)
        return bool(row[0])

    async def record_seen(
        self, *, scope: str, event_id: UUID, now: datetime, seen_until: datetime | None = None
    ) -> None:
        await self._fetch(
            "record_seen", scope=scope, event_id=event_id, now=now, seen_until=seen_until
        )

    async def release(self, *, scope: str, event_id: UUID, owner: str) -> None:
        await self._fetch("release", scope=scope, event_id=event_id, owner=owner)

    async def mark_waiting(self, *, scope: str, leader_id: UUID, now: datetime) -> bool:
        """Ask the leader's completion to notify; False when it holds no live lease."""
        return bool(await self._fetch("mark_waiting", scope=scope, leader_id=leader_id, now=now))

    async def record_follower(self, row: FollowerRow) -> None:
        await self._fetch(
            "record_follower",
            scope=row.scope,
            event_id=row.event_id,
            leader_id=row.leader_id,
            occurred=row.occurred,
            received=row.received,
            event=row.event_json,
        )

    async def forget_follower(self, *, scope: str, event_id: UUID) -> None:
        await self._fetch("forget_follower", scope=scope, event_id=event_id)

    async def followers_of(self, *, scope: str, leader_id: UUID) -> list[str]:
        rows = await self._fetch("followers_of", scope=scope, leader_id=leader_id)
        return [row[0] for row in rows]

    async def followers_by_id(self, *, scope: str, ids: Sequence[UUID]) -> list[str]:
        if not ids:
            return []
        rows = await self._fetch("followers_by_id", scope=scope, ids=list(ids))
        return [row[0] for row in rows]

    async def take_lost_followers(
        self, *, scope: str, cutoff: datetime, now: datetime, owner: str, hold_until: datetime
    ) -> list[str]:
        """Delete and return the lost followers: handed out once, so never retried
        after the statement may have reached the database.  (PostgreSQL's takes them in
        two steps that may be repeated, claimed by ``owner`` until ``hold_until`` in
        between: see take_lost_claim.)"""
        rows = await self._fetch("take_lost", scope=scope, cutoff=cutoff, now=now, idempotent=False)
        return [row[0] for row in rows]

    # housekeeping and operators
    @abc.abstractmethod
    async def clear(self, *, scope: str | None) -> None: ...

    @abc.abstractmethod
    async def query(
        self, name: str, /, *, types: Sequence[type] | None = None, **params: Any
    ) -> Rows:
        """Run the named statement of this dialect's queries.sql and return its rows,
        decoded to ``types`` (UUID, datetime, ...) column by column when given."""

    @abc.abstractmethod
    async def write(self, name: str, /, **params: Any) -> Rows:
        """Run the named statement as a write transaction of its own."""

    @abc.abstractmethod
    async def check_version(self) -> None: ...

    @abc.abstractmethod
    async def dispose(self) -> None: ...

    def abandon(self) -> None:
        """Let go of the connections at once, awaiting nothing: for a backend whose
        event loop was closed without disposing of it first."""
        self.connections.abandon()


async def _logged(cleanup: Coroutine[Any, Any, None]) -> None:
    try:
        await cleanup
    except Exception:
        logger.warning(
            "giving back a lease after the store was unavailable failed; it expires",
            exc_info=True,
        )


def announce(listeners: Sequence[StatementListener], query: Query) -> None:
    for listener in listeners:
        listener(query.name, query.sql)


def require_served_revision(
    url: str, revision: str | None, oldest: str | None, *, code_revision: str
) -> None:
    """Raise SchemaError unless this code may run on a database at ``revision``."""
    problem = check_revision(url, revision, oldest, code_revision=code_revision)
    if problem is not None:
        raise SchemaError(problem)
    if revision != code_revision:
        logger.info(
            "the database %s is at revision %s, ahead of this code's %s and compatible",
            url,
            revision,
            code_revision,
        )


__all__ = [
    "Backend",
    "BeginRequest",
    "Begun",
    "Claim",
    "CompleteRequest",
    "FollowerRow",
    "LeaderStatus",
    "ParkRequest",
    "Refused",
    "Rows",
    "StatementListener",
]
