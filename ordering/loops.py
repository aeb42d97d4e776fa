"""What the store keeps per event loop and per process: shared, thread-safe, fork-aware.

Async connections, timers and futures belong to the loop that made them, so each loop
gets objects of its own.  They are kept on the loop itself (an attribute), not in a
table keyed by it: they refer back to their loop, so a table holding them would keep
every loop alive, and with it their connections.  Kept on the loop, a loop that is
gone takes them with it, whatever ended it.

A loop that ends closes what it had: ``asyncio.run()`` (and ``asyncio.Runner``, and any
owner who calls ``loop.shutdown_asyncgens()`` before ``close()``, as it should) closes
the loop's async generators while the loop still runs, and an async generator started
with the first object of each loop disposes of them then (its ``finally``), the
connections closed with a word to the server.  A loop closed without that can no longer
run anything: its objects are released as soon as the store builds something on
another loop, or at exit, SQLite's connections closed at once and asyncpg's left to
their finalizers (closing those needs the loop).

A process forked from one that had such objects must never use them: their sockets
are shared with the parent (a statement sent by both would interleave on one
connection), their timers and futures belong to a loop of the parent, and the parent's
epoll instance is shared too.  Nor may the child close them: closing would touch that
shared state as well.  So, in a forked child, the registries forget everything the
parent built (keeping the objects referenced, untouched, so that no finalizer runs on
them) and build afresh.

The same goes for anything that names this process: ``process_token`` is made anew in
a forked child, which is what keeps the lease owners of two forked workers apart.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import socket
import sys
import threading
import uuid
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: The name of the attribute that holds a loop's objects: by registry, by key.
_OBJECTS = "_ordering_objects"

Objects = dict["Registry[Any]", dict[str, Any]]

#: Every loop that has objects, weakly, with the async generator that disposes of them
#: when the loop shuts down.
_tracked: dict[weakref.ref[asyncio.AbstractEventLoop], AsyncGenerator[None, None]] = {}
#: Guards ``_tracked``; reentrant, as a loop collected while it is held takes it again
#: (``_loop_gone``).
_tracking = threading.RLock()

#: Objects that forked children inherited and must neither use nor close.
_left_by_parent: list[Any] = []


class Registry(Generic[T]):
    """Hands out one shared object per (event loop, key); built lazily, cheap to look up.

    Several threads, each running a loop of its own, may use one registry: building
    and forgetting take a lock, the lookup of an object already built does not.  When
    a loop shuts down, ``dispose`` is awaited for each of its objects (those of the
    registry used last on the loop first, as they may use the others); ``abandon`` is
    called for each object of a loop found closed.  A forked child starts empty.
    """

    def __init__(
        self,
        *,
        dispose: Callable[[T], Awaitable[None]],
        abandon: Callable[[T], None] | None = None,
    ) -> None:
        self._dispose = dispose
        self._abandon = abandon
        self._lock = threading.Lock()
        self.keys_opened: set[str] = set()
        _registries.add(self)

    def get(self, key: str, factory: Callable[[str], T]) -> T:
        loop = asyncio.get_running_loop()
        objects: Objects | None = getattr(loop, _OBJECTS, None)
        if objects is not None:
            own: dict[str, T] | None = objects.get(self)
            found = None if own is None else own.get(key)
            if found is not None:
                return found
        _release_closed_loops()
        with self._lock:
            own = _objects_of(loop).setdefault(self, {})
            found = own.get(key)
            if found is None:
                found = own[key] = factory(key)
                self.keys_opened.add(key)
            return found

    def current(self) -> list[T]:
        """The objects built for the running loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            own: dict[str, T] = (_peek(loop) or {}).get(self, {})
            return list(own.values())

    def forget_current(self) -> list[T]:
        """Hand over the running loop's objects and forget their keys (the caller closes
        them; a database dropped since must not be visited by clear_all_scopes)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            gone: dict[str, T] = (_peek(loop) or {}).pop(self, {})
        self._forgotten(set(gone))
        return list(gone.values())

    def _forgotten(self, keys: set[str]) -> None:
        """Keys no longer built on some loop: no longer opened, unless another has them."""
        every_loop = _all_objects()
        with self._lock:  # other loops' threads add keys under it
            still_open = {key for objects in every_loop for key in objects.get(self, ())}
            self.keys_opened -= keys - still_open

    # A loop that ends keeps its keys opened, unlike forget_current: the process did
    # open those databases, and clear_all_scopes on a later loop visits them.

    async def _dispose_all(self, objects: dict[str, T]) -> None:
        for found in objects.values():
            try:
                await self._dispose(found)
            except Exception:
                logger.warning("closing what an event loop left failed", exc_info=True)

    def _abandon_all(self, objects: dict[str, T]) -> None:
        if self._abandon is None:
            return
        for found in objects.values():
            try:
                self._abandon(found)
            except Exception:
                logger.warning("releasing what a closed loop left failed", exc_info=True)

    def _forget_after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self.keys_opened = set()


_registries: weakref.WeakSet[Registry[Any]] = weakref.WeakSet()


def _objects_of(loop: asyncio.AbstractEventLoop) -> Objects:
    """The loop's objects, kept on the loop (every loop class derives from
    ``AbstractEventLoop``, so every loop takes attributes); the first time, the hook
    that disposes of them at its shutdown is started (on the running loop: this is
    its thread)."""
    objects: Objects | None = getattr(loop, _OBJECTS, None)
    if objects is not None:
        return objects
    objects = {}
    setattr(loop, _OBJECTS, objects)
    hook = _disposing_at_shutdown(weakref.ref(loop), os.getpid())
    # Started up to its yield with the loop's first-iteration hook, which has the loop
    # close it at shutdown, and without the loop's finalizer, which would refer to the
    # loop and keep it alive for as long as the hook is kept here.
    firstiter, finalizer = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(firstiter, None)
    try:
        with contextlib.suppress(StopIteration):
            hook.asend(None).send(None)
    finally:
        sys.set_asyncgen_hooks(firstiter, finalizer)
    with _tracking:
        _tracked[weakref.ref(loop, _loop_gone)] = hook
    return objects


def _all_objects() -> list[Objects]:
    with _tracking:
        loops = [ref() for ref in _tracked]
    return [objects for loop in loops if loop is not None and (objects := _peek(loop))]


def _peek(loop: asyncio.AbstractEventLoop) -> Objects | None:
    found: Objects | None = getattr(loop, _OBJECTS, None)
    return found


def _take(loop: asyncio.AbstractEventLoop) -> Objects:
    """Take every object of the loop off it (the loop keeps an empty set, so that its
    hook is not started twice)."""
    with _tracking:
        objects = _peek(loop)
        if objects is None:
            return {}
        taken = dict(objects)
        objects.clear()
        return taken


async def _disposing_at_shutdown(
    loop_ref: weakref.ref[asyncio.AbstractEventLoop], pid: int
) -> AsyncGenerator[None, None]:
    """Waits at its yield until the loop closes its async generators as it shuts down,
    then disposes of the loop's objects while the loop still runs."""
    try:
        yield
    finally:
        loop = loop_ref()
        if loop is not None and not loop.is_closed() and os.getpid() == pid:
            objects = _take(loop)
            for registry, own in reversed(objects.items()):
                await registry._dispose_all(own)


