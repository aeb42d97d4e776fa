-- The store's objects on PostgreSQL as this code expects them, written out whole.
-- They live in a schema of their own (``ordering`` unless configured): every
-- connection of the store sets its search_path to it, so nothing here names it.
-- The migrations build the same objects step by step; a test builds a database
-- both ways and compares their catalogs.

CREATE TABLE seen_events (
    scope character varying(200) NOT NULL,
    event_id uuid NOT NULL,
    seen_at timestamp with time zone NOT NULL,
    -- When the row may go: its writer's seen_at + seen_expiration (revision 0006 on).
    -- NULL in rows written by earlier releases; the pruner goes by seen_at for those.
    expires_at timestamp with time zone,
    CONSTRAINT pk_seen_events PRIMARY KEY (scope, event_id)
);
CREATE INDEX ix_seen_events_seen_at ON seen_events (seen_at);
CREATE INDEX ix_seen_events_expires_at ON seen_events (expires_at);

-- No index on expires_at: the table holds only leases in flight (and expired ones
-- until prune), and every event inserts and deletes its lease.
CREATE TABLE processing_leases (
    scope character varying(200) NOT NULL,
    event_id uuid NOT NULL,
    owner character varying(200) NOT NULL,
    acquired_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    -- set by a follower waiting for this event in flight: completion then NOTIFYs
    has_waiters boolean DEFAULT false NOT NULL,
    CONSTRAINT pk_processing_leases PRIMARY KEY (scope, event_id)
);

CREATE TABLE waiting_followers (
    scope character varying(200) NOT NULL,
    follower_id uuid NOT NULL,
    leader_id uuid NOT NULL,
    occurred timestamp with time zone NOT NULL,
    received timestamp with time zone NOT NULL,
    event jsonb NOT NULL,
    claimed_by character varying(200),
    claimed_until timestamp with time zone,
    CONSTRAINT pk_waiting_followers PRIMARY KEY (follower_id, scope),
    CONSTRAINT ck_waiting_followers_claim_has_owner_and_expiry
        CHECK ((claimed_by IS NULL) = (claimed_until IS NULL)),
    CONSTRAINT ck_waiting_followers_does_not_follow_itself CHECK (follower_id <> leader_id)
);
-- Each lookup of the hot path has one index led by the column it looks up: a follower by
-- its id (the primary key), a leader's followers by the leader.  Were both led by scope,
-- a planner without statistics (a new table, or one autovacuum has not reached yet)
-- could take either for either lookup, and read every follower of the scope for each.
CREATE INDEX ix_waiting_followers_by_leader
    ON waiting_followers (leader_id, scope, occurred, received, follower_id);
-- What get_lost_followers looks for: unclaimed followers by when they came, claimed ones
-- by when their claim ends.  Partial, so that no other lookup can take them.
CREATE INDEX ix_waiting_followers_unclaimed
    ON waiting_followers (scope, received) WHERE claimed_until IS NULL;
CREATE INDEX ix_waiting_followers_claimed
    ON waiting_followers (scope, claimed_until) WHERE claimed_until IS NOT NULL;

-- The oldest code revision this database still serves: a migration that only adds
-- leaves it alone, one that removes what older code needs moves it up.
CREATE TABLE code_compatibility (
    oldest_code_revision character varying(32) NOT NULL
);

-- begin_event_v1: take the event's lease (or take over an expired one, or one already
-- ours) and, in the same round trip, look at its leader.  No row: someone else holds
-- a live lease.
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
    {take_over_lease(, has_waiters = false)};
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Checked once the lease is ours, with a fresh snapshot: a copy of this event that
    -- completed while we waited for its lease row (it marks seen and drops the lease in
    -- one transaction) is seen here, so a redelivery is never handled a second time.
    IF p_refuse_seen AND {seen(p_scope, p_event_id, p_seen_after)} THEN
        DELETE FROM processing_leases l
        WHERE {held_by(l, p_scope, p_event_id, p_owner)};
        RETURN QUERY SELECT true, false, false;
        RETURN;
    END IF;
    IF p_follows IS NULL THEN
        RETURN QUERY SELECT false, false, false;
        RETURN;
    END IF;
    RETURN QUERY SELECT
        false,
        {seen(p_scope, p_follows, p_seen_after)},
        {in_flight(p_scope, p_follows, p_now)};
