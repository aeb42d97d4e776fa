"""The store: seen events, processing leases, waiting followers.

On PostgreSQL three functions begin an event, complete a leader and park a follower,
each in one round trip.  Completing and parking take the same transaction-level
advisory lock on the leader, which is what keeps a follower from being stranded (see
ordering/store.py).

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def UTCDateTime() -> sa.DateTime:
    return sa.DateTime(timezone=True)


BEGIN_EVENT = """
CREATE OR REPLACE FUNCTION ordering_begin_event(
    p_scope text, p_event_id uuid, p_follows uuid, p_owner text, p_now timestamptz,
    p_expires_at timestamptz, p_seen_after timestamptz, p_refuse_seen boolean
) RETURNS TABLE (already_seen boolean, leader_seen boolean, leader_in_flight boolean)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- A lease lost in a database crash costs nothing (its holder's connection is
    -- gone too, and the lease would only have expired), so its commit skips the WAL
    -- flush.  Completion, which marks the event seen, stays durable.
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO ordering_processing_leases AS l
        (scope, event_id, owner, acquired_at, expires_at)
    VALUES (p_scope, p_event_id, p_owner, p_now, p_expires_at)
    ON CONFLICT (scope, event_id) DO UPDATE
        SET owner = excluded.owner, acquired_at = excluded.acquired_at,
            expires_at = excluded.expires_at, has_waiters = false
        WHERE l.expires_at <= excluded.acquired_at OR l.owner = excluded.owner;
    IF NOT FOUND THEN
        RETURN;  -- someone else holds a live lease
    END IF;
    IF NOT p_refuse_seen AND p_follows IS NULL THEN
        RETURN QUERY SELECT false, false, false;
        RETURN;
    END IF;
    -- Checked once the lease is ours, with a fresh snapshot: a copy of this event that
    -- completed while we waited for its lease row (it marks seen and drops the lease in
    -- one transaction) is seen here, so a redelivery is never handled a second time.
    IF p_refuse_seen AND EXISTS (
        SELECT 1 FROM ordering_seen_events s
        WHERE s.scope = p_scope AND s.event_id = p_event_id AND s.seen_at > p_seen_after
    ) THEN
        DELETE FROM ordering_processing_leases l
        WHERE l.scope = p_scope AND l.event_id = p_event_id AND l.owner = p_owner;
        RETURN QUERY SELECT true, false, false;
        RETURN;
    END IF;
    IF p_follows IS NULL THEN
        RETURN QUERY SELECT false, false, false;
        RETURN;
    END IF;
    RETURN QUERY SELECT
        false,
        EXISTS (SELECT 1 FROM ordering_seen_events s
                WHERE s.scope = p_scope AND s.event_id = p_follows
                  AND s.seen_at > p_seen_after),
        EXISTS (SELECT 1 FROM ordering_processing_leases p
                WHERE p.scope = p_scope AND p.event_id = p_follows AND p.expires_at > p_now);
END
$$
"""

PARK_FOLLOWER = """
CREATE OR REPLACE FUNCTION ordering_park_follower(
    p_scope text, p_event_id uuid, p_leader_id uuid, p_occurred timestamptz,
    p_received timestamptz, p_event jsonb, p_owner text, p_seen_after timestamptz
) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    waited boolean;
BEGIN
    -- The leader's completion takes the same lock.  Each statement below runs with
    -- a fresh snapshot, so it sees a completion that committed while we waited.
    PERFORM pg_advisory_xact_lock(hashtextextended(p_scope || '/' || p_leader_id::text, 0));
    IF EXISTS (
        SELECT 1 FROM ordering_seen_events s
        WHERE s.scope = p_scope AND s.event_id = p_leader_id AND s.seen_at > p_seen_after
    ) THEN
        -- The leader is seen: go ahead, unless our lease is gone, which means an
        -- earlier attempt of this very call parked (and its reply was lost).
        RETURN p_owner <> '' AND NOT EXISTS (
            SELECT 1 FROM ordering_processing_leases l
            WHERE l.scope = p_scope AND l.event_id = p_event_id AND l.owner = p_owner);
    END IF;
    INSERT INTO ordering_waiting_followers
        (scope, follower_id, leader_id, occurred, received, event)
    VALUES (p_scope, p_event_id, p_leader_id, p_occurred, p_received, p_event)
    ON CONFLICT (scope, follower_id) DO NOTHING;
    -- Give up our own lease in the same transaction, so the leader can take the
    -- follower over the moment it sees the row; wake anyone who waited on it.
    DELETE FROM ordering_processing_leases l
    WHERE l.scope = p_scope AND l.event_id = p_event_id AND l.owner = p_owner
    RETURNING l.has_waiters INTO waited;
    IF waited THEN
        PERFORM pg_notify('ordering_seen', p_scope || '/' || p_event_id::text);
    END IF;
    RETURN true;
