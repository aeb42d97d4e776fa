-- Revision 0003 on postgresql: the objects it creates, written out as they were when it was made.
-- Never edit: later revisions change objects in revisions of their own.

CREATE TABLE code_compatibility (
    oldest_code_revision character varying(32) NOT NULL
);

CREATE FUNCTION begin_event_v1(
    p_scope text, p_event_id uuid, p_follows uuid, p_owner text, p_now timestamptz,
    p_expires_at timestamptz, p_seen_after timestamptz, p_refuse_seen boolean
) RETURNS TABLE (already_seen boolean, leader_seen boolean, leader_in_flight boolean)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- A lease lost in a database crash costs nothing (its holder's connection is
    -- gone too, and the lease would only have expired), so its commit skips the WAL
    -- flush.  Completion, which marks the event seen, stays durable.
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
    VALUES (p_scope, p_event_id, p_owner, p_now, p_expires_at)
    ON CONFLICT (scope, event_id) DO UPDATE
        SET owner = excluded.owner, acquired_at = excluded.acquired_at,
            expires_at = excluded.expires_at, has_waiters = false
        WHERE ((l.expires_at <= excluded.acquired_at) OR l.owner = excluded.owner);
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Checked once the lease is ours, with a fresh snapshot: a copy of this event that
    -- completed while we waited for its lease row (it marks seen and drops the lease in
    -- one transaction) is seen here, so a redelivery is never handled a second time.
    IF p_refuse_seen AND EXISTS (SELECT 1 FROM seen_events s
        WHERE s.scope = p_scope AND s.event_id = p_event_id AND s.seen_at > p_seen_after) THEN
        DELETE FROM processing_leases l
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
        EXISTS (SELECT 1 FROM seen_events s
        WHERE s.scope = p_scope AND s.event_id = p_follows AND s.seen_at > p_seen_after),
        EXISTS (SELECT 1 FROM processing_leases p
        WHERE p.scope = p_scope AND p.event_id = p_follows AND NOT (p.expires_at <= p_now));
END
$$;

CREATE FUNCTION park_follower_v1(
    p_scope text, p_event_id uuid, p_leader_id uuid, p_occurred timestamptz,
    p_received timestamptz, p_event jsonb, p_owner text, p_seen_after timestamptz
) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    waited boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_scope || '/' || p_leader_id::text, 0));
    IF EXISTS (SELECT 1 FROM seen_events s
        WHERE s.scope = p_scope AND s.event_id = p_leader_id AND s.seen_at > p_seen_after) THEN
        -- The leader is seen: go ahead, unless our lease is gone, which means an
        -- earlier attempt of this very call parked (and its reply was lost).
        RETURN p_owner IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM processing_leases l
            WHERE l.scope = p_scope AND l.event_id = p_event_id AND l.owner = p_owner);
    END IF;
    INSERT INTO waiting_followers (scope, follower_id, leader_id, occurred, received, event)
    VALUES (p_scope, p_event_id, p_leader_id, p_occurred, p_received, p_event)
    ON CONFLICT (scope, follower_id) DO NOTHING;
    DELETE FROM processing_leases l
    WHERE l.scope = p_scope AND l.event_id = p_event_id AND l.owner = p_owner
    RETURNING l.has_waiters INTO waited;
    IF waited THEN
        PERFORM pg_notify('ordering_seen', p_scope || '/' || p_event_id::text);
    END IF;
    RETURN true;
END
$$;

