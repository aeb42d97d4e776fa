"""Opening the database for an operator, and which revision its objects are at."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import make_url

from .. import migrate
from ..backends import Backend, backend_for
from ..exceptions import SchemaError, StoreUnavailable
from ..schema import migrate_hint
from ..urls import resolve_url, safe_url


def _missing_sqlite_file(url: str) -> Path | None:
    """The SQLite file the URL names, if it does not exist (connecting would create it)."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database:
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


async def open_backend(url: str | None = None, *, schema: str | None = None) -> Backend:
    """The shared backend for ``url`` (the one the orderings of this event loop use),
    checked to be at a schema revision this code runs on.

    Raises SchemaError, naming the command to run, when the store's objects are
    missing, behind or too new; a SQLite file that does not exist is reported, not created.  An
    unreachable database is reported at once (StoreUnavailable) rather than after the
    store's patient retries: a person or a scheduler asked.
    """
    url = resolve_url(url)
    missing = _missing_sqlite_file(url)
    if missing is not None:
        raise SchemaError(
            f"the SQLite database {missing} does not exist: {migrate_hint(safe_url(url))}"
        )
    backend = backend_for(url, schema)
    try:
        await backend.ping()
    except Exception as exc:  # drivers raise their own classes when connecting
        raise _unreachable(url, exc) from exc
    await backend.check_version()
    return backend


def _unreachable(url: str, exc: BaseException) -> StoreUnavailable:
    lines = str(exc).strip().splitlines()
    reason = lines[0] if lines else type(exc).__name__
    return StoreUnavailable(f"cannot open the database {safe_url(url)}: {reason}")


@dataclass(frozen=True)
class RevisionState:
    """Which revision the database's objects are at, against the migrations this code
    ships."""

    url: str
    current: str | None
    head: str
    missing_file: Path | None = None
    #: The oldest code revision the database serves (from its code_compatibility row).
    oldest_served: str | None = None

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    @property
    def usable(self) -> bool:
        """Whether this code runs on the database: at its head, or at a later revision
        that still serves it (a rolling deploy's expand step)."""
        return self.at_head or (
            self.current is not None
            and self.current > self.head
            and self.oldest_served is not None
            and self.oldest_served <= self.head
        )

    def describe(self) -> str:
        where = safe_url(self.url)
        hint = migrate_hint(where)
        if self.missing_file is not None:
            return f"the SQLite database {self.missing_file} does not exist: {hint}"
        if self.at_head:
            return f"{where} is at revision {self.current}, the head: nothing to migrate"
        if self.current is None:
            return f"{where} has no ordering schema: {hint}"
        if self.current < self.head:
            return f"{where} is at revision {self.current}, behind the code's {self.head}: {hint}"
        if self.usable:
            return (
                f"{where} is at revision {self.current}, ahead of the code's {self.head} "
                f"and still serving it (a newer release expanded the schema): nothing to do"
            )
        return (
            f"{where} is at revision {self.current}, which no longer serves this code "
            f"(its head is {self.head}): upgrade this package (pip install -U "
            "sql-causal-ordering)"
        )


async def revision_state(url: str | None = None, *, schema: str | None = None) -> RevisionState:
    """The database's revision and the head, without creating a missing SQLite file."""
    url = resolve_url(url)
    head = migrate.head_revision()
    missing = _missing_sqlite_file(url)
    if missing is not None:
        return RevisionState(url, None, head, missing_file=missing)
    try:
        current, oldest = await migrate.database_revisions(url, schema=schema)
    except Exception as exc:  # drivers raise their own classes when connecting
        raise _unreachable(url, exc) from exc
    return RevisionState(url, current, head, oldest_served=oldest)


def aware(moment: datetime, name: str = "now") -> datetime:
    if not isinstance(moment, datetime):
        raise TypeError(f"{name} must be a datetime, not {moment!r}")
    if moment.tzinfo is None:
        raise ValueError(f"{name}: naive datetime {moment!r}: give a timezone, e.g. UTC")
    return moment
