"""Waking followers that wait for a leader in flight: LISTEN/NOTIFY on PostgreSQL
(on SQLite, a completion wakes the waiters of its own process: see sqlite.py).

A notification is only a hint.  Waiters keep polling at their poll interval as well,
so a notification lost with a dropped connection costs one interval, never an event.
Completion sends NOTIFY only for a lease that a waiter marked (``has_waiters``): NOTIFY
serializes the commits that use it, and most events have nobody waiting.  The channel
and the payload (the event's key) come from ``ordering.sql``, which also writes them
into the SQL that sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar
from uuid import UUID

from .sql import SEEN_CHANNEL, event_key

logger = logging.getLogger(__name__)


class Waiter:
    """Waits for one leader: ``wait`` returns early when the leader's completion is
    announced, else after the timeout."""

    def __init__(self, woken: asyncio.Event | None) -> None:
        self._woken = woken

    @property
    def woken_by_completion(self) -> bool:
        """The leader's completion wakes this waiter (else it only polls)."""
        return self._woken is not None

    async def wait(self, seconds: float) -> None:
        if self._woken is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), seconds)
        self._woken.clear()


K = TypeVar("K", bound=Hashable)


class Wakeups(Generic[K]):
    """Waiters by key: ``registered(key)`` gives a waiter its event for as long as it
    waits, ``wake(key)`` sets the events of everyone waiting on the key."""

    def __init__(self) -> None:
        self._waiting: dict[K, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def registered(self, key: K) -> Iterator[asyncio.Event]:
        woken = asyncio.Event()
        self._waiting.setdefault(key, set()).add(woken)
        try:
            yield woken
        finally:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiting[key]

    def wake(self, key: K) -> None:
        for woken in self._waiting.get(key, ()):
            woken.set()


class Notifications:
    """One LISTEN connection per backend (URL and event loop), shared by every waiter.

    ``connect`` opens an asyncpg connection; this class only uses its public
    ``add_listener``, ``is_closed``, ``close`` and ``terminate``.
    """

    def __init__(self, connect: Callable[[], Awaitable[Any]], *, timeout: float) -> None:
        self._connect = connect
        #: How long setting up the LISTEN connection may take; after a failure, how
        #: long followers poll before it is tried again.
        self._timeout = timeout
        self._retry_at = 0.0
        self._driver: Any = None
        self._wakeups: Wakeups[str] = Wakeups()
        self._lock = asyncio.Lock()

    async def _listening(self) -> bool:
        if self._driver is not None and not self._driver.is_closed():
            return True
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            return False
        async with self._lock:
            if self._driver is not None and not self._driver.is_closed():
                return True
            if loop.time() < self._retry_at:
                return False
            await self._close_connection()
            driver = None
            try:
                async with asyncio.timeout(self._timeout):
                    driver = await self._connect()
                    await driver.add_listener(SEEN_CHANNEL, self._notified)
            except Exception:
                if driver is not None:
                    driver.terminate()
                self._retry_at = loop.time() + self._timeout
                logger.warning(
                    "cannot LISTEN for completions; followers will poll instead", exc_info=True
                )
                return False
            self._driver = driver
            return True

    def _notified(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self._wakeups.wake(payload)

    @asynccontextmanager
    async def waiter(self, scope: str, event_id: UUID) -> AsyncIterator[Waiter]:
        """A waiter for the event, registered before the caller marks the lease, so
        that no notification can slip between the two."""
        if not await self._listening():
            yield Waiter(None)
            return
        with self._wakeups.registered(event_key(scope, event_id)) as woken:
            yield Waiter(woken)

    async def _close_connection(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            try:
                await driver.close(timeout=1)
            except Exception:
                logger.debug("closing the LISTEN connection failed", exc_info=True)

    async def close(self) -> None:
        await self._close_connection()