END
$$;

-- park_follower_v1: park the event as a follower of its leader, unless the leader was
-- seen meanwhile; parking gives up the follower's own lease in the same transaction,
-- so the leader can take the follower over the moment it sees the row.  Completion
-- takes the same advisory lock on the leader, and each statement of a PL/pgSQL
-- function takes a fresh snapshot, so whichever runs second sees the first: either
-- the follower sees its leader seen, or the leader sees the follower's row.
CREATE FUNCTION park_follower_v1(
    p_scope text, p_event_id uuid, p_leader_id uuid, p_occurred timestamptz,
    p_received timestamptz, p_event jsonb, p_owner text, p_seen_after timestamptz
) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    waited boolean;
BEGIN
    PERFORM pg_advisory_xact_lock({event_lock(p_scope, p_leader_id)});
    IF {seen(p_scope, p_leader_id, p_seen_after)} THEN
        -- The leader is seen: go ahead, unless our lease is gone, which means an
        -- earlier attempt of this very call parked (and its reply was lost).
        RETURN p_owner IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM processing_leases l
            WHERE {held_by(l, p_scope, p_event_id, p_owner)});
    END IF;
    INSERT INTO waiting_followers (scope, follower_id, leader_id, occurred, received, event)
    VALUES (p_scope, p_event_id, p_leader_id, p_occurred, p_received, p_event)
    ON CONFLICT (scope, follower_id) DO NOTHING;
    DELETE FROM processing_leases l
    WHERE {held_by(l, p_scope, p_event_id, p_owner)}
    RETURNING l.has_waiters INTO waited;
    IF waited THEN
        PERFORM {seen_notify(p_scope, p_event_id)};
    END IF;
    RETURN true;
END
$$;

-- complete_event_v1: mark the event seen, release its lease, drop its own follower row
-- and, given a claim owner, claim and lease the followers that waited for it.  A
-- follower whose redelivered copy holds a live lease is left to that copy's worker.
CREATE FUNCTION complete_event_v1(
    p_scope text, p_event_id uuid, p_owner text, p_now timestamptz,
    p_claim_owner text, p_claim_until timestamptz, p_is_follower boolean
) RETURNS TABLE (released_event text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    claimed record;
    waited boolean;
BEGIN
    PERFORM pg_advisory_xact_lock({event_lock(p_scope, p_event_id)});
    INSERT INTO seen_events AS s (scope, event_id, seen_at)
    VALUES (p_scope, p_event_id, p_now)
    ON CONFLICT (scope, event_id) DO UPDATE SET seen_at = excluded.seen_at;
    DELETE FROM processing_leases l
    WHERE {held_by(l, p_scope, p_event_id, p_owner)}
    RETURNING l.has_waiters INTO waited;
    -- Only followers waiting for this event in flight pay for NOTIFY, which
    -- serializes the commits that use it.
    IF waited THEN
        PERFORM {seen_notify(p_scope, p_event_id)};
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
          AND {may_claim(f, p_claim_owner, p_now)}
        RETURNING f.follower_id, f.event
    LOOP
        INSERT INTO processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
        VALUES (p_scope, claimed.follower_id, p_claim_owner, p_now, p_claim_until)
        {take_over_lease()};
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

-- begin_events_v1 and complete_events_v1: the same for many events in one round trip
-- and one transaction (concurrent consumers share them); item is the event's place
-- in the arrays, from 1.  An event missing from begin's answer is held elsewhere.
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

-- begin_events_v2 and complete_events_v2: what the _v1 forms answer, set-based: a few
-- statements for the whole batch rather than a few per event.  Each statement of a
-- PL/pgSQL function reads with a fresh snapshot, so begin's seen check, after the leases
-- are taken, sees what committed while a lease row was waited for, as begin_event_v1's
-- does.  Rows are taken in key order, so that two batches in flight do not deadlock.
-- Generic plans: a custom plan for these statements costs more to make than to run.
-- Below 8 events the set-based statements cost more than a call per event (measured:
-- about even at 8), so a small batch makes those calls instead.
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
        {take_over_lease(, has_waiters = false)}
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
          AND {seen(a.scope, a.event_id, a.seen_after)}
          AND {held_by(l, a.scope, a.event_id, a.owner)}
        RETURNING a.item
    )
    SELECT coalesce(array_agg(r.item), '{}') INTO seen_already FROM refused r;
    RETURN QUERY
    SELECT a.item::integer, a.item = ANY (seen_already),
           a.follows IS NOT NULL AND NOT a.item = ANY (seen_already)
               AND {seen(a.scope, a.follows, a.seen_after)},
           a.follows IS NOT NULL AND NOT a.item = ANY (seen_already)
               AND {in_flight(a.scope, a.follows, a.now)}
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
    FROM (SELECT DISTINCT {event_lock(a.scope, a.event_id)} AS key
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
        WHERE {held_by(l, a.scope, a.event_id, a.owner)}
        RETURNING l.scope, l.event_id, l.has_waiters
    )
    SELECT count({seen_notify(r.scope, r.event_id)})
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
          AND {may_claim(f, a.claim_owner, a.now)}
        RETURNING a.item, f.follower_id, f.event, a.claim_owner, a.claim_until, a.now
    LOOP
        INSERT INTO processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
        VALUES (p_scope[claimed.item], claimed.follower_id, claimed.claim_owner, claimed.now,
                claimed.claim_until)
        {take_over_lease()};
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

