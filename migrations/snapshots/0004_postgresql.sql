-- Revision 0004 on postgresql: the objects it creates, written out as they were when it was made.
-- Never edit: later revisions change objects in revisions of their own.

CREATE FUNCTION begin_events_v2(
    p_scope text[], p_event_id uuid[], p_follows uuid[], p_owner text[], p_now timestamptz[],
    p_expires_at timestamptz[], p_seen_after timestamptz[], p_refuse_seen boolean[]
) RETURNS TABLE (item integer, already_seen boolean, leader_seen boolean,
                 leader_in_flight boolean)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    taken bigint[];
    seen_already bigint[];
BEGIN
    IF cardinality(p_event_id) < 8 THEN
        FOR i IN 1 .. cardinality(p_event_id) LOOP
            RETURN QUERY SELECT i, b.already_seen, b.leader_seen, b.leader_in_flight
            FROM begin_event_v1(p_scope[i], p_event_id[i], p_follows[i], p_owner[i],
                                p_now[i], p_expires_at[i], p_seen_after[i],
                                p_refuse_seen[i]) AS b;
        END LOOP;
        RETURN;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    -- An event twice in one batch: its first copy may take the lease, the second
    -- finds it held, as if they had come one after the other.
    WITH asked AS (
        SELECT DISTINCT ON (a.scope, a.event_id) a.*
        FROM unnest(p_scope, p_event_id, p_owner, p_now, p_expires_at)
             WITH ORDINALITY AS a(scope, event_id, owner, now, expires_at, item)
        ORDER BY a.scope, a.event_id, a.item
    ), leased AS (
        INSERT INTO processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
        SELECT a.scope, a.event_id, a.owner, a.now, a.expires_at FROM asked a
        ORDER BY a.scope, a.event_id
        ON CONFLICT (scope, event_id) DO UPDATE
            SET owner = excluded.owner, acquired_at = excluded.acquired_at,
                expires_at = excluded.expires_at, has_waiters = false
            WHERE ((l.expires_at <= excluded.acquired_at) OR l.owner = excluded.owner)
        RETURNING l.scope, l.event_id, l.owner
    )
    SELECT array_agg(a.item) INTO taken
    FROM asked a JOIN leased t USING (scope, event_id, owner);
    IF taken IS NULL THEN
        RETURN;
    END IF;
    -- Refuse what was seen meanwhile, giving its lease back.
    WITH refused AS (
        DELETE FROM processing_leases l
        USING unnest(p_scope, p_event_id, p_owner, p_seen_after, p_refuse_seen)
              WITH ORDINALITY AS a(scope, event_id, owner, seen_after, refuse_seen, item)
        WHERE a.item = ANY (taken) AND a.refuse_seen
          AND EXISTS (SELECT 1 FROM seen_events s
        WHERE s.scope = a.scope AND s.event_id = a.event_id AND s.seen_at > a.seen_after)
          AND l.scope = a.scope AND l.event_id = a.event_id AND l.owner = a.owner
        RETURNING a.item
    )
    SELECT coalesce(array_agg(r.item), '{}') INTO seen_already FROM refused r;
    RETURN QUERY
    SELECT a.item::integer, a.item = ANY (seen_already),
           a.follows IS NOT NULL AND NOT a.item = ANY (seen_already)
               AND EXISTS (SELECT 1 FROM seen_events s
        WHERE s.scope = a.scope AND s.event_id = a.follows AND s.seen_at > a.seen_after),
           a.follows IS NOT NULL AND NOT a.item = ANY (seen_already)
               AND EXISTS (SELECT 1 FROM processing_leases p
        WHERE p.scope = a.scope AND p.event_id = a.follows AND NOT (p.expires_at <= a.now))
    FROM unnest(p_scope, p_follows, p_now, p_seen_after)
         WITH ORDINALITY AS a(scope, follows, now, seen_after, item)
    WHERE a.item = ANY (taken);
END
$$;

CREATE FUNCTION complete_events_v2(
    p_scope text[], p_event_id uuid[], p_owner text[], p_now timestamptz[],
    p_claim_owner text[], p_claim_until timestamptz[], p_is_follower boolean[]
) RETURNS TABLE (item integer, released_event text)
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    claimed record;
    notified bigint;
BEGIN
    IF cardinality(p_event_id) < 8 THEN
        FOR i IN 1 .. cardinality(p_event_id) LOOP
            RETURN QUERY SELECT i, c.released_event
            FROM complete_event_v1(p_scope[i], p_event_id[i], p_owner[i], p_now[i],
                                   p_claim_owner[i], p_claim_until[i], p_is_follower[i]) AS c;
        END LOOP;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(k.key)
    FROM (SELECT DISTINCT hashtextextended(a.scope || '/' || a.event_id::text, 0) AS key
          FROM unnest(p_scope, p_event_id) AS a(scope, event_id)
          ORDER BY 1) AS k;
    -- An event twice in one batch is seen at its last copy's time.
    INSERT INTO seen_events AS s (scope, event_id, seen_at)
    SELECT DISTINCT ON (a.scope, a.event_id) a.scope, a.event_id, a.now
    FROM unnest(p_scope, p_event_id, p_now) WITH ORDINALITY AS a(scope, event_id, now, item)
    ORDER BY a.scope, a.event_id, a.item DESC
    ON CONFLICT (scope, event_id) DO UPDATE SET seen_at = excluded.seen_at;
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