END
$$
"""

COMPLETE_EVENT = """
CREATE OR REPLACE FUNCTION ordering_complete_event(
    p_scope text, p_event_id uuid, p_owner text, p_now timestamptz,
    p_claim_owner text, p_claim_until timestamptz, p_is_follower boolean
) RETURNS TABLE (
    released_id uuid, released_occurred timestamptz, released_received timestamptz,
    released_event text
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    claimed record;
    waited boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_scope || '/' || p_event_id::text, 0));
    INSERT INTO ordering_seen_events AS s (scope, event_id, seen_at)
    VALUES (p_scope, p_event_id, p_now)
    ON CONFLICT (scope, event_id) DO UPDATE SET seen_at = excluded.seen_at;
    DELETE FROM ordering_processing_leases l
    WHERE l.scope = p_scope AND l.event_id = p_event_id AND l.owner = p_owner
    RETURNING l.has_waiters INTO waited;
    -- Wake followers that wait for this event in flight (only they pay for NOTIFY,
    -- which serializes committing transactions that use it).
    IF waited THEN
        PERFORM pg_notify('ordering_seen', p_scope || '/' || p_event_id::text);
    END IF;
    IF p_is_follower THEN  -- only an event that follows another can have parked
        DELETE FROM ordering_waiting_followers f
        WHERE f.scope = p_scope AND f.follower_id = p_event_id;
    END IF;
    IF p_claim_owner IS NULL THEN
        RETURN;
    END IF;
    FOR claimed IN
        UPDATE ordering_waiting_followers f
        SET claimed_by = p_claim_owner, claimed_until = p_claim_until
        WHERE f.scope = p_scope AND f.leader_id = p_event_id
          AND (f.claimed_until IS NULL OR f.claimed_until <= p_now
               OR f.claimed_by = p_claim_owner)
        RETURNING f.follower_id, f.occurred, f.received, f.event
    LOOP
        -- A claimed follower is leased to the claimer; if a redelivered copy holds a
        -- live lease, that worker will handle it, so the claim is given back.
        INSERT INTO ordering_processing_leases AS l
            (scope, event_id, owner, acquired_at, expires_at)
        VALUES (p_scope, claimed.follower_id, p_claim_owner, p_now, p_claim_until)
        ON CONFLICT (scope, event_id) DO UPDATE
            SET owner = excluded.owner, acquired_at = excluded.acquired_at,
                expires_at = excluded.expires_at
            WHERE l.expires_at <= excluded.acquired_at OR l.owner = excluded.owner;
        IF FOUND THEN
            released_id := claimed.follower_id;
            released_occurred := claimed.occurred;
            released_received := claimed.received;
            released_event := claimed.event::text;
            RETURN NEXT;
        ELSE
            UPDATE ordering_waiting_followers f
            SET claimed_by = NULL, claimed_until = NULL
            WHERE f.scope = p_scope AND f.follower_id = claimed.follower_id;
        END IF;
    END LOOP;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "ordering_seen_events",
        sa.Column("scope", sa.String(200), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "event_id", name="pk_ordering_seen_events"),
    )
    op.create_index("ix_ordering_seen_events_seen_at", "ordering_seen_events", ["seen_at"])

    op.create_table(
        "ordering_processing_leases",
        sa.Column("scope", sa.String(200), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("acquired_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("has_waiters", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "event_id", name="pk_ordering_processing_leases"),
    )

    op.create_table(
        "ordering_waiting_followers",
        sa.Column("scope", sa.String(200), nullable=False),
        sa.Column("follower_id", sa.Uuid(), nullable=False),
        sa.Column("leader_id", sa.Uuid(), nullable=False),
        sa.Column("occurred", UTCDateTime(), nullable=False),
        sa.Column("received", UTCDateTime(), nullable=False),
        sa.Column(
            "event", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("claimed_by", sa.String(200), nullable=True),
        sa.Column("claimed_until", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("scope", "follower_id", name="pk_ordering_waiting_followers"),
        sa.CheckConstraint(
            "(claimed_by IS NULL) = (claimed_until IS NULL)",
            name=op.f("ck_ordering_waiting_followers_claim_has_owner_and_expiry"),
        ),
        sa.CheckConstraint(
            "follower_id <> leader_id",
            name=op.f("ck_ordering_waiting_followers_does_not_follow_itself"),
        ),
    )
    op.create_index(
        "ix_ordering_waiting_followers_by_leader",
        "ordering_waiting_followers",
        ["scope", "leader_id", "occurred", "received", "follower_id"],
    )
    op.create_index(
        "ix_ordering_waiting_followers_by_received",
        "ordering_waiting_followers",
        ["scope", "received"],
    )

    if op.get_context().dialect.name == "postgresql":
        op.execute(BEGIN_EVENT)
        op.execute(PARK_FOLLOWER)
        op.execute(COMPLETE_EVENT)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION ordering_begin_event"
            "(text, uuid, uuid, text, timestamptz, timestamptz, timestamptz, boolean)"
        )
        op.execute(
            "DROP FUNCTION ordering_complete_event"
            "(text, uuid, text, timestamptz, text, timestamptz, boolean)"
        )
        op.execute(
            "DROP FUNCTION ordering_park_follower"
            "(text, uuid, uuid, timestamptz, timestamptz, jsonb, text, timestamptz)"
        )
    op.drop_table("ordering_waiting_followers")
    op.drop_table("ordering_processing_leases")
    op.drop_table("ordering_seen_events")
