-- Every statement the store runs on PostgreSQL.  Each one is named with the names of
-- its parameters, in the order of $1, $2, ...; the SQLite file defines the same names
-- with the same parameters.  Events are read back as JSON text.

-- The hot path: one round trip each ---------------------------------------------

-- name: begin(scope, event_id, follows, owner, now, expires_at, seen_after, refuse_seen)
-- The last column: the lease was another owner's and had expired (its worker died or
-- stalled).  This statement reads with the snapshot it started with, and the function's
-- writes are later commands of the transaction, so it sees the lease as it was before
-- the function took it.
SELECT b.already_seen, b.leader_seen, b.leader_in_flight,
       {expired_elsewhere($1, $2, $4, $5)}
FROM begin_event_v1($1, $2, $3, $4, $5, $6, $7, $8) AS b

-- name: complete(scope, event_id, owner, now, claim_owner, claim_until, is_follower, seen_until)
SELECT released_event FROM complete_event_v2($1, $2, $3, $4, $5, $6, $7, $8)

-- name: begin_batch(scope, event_id, follows, owner, now, expires_at, seen_after, refuse_seen)
-- begin for many events: each parameter an array, one element per event; the last
-- column as begin's.
SELECT b.item, b.already_seen, b.leader_seen, b.leader_in_flight,
       {expired_elsewhere(($1::text[])[b.item], ($2::uuid[])[b.item], ($4::text[])[b.item],
                          ($5::timestamptz[])[b.item])}
FROM begin_events_v2($1, $2, $3, $4, $5, $6, $7, $8) AS b

-- name: complete_batch(scope, event_id, owner, now, claim_owner, claim_until, is_follower, seen_until)
SELECT item, released_event FROM complete_events_v3($1, $2, $3, $4, $5, $6, $7, $8)

-- name: park(scope, event_id, leader_id, occurred, received, event, owner, seen_after)
SELECT park_follower_v1($1, $2, $3, $4, $5, $6::jsonb, $7, $8)

-- Leases and leaders ---------------------------------------------------------------

-- name: leader_status(scope, leader_id, now, seen_after)
SELECT {seen($1, $2, $4)}, {in_flight($1, $2, $3)}

-- name: seen(scope, event_id, seen_after)
SELECT {seen($1, $2, $3)}

-- name: seen_batch(scope, event_id, seen_after)
-- seen for many events: each parameter an array; the items (from 1) that were seen.
SELECT a.item
FROM unnest($1::text[], $2::uuid[], $3::timestamptz[])
     WITH ORDINALITY AS a(scope, event_id, seen_after, item)
WHERE {seen(a.scope, a.event_id, a.seen_after)}

-- name: release(scope, event_id, owner)
DELETE FROM processing_leases l WHERE {held_by(l, $1, $2, $3)}

-- name: mark_waiting(scope, leader_id, now)
-- A follower waiting for this leader in flight asks to be notified when it completes.
UPDATE processing_leases l SET has_waiters = true
WHERE l.scope = $1 AND l.event_id = $2 AND NOT {lease_expired(l, $3)}
RETURNING 1

-- name: renew(scope, owner, expires_at)
-- Every lease and claim of one owner, pushed back together.
WITH leases AS (
    UPDATE processing_leases SET expires_at = $3 WHERE scope = $1 AND owner = $2
)
UPDATE waiting_followers SET claimed_until = $3 WHERE scope = $1 AND claimed_by = $2

