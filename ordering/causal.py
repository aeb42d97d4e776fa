"""CausalOrdering: Prefect's interface, with all of its state in SQL tables.

The hot path, one call of ``preceding_event_confirmed`` for an event whose leader was
already seen, is two statements: ``Store.begin`` (take the lease and look at the
leader) and ``Store.complete`` (mark seen, release the lease, claim followers).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar, cast, overload
from uuid import UUID

from pydantic import BaseModel

from . import metrics
from .backends import (
    Backend,
    BeginRequest,
    Begun,
    Claim,
    CompleteRequest,
    FollowerRow,
    ParkRequest,
    Refused,
    backend_for,
    dispose_backends,
    opened,
)
from .constants import (
    IN_FLIGHT_EVENT_TIMEOUT,
    LEASE_DURATION,
    MAX_DEPTH_OF_PRECEDING_EVENT,
    PRECEDING_EVENT_LOOKBACK,
    SEEN_EXPIRATION,
    lookback_cutoff,
)
from .events import EventModel, OrderedEvent, as_uuid, checked_event, event_id, is_follower
from .exceptions import (
    EventAlreadyProcessed,
    EventArrivedEarly,
    EventBeingProcessed,
    MaxDepthExceeded,
    StoreUnavailable,
)
from .loops import process_token
from .models import ReceivedEvent, utc_now
from .renewal import close_keeper, keeper
from .schema import resolve_schema
from .urls import (
    resolve_url,
    url_deadline,
    url_prune_interval,
    url_sets_deadline,
    with_deadline,
    with_prune_interval,
)

logger = logging.getLogger("ordering")

E = TypeVar("E", bound=OrderedEvent)
E_contra = TypeVar("E_contra", bound=OrderedEvent, contravariant=True)


class EventHandler(Protocol[E_contra]):
    """What ``preceding_event_confirmed`` hands released followers to."""

    def __call__(self, event: E_contra, /, depth: int = 0) -> Awaitable[None]: ...


_owner_serial = itertools.count()


def _new_owner() -> str:
    """A fresh token for one lease or one batch of claims: unique among processes,
    forked ones included (a lease may be taken again by its own owner, so two
    processes must never make the same one), and readable in audits: it names the
    host and process."""
    return f"{process_token()}:{next(_owner_serial)}"


@dataclass
class _Lease:
    """A processing lease this task holds."""

    owner: str
    #: Taken by a leader's completion on this task's behalf, for a released follower
    #: it hands to the handler: ``preceding_event_confirmed`` for that follower uses
    #: it instead of taking (and failing to take) a lease of its own.
    released_by_leader: bool = False
    #: Set when such a follower went through ``preceding_event_confirmed`` to the end.
    completed: bool = False


_LeaseKey = tuple[str, str, UUID]

#: The leases the running task holds, by (database, scope, event id).  Entries are
#: added and removed by key, never by resetting the variable, so nested uses do not
#: undo each other; a task that ends takes its entries with it.
_task_leases: contextvars.ContextVar[Mapping[_LeaseKey, _Lease]] = contextvars.ContextVar(
    "ordering_task_leases", default=MappingProxyType({})
)


def _hold(key: _LeaseKey, lease: _Lease) -> None:
    _task_leases.set(MappingProxyType({**_task_leases.get(), key: lease}))


def _let_go(key: _LeaseKey, lease: _Lease) -> None:
    current = _task_leases.get()
    if current.get(key) is lease:
        _task_leases.set(MappingProxyType({k: v for k, v in current.items() if k != key}))


# A child forked in the middle of a task holds none of the parent's leases.
os.register_at_fork(after_in_child=lambda: _task_leases.set(MappingProxyType({})))


_EVENT_FIELDS = frozenset({"id", "follows", "occurred", "received"})


def _is_event_model(event_type: Any) -> bool:
    if not isinstance(event_type, type) or not callable(
        getattr(event_type, "model_validate_json", None)
    ):
        return False
    if issubclass(event_type, BaseModel):
        return _EVENT_FIELDS.issubset(event_type.model_fields)
    return True


class CausalOrdering(Generic[E]):
    """Keeps events in causal order, with its state in a SQL database.

    Construction is cheap and does no I/O: every instance on the same URL shares one
    backend and its connections (per event loop).  Time comes from ``clock``; tests
    pass their own.
    """

    @overload
    def __init__(
        self: CausalOrdering[ReceivedEvent],
        scope: str,
        *,
        url: str | None = ...,
        clock: Callable[[], datetime] | None = ...,
        event_type: None = ...,
        preceding_event_lookback: timedelta = ...,
        seen_expiration: timedelta = ...,
        max_depth: int = ...,
        in_flight_event_timeout: timedelta = ...,
        lease_duration: timedelta = ...,
        poll_interval: float = ...,
        notify: bool = ...,
        schema: str | None = ...,
        deadline: timedelta | None = ...,
        prune_interval: timedelta | None = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: CausalOrdering[E],
        scope: str,
        *,
        url: str | None = ...,
        clock: Callable[[], datetime] | None = ...,
        event_type: type[E],
        preceding_event_lookback: timedelta = ...,
        seen_expiration: timedelta = ...,
        max_depth: int = ...,
        in_flight_event_timeout: timedelta = ...,
        lease_duration: timedelta = ...,
        poll_interval: float = ...,
        notify: bool = ...,
        schema: str | None = ...,
        deadline: timedelta | None = ...,
        prune_interval: timedelta | None = ...,
    ) -> None: ...

    def __init__(
        self,
        scope: str,
        *,
        url: str | None = None,
        clock: Callable[[], datetime] | None = None,
        event_type: type[Any] | None = None,
        preceding_event_lookback: timedelta = PRECEDING_EVENT_LOOKBACK,
        seen_expiration: timedelta = SEEN_EXPIRATION,
        max_depth: int = MAX_DEPTH_OF_PRECEDING_EVENT,
        in_flight_event_timeout: timedelta = IN_FLIGHT_EVENT_TIMEOUT,
        lease_duration: timedelta = LEASE_DURATION,
        poll_interval: float = 0.25,
        notify: bool = True,
        schema: str | None = None,
        deadline: timedelta | None = None,
        prune_interval: timedelta | None = None,
    ) -> None:
        if not isinstance(scope, str) or not scope or len(scope) > 200:
            raise ValueError(
                f"scope must be a non-empty string of at most 200 characters, not {scope!r}"
            )
        for name, value in (
            ("preceding_event_lookback", preceding_event_lookback),
            ("seen_expiration", seen_expiration),
            ("lease_duration", lease_duration),
        ):
            if value <= timedelta(0):
                raise ValueError(f"{name} must be positive, not {value}")
        if deadline is not None and deadline <= timedelta(0):
            raise ValueError(f"deadline must be positive, not {deadline}")
        if prune_interval is not None and (
            not isinstance(prune_interval, timedelta) or prune_interval < timedelta(0)
        ):
            raise ValueError(
                "prune_interval must be a timedelta of 0 or more (0 turns the store's "
                f"pruning off), not {prune_interval!r}"
            )
        if in_flight_event_timeout < timedelta(0):
            raise ValueError(
                f"in_flight_event_timeout must not be negative, not {in_flight_event_timeout}"
            )
        if max_depth < 0:
            raise ValueError(f"max_depth must not be negative, not {max_depth}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, not {poll_interval}")
        if event_type is not None and not _is_event_model(event_type):
            raise ValueError(
                f"event_type must be a model class with model_validate_json and the fields "
                f"{sorted(_EVENT_FIELDS)}, "
                f"not {event_type!r}"
            )
        self.scope = scope
        self.url = resolve_url(url)
        #: The URL the backend is built for: ``url`` with the deadline written in, so
        #: that orderings with other deadlines get backends of their own.
        self._store_url = self.url
        if deadline is not None:
            self._store_url = with_deadline(self.url, deadline.total_seconds())
        #: How long any call of the store may take, all its attempts included, before it
        #: raises StoreUnavailable (``deadline=``, else the URL's ``?deadline=``, else
        #: 10 seconds).  Keep it well below ``lease_duration``.
        self.deadline = timedelta(seconds=url_deadline(self._store_url))
        if self.deadline >= lease_duration and (deadline or url_sets_deadline(self.url)):
            raise ValueError(
                f"deadline ({self.deadline}) must be shorter than lease_duration "
                f"({lease_duration}): a call could outlast the lease it holds"
            )
        if prune_interval is not None:
            self._store_url = with_prune_interval(self._store_url, prune_interval.total_seconds())
        #: How often the store deletes expired rows by itself (ordering/retention.py;
        #: ``prune_interval=``, else the URL's ``?prune_interval=``, else 60 s); 0: never.
        self.prune_interval = timedelta(seconds=url_prune_interval(self._store_url))
        self.clock: Callable[[], datetime] = clock or utc_now
        self.event_type: type[Any] = event_type or ReceivedEvent
        # The overloads tie E to event_type (ReceivedEvent when none is given).
        self._parse = cast(EventModel[E], self.event_type)
        #: The PostgreSQL schema of the store's objects (ignored on SQLite).
        self.schema = resolve_schema(schema)
        self.preceding_event_lookback = preceding_event_lookback
        self.seen_expiration = seen_expiration
        self.max_depth = max_depth
        self.in_flight_event_timeout = in_flight_event_timeout
        self.lease_duration = lease_duration
        self.poll_interval = poll_interval
        self.notify = notify
        self._key_prefix = f"{self._store_url}#{self.schema}"
        self._metric_attributes = metrics.scope_attributes(scope)

    # -- plumbing -----------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The shared backend for this URL on the running event loop; the first use
        starts its pruner (ordering/retention.py)."""
        backend = backend_for(self._store_url, self.schema)
        if backend.pruner is None:
            backend.start_pruning(self.clock)
        return backend

    def _now(self) -> datetime:
        now = self.clock()
        if not isinstance(now, datetime) or now.tzinfo is None:
            raise ValueError(f"the clock must return an aware UTC datetime, not {now!r}")
        return now

    def _load(self, rows: Iterable[str]) -> list[E]:
        events = [self._parse.model_validate_json(row) for row in rows]
        events.sort(key=lambda e: (e.occurred, e.received, e.id))
        return events

    def _key(self, event_id: UUID) -> _LeaseKey:
        return (self._key_prefix, self.scope, event_id)

    def _lease_of(self, event_id: UUID) -> _Lease | None:
        return _task_leases.get().get(self._key(event_id))

    def _log(self, event: Any, message: str, *args: Any, level: int = logging.INFO) -> None:
        resource = getattr(event, "resource", None)
        resource_id = getattr(resource, "id", None)
        logger.log(
            level,
            "Event %r (%s) for %r " + message,
            getattr(event, "event", None),
            event.id,
            resource_id,
            *args,
            extra={
                "event_id": event.id,
                "follows": event.follows,
                "resource_id": resource_id,
                "scope": self.scope,
            },
        )

    # -- seen -----------------------------------------------------------------------

    async def event_has_been_seen(self, event: UUID | str | E) -> bool:
        """Whether the event (or event id) was processed within the seen expiration."""
        seen_id = event_id(event)
        return await self.backend.seen(
            scope=self.scope, event_id=seen_id, seen_after=self._now() - self.seen_expiration
        )

    async def record_event_as_seen(self, event: E) -> None:
        seen_id = event_id(event)
        now = self._now()
        await self.backend.record_seen(
            scope=self.scope, event_id=seen_id, now=now, seen_until=now + self.seen_expiration
        )

    # -- processing leases --------------------------------------------------------

    async def record_event_as_processing(self, event: E) -> bool:
        """Take the event's processing lease for this task; False if another holder
        has a live one.  ``forget_event_is_processing``, from the same task, gives it
        back (else it expires after ``lease_duration``)."""
        lease_id = event_id(event)
        owner = _new_owner()
        now = self._now()
        taken = await self.backend.begin(
            BeginRequest(
                scope=self.scope,
                event_id=lease_id,
                follows=None,
                owner=owner,
                now=now,
                expires_at=now + self.lease_duration,
                seen_after=now,
                refuse_seen=False,  # Prefect's processing guard is about processing only
            )
        )
        if not isinstance(taken, Begun):
            return False
        if taken.took_over:
            self._took_over(event)
        _hold(self._key(lease_id), _Lease(owner))
        return True

    async def event_has_started_processing(self, event: UUID | str | E) -> bool:
        now = self._now()
        status = await self.backend.leader_status(
            scope=self.scope, leader_id=event_id(event), now=now, seen_after=now
        )
        return status.in_flight

    async def forget_event_is_processing(self, event: E) -> None:
        """Release the lease this task took with ``record_event_as_processing``."""
        lease_id = event_id(event)
        lease = self._lease_of(lease_id)
        if lease is None or lease.released_by_leader:
            logger.debug("no lease of this task to forget for %s", lease_id)
            return
        _let_go(self._key(lease_id), lease)
        await self.backend.release(scope=self.scope, event_id=lease_id, owner=lease.owner)

    @asynccontextmanager
    async def event_is_processing(self, event: E) -> AsyncIterator[None]:
        """Hold the event's lease while the body runs; mark it seen if the body succeeds.

        Raises EventBeingProcessed when another holder has a live lease.
        """
        event = checked_event(event)
        held = self._lease_of(event.id)
        if held is not None and held.released_by_leader:
            yield  # a leader released this follower to us: its lease is already ours
            return
        owner = _new_owner()
        now, asked_at = self._now(), time.monotonic()
        backend = self.backend
        await self._take_lease(backend, event, owner, now, None)
        lease = _Lease(owner)
        _hold(self._key(event.id), lease)  # so that wait_for_leader gives it up when parking
        done = False
        kept = self._keep(backend, owner, asked_at)
        try:
            try:
                yield
            finally:
                keeper().release(kept)
            now = self._now()
            await self.backend.complete(
                CompleteRequest(
                    scope=self.scope,
                    event_id=event.id,
                    lease_owner=owner,
                    now=now,
                    claim=None,
                    is_follower=is_follower(event),
                    seen_until=now + self.seen_expiration,
                )
            )
            metrics.EVENTS_COMPLETED.add(1, self._metric_attributes)
            done = True
        except EventArrivedEarly as early:
            done = _parked_here(early, event.id)  # parking released the lease
            raise
        except StoreUnavailable:
            done = True
            backend.later(backend.release(scope=self.scope, event_id=event.id, owner=owner))
            raise
        finally:
            _let_go(self._key(event.id), lease)
            if not done:
                await _shielded(
                    self.backend.release(scope=self.scope, event_id=event.id, owner=owner)
                )

    async def _take_lease(
        self,
        backend: Backend,
        event: OrderedEvent,
        owner: str,
        now: datetime,
        leader: UUID | None,
    ) -> Begun:
        """Lease the event (and look at its leader), or raise why not."""
        taken = await backend.begin(
            BeginRequest(
                scope=self.scope,
                event_id=event.id,
                follows=leader,
                owner=owner,
                now=now,
                expires_at=now + self.lease_duration,
                seen_after=now - self.seen_expiration,
            )
        )
        if taken is Refused.ALREADY_SEEN:
            metrics.refused(self.scope, metrics.ALREADY_PROCESSED)
            self._log(event, "was processed already")
            raise EventAlreadyProcessed(event)
        if taken is Refused.HELD_ELSEWHERE:
            metrics.refused(self.scope, metrics.HELD_ELSEWHERE)
            self._log(event, "is already being processed")
            raise EventBeingProcessed(event)
        assert isinstance(taken, Begun)
        metrics.EVENTS_BEGUN.add(1, self._metric_attributes)
        if taken.took_over:
            self._took_over(event)
        return taken

    def _took_over(self, event: Any) -> None:
        """Count and log a lease taken from an owner that let it expire."""
        metrics.LEASES_TAKEN_OVER.add(1, self._metric_attributes)
        self._log(event, "was taken over from a lease that expired (its worker died or stalled)")

    def _keep(self, backend: Backend, owner: str, asked_at: float) -> int:
        """Have the owner's leases and claims, taken by a call made at ``asked_at``
        (``time.monotonic()``), renewed while its body runs long (see
        ordering/renewal.py); give the key back to ``keeper().release``.

        A call that took longer than a third of the lease (a store slower than the lease
        is short) leaves less than the usual time before expiry: the first renewal then
        starts at once.  One that came back after the expiry, or a renewal that did, is
        logged: another worker may have taken the lease over and handled the same event.
        The time a call took is the process's own, not the ordering's clock.
        """
        lease = self.lease_duration.total_seconds()
        took = time.monotonic() - asked_at
        if took >= lease:
            self._expired_before(took - lease, "the store's answer came")
        expires = asked_at + lease

        async def renew() -> None:
            nonlocal expires
            renewed_at = time.monotonic()
            expires_at = self._now() + self.lease_duration
            await backend.renew(scope=self.scope, owner=owner, expires_at=expires_at)
            late = time.monotonic() - expires
            if late > 0:
                self._expired_before(late, "its renewal")
            expires = renewed_at + lease

        return keeper().hold(renew, lease / 3, due_now=took > lease / 3)

    def _expired_before(self, seconds: float, when: str) -> None:
        logger.warning(
            "a lease or claim had expired %.1f s before %s: another worker may have taken "
            "it over and handled the same event (lease_duration is %s)",
            seconds,
            when,
            self.lease_duration,
            extra={"scope": self.scope},
        )

    # -- followers ------------------------------------------------------------------

    async def record_follower(self, event: E) -> None:
        """Remember that this event waits for the event it follows."""
        event = checked_event(event)
        leader = self._declared_leader(event)
        await self.backend.record_follower(
            FollowerRow(
                scope=self.scope,
                event_id=event.id,
                leader_id=leader,
                occurred=event.occurred,
                received=event.received,
                event_json=event.model_dump_json(),
            )
        )

    async def forget_follower(self, follower: E) -> None:
        await self.backend.forget_follower(
            scope=self.scope, event_id=event_id(follower, "follower")
        )

    async def get_followers(self, leader: E) -> list[E]:
        """The events waiting for this leader, in the order they occurred."""
        leader_id = event_id(leader, "leader")
        return self._load(await self.backend.followers_of(scope=self.scope, leader_id=leader_id))

    async def followers_by_id(self, follower_ids: Sequence[UUID | str]) -> list[E]:
        """The waiting events with these ids, in the order they occurred."""
        if isinstance(follower_ids, (str, UUID)) or not isinstance(follower_ids, Iterable):
            raise TypeError(f"follower_ids must be a sequence of UUIDs, not {follower_ids!r}")
        ids = [as_uuid(value, "follower_ids[]") for value in follower_ids]
        return self._load(await self.backend.followers_by_id(scope=self.scope, ids=ids))

    async def get_lost_followers(self) -> list[E]:
        """Hand out, once, followers whose leader never came within the lookback, and
        released followers whose handler died before finishing them."""
        now = self._now()
        rows = await self.backend.take_lost_followers(
            scope=self.scope,
            cutoff=lookback_cutoff(now, self.preceding_event_lookback),
            now=now,
            owner=_new_owner(),
            hold_until=now + self.lease_duration,
        )
        metrics.lost_followers(self._metric_attributes, len(rows))
        return self._load(rows)

    def _declared_leader(self, event: OrderedEvent) -> UUID:
        if event.follows is None or not is_follower(event):
            raise ValueError(f"event {event.id} does not follow another event")
        return event.follows

    def _leader_to_wait_for(self, event: OrderedEvent, now: datetime) -> UUID | None:
        """The leader this event must wait for, or None if it may go now."""
        if event.follows is None or not is_follower(event):
            return None
        # Too old for our bookkeeping of its leader to be trusted: send it.  The event is
        # not stored yet, so this is judged here, by the same cutoff as the lost rule's.
        if event.received <= lookback_cutoff(now, self.preceding_event_lookback):
            return None
        return event.follows

    # -- waiting for leaders --------------------------------------------------------

    async def wait_for_leader(self, event: E) -> None:
        """Return when the event may be processed; park it and raise EventArrivedEarly
        if its leader has not been seen (after waiting for a leader in flight)."""
        event = checked_event(event)
        now = self._now()
        leader = self._leader_to_wait_for(event, now)
        if leader is None:
            return
        status = await self.backend.leader_status(
            scope=self.scope, leader_id=leader, now=now, seen_after=now - self.seen_expiration
        )
        if status.seen:
            return
        lease = self._lease_of(event.id)
        await self._wait_or_park(event, leader, status.in_flight, lease.owner if lease else None)

    async def _wait_or_park(
        self, event: OrderedEvent, leader: UUID, in_flight: bool, owner: str | None
    ) -> None:
        if in_flight and await self._wait_for_in_flight(event, leader):
            return
        now = self._now()
        parked = await self.backend.park(
            ParkRequest(
                scope=self.scope,
                event_id=event.id,
                leader_id=leader,
                occurred=event.occurred,
                received=event.received,
                event_json=event.model_dump_json(),
                lease_owner=owner,
                seen_after=now - self.seen_expiration,
            )
        )
        if not parked:
            return  # the leader was seen while we looked: go ahead
        metrics.EVENTS_PARKED.add(1, self._metric_attributes)
        self._log(event, "arrived before the event it follows %s", leader)
        raise EventArrivedEarly(event)

    async def _wait_for_in_flight(self, event: OrderedEvent, leader: UUID) -> bool:
        """Wait while the leader is being processed; True once it has been seen.

        The leader's completion wakes us: on PostgreSQL through LISTEN/NOTIFY, on
        SQLite when it completes in this process.  Polling every ``poll_interval``
        stays as the fallback (and finds a completion in another SQLite process).
        """
        backend = self.backend
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.in_flight_event_timeout.total_seconds()
        async with backend.leader_waiter(
            scope=self.scope, leader_id=leader, notify=self.notify
        ) as waiter:
            if waiter.woken_by_completion and not await backend.mark_waiting(
                scope=self.scope, leader_id=leader, now=self._now()
            ):
                return await self.event_has_been_seen(leader)  # no live lease any more
            while (remaining := deadline - loop.time()) > 0:
                await waiter.wait(min(self.poll_interval, remaining))
                now = self._now()
                status = await backend.leader_status(
                    scope=self.scope,
                    leader_id=leader,
                    now=now,
                    seen_after=now - self.seen_expiration,
                )
                if status.seen:
                    return True
                if not status.in_flight:
                    return False  # its holder gave up or died: park instead of waiting on
        self._log(
            event, "timed out waiting for its in-flight leader %s, will treat as lost", leader
        )
        return False

    # -- the consumer's entry point -------------------------------------------------

    @asynccontextmanager
    async def preceding_event_confirmed(
        self, handler: EventHandler[E], event: E, depth: int = 0
    ) -> AsyncIterator[None]:
        """Run the body only once the event's leader has been processed.

        Raises EventArrivedEarly (the event is parked; its leader will hand it to
        ``handler`` later), EventBeingProcessed (another worker holds it; retry later),
        its subclass EventAlreadyProcessed (it was handled already; skip it) or
        MaxDepthExceeded.  After the body succeeds the event is marked seen and the
        followers that waited for it are handed to ``handler`` in the order they occurred.

        The round trips of one call: ``begin`` (take the lease and look at the leader)
        and ``complete`` (mark seen, release the lease, claim followers); ``park``
        instead of ``complete`` for an event that arrived early.
        """
        checked_event(event)
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {handler!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a whole number of at least 0, not {depth!r}")
        if depth > self.max_depth:
            self._log(event, "has exceeded the maximum recursion depth %s", self.max_depth)
            raise MaxDepthExceeded(event)
        backend = self.backend
        now, asked_at = self._now(), time.monotonic()
        leader = self._leader_to_wait_for(event, now)
        held = self._lease_of(event.id)
        if held is not None and not held.released_by_leader:
            held = None  # a lease of record_event_as_processing: take ours as usual
        if held is None:
            owner = _new_owner()
            begun = await self._take_lease(backend, event, owner, now, leader)
            leader_seen, leader_in_flight = begun.leader_seen, begun.leader_in_flight
        else:
            # Released by its leader's completion, which marked the leader seen in the
            # same transaction: nothing to look up.
            owner = held.owner
            leader_seen, leader_in_flight = True, False

        released: list[str] = []
        claim: Claim | None = None
        done = False
        # A released follower's lease is its leader's claim, which _hand_out keeps.
        kept = self._keep(backend, owner, asked_at) if held is None else None
        try:
            try:
                if leader is not None and not leader_seen:
                    await self._wait_or_park(event, leader, leader_in_flight, owner)
                yield
            finally:
                if kept is not None:
                    keeper().release(kept)
            now, asked_at = self._now(), time.monotonic()
            claim = Claim(owner=_new_owner(), until=now + self.lease_duration)
            released = await backend.complete(
                CompleteRequest(
                    scope=self.scope,
                    event_id=event.id,
                    lease_owner=owner,
                    now=now,
                    claim=claim,
                    is_follower=is_follower(event),
                    seen_until=now + self.seen_expiration,
                )
            )
            metrics.EVENTS_COMPLETED.add(1, self._metric_attributes)
            done = True
            if held is not None:
                held.completed = True
        except EventArrivedEarly as early:
            done = _parked_here(early, event.id)  # parking released the lease
            raise
        except StoreUnavailable:
            # The store did not answer within the deadline: rather than keep the caller
            # waiting as long again, the lease is given back in the background (it
            # expires after lease_duration if the store stays away).
            done = True
            if held is None:
                backend.later(backend.release(scope=self.scope, event_id=event.id, owner=owner))
            raise
        finally:
            if not done and held is None:
                await _shielded(backend.release(scope=self.scope, event_id=event.id, owner=owner))
        if released and claim is not None:
            await self._hand_out(handler, event, self._load(released), claim.owner, asked_at, depth)

    async def _hand_out(
        self,
        handler: EventHandler[E],
        leader: OrderedEvent,
        followers: list[E],
        owner: str,
        claimed_at: float,
        depth: int,
    ) -> None:
        """Hand released followers to the handler, in order, each then marked seen.

        Each follower arrives here claimed and leased by this worker.  Its row stays
        until it has been handled, so a crash loses nothing: the claim expires and
        ``get_lost_followers`` hands it out again.  A follower that was handled counts
        as seen and releases its own followers, whether or not the handler went through
        ``preceding_event_confirmed`` itself.
        """
        pending = list(followers)
        backend = self.backend
        kept = self._keep(backend, owner, claimed_at)
        try:
            while pending:
                follower = pending[0]
                if depth + 1 > self.max_depth:
                    raise MaxDepthExceeded(follower)
                lease = _Lease(owner, released_by_leader=True)
                key = self._key(follower.id)
                _hold(key, lease)
                metrics.EVENTS_RELEASED.add(1, self._metric_attributes)
                try:
                    await handler(follower, depth=depth + 1)
                finally:
                    _let_go(key, lease)
                if lease.completed:  # its handler's own call completed it, and handed on
                    pending.pop(0)
                    continue
                now, asked_at = self._now(), time.monotonic()
                claim = Claim(owner=_new_owner(), until=now + self.lease_duration)
                released = await backend.complete(
                    CompleteRequest(
                        scope=self.scope,
                        event_id=follower.id,
                        lease_owner=owner,
                        now=now,
                        claim=claim,
                        seen_until=now + self.seen_expiration,
                    )
                )
                metrics.EVENTS_COMPLETED.add(1, self._metric_attributes)
                pending.pop(0)
                if released:
                    await self._hand_out(
                        handler, follower, self._load(released), claim.owner, asked_at, depth + 1
                    )
        except MaxDepthExceeded:
            self._log(leader, "reached its max depth of %s followers processed.", self.max_depth)
        except StoreUnavailable:
            # As in preceding_event_confirmed: the claims are given back in the
            # background (else they expire, and the lost-follower sweep hands them out).
            ids = [f.id for f in pending]
            pending.clear()
            backend.later(backend.unclaim(scope=self.scope, owner=owner, ids=ids, now=self._now()))
            raise
        finally:
            keeper().release(kept)
            if pending:
                await _shielded(
                    backend.unclaim(
                        scope=self.scope,
                        owner=owner,
                        ids=[f.id for f in pending],
                        now=self._now(),
                    )
                )

    # -- clearing -------------------------------------------------------------------

    async def clear(self) -> None:
        """Delete every row of this scope."""
        await self.backend.clear(scope=self.scope)

    @classmethod
    async def clear_all_scopes(cls) -> None:
        """Delete every row of every scope, in each database this process opened an
        ordering on (else the default database)."""
        stores = sorted(opened(), key=str) or [(resolve_url(None), None)]
        for url, schema in stores:
            await backend_for(url, schema).clear(scope=None)


def _parked_here(early: EventArrivedEarly, parked_id: UUID) -> bool:
    """Whether the early arrival is this event's own (its parking released the lease),
    not one raised by a handler for another event."""
    return getattr(early.event, "id", None) == parked_id


async def _shielded(cleanup: Awaitable[None]) -> None:
    """Run cleanup to the end even if the caller is cancelled meanwhile."""
    task = asyncio.ensure_future(cleanup)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    try:
        task.result()
    except Exception:
        logger.warning("cleanup after an interrupted event failed", exc_info=True)
    if cancelled:
        raise asyncio.CancelledError


async def dispose() -> None:
    """Close what the store opened in this process on the running event loop: its
    connection pools, PostgreSQL's LISTEN connection, the lease renewals and the pruner.
    For shutdown and tests; an ordering used afterwards opens them again."""
    close_keeper()
    await dispose_backends()


async def dispose_engines() -> None:
    """Deprecated name of ``ordering.dispose()``, which closes backends, not engines."""
    warnings.warn(
        "ordering.causal.dispose_engines() is deprecated: call ordering.dispose()",
        DeprecationWarning,
        stacklevel=2,
    )
    await dispose()
