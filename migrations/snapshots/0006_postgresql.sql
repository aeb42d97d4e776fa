-- Revision 0006 on postgresql: the objects it creates, written out as they were when it was made.
-- Never edit: later revisions change objects in revisions of their own.

CREATE FUNCTION complete_event_v2(
    p_scope text, p_event_id uuid, p_owner text, p_now timestamptz,
    p_claim_owner text, p_claim_until timestamptz, p_is_follower boolean,
    p_seen_until timestamptz
) RETURNS TABLE (released_event text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    claimed record;
    waited boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_scope || '/' || p_event_id::text, 0));
    INSERT INTO seen_events AS s (scope, event_id, seen_at, expires_at)
    VALUES (p_scope, p_event_id, p_now, p_seen_until)
    ON CONFLICT (scope, event_id) DO UPDATE
        SET seen_at = excluded.seen_at, expires_at = excluded.expires_at;
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

CREATE FUNCTION complete_events_v3(
    p_scope text[], p_event_id uuid[], p_owner text[], p_now timestamptz[],
    p_claim_owner text[], p_claim_until timestamptz[], p_is_follower boolean[],
    p_seen_until timestamptz[]
) RETURNS TABLE (item integer, released_event text)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    claimed record;
    notified bigint;
BEGIN
    IF cardinality(p_event_id) < 8 THEN
        FOR i IN 1 .. cardinality(p_event_id) LOOP
            RETURN QUERY SELECT i, c.released_event
            FROM complete_event_v2(p_scope[i], p_event_id[i], p_owner[i], p_now[i],
                                   p_claim_owner[i], p_claim_until[i], p_is_follower[i],
                                   p_seen_until[i]) AS c;
        END LOOP;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(k.key)
    FROM (SELECT DISTINCT hashtextextended(a.scope || '/' || a.event_id::text, 0) AS key
          FROM unnest(p_scope, p_event_id) AS a(scope, event_id)
          ORDER BY 1) AS k;
    -- An event twice in one batch is seen at its last copy's time.
    INSERT INTO seen_events AS s (scope, event_id, seen_at, expires_at)
    SELECT DISTINCT ON (a.scope, a.event_id) a.scope, a.event_id, a.now, a.seen_until
    FROM unnest(p_scope, p_event_id, p_now, p_seen_until)
         WITH ORDINALITY AS a(scope, event_id, now, seen_until, item)
    ORDER BY a.scope, a.event_id, a.item DESC
    ON CONFLICT (scope, event_id) DO UPDATE
        SET seen_at = excluded.seen_at, expires_at = excluded.expires_at;
    -- Only followers waiting for an event in flight pay for NOTIFY, which serializes
    -- the commits that use it.
    WITH released AS (
        DELETE FROM processing_leases l
        USING unnest(p_scope, p_event_id, p_owner) AS a(scope, event_id, owner)
        WHERE l.scope = a.scope AND l.event_id = a.event_id AND l.owner = a.owner
        RETURNING l.scope, l.event_id, l.has_waiters
    )
    SELECT count(pg_notify('ordering_seen', r.scope || '/' || r.event_id::text))
    INTO notified FROM released r WHERE r.has_waiters;
    DELETE FROM waiting_followers f
    USING unnest(p_scope, p_event_id, p_is_follower) AS a(scope, event_id, is_follower)
    WHERE a.is_follower AND f.scope = a.scope AND f.follower_id = a.event_id;
    FOR claimed IN
        UPDATE waiting_followers f
        SET claimed_by = a.claim_owner, claimed_until = a.claim_until
        FROM unnest(p_scope, p_event_id, p_now, p_claim_owner, p_claim_until)
             WITH ORDINALITY AS a(scope, event_id, now, claim_owner, claim_until, item)
        WHERE a.claim_owner IS NOT NULL
          AND f.scope = a.scope AND f.leader_id = a.event_id
          AND (f.claimed_until IS NULL OR f.claimed_until <= a.now
 OR f.claimed_by = a.claim_owner)
        RETURNING a.item, f.follower_id, f.event, a.claim_owner, a.claim_until, a.now
    LOOP
        INSERT INTO processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
        VALUES (p_scope[claimed.item], claimed.follower_id, claimed.claim_owner, claimed.now,
                claimed.claim_until)
        ON CONFLICT (scope, event_id) DO UPDATE
            SET owner = excluded.owner, acquired_at = excluded.acquired_at,
                expires_at = excluded.expires_at
            WHERE ((l.expires_at <= excluded.acquired_at) OR l.owner = excluded.owner);
        IF FOUND THEN
            item := claimed.item;
            released_event := claimed.event::text;
            RETURN NEXT;
        ELSE
            UPDATE waiting_followers f SET claimed_by = NULL, claimed_until = NULL
            WHERE f.scope = p_scope[claimed.item] AND f.follower_id = claimed.follower_id;
        END IF;
    END LOOP;
END
$$;