-- name: record_seen(scope, event_id, now, seen_until)
INSERT INTO seen_events (scope, event_id, seen_at, expires_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (scope, event_id) DO UPDATE
SET seen_at = excluded.seen_at, expires_at = excluded.expires_at

-- Followers --------------------------------------------------------------------------

-- name: record_follower(scope, event_id, leader_id, occurred, received, event)
INSERT INTO waiting_followers (scope, follower_id, leader_id, occurred, received, event)
VALUES ($1, $2, $3, $4, $5, $6::jsonb)
ON CONFLICT (scope, follower_id) DO NOTHING

-- name: forget_follower(scope, event_id)
DELETE FROM waiting_followers WHERE scope = $1 AND follower_id = $2

-- name: followers_of(scope, leader_id)
SELECT event::text FROM waiting_followers
WHERE scope = $1 AND leader_id = $2
ORDER BY occurred, received, follower_id

-- name: followers_by_id(scope, ids)
SELECT event::text FROM waiting_followers
WHERE scope = $1 AND follower_id = ANY($2::uuid[])
ORDER BY occurred, received, follower_id

-- name: take_lost(scope, cutoff, now)
DELETE FROM waiting_followers f WHERE f.scope = $1 AND {lost(f, $2, $3)}
RETURNING f.event::text

-- name: take_lost_claim(scope, cutoff, now, owner, until)
-- The first half of handing out lost followers so that it may be repeated: claim them
-- for this call's owner (a repeat with the same owner finds the same rows again), then
-- take_lost_forget deletes them.  Should the second half never run, the claim expires
-- and a later sweep hands them out: a reply lost on the way never loses a follower.
UPDATE waiting_followers f SET claimed_by = $4, claimed_until = $5
WHERE f.scope = $1 AND ({lost(f, $2, $3)} OR f.claimed_by = $4)
RETURNING f.follower_id, f.event::text

-- name: take_lost_forget(scope, owner, ids)
DELETE FROM waiting_followers WHERE scope = $1 AND follower_id = ANY($3::uuid[])
  AND claimed_by = $2

-- name: unclaim(scope, owner, ids, now)
-- Followers claimed but not handled (their handler failed, or the depth limit cut them
-- off): their claims expire now, so the next get_lost_followers hands them out again,
-- and the leases taken with the claim are dropped.
WITH leases AS (
    DELETE FROM processing_leases WHERE scope = $1 AND owner = $2 AND event_id = ANY($3::uuid[])
)
UPDATE waiting_followers SET claimed_until = $4
WHERE scope = $1 AND claimed_by = $2 AND follower_id = ANY($3::uuid[])

-- name: clear(scope)
-- Every row of one scope, or of all scopes when scope is NULL.
WITH seen AS (DELETE FROM seen_events WHERE $1::text IS NULL OR scope = $1),
     leases AS (DELETE FROM processing_leases WHERE $1::text IS NULL OR scope = $1)
DELETE FROM waiting_followers WHERE $1::text IS NULL OR scope = $1

-- Schema -------------------------------------------------------------------------------

-- name: schema_tables()
-- Which bookkeeping tables exist: alembic's, code_compatibility (from revision 0003
-- on), and the first release's version table in public.
SELECT to_regclass('alembic_version') IS NOT NULL,
       to_regclass('code_compatibility') IS NOT NULL,
       to_regclass('public.ordering_alembic_version') IS NOT NULL

-- name: schema_revision()
SELECT version_num FROM alembic_version LIMIT 1

-- name: first_release_revision()
SELECT version_num FROM public.ordering_alembic_version LIMIT 1

-- name: oldest_code_served()
SELECT oldest_code_revision FROM code_compatibility LIMIT 1

-- Operators: status, listing, prune, replay --------------------------------------

-- name: seen_counts(scope, seen_after, since)
-- Live and expired, and those seen after since (for the rate `status --watch` shows).
SELECT s.scope, count(*) FILTER (WHERE {seen_since(s, $2)}),
       count(*) FILTER (WHERE NOT ({seen_since(s, $2)})),
       count(*) FILTER (WHERE {seen_since(s, $3)})
FROM seen_events s WHERE $1::text IS NULL OR s.scope = $1
GROUP BY s.scope

-- name: lease_counts(scope, now)
SELECT l.scope, count(*) FILTER (WHERE NOT {lease_expired(l, $2)}),
       count(*) FILTER (WHERE {lease_expired(l, $2)})
FROM processing_leases l WHERE $1::text IS NULL OR l.scope = $1
GROUP BY l.scope

-- name: waiting_counts(scope, now, cutoff)
SELECT f.scope,
       count(*) FILTER (WHERE f.claimed_by IS NULL),
       count(*) FILTER (WHERE f.claimed_until > $2),
       count(*) FILTER (WHERE f.claimed_until <= $2),
       count(*) FILTER (WHERE f.claimed_by IS NULL AND {lost(f, $3, $2)})
FROM waiting_followers f WHERE $1::text IS NULL OR f.scope = $1
GROUP BY f.scope

