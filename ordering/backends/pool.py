"""The connection pool of a backend, and the one place statements are run.

``Connections.run`` is the choke point: every statement of every operation, the
operators' included, goes through it.  It keeps opened connections between operations,
bounds how many are in use, retries lost connections and maps the driver's errors,
all within one deadline per call.  Each dialect says how to open, close and judge a
connection and how to read its driver's errors (``PostgresConnections``,
``SqliteConnections``); nothing else in the package opens one.

Deadlines and retries
---------------------
Every call of the store has one deadline (``deadline``, from the URL's ``?deadline=``
or the ordering's ``deadline=``; 10 seconds unless set): everything the call waits for
counts against it: a free connection, connecting, the statement, a lock the statement
waits for, the backoff between attempts, and the time a call spends queued for a shared
round trip (batching.py).  When it has passed, the call raises ``StoreUnavailable``.

A connection that fails is dropped and the operation tried again on another one, with
jittered exponential backoff.  Each attempt may take at most a third of the deadline
(``attempt_seconds``), so a connection that went silent (a hung server, a half-open
network path) is given up while there is time to try a fresh one.  A failure before
the statement could change anything is always safe to retry; after it may have been
applied, only idempotent operations are retried.  Every write of the store is
idempotent for its caller's token (a lease or claim already ours is taken again; an
upsert writes the same row), except ``take_lost_followers``, whose DELETE hands rows out
once and so is never repeated blindly.  Which errors count as a lost connection is
decided by exception class and SQLSTATE (PostgreSQL) or result code (SQLite), never by
message text.

The retry loop is written out here rather than taken from a retry library: every
statement of the hot path goes through it, and a library's per-call machinery
(tenacity's AsyncRetrying: about 57 us per call, measured beside 0.8 us for this loop)
would cost more than some of the statements; the loop also has to tell "changed
nothing" from "maybe applied", which such libraries do not model.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Generic, TypeVar

from .. import metrics
from ..exceptions import StoreUnavailable
from ..urls import url_deadline

logger = logging.getLogger("ordering.backends")

T = TypeVar("T")
C = TypeVar("C")

#: stack set it: a batch runs until its earliest caller's deadline, and an operation
#: run inside another (the schema check before the first) shares the outer deadline.
_gives_up_at: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "ordering_gives_up_at", default=None
)
#: When the running attempt must be over (event loop time).
_attempt_ends: contextvars.ContextVar[float] = contextvars.ContextVar(
    "ordering_attempt_ends", default=float("inf")
)


def seconds_left() -> float:
    """What is left of the running attempt's time: every wait of an operation bounds
    itself with it (asyncpg's ``timeout=``, SQLite's busy timeout)."""
    return max(0.0, _attempt_ends.get() - asyncio.get_running_loop().time())


def gives_up_at_most() -> float:
    """When the running task's call gives up at the latest, if a caller set it."""
    return _gives_up_at.get() or float("inf")


@contextmanager
def giving_up_at(when: float | None) -> Iterator[None]:
    """Calls made in the block give up at ``when`` (event loop time) at the latest."""
    token = _gives_up_at.set(when)
    try:
        yield
    finally:
        _gives_up_at.reset(token)


