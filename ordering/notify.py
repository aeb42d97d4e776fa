"""Waking followers that wait for a leader in flight: LISTEN/NOTIFY on PostgreSQL.

A notification is only a hint.  Waiters keep polling at their poll interval as well,
so a notification lost with a dropped connection costs one interval, never an event.
Completion sends NOTIFY only for a lease that a waiter marked (``has_waiters``): NOTIFY
serializes the commits that use it, and most events have nobody waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

logger = logging.getLogger(__name__)

CHANNEL = "ordering_seen"


class Waiter:
    """Waits for one leader: ``wait`` returns early when the leader's completion is
    announced, else after the timeout."""

    def __init__(self, woken: asyncio.Event | None) -> None:
        self._woken = woken

    @property
    def notified_by_database(self) -> bool:
        return self._woken is not None

    async def wait(self, seconds: float) -> None:
        if self._woken is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), seconds)
        self._woken.clear()


class Notifications:
    """One LISTEN connection per backend (URL and event loop), shared by every waiter.

    ``connect`` opens an asyncpg connection; this class only uses its public
    ``add_listener``, ``is_closed`` and ``close``.
    """

    def __init__(self, connect: Callable[[], Awaitable[Any]]) -> None:
        self._connect = connect
        self._driver: Any = None
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._lock = asyncio.Lock()

    async def _listening(self) -> bool:
        if self._driver is not None and not self._driver.is_closed():
            return True
        async with self._lock:
            if self._driver is not None and not self._driver.is_closed():
                return True
            await self._close_connection()
            driver = None
            try:
                driver = await self._connect()
                await driver.add_listener(CHANNEL, self._notified)
            except Exception:
                if driver is not None:
                    try:
                        await driver.close(timeout=1)
                    except Exception:
                        logger.debug("closing a failed LISTEN connection failed", exc_info=True)
                logger.warning(
                    "cannot LISTEN for completions; followers will poll instead", exc_info=True
                )
                return False
            self._driver = driver
            return True

    def _notified(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        for woken in self._waiting.get(payload, ()):
            woken.set()

    @asynccontextmanager
    async def waiter(self, scope: str, event_id: UUID) -> AsyncIterator[Waiter]:
        """A waiter for the event, registered before the caller marks the lease, so
        that no notification can slip between the two."""
        if not await self._listening():
            yield Waiter(None)
            return
        key = f"{scope}/{event_id}"
        woken = asyncio.Event()
        self._waiting.setdefault(key, set()).add(woken)
        try:
            yield Waiter(woken)
        finally:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiting[key]

    async def _close_connection(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            try:
                await driver.close(timeout=1)
            except Exception:
                logger.debug("closing the LISTEN connection failed", exc_info=True)

    async def close(self) -> None:
        await self._close_connection()
