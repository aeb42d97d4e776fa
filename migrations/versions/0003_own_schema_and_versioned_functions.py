"""Our own namespace, versioned hot-path functions, and code compatibility.

On PostgreSQL the store's objects now live in their own schema (the environment moves
those of an older release out of ``public`` before this runs), so the tables drop
their ``ordering_`` prefix; the hot-path functions are named by version
(``begin_event_v1``, ...) so that a later release can add ``_v2`` beside them while
workers of this one still run.  Both dialects get ``code_compatibility``, whose row
names the oldest code revision the database serves, and the audit views gain a
``lost`` column.

This revision is not additive for the previous release (its workers look for
``public.ordering_*``): stop them before migrating, as docs/deploy.md says.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence
from typing import Any

from alembic import context, op

from ordering.migrate import snapshot

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_VIEWS = ("ordering_stuck", "ordering_waiting", "ordering_held_leases")
NEW_VIEWS = {"postgresql": ("stuck", "waiting", "held_leases"), "sqlite": OLD_VIEWS}
OLD_FUNCTIONS = (
    "ordering_begin_event(text, uuid, uuid, text, timestamptz, timestamptz, timestamptz, boolean)",
    "ordering_complete_event(text, uuid, text, timestamptz, text, timestamptz, boolean)",
    "ordering_park_follower(text, uuid, uuid, timestamptz, timestamptz, jsonb, text, timestamptz)",
)
NEW_FUNCTIONS = (
    "begin_events_v1(text[], uuid[], uuid[], text[], timestamptz[], timestamptz[], "
    "timestamptz[], boolean[])",
    "complete_events_v1(text[], uuid[], text[], timestamptz[], text[], timestamptz[], boolean[])",
    "begin_event_v1(text, uuid, uuid, text, timestamptz, timestamptz, timestamptz, boolean)",
    "complete_event_v1(text, uuid, text, timestamptz, text, timestamptz, boolean)",
    "park_follower_v1(text, uuid, uuid, timestamptz, timestamptz, jsonb, text, timestamptz)",
)
#: (old name, new name) of tables, then of their constraints and indexes.
RENAMED_TABLES = (
    ("ordering_seen_events", "seen_events"),
    ("ordering_processing_leases", "processing_leases"),
    ("ordering_waiting_followers", "waiting_followers"),
)
RENAMED_CONSTRAINTS = (
    ("seen_events", "pk_ordering_seen_events", "pk_seen_events"),
    ("processing_leases", "pk_ordering_processing_leases", "pk_processing_leases"),
    ("waiting_followers", "pk_ordering_waiting_followers", "pk_waiting_followers"),
    (
        "waiting_followers",
        "ck_ordering_waiting_followers_claim_has_owner_and_expiry",
        "ck_waiting_followers_claim_has_owner_and_expiry",
    ),
    (
        "waiting_followers",
        "ck_ordering_waiting_followers_does_not_follow_itself",
        "ck_waiting_followers_does_not_follow_itself",
    ),
)
RENAMED_INDEXES = (
    ("ix_ordering_seen_events_seen_at", "ix_seen_events_seen_at"),
    ("ix_ordering_waiting_followers_by_leader", "ix_waiting_followers_by_leader"),
    ("ix_ordering_waiting_followers_by_received", "ix_waiting_followers_by_received"),
)


def upgrade() -> None:
    dialect = op.get_context().dialect.name
    for view in OLD_VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    if dialect == "postgresql":
        for function in OLD_FUNCTIONS:
            op.execute(f"DROP FUNCTION {function}")
        for old, new in RENAMED_TABLES:
            op.execute(f"ALTER TABLE {old} RENAME TO {new}")
        for table, old, new in RENAMED_CONSTRAINTS:
            op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {old} TO {new}")
        for old, new in RENAMED_INDEXES:
            op.execute(f"ALTER INDEX {old} RENAME TO {new}")
    for statement in snapshot(revision, dialect):
        op.execute(statement)
    table = "code_compatibility" if dialect == "postgresql" else "ordering_code_compatibility"
    op.execute(f"INSERT INTO {table} (oldest_code_revision) VALUES ('0003')")


def downgrade() -> None:
    """Back to exactly what revision 0002 left, its functions and views made again
    by those revisions' own definitions."""
    dialect = op.get_context().dialect.name
    for view in NEW_VIEWS[dialect]:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    if dialect == "postgresql":
        op.execute("DROP TABLE code_compatibility")
        for function in NEW_FUNCTIONS:
            op.execute(f"DROP FUNCTION {function}")
        for old, new in reversed(RENAMED_INDEXES):
            op.execute(f"ALTER INDEX {new} RENAME TO {old}")
        for table, old, new in reversed(RENAMED_CONSTRAINTS):
            op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT {new} TO {old}")
        for old, new in reversed(RENAMED_TABLES):
            op.execute(f"ALTER TABLE {new} RENAME TO {old}")
        initial = _revision_module("0001")
        for function in (initial.BEGIN_EVENT, initial.PARK_FOLLOWER, initial.COMPLETE_EVENT):
            op.execute(function)
    else:
        op.execute("DROP TABLE ordering_code_compatibility")
    _revision_module("0002").upgrade()


def _revision_module(name: str) -> Any:
    script = context.script.get_revision(name)
    assert script is not None
    return script.module