def _release_closed_loops() -> None:
    """Release the objects of every loop found closed (nothing can close them with a
    word to the server any more), and end their hooks."""
    with _tracking:
        closed = [
            (ref, loop) for ref in _tracked if (loop := ref()) is not None and loop.is_closed()
        ]
        hooks = [_tracked.pop(ref) for ref, _ in closed]
    for (_, loop), hook in zip(closed, hooks, strict=True):
        for registry, own in reversed(_take(loop).items()):
            registry._abandon_all(own)
        _end(hook)


def _loop_gone(ref: weakref.ref[asyncio.AbstractEventLoop]) -> None:
    with _tracking:
        hook = _tracked.pop(ref, None)
    if hook is not None:
        _end(hook)


def _end(hook: AsyncGenerator[None, None]) -> None:
    """End a hook whose loop is closed or gone, here and now (its ``finally`` has
    nothing to await then)."""
    with contextlib.suppress(StopIteration):
        hook.aclose().send(None)


atexit.register(_release_closed_loops)


def _new_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


_token = _new_token()
_token_pid = os.getpid()


def process_token() -> str:
    """Names this process, unique among processes (forked ones included) and readable
    in audits: host, process id and a random part.

    Made anew after a fork: by the fork hook, and by a process id check here for
    children forked without it (a C extension's fork())."""
    global _token, _token_pid
    if os.getpid() != _token_pid:
        _token, _token_pid = _new_token(), os.getpid()
    return _token


def _after_fork_in_child() -> None:
    global _token, _token_pid, _tracked, _tracking
    _token, _token_pid = _new_token(), os.getpid()
    for ref, hook in _tracked.items():
        loop = ref()
        objects = None if loop is None else _peek(loop)
        _left_by_parent.append((hook, objects))
        if loop is not None and getattr(loop, _OBJECTS, None) is not None:
            delattr(loop, _OBJECTS)
    _tracked, _tracking = {}, threading.RLock()
    for registry in list(_registries):
        registry._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