-- name: oldest_waiting(scope)
SELECT DISTINCT ON (scope) scope, follower_id, leader_id, received, event->>'event'
FROM waiting_followers WHERE $1::text IS NULL OR scope = $1
ORDER BY scope, received, follower_id

-- name: waiting_summary()
-- For the metrics: per scope, how many followers wait and when the oldest came.
SELECT scope, count(*), min(received) FROM waiting_followers GROUP BY scope

-- name: list_followers(scope, leader_id, lost_only, cutoff, now, row_limit)
SELECT f.scope, f.follower_id, f.leader_id, f.occurred, f.received, f.claimed_by,
       f.claimed_until, f.event::text, {lost(f, $4, $5)}
FROM waiting_followers f
WHERE ($1::text IS NULL OR f.scope = $1)
  AND ($2::uuid IS NULL OR f.leader_id = $2)
  AND (NOT $3 OR {lost(f, $4, $5)})
ORDER BY f.occurred, f.received, f.follower_id, f.scope
LIMIT $6

-- name: count_prunable_seen(scope, now, seen_after)
-- Rows past their own expiry, and rows without one (written by a release before
-- revision 0006) seen at or before seen_after.
SELECT count(*) FROM seen_events s
WHERE ($1::text IS NULL OR s.scope = $1)
  AND ({past_expiry(s, $2)} OR {unseen_without_expiry(s, $3)})

-- name: count_prunable_leases(scope, now)
SELECT count(*) FROM processing_leases l
WHERE ($1::text IS NULL OR l.scope = $1) AND {lease_expired(l, $2)}

-- name: prune_expired_seen(scope, now, batch_size)
-- One batch of rows past their own expiry.  The victims are chosen once, in a
-- materialized CTE (as an IN subquery PostgreSQL may scan it again per row, picking
-- new rows past the LIMIT); rows a worker is refreshing right now are skipped, and
-- the condition is checked again on the row as it is when deleted, so a row
-- refreshed meanwhile is kept.
WITH victims AS MATERIALIZED (
    SELECT s.scope, s.event_id FROM seen_events s
    WHERE ($1::text IS NULL OR s.scope = $1) AND {past_expiry(s, $2)}
    LIMIT $3 FOR UPDATE SKIP LOCKED
)
DELETE FROM seen_events s USING victims v
WHERE s.scope = v.scope AND s.event_id = v.event_id AND {past_expiry(s, $2)}
RETURNING s.event_id

-- name: prune_seen(scope, seen_after, batch_size)
-- One batch of rows without an expiry (written by a release before revision 0006),
-- seen at or before seen_after; as prune_expired_seen otherwise.
WITH victims AS MATERIALIZED (
    SELECT s.scope, s.event_id FROM seen_events s
    WHERE ($1::text IS NULL OR s.scope = $1) AND {unseen_without_expiry(s, $2)}
    LIMIT $3 FOR UPDATE SKIP LOCKED
)
DELETE FROM seen_events s USING victims v
WHERE s.scope = v.scope AND s.event_id = v.event_id AND {unseen_without_expiry(s, $2)}
RETURNING s.event_id

-- name: prune_leases(scope, now, batch_size)
WITH victims AS MATERIALIZED (
    SELECT scope, event_id FROM processing_leases l
    WHERE ($1::text IS NULL OR l.scope = $1) AND {lease_expired(l, $2)}
    LIMIT $3 FOR UPDATE SKIP LOCKED
)
DELETE FROM processing_leases l USING victims v
WHERE l.scope = v.scope AND l.event_id = v.event_id AND {lease_expired(l, $2)}
RETURNING l.event_id

-- name: take_pruner_lease(scope, event_id, owner, now, expires_at)
-- The pruner's turn: a lease row like an event's, so one process of all those on the
-- database prunes per interval.  A row back: the turn is ours (taken, or ours already).
INSERT INTO processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
VALUES ($1, $2, $3, $4, $5)
{take_over_lease()}
RETURNING 1

-- name: waiting_extent(scope)
-- When every follower waiting in the scope now will be lost: the latest received, and
-- the latest claim.
SELECT max(received), max(claimed_until), count(*) FROM waiting_followers WHERE scope = $1
