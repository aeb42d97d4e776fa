"""What the store keeps per event loop and per process: shared, thread-safe, fork-aware.

Async connections, timers and futures belong to the loop that made them, so each loop
gets objects of its own.  A process forked from one that had such objects must never
use them: their sockets are shared with the parent (a statement sent by both would
interleave on one connection), their timers and futures belong to a loop of the
parent, and the parent's epoll instance is shared too.  Nor may the child close them:
closing would touch that shared state as well.  So, in a forked child, a registry
forgets everything the parent built (it keeps the objects referenced, untouched, so
that no finalizer runs on them) and builds afresh.

The same goes for anything that names this process: ``process_token`` is made anew in
a forked child, which is what keeps the lease owners of two forked workers apart.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: Objects that forked children inherited and must neither use nor close.
_left_by_parent: list[Any] = []


class Registry(Generic[T]):
    """Hands out one shared object per (event loop, key); built lazily, cheap to look up.

    A loop that is gone takes its objects with it.  Several threads, each running a
    loop of its own, may use one registry: building and forgetting take a lock, the
    lookup of an object already built does not.  A forked child starts empty.
    """

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, T]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self.keys_opened: set[str] = set()
        _registries.add(self)

    def get(self, key: str, factory: Callable[[str], T]) -> T:
        loop = asyncio.get_running_loop()
        per_loop = self._by_loop.get(loop)
        found = None if per_loop is None else per_loop.get(key)
        if found is not None:
            return found
        with self._lock:
            per_loop = self._by_loop.get(loop)
            if per_loop is None:
                per_loop = self._by_loop[loop] = {}
            found = per_loop.get(key)
            if found is None:
                found = per_loop[key] = factory(key)
                self.keys_opened.add(key)
            return found

    def current(self) -> list[T]:
        """The objects built for the running loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            return list(self._by_loop.get(loop, {}).values())

    def forget_current(self) -> list[T]:
        """Hand over the running loop's objects and forget their keys (the caller closes
        them; a database dropped since must not be visited by clear_all_scopes)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            gone = self._by_loop.pop(loop, {})
            still_open = {key for per_loop in self._by_loop.values() for key in per_loop}
            self.keys_opened -= set(gone) - still_open
            return list(gone.values())

    def _forget_after_fork(self) -> None:
        _left_by_parent.append(dict(self._by_loop.items()))
        self._by_loop = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self.keys_opened = set()


_registries: weakref.WeakSet[Registry[Any]] = weakref.WeakSet()


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
    global _token, _token_pid
    _token, _token_pid = _new_token(), os.getpid()
    for registry in list(_registries):
        registry._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
