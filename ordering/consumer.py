"""OrderedConsumer: the consumer loop around ``CausalOrdering``, written once.

A broker callback hands each delivered event to ``OrderedConsumer.deliver`` and
acknowledges or redelivers the message as the returned ``Outcome`` says.  The consumer
runs ``preceding_event_confirmed`` around the user's handler (whose first statement
also refuses an event already seen, so a redelivery costs no extra round trip), hands
the followers a leader releases to the same handler, and runs the lost-follower sweep
(``get_lost_followers``) on its own, in a background task, every ``sweep_interval``.

Shutdown (``aclose``, or leaving ``async with``) waits for the handlings in flight
until ``close_timeout``, then cancels what is left: a cancelled handling releases its
lease (``preceding_event_confirmed`` does so on cancellation) and its delivery gets the
verdict ``STOPPED``, to be redelivered.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Generic, TypeVar
from uuid import UUID

from .causal import CausalOrdering
from .events import OrderedEvent
from .exceptions import (
    EventAlreadyProcessed,
    EventArrivedEarly,
    EventBeingProcessed,
    StoreUnavailable,
)

logger = logging.getLogger("ordering.consumer")

E = TypeVar("E", bound=OrderedEvent)

#: How often the background sweep asks the store for lost followers.
SWEEP_INTERVAL = timedelta(seconds=5)
#: The suggested wait before a delivery that was not acknowledged comes again.
RETRY_AFTER = timedelta(seconds=1)
#: How long ``aclose`` lets the handlings in flight run before cancelling them.
CLOSE_TIMEOUT = timedelta(seconds=30)

#: Set on an exception by the innermost handling it escaped from: the event it is about.
_FAILED_EVENT = "_ordering_failed_event"


class Verdict(enum.Enum):
    """What became of one delivery, and so what the broker callback does with it."""

    #: The handler ran to the end and the event is marked seen: acknowledge.
    HANDLED = "handled"
    #: The event was handled before (a redelivery): acknowledge.
    DUPLICATE = "duplicate"
    #: It arrived before its leader and is stored; the leader's handling will hand it
    #: to the handler (or the sweep will, after the lookback): acknowledge.
    PARKED = "parked"
    #: Another worker holds the event right now: redeliver it later.
    BUSY = "busy"
    #: The store could not be reached (``StoreUnavailable``): redeliver it later.
    UNAVAILABLE = "unavailable"
    #: The handler raised; the event is not marked seen: redeliver it later.
    FAILED = "failed"
    #: The consumer was closed before the handling finished: redeliver it.
    STOPPED = "stopped"

    @property
    def acknowledge(self) -> bool:
        """True: acknowledge the message; False: have the broker deliver it again."""
        return self in _ACKNOWLEDGED


_ACKNOWLEDGED = frozenset({Verdict.HANDLED, Verdict.DUPLICATE, Verdict.PARKED})


@dataclass(frozen=True)
class Outcome:
    """The verdict on one delivery, with what a broker callback may want besides."""

    verdict: Verdict
    #: Seconds to wait before the event is delivered again; None when acknowledged.
    retry_after: float | None = None
    #: What went wrong, for ``UNAVAILABLE`` and ``FAILED`` (to dead-letter a message
    #: that keeps failing, for instance).
    error: BaseException | None = None

    @property
    def acknowledge(self) -> bool:
        return self.verdict.acknowledge


def _positive(name: str, value: timedelta | None, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not isinstance(value, timedelta) or value <= timedelta(0):
        raise ValueError(f"{name} must be a positive timedelta, not {value!r}")
    return value.total_seconds()


class OrderedConsumer(Generic[E]):
    """Delivers events to a handler in causal order, through a ``CausalOrdering``.

    ``handler(event)`` is the user's code; it runs only once the event's leader has
    been handled, and the event counts as handled (seen) once it returns.  Make it
    idempotent: a crash between its side effects and the seen mark repeats it.

    A handler that raises gets the verdict ``FAILED``: the error is logged and the
    delivery is to be redelivered, since the event was not marked seen.  A message
    that fails every time comes back every time; the broker callback can dead-letter
    it (``Outcome.error`` says why it failed).  When the handler fails on a follower
    its leader released, the leader's delivery is still ``HANDLED`` (the leader was
    marked seen before its followers were handed on); the follower waits in the store
    and the sweep hands it out once its claim has expired.
    """

    def __init__(
        self,
        ordering: CausalOrdering[E],
        handler: Callable[[E], Awaitable[None]],
        *,
        sweep_interval: timedelta | None = SWEEP_INTERVAL,
        retry_after: timedelta = RETRY_AFTER,
        close_timeout: timedelta = CLOSE_TIMEOUT,
    ) -> None:
        if not isinstance(ordering, CausalOrdering):
            raise TypeError(f"ordering must be a CausalOrdering, not {ordering!r}")
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {handler!r}")
        self.ordering = ordering
        self.handler = handler
        self.sweep_interval = _positive("sweep_interval", sweep_interval, optional=True)
        self.retry_after = _positive("retry_after", retry_after)
        self.close_timeout = _positive("close_timeout", close_timeout)
        #: Handlings of deliveries, running now.
        self._in_flight: set[asyncio.Task[Outcome]] = set()
        #: Lost followers the store handed out that have not been handled yet: the
        #: store no longer holds them, so they are tried again at each sweep, and
        #: stored again as waiting followers if the consumer closes first.
        self._lost: deque[E] = deque()
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._closed = False

    # -- the broker's side -------------------------------------------------------------

    async def deliver(self, event: E) -> Outcome:
        """Handle one delivered event; the outcome says whether to acknowledge it.

        The handling runs in a task of its own, so that ``aclose`` can cancel it
        without cancelling the caller; if the caller is cancelled, the handling is
        cancelled too (its lease released) before the cancellation goes on.
        """
        if self._closed:
            raise RuntimeError(
                f"the consumer of scope {self.ordering.scope!r} is closed: stop the "
                "broker's deliveries before closing it"
            )
        self._start_sweeping()
        task = asyncio.create_task(self._deliver(event))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current and current.cancelling()):
                return self._outcome(event, Verdict.STOPPED)
            task.cancel()
            await asyncio.wait([task], timeout=self.close_timeout)
            raise

    async def __aenter__(self) -> OrderedConsumer[E]:
        self._start_sweeping()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop: no new deliveries, no new sweeps; wait for the handlings in flight
        (and a sweep round in progress) until ``close_timeout``, then cancel what is
        left.  Lost followers taken from the store but not handled are stored again
        as waiting followers, so another worker's sweep finds them."""
        if self._closed:
            return
        self._closed = True
        if self._stopping is not None:
            self._stopping.set()
        running: set[asyncio.Task[Any]] = set(self._in_flight)
        if self._sweeper is not None:
            running.add(self._sweeper)
        if running:
            _, late = await asyncio.wait(running, timeout=self.close_timeout)
            if late:
                logger.warning(
                    "cancelling %d handlings still running after %s s",
                    len(late),
                    self.close_timeout,
                    extra={"scope": self.ordering.scope, "in_flight": len(late)},
                )
                for task in late:
                    task.cancel()
                _, stuck = await asyncio.wait(late, timeout=self.close_timeout)
                if stuck:
                    logger.error(
                        "%d handlings did not stop within %s s of being cancelled",
                        len(stuck),
                        self.close_timeout,
                        extra={"scope": self.ordering.scope, "in_flight": len(stuck)},
                    )
        await self._store_lost_again()

    # -- handling ------------------------------------------------------------------------

    async def handle(self, event: E, depth: int = 0) -> None:
        """Run the user's handler inside ``preceding_event_confirmed``.

        This is also the handler the ordering hands released followers to, so each
        of them goes through ``preceding_event_confirmed`` again.  It raises what that
        raises; ``deliver`` turns it into a verdict.  A subclass may wrap it to watch
        every handling (depth > 0: a follower released by a leader).
        """
        try:
            async with self.ordering.preceding_event_confirmed(self.handle, event, depth=depth):
                await self.handler(event)
        except Exception as exc:
            if not hasattr(exc, _FAILED_EVENT):
                setattr(exc, _FAILED_EVENT, event.id)
            raise

    async def _deliver(self, event: E) -> Outcome:
        try:
            await self.handle(event)
        except EventArrivedEarly as exc:
            if _about(exc, event.id):
                return self._outcome(event, Verdict.PARKED)
            return self._failed(event, exc)
        except EventAlreadyProcessed as exc:
            if _about(exc, event.id):
                return self._outcome(event, Verdict.DUPLICATE)
            return self._failed(event, exc)
        except EventBeingProcessed as exc:
            if _about(exc, event.id):
                return self._outcome(event, Verdict.BUSY, exc)
            return self._failed(event, exc)
        except Exception as exc:
            return self._failed(event, exc)
        return self._outcome(event, Verdict.HANDLED)

    def _failed(self, event: E, exc: Exception) -> Outcome:
        failed_on = getattr(exc, _FAILED_EVENT, event.id)
        unavailable = isinstance(exc, StoreUnavailable)
        extra = self._extra(event) | {"failed_event_id": failed_on, "error": type(exc).__name__}
        if failed_on != event.id:
            # A follower this event released failed: this event was marked seen first.
            logger.error(
                "handling follower %s of event %s failed; it waits in the store until "
                "its claim expires and the sweep hands it out",
                failed_on,
                event.id,
                exc_info=not unavailable,
                extra=extra,
            )
            return self._outcome(event, Verdict.HANDLED)
        if unavailable:
            logger.warning("event %s: %s", event.id, exc, extra=extra)
            return self._outcome(event, Verdict.UNAVAILABLE, exc)
        logger.error("the handler failed on event %s", event.id, exc_info=exc, extra=extra)
        return self._outcome(event, Verdict.FAILED, exc)

    def _outcome(self, event: E, verdict: Verdict, error: BaseException | None = None) -> Outcome:
        outcome = Outcome(
            verdict,
            retry_after=None if verdict.acknowledge else self.retry_after,
            error=error,
        )
        self.on_outcome(event, outcome)
        return outcome

    def on_outcome(self, event: E, outcome: Outcome) -> None:
        """Called with the outcome of every delivery and of every lost follower the
        sweep handles; logs it at DEBUG.  A subclass may count them."""
        logger.debug(
            "event %s: %s",
            event.id,
            outcome.verdict.value,
            extra=self._extra(event) | {"verdict": outcome.verdict.value},
        )

    def _extra(self, event: E) -> dict[str, Any]:
        return {"event_id": event.id, "follows": event.follows, "scope": self.ordering.scope}

    # -- the lost-follower sweep --------------------------------------------------------

    async def sweep(self) -> int:
        """One round of the sweep: take the lost followers ``get_lost_followers``
        hands out and handle them, with those earlier rounds could not handle.
        Returns how many the store handed out.  Raises what the store raises
        (``StoreUnavailable``); the background sweep logs it and tries again later."""
        found = await self.ordering.get_lost_followers()
        self._lost.extend(found)
        retry: list[E] = []
        # Each follower leaves ``_lost`` only once its handling is over, so one whose
        # handling is cancelled (at close) is stored again.
        for _ in range(len(self._lost)):
            follower = self._lost[0]
            outcome = await self._deliver(follower)
            self._lost.popleft()
            if not outcome.acknowledge:
                retry.append(follower)
        self._lost.extend(retry)
        return len(found)

    def _start_sweeping(self) -> None:
        if self._sweeper is not None or self._closed or self.sweep_interval is None:
            return
        self._stopping = asyncio.Event()
        self._sweeper = asyncio.create_task(
            self._sweep_until_stopped(self.sweep_interval, self._stopping),
            name=f"ordering sweep of {self.ordering.scope}",
        )

    async def _sweep_until_stopped(self, interval: float, stopping: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(stopping.wait(), interval)
                return
            except TimeoutError:
                pass
            try:
                await self.sweep()
            except StoreUnavailable as exc:
                logger.warning(
                    "the lost-follower sweep failed, trying again in %s s: %s",
                    interval,
                    exc,
                    extra={"scope": self.ordering.scope, "error": type(exc).__name__},
                )
            except Exception:
                logger.exception(
                    "the lost-follower sweep failed, trying again in %s s",
                    interval,
                    extra={"scope": self.ordering.scope},
                )

    async def _store_lost_again(self) -> None:
        """Put lost followers this consumer took but did not handle back in the store."""
        while self._lost:
            follower = self._lost.popleft()
            try:
                await self.ordering.record_follower(follower)
            except Exception:
                logger.exception(
                    "could not store lost follower %s again: it is dropped",
                    follower.id,
                    extra=self._extra(follower),
                )


def _about(exc: Exception, event_id: UUID) -> bool:
    """Whether an ordering signal is about this event, not one raised by the handler
    for another event."""
    return getattr(getattr(exc, "event", None), "id", None) == event_id
