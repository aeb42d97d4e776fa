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
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar, overload
from uuid import UUID

from pydantic import BaseModel

from .constants import (
    IN_FLIGHT_EVENT_TIMEOUT,
    LEASE_DURATION,
    MAX_DEPTH_OF_PRECEDING_EVENT,
    PRECEDING_EVENT_LOOKBACK,
    SEEN_EXPIRATION,
)
from .engine import EngineRegistry, resolve_url
from .exceptions import (
    EventAlreadyProcessed,
    EventArrivedEarly,
    EventBeingProcessed,
    MaxDepthExceeded,
)
from .models import ReceivedEvent, utc_now
from .store import Begun, Refused, Store

logger = logging.getLogger("ordering")

E = TypeVar("E", bound=BaseModel)
E_contra = TypeVar("E_contra", bound=BaseModel, contravariant=True)


class EventHandler(Protocol[E_contra]):
    """What ``preceding_event_confirmed`` hands released followers to."""

    def __call__(self, event: E_contra, /, depth: int = 0) -> Awaitable[None]: ...


#: Names this process in lease and claim owners, so that audits can tell who holds what.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
_owner_serial = itertools.count()


def _new_owner() -> str:
    """A fresh token for one lease or one batch of claims: unique, readable."""
    return f"{WORKER_ID}:{next(_owner_serial)}"


_stores = EngineRegistry()


@dataclass
class _Held:
    """A follower's lease that a leader took on this task's behalf."""

    owner: str
    completed: bool = False


#: Leases this task holds for released followers: a handler that re-enters
#: ``preceding_event_confirmed`` for such a follower uses the lease instead of
#: taking (and failing to take) a second one.
_held: contextvars.ContextVar[Mapping[tuple[str, str, UUID], _Held]] = contextvars.ContextVar(
    "ordering_held_leases", default=MappingProxyType({})
)

#: Leases taken by ``record_event_as_processing``, for ``forget_event_is_processing``.
_process_leases: dict[tuple[str, str, UUID], str] = {}


_EVENT_FIELDS = frozenset({"id", "follows", "occurred", "received"})


def _is_event_model(event_type: Any) -> bool:
    return (
        isinstance(event_type, type)
        and issubclass(event_type, BaseModel)
        and _EVENT_FIELDS.issubset(event_type.model_fields)
    )


def _follower_times(event: Any) -> tuple[datetime, datetime]:
    """(occurred, received), refusing naive datetimes from models that allow them."""
    for name in ("occurred", "received"):
        value = getattr(event, name)
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(
                f"event {event.id}: {name} must be an aware UTC datetime, not {value!r}"
            )
    return event.occurred, event.received


def _is_follower(event: Any) -> bool:
    """Whether the event follows another (only such an event can have been parked)."""
    return event.follows is not None and event.follows != event.id


def _event_id(event: Any) -> UUID:
    return event if isinstance(event, UUID) else event.id


