"""Audit views: what waits and for whom, what is stuck, which leases are held.

Plain SQL for people at a database console; the code never reads them.  Both dialects
get the same view names and columns, written in each one's own date and JSON syntax.

The views cannot see the clock a ``CausalOrdering`` was given, nor a lookback other
than the default: they judge time by the database's current time (``now()`` on
PostgreSQL, the start of the current transaction; ``'now'`` on SQLite) and use the
default 15-minute ``PRECEDING_EVENT_LOOKBACK``, frozen here as it was when this
revision was written.

On SQLite, ids are shown in their usual dashed form and times as UTC text; on
PostgreSQL they keep their native ``uuid`` and ``timestamptz`` types.

A later migration that rebuilds one of these tables in SQLite batch mode must drop
these views first and create them again after: SQLite refuses to rename a table into
place while a view refers to the name.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The default lookback when this revision was written (ordering.PRECEDING_EVENT_LOOKBACK).
LOOKBACK_MINUTES = 15

VIEWS = ("ordering_stuck", "ordering_waiting", "ordering_held_leases")  # dependents first


class _Dialect:
    """The few expressions whose spelling differs between the two databases."""

    def __init__(self, name: str) -> None:
        self.postgres = name == "postgresql"

    def now(self) -> str:
        if self.postgres:
            return "now()"
        # The layout SQLAlchemy stores UTC times in on SQLite (microseconds), so that
        # text comparison is time comparison.
        return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"

    def lookback_cutoff(self) -> str:
        if self.postgres:
            return f"(now() - interval '{LOOKBACK_MINUTES} minutes')"
        return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', '-{LOOKBACK_MINUTES} minutes') || '000')"

    def seconds_since(self, column: str) -> str:
        if self.postgres:
            return f"CAST(floor(extract(epoch FROM now() - {column})) AS bigint)"
        return f"CAST((julianday('now') - julianday({column})) * 86400 AS INTEGER)"

    def uuid(self, column: str) -> str:
        if self.postgres:
            return column
        # SQLAlchemy keeps UUIDs as 32 hex digits on SQLite; show them as events do.
        return (
            f"(substr({column}, 1, 8) || '-' || substr({column}, 9, 4) || '-' || "
            f"substr({column}, 13, 4) || '-' || substr({column}, 17, 4) || '-' || "
            f"substr({column}, 21))"
        )

    def json_text(self, column: str, key: str) -> str:
        if self.postgres:
            return f"({column} ->> '{key}')"
        return f"json_extract({column}, '$.{key}')"


def _waiting(d: _Dialect) -> str:
    return f"""
CREATE VIEW ordering_waiting AS
SELECT
    f.scope,
    {d.uuid("f.follower_id")} AS follower_id,
    {d.json_text("f.event", "event")} AS event_name,
    {d.uuid("f.leader_id")} AS leader_id,
    f.occurred,
    f.received,
    {d.seconds_since("f.received")} AS waiting_seconds,
    CASE
        WHEN f.claimed_by IS NULL THEN 'waiting'
        WHEN f.claimed_until > {d.now()} THEN 'claimed'
        ELSE 'claim expired'
    END AS state,
    f.claimed_by,
    f.claimed_until,
    f.received <= {d.lookback_cutoff()} AS past_lookback,
    s.seen_at AS leader_seen_at,
    f.event
FROM ordering_waiting_followers f
LEFT JOIN ordering_seen_events s ON s.scope = f.scope AND s.event_id = f.leader_id
"""


# Exactly the rows get_lost_followers() would hand out now (see TAKE_LOST in
# ordering/store.py), with the likely reason.
STUCK = """
CREATE VIEW ordering_stuck AS
SELECT
    scope, follower_id, event_name, leader_id, occurred, received, waiting_seconds,
    state, claimed_by, claimed_until, leader_seen_at,
    CASE
        WHEN state = 'claim expired' THEN 'claimed by a worker that stopped before handling it'
        WHEN leader_seen_at IS NOT NULL THEN 'its leader was handled but did not release it'
        ELSE 'its leader never arrived'
    END AS reason,
    event
FROM ordering_waiting
WHERE (state = 'waiting' AND past_lookback) OR state = 'claim expired'
"""


def _held_leases(d: _Dialect) -> str:
    return f"""
CREATE VIEW ordering_held_leases AS
SELECT
    scope,
    {d.uuid("event_id")} AS event_id,
    owner AS held_by,
    acquired_at,
    expires_at,
    {d.seconds_since("acquired_at")} AS held_seconds,
    CASE WHEN expires_at > {d.now()} THEN 'live' ELSE 'expired' END AS state
FROM ordering_processing_leases
"""


def upgrade() -> None:
    d = _Dialect(op.get_context().dialect.name)
    # Views a tool dropped the tables under (Prefect's database reset does, on SQLite)
    # would make CREATE VIEW fail: start from none.
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.execute(_waiting(d))
    op.execute(STUCK)
    op.execute(_held_leases(d))


def downgrade() -> None:
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
