"""Which schema revisions this code runs on, and where the store's objects live.

Schema changes roll out without stopping the workers (expand, deploy, contract): a
migration that only adds (a column, a new version of a function) leaves the database
usable by the code of the previous release, and says so in the table
``code_compatibility``, whose one row names the oldest code revision the database
still serves.  A migration that removes what older code needs (the contract step,
once no such worker runs) moves that row up.  So this code runs on a database at its
own revision, or at a later one whose oldest served revision is not above ours.
docs/deploy.md gives the procedure.
"""

from __future__ import annotations

import functools
import os
import re

#: The schema revision this code was written for (the newest migration it ships).
CODE_REVISION = "0006"

#: The PostgreSQL schema the store's objects live in, unless told otherwise.
DEFAULT_SCHEMA = "ordering"
SCHEMA_ENV = "ORDERING_SCHEMA"

#: Alembic's bookkeeping table: inside the store's schema on PostgreSQL, prefixed on
#: SQLite (where everything of ours is prefixed ``ordering_``).
POSTGRES_VERSION_TABLE = "alembic_version"
SQLITE_VERSION_TABLE = "ordering_alembic_version"

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def resolve_schema(name: str | None = None) -> str:
    """The PostgreSQL schema to use: the argument, else $ORDERING_SCHEMA, else ``ordering``."""
    return _checked_schema(name or os.environ.get(SCHEMA_ENV) or DEFAULT_SCHEMA)


@functools.lru_cache(maxsize=64)
def _checked_schema(chosen: str) -> str:
    """Checked once per distinct name: an ordering may be constructed for every event."""
    if not isinstance(chosen, str) or not _IDENTIFIER.fullmatch(chosen):
        raise ValueError(
            f"schema must be a lower-case SQL identifier (letters, digits, _), not {chosen!r}"
        )
    return chosen


def migrate_hint(url: str) -> str:
    return f"run `ordering migrate --url '{url}'`"


def check_revision(
    url: str, revision: str | None, oldest: str | None, *, code_revision: str = CODE_REVISION
) -> str | None:
    """What is wrong with running this code on the database at ``url``, at ``revision``
    and serving code from ``oldest`` on; None when nothing is."""
    if revision is None:
        return (
            f"the database {url} has no ordering schema; this code needs revision "
            f"{code_revision}: {migrate_hint(url)}"
        )
    if revision < code_revision:
        return (
            f"the database {url} is at revision {revision}, older than this code's "
            f"{code_revision}: {migrate_hint(url)}"
        )
    if revision > code_revision and (oldest is None or oldest > code_revision):
        return (
            f"the database {url} is at revision {revision}, which no longer serves code of "
            f"revision "
            f"{code_revision} (it serves {oldest or 'only its own'} and later): "
            "upgrade this package (pip install -U sql-causal-ordering)"
        )
    return None
