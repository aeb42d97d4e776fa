"""Waiting followers indexed by what the hot path looks up, not by scope first.

The primary key was (scope, follower_id) and the other indexes started with scope too,
so on a table without statistics (a new database, or one autovacuum has not analyzed
yet) PostgreSQL's planner could not tell them apart: it took the index on
(scope, received) to find a follower by its id, or the followers of a leader, and read
every follower waiting in the scope for each completion.  Now a follower's id leads
the primary key, a leader's id leads ``ix_waiting_followers_by_leader``, and what
get_lost_followers looks for (unclaimed followers by when they came, claimed ones by
when their claim ends) has two partial indexes that no other lookup can use.

Only indexes change (the key keeps its columns, so ``ON CONFLICT (scope, follower_id)``
still finds it): workers of the previous release keep working throughout.  Rebuilding
the key locks the table for as long as that takes, which is short for a table of
followers waiting for their leaders.  Nothing changes on SQLite, whose planner takes
the index that matches the most columns.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

from ordering.migrate import snapshot

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE waiting_followers DROP CONSTRAINT pk_waiting_followers")
    op.execute("DROP INDEX ix_waiting_followers_by_leader")
    op.execute("DROP INDEX ix_waiting_followers_by_received")
    for statement in snapshot(revision, "postgresql"):
        op.execute(statement)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX ix_waiting_followers_claimed")
    op.execute("DROP INDEX ix_waiting_followers_unclaimed")
    op.execute("DROP INDEX ix_waiting_followers_by_leader")
    op.execute("ALTER TABLE waiting_followers DROP CONSTRAINT pk_waiting_followers")
    op.execute(
        "ALTER TABLE waiting_followers "
        "ADD CONSTRAINT pk_waiting_followers PRIMARY KEY (scope, follower_id)"
    )
    op.execute(
        "CREATE INDEX ix_waiting_followers_by_leader "
        "ON waiting_followers (scope, leader_id, occurred, received, follower_id)"
    )
    op.execute(
        "CREATE INDEX ix_waiting_followers_by_received ON waiting_followers (scope, received)"
    )
