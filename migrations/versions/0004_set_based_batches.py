"""Set-based batch forms of the hot path: ``begin_events_v2`` and ``complete_events_v2``.

They answer exactly what ``begin_events_v1`` and ``complete_events_v1`` answer, for a
whole batch of events in a few statements rather than a few per event, which is what
concurrent consumers sharing a round trip save on.  The ``_v1`` forms stay for the
workers of the previous release: this revision only adds (an expand step), so it runs
while they work, and ``code_compatibility`` is left alone.  Nothing changes on SQLite.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

from ordering.migrate import snapshot

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_FUNCTIONS = (
    "begin_events_v2(text[], uuid[], uuid[], text[], timestamptz[], timestamptz[], "
    "timestamptz[], boolean[])",
    "complete_events_v2(text[], uuid[], text[], timestamptz[], text[], timestamptz[], boolean[])",
)


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for statement in snapshot(revision, "postgresql"):
        op.execute(statement)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for function in NEW_FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}")
