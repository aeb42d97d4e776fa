"""Seen rows carry their own expiry, so the store can prune them by itself.

A seen row gets ``expires_at``: its writer's ``seen_at + seen_expiration``, the
lifetime decided when it is written (as a Redis TTL is), so whatever deletes
expired rows never has to be told the longest seen expiration any worker uses.
Rows written by earlier releases have none (NULL); the pruner goes by ``seen_at``
for those.  The store's "seen" rule is unchanged (processed within the reader's
seen expiration, by ``seen_at``), so rows of either release read the same to
workers of either release.

On PostgreSQL the writers of this release call ``complete_event_v2`` and
``complete_events_v3``, which write the column; the older forms stay for the
workers of the previous release.  The column is nullable without a default (a
change of the catalog, no table rewrite).  Its index is made with CREATE INDEX IF NOT
EXISTS, which holds writes to the seen table while it builds: seconds on a table
of millions of rows (which a seen table nothing pruned may be).  To avoid that
pause, build it beforehand without blocking writes, and the migration finds it:
``CREATE INDEX CONCURRENTLY ix_seen_events_expires_at ON ordering.seen_events
(expires_at)`` (docs/deploy.md).

Only additions (an expand step): workers of revision 0005 keep running, and
``code_compatibility`` is left alone.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

from ordering.migrate import snapshot

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_FUNCTIONS = (
    "complete_event_v2(text, uuid, text, timestamptz, text, timestamptz, boolean, timestamptz)",
    "complete_events_v3(text[], uuid[], text[], timestamptz[], text[], timestamptz[], "
    "boolean[], timestamptz[])",
)


def upgrade() -> None:
    context = op.get_context()
    if context.dialect.name != "postgresql":
        op.execute("ALTER TABLE ordering_seen_events ADD COLUMN expires_at DATETIME")
        op.execute(
            "CREATE INDEX ix_ordering_seen_events_expires_at ON ordering_seen_events (expires_at)"
        )
        return
    op.execute("ALTER TABLE seen_events ADD COLUMN expires_at timestamp with time zone")
    op.execute("CREATE INDEX IF NOT EXISTS ix_seen_events_expires_at ON seen_events (expires_at)")
    for statement in snapshot(revision, "postgresql"):
        op.execute(statement)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        op.execute("DROP INDEX ix_ordering_seen_events_expires_at")
        op.execute("ALTER TABLE ordering_seen_events DROP COLUMN expires_at")
        return
    for function in NEW_FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}")
    op.execute("DROP INDEX ix_seen_events_expires_at")
    op.execute("ALTER TABLE seen_events DROP COLUMN expires_at")