class CausalOrdering(Generic[E]):
    """Keeps events in causal order, with its state in a SQL database.

    Construction is cheap and does no I/O: every instance on the same URL shares one
    engine and pool (per event loop).  Time comes from ``clock``; tests pass their own.
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
                f"event_type must be a pydantic model with the fields {sorted(_EVENT_FIELDS)}, "
                f"not {event_type!r}"
            )
        self.scope = scope
        self.url = resolve_url(url)
        self.clock: Callable[[], datetime] = clock or utc_now
        self.event_type: type[Any] = event_type or ReceivedEvent
        self.preceding_event_lookback = preceding_event_lookback
        self.seen_expiration = seen_expiration
        self.max_depth = max_depth
        self.in_flight_event_timeout = in_flight_event_timeout
        self.lease_duration = lease_duration
        self.poll_interval = poll_interval
        self.notify = notify

    # -- plumbing -----------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The shared store for this URL on the running event loop."""
        return _stores.get(self.url, Store)  # type: ignore[no-any-return]

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None:
            raise ValueError("the clock returned a naive datetime; it must return aware UTC")
        return now

    def _load(self, rows: Iterable[str]) -> list[E]:
        events = [self.event_type.model_validate_json(row) for row in rows]
        events.sort(key=lambda e: (e.occurred, e.received, e.id))
        return events

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

    async def event_has_been_seen(self, event: UUID | E) -> bool:
        return await self.store.seen(
            self.scope, _event_id(event), self._now() - self.seen_expiration
        )

    async def record_event_as_seen(self, event: E) -> None:
        await self.store.record_seen(self.scope, event.id, self._now())  # type: ignore[attr-defined]

    # -- processing leases --------------------------------------------------------

    async def record_event_as_processing(self, event: E) -> bool:
        """Take the event's processing lease; False if another holder has a live one."""
        owner = _new_owner()
        now = self._now()
        event_id: UUID = event.id  # type: ignore[attr-defined]
        taken = await self.store.begin(
            self.scope,
            event_id,
            None,
            owner,
            now,
            now + self.lease_duration,
            now,
            refuse_seen=False,  # the seed's guard is about processing only
        )
        if not isinstance(taken, Begun):
            return False
        _process_leases[(self.url, self.scope, event_id)] = owner
        return True

    async def event_has_started_processing(self, event: UUID | E) -> bool:
        now = self._now()
        _, in_flight = await self.store.leader_status(self.scope, _event_id(event), now, now)
        return in_flight

    async def forget_event_is_processing(self, event: E) -> None:
        """Release the lease this process took with ``record_event_as_processing``."""
        event_id: UUID = event.id  # type: ignore[attr-defined]
        owner = _process_leases.pop((self.url, self.scope, event_id), None)
        if owner is not None:
            await self.store.release(self.scope, event_id, owner)
        else:
            logger.debug("no lease of this process to forget for %s", event_id)

    @asynccontextmanager
    async def event_is_processing(self, event: E) -> AsyncIterator[None]:
        """Hold the event's lease while the body runs; mark it seen if the body succeeds.

        Raises EventBeingProcessed when another holder has a live lease.
        """
        if self._held(event) is not None:
            yield  # a leader released this follower to us: its lease is already ours
            return
        owner = _new_owner()
        now = self._now()
        event_id: UUID = event.id  # type: ignore[attr-defined]
        await self._take_lease(event, owner, now, None)
        key = (self.url, self.scope, event_id)
        _process_leases[key] = owner  # so that wait_for_leader can give it up when parking
        done = False
        try:
            async with self._keep_alive(owner):
                yield
            await self.store.complete(
                self.scope,
                event_id,
                owner,
                self._now(),
                None,
                now,
                is_follower=_is_follower(event),
            )
            done = True
        except EventArrivedEarly as early:
            done = _event_id(early.event) == event_id  # parking released the lease
            raise
        finally:
            if _process_leases.get(key) == owner:
                del _process_leases[key]
            if not done:
                await _shielded(self.store.release(self.scope, event_id, owner))

    async def _take_lease(
        self, event: Any, owner: str, now: datetime, leader: UUID | None
    ) -> Begun:
        """Lease the event (and look at its leader), or raise why not."""
        taken = await self.store.begin(
            self.scope,
            event.id,
            leader,
            owner,
            now,
            now + self.lease_duration,
            now - self.seen_expiration,
        )
        if taken is Refused.ALREADY_SEEN:
            self._log(event, "was processed already")
            raise EventAlreadyProcessed(event)
        if taken is Refused.HELD_ELSEWHERE:
            self._log(event, "is already being processed")
            raise EventBeingProcessed(event)
        assert isinstance(taken, Begun)
        return taken

    def _held(self, event: Any) -> _Held | None:
        return _held.get().get((self.url, self.scope, event.id))

    @asynccontextmanager
    async def _keep_alive(self, owner: str) -> AsyncIterator[None]:
        """Renew the owner's leases and claims while the body runs longer than a third
        of their duration, so that only a dead holder ever loses them.

        Costs one timer per event; the renewal itself only runs for slow bodies.
        """
        loop = asyncio.get_running_loop()
        interval = self.lease_duration.total_seconds() / 3
        tasks: set[asyncio.Task[None]] = set()

        async def renew() -> None:
            try:
                await self.store.renew(self.scope, owner, self._now() + self.lease_duration)
            except Exception:
                logger.warning("could not renew lease %s", owner, exc_info=True)

        def fire() -> None:
            task = loop.create_task(renew())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            timer[0] = loop.call_later(interval, fire)

        timer = [loop.call_later(interval, fire)]
        try:
            yield
        finally:
            timer[0].cancel()
            for task in tasks:
                task.cancel()

    # -- followers ------------------------------------------------------------------

    async def record_follower(self, event: E) -> None:
        """Remember that this event waits for the event it follows."""
        leader = self._declared_leader(event)
        await self.store.record_follower(
            self.scope,
            event.id,  # type: ignore[attr-defined]
            leader,
            *_follower_times(event),
            event.model_dump_json(),
        )

    async def forget_follower(self, follower: E) -> None:
        await self.store.forget_follower(self.scope, follower.id)  # type: ignore[attr-defined]

    async def get_followers(self, leader: E) -> list[E]:
        """The events waiting for this leader, in the order they occurred."""
        return self._load(await self.store.followers_of(self.scope, leader.id))  # type: ignore[attr-defined]

    async def followers_by_id(self, follower_ids: Sequence[UUID]) -> list[E]:
        """The waiting events with these ids, in the order they occurred."""
        return self._load(await self.store.followers_by_id(self.scope, list(follower_ids)))

    async def get_lost_followers(self) -> list[E]:
        """Hand out, once, followers whose leader never came within the lookback, and
        released followers whose handler died before finishing them."""
        now = self._now()
        rows = await self.store.take_lost_followers(
            self.scope, now - self.preceding_event_lookback, now
        )
        return self._load(rows)

    def _declared_leader(self, event: Any) -> UUID:
        if not _is_follower(event):
            raise ValueError(f"event {event.id} does not follow another event")
        return event.follows  # type: ignore[no-any-return]

    def _leader_to_wait_for(self, event: Any, now: datetime) -> UUID | None:
        """The leader this event must wait for, or None if it may go now."""
        if not _is_follower(event):
            return None
        # Too old for our bookkeeping of its leader to be trusted: send it.
        if now - event.received >= self.preceding_event_lookback:
            return None
        return event.follows  # type: ignore[no-any-return]

    # -- waiting for leaders --------------------------------------------------------

    async def wait_for_leader(self, event: E) -> None:
        """Return when the event may be processed; park it and raise EventArrivedEarly
        if its leader has not been seen (after waiting for a leader in flight)."""
        now = self._now()
        leader = self._leader_to_wait_for(event, now)
        if leader is None:
            return
        seen, in_flight = await self.store.leader_status(
            self.scope, leader, now, now - self.seen_expiration
        )
        if seen:
            return
        held = self._held(event)
        owner = held.owner if held else _process_leases.get((self.url, self.scope, event.id), "")  # type: ignore[attr-defined]
        await self._wait_or_park(event, leader, in_flight, owner)

    async def _wait_or_park(self, event: Any, leader: UUID, in_flight: bool, owner: str) -> None:
        if in_flight and await self._wait_for_in_flight(event, leader):
            return
        now = self._now()
        parked = await self.store.park(
            self.scope,
            event.id,
            leader,
            *_follower_times(event),
            event.model_dump_json(),
            owner,
            now - self.seen_expiration,
        )
        if not parked:
            return  # the leader was seen while we looked: go ahead
        self._log(event, "arrived before the event it follows %s", leader)
        raise EventArrivedEarly(event)

    async def _wait_for_in_flight(self, event: Any, leader: UUID) -> bool:
        """Wait while the leader is being processed; True once it has been seen.

        On PostgreSQL the leader's completion wakes us (LISTEN/NOTIFY); polling every
        ``poll_interval`` stays as the fallback, and is all there is on SQLite.
        """
        store = self.store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.in_flight_event_timeout.total_seconds()
        async with store.leader_waiter(self.scope, leader, notify=self.notify) as waiter:
            if waiter.notified_by_database and not await store.mark_waiting(
                self.scope, leader, self._now()
            ):
                return await self.event_has_been_seen(leader)  # no live lease any more
            while (remaining := deadline - loop.time()) > 0:
                await waiter.wait(min(self.poll_interval, remaining))
                now = self._now()
                seen, in_flight = await store.leader_status(
                    self.scope, leader, now, now - self.seen_expiration
                )
                if seen:
                    return True
                if not in_flight:
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
        """
        if depth > self.max_depth:
            self._log(event, "has exceeded the maximum recursion depth %s", self.max_depth)
            raise MaxDepthExceeded(event)
        store = self.store
        ev: Any = event
        now = self._now()
        leader = self._leader_to_wait_for(ev, now)
        seen_after = now - self.seen_expiration
        held = self._held(ev)
        if held is None:
            owner = _new_owner()
            begun = await self._take_lease(ev, owner, now, leader)
            leader_seen, leader_in_flight = begun.leader_seen, begun.leader_in_flight
        else:
            owner = held.owner
            leader_seen, leader_in_flight = (
                await store.leader_status(self.scope, leader, now, seen_after)
                if leader is not None
                else (True, False)
            )

        released: list[str] = []
        done = False
        try:
            async with self._keep_alive(owner):
                if leader is not None and not leader_seen:
                    await self._wait_or_park(ev, leader, leader_in_flight, owner)
                yield
            now = self._now()
            claim_owner = _new_owner()
            released = await store.complete(
                self.scope,
                ev.id,
                owner,
                now,
                claim_owner,
                now + self.lease_duration,
                is_follower=_is_follower(ev),
            )
            done = True
            if held is not None:
                held.completed = True
        except EventArrivedEarly as early:
            done = _event_id(early.event) == ev.id  # parking released the lease
            raise
        finally:
            if not done and held is None:
                await _shielded(store.release(self.scope, ev.id, owner))
        if released:
            await self._hand_out(handler, ev, self._load(released), claim_owner, depth)

    async def _hand_out(
        self,
        handler: EventHandler[E],
        leader: Any,
        followers: list[E],
        owner: str,
        depth: int,
    ) -> None:
        """Hand released followers to the handler, in order, each then marked seen.

        Each follower arrives here claimed and leased by this worker.  Its row stays
        until it has been handled, so a crash loses nothing: the claim expires and
        ``get_lost_followers`` hands it out again.  A follower that was handled counts
        as seen and releases its own followers, whether or not the handler went through
        ``preceding_event_confirmed`` itself.
        """
        pending: list[Any] = list(followers)
        store = self.store
        try:
            async with self._keep_alive(owner):
                while pending:
                    follower = pending[0]
                    if depth + 1 > self.max_depth:
                        raise MaxDepthExceeded(follower)
                    held = _Held(owner)
                    token = _held.set({**_held.get(), (self.url, self.scope, follower.id): held})
                    try:
                        await handler(follower, depth=depth + 1)
                    finally:
                        _held.reset(token)
                    released: list[str] = []
                    claim_owner = _new_owner()
                    if not held.completed:
                        now = self._now()
                        released = await store.complete(
                            self.scope,
                            follower.id,
                            owner,
                            now,
                            claim_owner,
                            now + self.lease_duration,
                        )
                    pending.pop(0)
                    if released:
                        await self._hand_out(
                            handler, follower, self._load(released), claim_owner, depth + 1
                        )
        except MaxDepthExceeded:
            self._log(leader, "reached its max depth of %s followers processed.", self.max_depth)
        finally:
            if pending:
                await _shielded(
                    store.unclaim(self.scope, owner, [f.id for f in pending], self._now())
                )

    # -- clearing -------------------------------------------------------------------

    async def clear(self) -> None:
        """Delete every row of this scope."""
        await self.store.clear(self.scope)

    @classmethod
    async def clear_all_scopes(cls) -> None:
        """Delete every row of every scope, in each database this process opened an
        ordering on (else the default database)."""
        urls = sorted(_stores.urls_opened) or [resolve_url(None)]
        for url in urls:
            await _stores.get(url, Store).clear(None)


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


async def dispose_engines() -> None:
    """Close the pools this process opened on the running event loop (for shutdown and tests)."""
    for store in _stores.forget_current():
        await store.dispose()
