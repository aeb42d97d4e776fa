"""A later release's expand step, for tests/test_expand_contract.py: additive only.

Adds a nullable ``note`` column to the seen-events table and, on PostgreSQL,
``complete_event_v3``: ``complete_event_v2`` with a last argument, ``p_note``, written
to the seen row.  Nothing the code of revision 0006 uses changes, so
``code_compatibility`` is left alone: workers of both releases run side by side on a
database at this revision.

The function body is a copy of ``complete_event_v2`` as revision 0006 defines it (its
rules written out), frozen here as a migration must be: a later change to
definitions.sql must not change what this revision builds.

Revision ID: 0099
Revises: 0006
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0099"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEEN_TABLE = {"postgresql": "seen_events", "sqlite": "ordering_seen_events"}

COMPLETE_EVENT_V3 = """
CREATE FUNCTION complete_event_v3(
    p_scope text, p_event_id uuid, p_owner text, p_now timestamptz,
    p_claim_owner text, p_claim_until timestamptz, p_is_follower boolean,
    p_seen_until timestamptz, p_note text
) RETURNS TABLE (released_event text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    claimed record;
    waited boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_scope || '/' || p_event_id::text, 0));
    INSERT INTO seen_events AS s (scope, event_id, seen_at, expires_at, note)
    VALUES (p_scope, p_event_id, p_now, p_seen_until, p_note)
    ON CONFLICT (scope, event_id) DO UPDATE
        SET seen_at = excluded.seen_at, expires_at = excluded.expires_at,
            note = excluded.note;
    DELETE FROM processing_leases l
    WHERE l.scope = p_scope AND l.event_id = p_event_id AND l.owner = p_owner
    RETURNING l.has_waiters INTO waited;
    IF waited THEN
        PERFORM pg_notify('ordering_seen', p_scope || '/' || p_event_id::text);
    END IF;
    IF p_is_follower THEN
        DELETE FROM waiting_followers f WHERE f.scope = p_scope AND f.follower_id = p_event_id;
    END IF;
    IF p_claim_owner IS NULL THEN
        RETURN;
    END IF;
    FOR claimed IN
        UPDATE waiting_followers f
        SET claimed_by = p_claim_owner, claimed_until = p_claim_until
        WHERE f.scope = p_scope AND f.leader_id = p_event_id
          AND (f.claimed_until IS NULL OR f.claimed_until <= p_now
               OR f.claimed_by = p_claim_owner)
        RETURNING f.follower_id, f.event
    LOOP
        INSERT INTO processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
        VALUES (p_scope, claimed.follower_id, p_claim_owner, p_now, p_claim_until)
        ON CONFLICT (scope, event_id) DO UPDATE
            SET owner = excluded.owner, acquired_at = excluded.acquired_at,
                expires_at = excluded.expires_at
            WHERE ((l.expires_at <= excluded.acquired_at) OR l.owner = excluded.owner);
        IF FOUND THEN
            released_event := claimed.event::text;
            RETURN NEXT;
        ELSE
            UPDATE waiting_followers f SET claimed_by = NULL, claimed_until = NULL
            WHERE f.scope = p_scope AND f.follower_id = claimed.follower_id;
        END IF;
    END LOOP;
END
$$
"""

COMPLETE_EVENT_V3_SIGNATURE = (
    "complete_event_v3(text, uuid, text, timestamptz, text, timestamptz, boolean, "
    "timestamptz, text)"
)


def upgrade() -> None:
    dialect = op.get_context().dialect.name
    # Nullable, no default: on PostgreSQL a change of the catalog only, no table rewrite.
    op.execute(f"ALTER TABLE {SEEN_TABLE[dialect]} ADD COLUMN note text")
    if dialect == "postgresql":
        op.execute(COMPLETE_EVENT_V3)


def downgrade() -> None:
    dialect = op.get_context().dialect.name
    if dialect == "postgresql":
        op.execute(f"DROP FUNCTION {COMPLETE_EVENT_V3_SIGNATURE}")
    op.execute(f"ALTER TABLE {SEEN_TABLE[dialect]} DROP COLUMN note")