-- complete_event_v2 and complete_events_v3 (revision 0006): complete_event_v1 and
-- complete_events_v2 with one argument more, p_seen_until, the seen row's expires_at
-- (its writer's seen expiration from now), which the pruner goes by.  The older forms
-- stay for workers of the release before, which write no expires_at.
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
    PERFORM pg_advisory_xact_lock({event_lock(p_scope, p_event_id)});
    INSERT INTO seen_events AS s (scope, event_id, seen_at, expires_at)
    VALUES (p_scope, p_event_id, p_now, p_seen_until)
    ON CONFLICT (scope, event_id) DO UPDATE
        SET seen_at = excluded.seen_at, expires_at = excluded.expires_at;
    DELETE FROM processing_leases l
    WHERE {held_by(l, p_scope, p_event_id, p_owner)}
    RETURNING l.has_waiters INTO waited;
    -- Only followers waiting for this event in flight pay for NOTIFY, which
    -- serializes the commits that use it.
    IF waited THEN
        PERFORM {seen_notify(p_scope, p_event_id)};
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
          AND {may_claim(f, p_claim_owner, p_now)}
        RETURNING f.follower_id, f.event
    LOOP
        INSERT INTO processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
        VALUES (p_scope, claimed.follower_id, p_claim_owner, p_now, p_claim_until)
        {take_over_lease()};
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
    FROM (SELECT DISTINCT {event_lock(a.scope, a.event_id)} AS key
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
        WHERE {held_by(l, a.scope, a.event_id, a.owner)}
        RETURNING l.scope, l.event_id, l.has_waiters
    )
    SELECT count({seen_notify(r.scope, r.event_id)})
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
          AND {may_claim(f, a.claim_owner, a.now)}
        RETURNING a.item, f.follower_id, f.event, a.claim_owner, a.claim_until, a.now
    LOOP
        INSERT INTO processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
        VALUES (p_scope[claimed.item], claimed.follower_id, claimed.claim_owner, claimed.now,
                claimed.claim_until)
        {take_over_lease()};
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

-- The audit views: plain SQL for people at a database console; the code never reads
-- them.  They judge time by the database's clock (now(), the start of the current
-- transaction) and use the default 15-minute lookback.
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
    {lost(f, now() - interval '15 minutes', now())} AS lost,
    s.seen_at AS leader_seen_at,
    f.event
FROM waiting_followers f
LEFT JOIN seen_events s ON s.scope = f.scope AND s.event_id = f.leader_id;

-- Exactly the followers get_lost_followers() would hand out now, with the likely reason.
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
    CASE WHEN {lease_expired(l, now())} THEN 'expired' ELSE 'live' END AS state
FROM processing_leases l;
