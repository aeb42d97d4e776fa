"""Keeping the leases of long-running bodies alive, with one timer per event loop.

A body that runs longer than a third of its lease's duration gets the lease (and the
claims of its owner) renewed, so that only a dead holder ever loses them.  Most
bodies are far shorter, so an event costs two dictionary writes here, not a timer of
its own: one timer per loop ticks while any lease is held and renews the holders
that are due.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .loops import Registry

logger = logging.getLogger("ordering")


@dataclass(slots=True)
class _Held:
    renew: Callable[[], Awaitable[None]]
    interval: float
    due: float


class LeaseKeeper:
    """Renews every held lease that is due, on one timer for the whole loop.

    A renewal starts between one and one and a half intervals after the last (the
    timer ticks twice per the shortest interval held).  With intervals of a third of
    the lease duration, a renewal starts at most half a lease after the last, which
    leaves the store the other half to answer it, even when it is busy with other
    writers (SQLite's write lock) or slow.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: dict[int, _Held] = {}
        self._serial = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._tick = float("inf")
        self._renewing: set[asyncio.Task[None]] = set()

    def hold(
        self, renew: Callable[[], Awaitable[None]], interval: float, *, due_now: bool = False
    ) -> int:
        """Renew every ``interval`` seconds from now on (the first time at the next
        tick if ``due_now``: the lease has less time left than it should)."""
        key = next(self._serial)
        due = self._loop.time() + (0.0 if due_now else interval)
        self._held[key] = _Held(renew, interval, due)
        if interval < self._tick or self._timer is None:
            self._tick = min(self._tick, interval)
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_later(self._tick / 2, self._fire)
        return key

    def release(self, key: int) -> None:
        self._held.pop(key, None)

    def _fire(self) -> None:
        if not self._held:
            self._timer, self._tick = None, float("inf")
            return
        now = self._loop.time()
        for held in self._held.values():
            if held.due <= now:
                held.due = now + held.interval
                task = self._loop.create_task(self._renew(held.renew))
                self._renewing.add(task)
                task.add_done_callback(self._renewing.discard)
        self._timer = self._loop.call_later(self._tick / 2, self._fire)

    @staticmethod
    async def _renew(renew: Callable[[], Awaitable[None]]) -> None:
        try:
            await renew()
        except Exception:
            logger.warning("could not renew a lease", exc_info=True)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._tick = None, float("inf")
        self._held.clear()
        for task in self._renewing:
            task.cancel()


async def _closed(found: LeaseKeeper) -> None:
    found.close()


_keepers: Registry[LeaseKeeper] = Registry(dispose=_closed)


def keeper() -> LeaseKeeper:
    """The running loop's keeper."""
    return _keepers.get("", lambda _: LeaseKeeper(asyncio.get_running_loop()))


def close_keeper() -> None:
    for found in _keepers.forget_current():
        found.close()