CREATE FUNCTION complete_event_v1(
    p_scope text, p_event_id uuid, p_owner text, p_now timestamptz,
    p_claim_owner text, p_claim_until timestamptz, p_is_follower boolean
) RETURNS TABLE (released_event text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    claimed record;
    waited boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_scope || '/' || p_event_id::text, 0));
    INSERT INTO seen_events AS s (scope, event_id, seen_at)
    VALUES (p_scope, p_event_id, p_now)
    ON CONFLICT (scope, event_id) DO UPDATE SET seen_at = excluded.seen_at;
    DELETE FROM processing_leases l
    WHERE l.scope = p_scope AND l.event_id = p_event_id AND l.owner = p_owner
    RETURNING l.has_waiters INTO waited;
    -- Only followers waiting for this event in flight pay for NOTIFY, which
    -- serializes the commits that use it.
    IF waited THEN
        PERFORM pg_notify('ordering_seen', p_scope || '/' || p_event_id::text);
    END IF;
    IF p_is_follower THEN  -- only an event that follows another can have parked
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
$$;

CREATE FUNCTION begin_events_v1(
    p_scope text[], p_event_id uuid[], p_follows uuid[], p_owner text[], p_now timestamptz[],
    p_expires_at timestamptz[], p_seen_after timestamptz[], p_refuse_seen boolean[]
) RETURNS TABLE (item integer, already_seen boolean, leader_seen boolean,
                 leader_in_flight boolean)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    FOR i IN 1 .. cardinality(p_event_id) LOOP
        RETURN QUERY SELECT i, b.already_seen, b.leader_seen, b.leader_in_flight
        FROM begin_event_v1(p_scope[i], p_event_id[i], p_follows[i], p_owner[i], p_now[i],
                            p_expires_at[i], p_seen_after[i], p_refuse_seen[i]) AS b;
    END LOOP;
END
$$;

CREATE FUNCTION complete_events_v1(
    p_scope text[], p_event_id uuid[], p_owner text[], p_now timestamptz[],
    p_claim_owner text[], p_claim_until timestamptz[], p_is_follower boolean[]
) RETURNS TABLE (item integer, released_event text)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    FOR i IN 1 .. cardinality(p_event_id) LOOP
        RETURN QUERY SELECT i, c.released_event
        FROM complete_event_v1(p_scope[i], p_event_id[i], p_owner[i], p_now[i],
                               p_claim_owner[i], p_claim_until[i], p_is_follower[i]) AS c;
    END LOOP;
END
$$;

CREATE VIEW waiting AS
SELECT
    f.scope,
    f.follower_id,
    f.event ->> 'event' AS event_name,
    f.leader_id,
    f.occurred,
    f.received,
    CAST(floor(extract(epoch FROM now() - f.received)) AS bigint) AS waiting_seconds,
    CASE
        WHEN f.claimed_by IS NULL THEN 'waiting'
        WHEN f.claimed_until > now() THEN 'claimed'
        ELSE 'claim expired'
    END AS state,
    f.claimed_by,
    f.claimed_until,
    f.received <= now() - interval '15 minutes' AS past_lookback,
    ((f.claimed_until IS NULL AND f.received <= now() - interval '15 minutes')
 OR f.claimed_until <= now()) AS lost,
    s.seen_at AS leader_seen_at,
    f.event
FROM waiting_followers f
LEFT JOIN seen_events s ON s.scope = f.scope AND s.event_id = f.leader_id;

CREATE VIEW stuck AS
SELECT
    scope, follower_id, event_name, leader_id, occurred, received, waiting_seconds,
    state, claimed_by, claimed_until, leader_seen_at,
    CASE
        WHEN state = 'claim expired' THEN 'claimed by a worker that stopped before handling it'
        WHEN leader_seen_at IS NOT NULL THEN 'its leader was handled but did not release it'
        ELSE 'its leader never arrived'
    END AS reason,
    event
FROM waiting
WHERE lost;

CREATE VIEW held_leases AS
SELECT
    l.scope,
    l.event_id,
    l.owner AS held_by,
    l.acquired_at,
    l.expires_at,
    CAST(floor(extract(epoch FROM now() - l.acquired_at)) AS bigint) AS held_seconds,
    CASE WHEN (l.expires_at <= now()) THEN 'expired' ELSE 'live' END AS state
FROM processing_leases l;
