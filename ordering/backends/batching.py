"""Sharing round trips and commits between concurrent callers.

Several consumers in one process call the same operation at once.  A ``Batcher``
sends a call at once when nothing of its kind is in flight and the last round trip
went alone (so a lone consumer waits for nothing).  Otherwise it queues the call, and
the queue goes at the end of the loop's turn, or when a round trip in flight returns:
everything queued meanwhile in one round trip, one transaction, one commit.  Waiting
for the end of the turn matters once consumers run in step: those woken by one answer
all call again in the same turn, and the first of them going alone would split them
into a round trip of one and one of the rest.  Each caller
still gets its own answer, and its own error: when a batch fails for a reason other
than a lost database, its calls are tried again one at a time, so that an error lands
on the call that caused it.

A queued call's deadline runs from when it was made: its round trip gives up at the
earliest deadline of the calls it carries (see pool.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..exceptions import OrderingError
from .pool import gives_up_at_most, giving_up_at

logger = logging.getLogger(__name__)

R = TypeVar("R")
A = TypeVar("A")


@dataclass(slots=True)
class _Call(Generic[R, A]):
    """A queued call: its request, its caller's future, and when it gives up."""

    request: R
    future: asyncio.Future[A]
    gives_up_at: float


class Batcher(Generic[R, A]):
    """Combines concurrent calls of one operation.

    ``send`` takes requests and returns one answer per request, in order.
    ``orphaned(request, answer)`` is called for an answer whose caller was cancelled
    while its call was in flight (to give back what the call took).
    """

    def __init__(
        self,
        send: Callable[[Sequence[R]], Awaitable[Sequence[A]]],
        *,
        max_batch: int = 256,
        max_in_flight: int = 1,
        orphaned: Callable[[R, A], None] | None = None,
        deadline: float = float("inf"),
    ) -> None:
        self._send = send
        self._deadline = deadline
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._orphaned = orphaned
        self._queue: list[_Call[R, A]] = []
        self._in_flight = 0
        self._flushing: set[asyncio.Task[None]] = set()
        self._drain_scheduled = False
        #: The last round trip carried more than one call, or calls queued behind it.
        self._company = False

    async def submit(self, request: R) -> A:
        if self._in_flight < self._max_in_flight and not self._queue and not self._company:
            self._in_flight += 1
            try:
                (answer,) = await self._send((request,))
                return answer
            finally:
                self._returned(1)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[A] = loop.create_future()
        gives_up_at = min(loop.time() + self._deadline, gives_up_at_most())
        self._queue.append(_Call(request, future, gives_up_at))
        self._drain_soon()
        return await future

    def _returned(self, calls: int) -> None:
        """A round trip of ``calls`` calls is over: note whether it had company, and
        let the queue go."""
        self._company = calls > 1 or bool(self._queue)
        self._in_flight -= 1
        self._drain_soon()

    def _drain_soon(self) -> None:
        if self._queue and not self._drain_scheduled:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        if not self._queue or self._in_flight >= self._max_in_flight:
            return
        batch = self._queue[: self._max_batch]
        del self._queue[: self._max_batch]
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush(self, batch: list[_Call[R, A]]) -> None:
        live = [(call.request, call.future) for call in batch if not call.future.done()]
        try:
            if not live:
                return
            gives_up_at = min(call.gives_up_at for call in batch if not call.future.done())
            try:
                with giving_up_at(gives_up_at):
                    answers = await self._send([request for request, _ in live])
            except OrderingError as exc:  # the database is gone: every caller hears it
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                return
            except Exception:
                if len(live) == 1:
                    raise
                logger.debug("a batch of %d failed; trying its calls one by one", len(live))
                with giving_up_at(gives_up_at):
                    await self._one_by_one(live)
                return
            for (request, future), answer in zip(live, answers, strict=True):
                self._deliver(request, future, answer)
        except BaseException as exc:
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._returned(len(live))

    async def _one_by_one(self, batch: list[tuple[R, asyncio.Future[A]]]) -> None:
        for request, future in batch:
            if future.done():
                continue
            try:
                (answer,) = await self._send((request,))
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                self._deliver(request, future, answer)

    def _deliver(self, request: R, future: asyncio.Future[A], answer: A) -> None:
        if not future.done():
            future.set_result(answer)
        elif self._orphaned is not None:
            self._orphaned(request, answer)
