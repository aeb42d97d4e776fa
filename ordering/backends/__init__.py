"""Backends: one module per dialect behind the interface of ``base.py``.

``backend_for(url)`` hands out the shared backend of a URL on the running event loop;
construction does no I/O, the database's revision is checked on first use.  The choice
of backend is by the URL's scheme, here; what a third dialect takes besides its module
is listed in docs/design.md.
"""

from __future__ import annotations

from .. import metrics
from ..loops import Registry
from ..schema import resolve_schema
from .base import (
    Backend,
    BeginRequest,
    Begun,
    Claim,
    CompleteRequest,
    FollowerRow,
    LeaderStatus,
    ParkRequest,
    Refused,
    StatementListener,
)
from .postgresql import PostgresBackend
from .sqlite import SqliteBackend

_registry: Registry[Backend] = Registry(
    dispose=lambda backend: backend.dispose(), abandon=lambda backend: backend.abandon()
)


def backend_for(url: str, schema: str | None = None) -> Backend:
    """The shared backend of ``url`` (a checked URL, see ``urls.resolve_url``) on the
    running event loop; on PostgreSQL, for the store's schema ``schema``.

    Called several times per event: the lookup is two dictionary reads."""
    if url.startswith("sqlite"):
        return _registry.get(url, _sqlite)
    chosen = schema or resolve_schema(None)
    key = _key(url, chosen)
    return _registry.get(key, lambda _: _watched(key, PostgresBackend(url, schema=chosen)))


def _sqlite(url: str) -> Backend:
    return _watched(url, SqliteBackend(url))


def _watched(key: str, backend: Backend) -> Backend:
    """A backend just built, its database's waiting followers reported as metrics."""
    metrics.watch(key, backend)
    return backend


def _key(url: str, schema: str | None) -> str:
    return url if url.startswith("sqlite") else f"{url}#{schema or resolve_schema(None)}"


def use_backend(url: str, backend: Backend, *, schema: str | None = None) -> None:
    """Make ``backend`` the shared backend of ``url`` (and, on PostgreSQL, ``schema``) on
    the running event loop, as if ``backend_for`` had built it: for a backend built with
    other statements or another code revision (the next release's code, in the rolling
    deploy test).  Raises RuntimeError if one was built there already."""
    installed = _registry.get(_key(url, schema), lambda _: backend)
    if installed is not backend:
        raise RuntimeError(f"a backend for {url} was built already on this event loop")


def opened() -> set[tuple[str, str | None]]:
    """(URL, PostgreSQL schema or None) of every backend this process built."""
    found: set[tuple[str, str | None]] = set()
    for key in _registry.keys_opened:
        url, _, schema = key.partition("#")
        found.add((url, schema or None))
    return found


async def dispose_backends() -> None:
    """Close the connections this process opened on the running event loop (for
    shutdown and tests)."""
    for backend in _registry.forget_current():
        await backend.dispose()


__all__ = [
    "Backend",
    "BeginRequest",
    "Begun",
    "Claim",
    "CompleteRequest",
    "FollowerRow",
    "LeaderStatus",
    "ParkRequest",
    "PostgresBackend",
    "Refused",
    "SqliteBackend",
    "StatementListener",
    "backend_for",
    "dispose_backends",
    "opened",
    "use_backend",
]