class Connections(Generic[C], abc.ABC):
    """Connections of one backend: at most ``max_connections`` in use at once, every
    operation run within the deadline with retries, and those opened kept between
    operations until they go unused for ``idle_seconds``.

    Keeping them matters under concurrency: a new connection costs a connect, and its
    first statements a prepare each and a lookup of their array types (milliseconds),
    so a pool that closed what it could not keep idle would open and close connections
    all the time once more operations run at once than it keeps.

    Subclasses say how to open and close a connection and how to read the driver's
    errors; nothing else in the package opens one.
    """

    def __init__(
        self,
        url: str,
        *,
        deadline: float | None = None,
        backoff: float = 0.05,
        backoff_max: float = 2.0,
        max_connections: int = 30,
        idle_seconds: float = 60.0,
    ) -> None:
        self.url = url
        #: Seconds a call may take in all (see the module's docstring).
        self.deadline = url_deadline(url) if deadline is None else deadline
        #: Seconds one attempt may take: connecting and running its statements.  An
        #: attempt is tried again only if a whole one still fits in the deadline, so
        #: the server's own timeouts (``server_timeout_ms``) always end a statement
        #: before its caller gives up on it: a statement given up on is rolled back,
        #: not left waiting for a lock to be applied later.
        self.attempt_seconds = self.deadline / 3
        self.server_timeout_ms = max(1, int(self.attempt_seconds * 800))
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.idle_seconds = idle_seconds
        #: Open connections not in use, each with when it was given back; the most
        #: recently used last, so the ones at the front are those unused longest.
        self._idle: list[tuple[C, float]] = []
        self._closing_timer: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        #: Set by ``aclose()``: a connection given back from then on is closed.
        self._closed = False
        self._slots = asyncio.Semaphore(max_connections)
        self.before_first_use: Callable[[], Awaitable[None]] | None = None
        self._system = metrics.system_of(url)
        self._metric_attributes = metrics.system_attributes(self._system)
        self._operations: dict[str, metrics.Attributes] = {}

    # what a dialect says
    @abc.abstractmethod
    async def connect(self) -> C:
        """Open a connection, waiting at most ``attempt_seconds`` (or ``seconds_left()``
        of a running attempt)."""

    @abc.abstractmethod
    async def close(self, connection: C) -> None:
        """Close quietly, waiting a moment at most: the connection may be broken already."""

    @abc.abstractmethod
    def discard(self, connection: C) -> None:
        """Drop a connection that failed or timed out, at once, without a word to the
        server (which may not answer)."""

    @abc.abstractmethod
    def is_usable(self, connection: C) -> bool: ...

    @abc.abstractmethod
    def is_transient(self, exc: BaseException) -> bool:
        """A lost or refused connection, a busy database, a statement that lost a race
        or ran out of time: worth trying again."""

    @abc.abstractmethod
    def changed_nothing(self, exc: BaseException, connection: C | None) -> bool:
        """The failed statement certainly changed nothing: it never reached the
        database, or the database rolled it back."""

    @abc.abstractmethod
    def is_database_error(self, exc: BaseException) -> bool:
        """An error of the driver or the network (as opposed to a bug or cancellation)."""

    @abc.abstractmethod
    def safe_url(self) -> str: ...

    # the pool
    @property
    def idle(self) -> int:
        """How many connections are open and not in use."""
        return len(self._idle)

    async def _acquire(self) -> C:
        while self._idle:
            connection, _ = self._idle.pop()
            if self.is_usable(connection):
                return connection
            self.discard(connection)
        return await self.connect()

    async def _give_back(self, connection: C) -> None:
        if self._closed:
            await self.close(connection)
        elif self.is_usable(connection):
            self._idle.append((connection, time.monotonic()))
            self._close_unused_later()
        else:
            self.discard(connection)

    def _close_unused_later(self) -> None:
        """Close the connections left unused for ``idle_seconds``, even if no operation
        comes to give one back: one timer at a time, while any connection is idle."""
        if self._closing_timer is None and self._idle:
            self._closing_timer = asyncio.get_running_loop().call_later(
                self.idle_seconds, self._closing_due
            )

    def _closing_due(self) -> None:
        self._closing_timer = None
        task = asyncio.get_running_loop().create_task(self._close_unused())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_unused(self) -> None:
        cutoff = time.monotonic() - self.idle_seconds
        while self._idle and self._idle[0][1] <= cutoff:
            unused, _ = self._idle.pop(0)
            await self.close(unused)
        self._close_unused_later()

    async def aclose(self) -> None:
        """Close the idle connections, and each one given back from now on: a call
        still running when its backend is disposed closes its connection as it ends,
        instead of leaving it open in a pool nobody uses again."""
        self._closed = True
        await self.close_idle()

    async def close_idle(self) -> None:
        idle, self._idle = self._idle, []
        if self._closing:  # a timed close under way: let it finish, not outlive the loop
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._closing_timer is not None:
            self._closing_timer.cancel()
            self._closing_timer = None
        for connection, _ in idle:
            await self.close(connection)

    def abandon(self) -> None:
        """Forget the idle connections of a closed event loop, closing those that close
        without it (``close_now``); the others go with their finalizers."""
        idle, self._idle = self._idle, []
        self._closing_timer = None  # a timer of a closed loop never fires
        for connection, _ in idle:
            self.close_now(connection)

    def close_now(self, connection: C) -> None:
        """Close a connection without its event loop, if the driver can (SQLite's can;
        an asyncpg connection needs its loop to close its socket)."""

    def _drop_idle(self) -> None:
        """The server may have dropped every connection: drop the idle ones too."""
        idle, self._idle = self._idle, []
        for connection, _ in idle:
            self.discard(connection)

    @asynccontextmanager
    async def held(self) -> AsyncIterator[C]:
        """One connection for a caller that manages its own statements (no retries,
        no deadline on its statements)."""
        async with self._slots:
            connection = await self._acquire()
            try:
                yield connection
            except BaseException:
                self.discard(connection)
                raise
            await self._give_back(connection)

    async def _take_slot(self, by: float) -> bool:
        """Take one of the ``max_connections`` slots, waiting until ``by`` at most.

        Neither this nor the statements are bounded with ``asyncio.timeout``: on
        Python 3.11 a timeout that fires as the awaited call completes leaves a
        cancellation pending, which would then cancel the caller after the statement
        succeeded.  The drivers' own timeouts raise instead (see ``seconds_left``)."""
        if not self._slots.locked():
            await self._slots.acquire()  # free: returns at once
            return True
        waiting = asyncio.ensure_future(self._slots.acquire())
        await asyncio.wait({waiting}, timeout=max(0.0, by - asyncio.get_running_loop().time()))
        if not waiting.done():
            waiting.cancel()
            await asyncio.wait({waiting})
        if waiting.cancelled():
            raise TimeoutError("no free connection within the attempt's time")
        return True

    async def run(
        self,
        operation: Callable[[C], Awaitable[T]],
        *,
        idempotent: bool = True,
        name: str = "other",
    ) -> T:
        """Run ``operation`` on a connection, retrying lost connections, within the
        deadline of the call (see the module's docstring).  ``name`` says which
        operation it is in the metrics (``ordering.store.duration``)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        gives_up_at = _gives_up_at.get()
        if gives_up_at is None:
            gives_up_at = loop.time() + self.deadline
        try:
            with giving_up_at(gives_up_at):
                if self.before_first_use is not None:
                    check, self.before_first_use = self.before_first_use, None
                    try:
                        await check()
                    except BaseException:
                        self.before_first_use = check
                        raise
                return await self._attempts(operation, idempotent, gives_up_at)
        finally:
            attributes = self._operations.get(name)
            if attributes is None:
                attributes = self._operations[name] = metrics.operation_attributes(
                    self._system, name
                )
            metrics.STORE_DURATION.record(time.perf_counter() - started, attributes)

    async def _attempts(
        self, operation: Callable[[C], Awaitable[T]], idempotent: bool, gives_up_at: float
    ) -> T:
        loop = asyncio.get_running_loop()
        delay = self.backoff
        attempt = 0
        #: When the first attempt failed (loop time), for the retry-time metric.
        failed_at: float | None = None
        while True:
            attempt += 1
            connection: C | None = None
            token = _attempt_ends.set(min(gives_up_at, loop.time() + self.attempt_seconds))
            slot = False
            try:
                slot = await self._take_slot(_attempt_ends.get())
                connection = await self._acquire()
                # The statements get an attempt's whole time from here, so that the
                # server's own timeouts end them before this side gives up: sent with
                # less left, a statement's outcome could be unknown.  An operation that
                # may not be repeated gets what is left of the call.
                sent_by = loop.time() + self.attempt_seconds
                if sent_by > gives_up_at:
                    raise _OutOfTime
                _attempt_ends.set(sent_by if idempotent else gives_up_at)
                result = await operation(connection)
                await self._give_back(connection)
                if failed_at is not None:
                    metrics.retrying_took(self._metric_attributes, loop.time() - failed_at)
                return result
            except _OutOfTime:
                if connection is not None:
                    await self._give_back(connection)
                self._gave_up(loop.time() if failed_at is None else failed_at)
                raise StoreUnavailable(
                    f"{self.safe_url()} is unavailable: no time left for another attempt "
                    f"within the deadline of {self.deadline:g} s after {attempt - 1} "
                    f"(the URL's ?deadline=, or deadline= of the ordering)"
                ) from None
            except BaseException as exc:
                if connection is not None:
                    self.discard(connection)
                if not self.is_database_error(exc) or not self.is_transient(exc):
                    raise
                self._drop_idle()
                if failed_at is None:
                    failed_at = loop.time()
                if not idempotent and not self.changed_nothing(exc, connection):
                    self._gave_up(failed_at)
                    raise StoreUnavailable(
                        f"lost the connection to {self.safe_url()} during an operation "
                        f"that is not safe to repeat: {_described(exc)}"
                    ) from exc
                # Equal jitter: workers that failed together do not come back together.
                pause = random.uniform(delay / 2, delay)
                if loop.time() + pause + self.attempt_seconds > gives_up_at:
                    self._gave_up(failed_at)
                    raise StoreUnavailable(
                        f"{self.safe_url()} is unavailable: gave up after {attempt} "
                        f"attempt{'s' if attempt > 1 else ''} within the deadline of "
                        f"{self.deadline:g} s (the URL's ?deadline=, or deadline= of the "
                        f"ordering): {_described(exc)}"
                    ) from exc
                metrics.retried(self._metric_attributes)
                logger.warning(
                    "database operation failed (%s), retrying in %.2fs (attempt %d)",
                    _described(exc),
                    pause,
                    attempt,
                    extra={"url": self.safe_url(), "attempt": attempt},
                )
            finally:
                _attempt_ends.reset(token)
                if slot:
                    self._slots.release()
            await asyncio.sleep(pause)
            delay = min(delay * 2, self.backoff_max)

    def _gave_up(self, failed_at: float) -> None:
        metrics.unavailable(self._metric_attributes)
        metrics.retrying_took(
            self._metric_attributes, asyncio.get_running_loop().time() - failed_at
        )


class _OutOfTime(Exception):
    """Not enough of the deadline left to send a statement and hear its outcome."""


def _described(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer within the attempt's time"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["Connections", "gives_up_at_most", "giving_up_at", "seconds_left"]
