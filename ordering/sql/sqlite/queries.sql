-- Every statement the store runs on SQLite.  Each one is named with the names of its
-- parameters, in the order of ?1, ?2, ...; a statement both dialects run has the same
-- name and parameters in the PostgreSQL file.  Where PostgreSQL calls a function or
-- runs one statement with several parts, SQLite runs the steps below in one
-- BEGIN IMMEDIATE transaction (ordering/backends/sqlite.py), which takes the write
-- lock before anything is read.

-- The hot path ------------------------------------------------------------------------

-- name: begin(scope, event_id, follows, owner, now, expires_at, seen_after, refuse_seen)
-- Take a free lease, or our own again, unless the event was seen already (SQLite
-- serializes writers, so checking first is safe here) and look at the leader in the
-- same statement.  No row: someone else holds a lease, live or expired, or the event
-- was seen (the seen statement tells which; take_over takes an expired lease).
INSERT INTO ordering_processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
SELECT ?1, ?2, ?4, ?5, ?6
WHERE NOT (?8 AND {seen(?1, ?2, ?7)})
ON CONFLICT (scope, event_id) DO UPDATE
SET acquired_at = excluded.acquired_at, expires_at = excluded.expires_at, has_waiters = 0
WHERE l.owner = excluded.owner
RETURNING {seen(?1, ?3, ?7)}, {in_flight(?1, ?3, ?5)}

-- name: take_over(scope, event_id, follows, owner, now, expires_at, seen_after, refuse_seen)
-- begin's second step, once begin found another owner's lease: take it if it has
-- expired (its worker died or stalled).  Taking over is a separate statement so that
-- it can be counted (RETURNING sees only the row as written).  It applies
-- take_over_lease in full, so a lease that changed hands or went between the two
-- statements is still taken rightly; only the count may then be one too many.
INSERT INTO ordering_processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
SELECT ?1, ?2, ?4, ?5, ?6
WHERE NOT (?8 AND {seen(?1, ?2, ?7)})
{take_over_lease(, has_waiters = 0)}
RETURNING {seen(?1, ?3, ?7)}, {in_flight(?1, ?3, ?5)}

-- name: claim(scope, event_id, now, claim_owner, claim_until)
-- complete's last step: claim the followers that waited for the event, unless a
-- redelivered copy of one holds a live lease (that copy's worker handles it).
UPDATE ordering_waiting_followers AS f SET claimed_by = ?4, claimed_until = ?5
WHERE f.scope = ?1 AND f.leader_id = ?2 AND {may_claim(f, ?4, ?3)}
  AND NOT EXISTS (SELECT 1 FROM ordering_processing_leases l
                  WHERE l.scope = ?1 AND l.event_id = f.follower_id
                    AND NOT {may_take_lease(l, ?4, ?3)})
RETURNING event

-- name: lease_claimed(scope, event_id, now, claim_owner, claim_until)
INSERT INTO ordering_processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
SELECT scope, follower_id, ?4, ?3, ?5 FROM ordering_waiting_followers
WHERE scope = ?1 AND leader_id = ?2 AND claimed_by = ?4
ON CONFLICT (scope, event_id) DO UPDATE
SET owner = excluded.owner, acquired_at = excluded.acquired_at, expires_at = excluded.expires_at

-- name: still_leased(scope, event_id, owner)
-- park's check when the leader turned out seen: if our lease is gone, an earlier
-- attempt of this very park committed (its reply was lost) and the event is parked.
SELECT ?3 IS NULL OR EXISTS (SELECT 1 FROM ordering_processing_leases l
                             WHERE {held_by(l, ?1, ?2, ?3)})

-- Leases and leaders ---------------------------------------------------------------

-- name: leader_status(scope, leader_id, now, seen_after)
SELECT {seen(?1, ?2, ?4)}, {in_flight(?1, ?2, ?3)}

-- name: seen(scope, event_id, seen_after)
SELECT {seen(?1, ?2, ?3)}

-- name: release(scope, event_id, owner)
DELETE FROM ordering_processing_leases AS l WHERE {held_by(l, ?1, ?2, ?3)}

-- name: mark_waiting(scope, leader_id, now)
UPDATE ordering_processing_leases AS l SET has_waiters = 1
WHERE l.scope = ?1 AND l.event_id = ?2 AND NOT {lease_expired(l, ?3)}
RETURNING 1

-- name: renew_leases(scope, owner, expires_at)
UPDATE ordering_processing_leases SET expires_at = ?3 WHERE scope = ?1 AND owner = ?2

-- name: renew_claims(scope, owner, expires_at)
UPDATE ordering_waiting_followers SET claimed_until = ?3 WHERE scope = ?1 AND claimed_by = ?2

-- name: record_seen(scope, event_id, now, seen_until)
INSERT INTO ordering_seen_events (scope, event_id, seen_at, expires_at) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (scope, event_id) DO UPDATE
SET seen_at = excluded.seen_at, expires_at = excluded.expires_at

-- Followers --------------------------------------------------------------------------

-- name: record_follower(scope, event_id, leader_id, occurred, received, event)
INSERT INTO ordering_waiting_followers (scope, follower_id, leader_id, occurred, received, event)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
ON CONFLICT (scope, follower_id) DO NOTHING

-- name: forget_follower(scope, event_id)
DELETE FROM ordering_waiting_followers WHERE scope = ?1 AND follower_id = ?2

-- name: followers_of(scope, leader_id)
SELECT event FROM ordering_waiting_followers
WHERE scope = ?1 AND leader_id = ?2
ORDER BY occurred, received, follower_id

-- name: followers_by_id(scope, ids)
SELECT event FROM ordering_waiting_followers
WHERE scope = ?1 AND follower_id IN (SELECT value FROM json_each(?2))
ORDER BY occurred, received, follower_id

-- name: take_lost(scope, cutoff, now)
DELETE FROM ordering_waiting_followers AS f WHERE f.scope = ?1 AND {lost(f, ?2, ?3)}
RETURNING event

-- name: unclaim_followers(scope, owner, ids, now)
UPDATE ordering_waiting_followers SET claimed_until = ?4
WHERE scope = ?1 AND claimed_by = ?2 AND follower_id IN (SELECT value FROM json_each(?3))

-- name: unclaim_leases(scope, owner, ids)
DELETE FROM ordering_processing_leases
WHERE scope = ?1 AND owner = ?2 AND event_id IN (SELECT value FROM json_each(?3))

-- name: clear_seen(scope)
DELETE FROM ordering_seen_events WHERE ?1 IS NULL OR scope = ?1

-- name: clear_leases(scope)
DELETE FROM ordering_processing_leases WHERE ?1 IS NULL OR scope = ?1

-- name: clear_followers(scope)
DELETE FROM ordering_waiting_followers WHERE ?1 IS NULL OR scope = ?1

-- Schema -------------------------------------------------------------------------------

-- name: schema_tables()
-- Which bookkeeping tables exist: alembic's, code_compatibility (from revision 0003
-- on), and (PostgreSQL only) the first release's.
SELECT EXISTS (SELECT 1 FROM sqlite_master
               WHERE type = 'table' AND name = 'ordering_alembic_version'),
       EXISTS (SELECT 1 FROM sqlite_master
               WHERE type = 'table' AND name = 'ordering_code_compatibility'),
       0

-- name: schema_revision()
SELECT version_num FROM ordering_alembic_version LIMIT 1

-- name: oldest_code_served()
SELECT oldest_code_revision FROM ordering_code_compatibility LIMIT 1

-- Operators: status, listing, prune, replay --------------------------------------

-- name: seen_counts(scope, seen_after, since)
-- Live and expired, and those seen after since (for the rate `status --watch` shows).
SELECT s.scope, count(*) FILTER (WHERE {seen_since(s, ?2)}),
       count(*) FILTER (WHERE NOT ({seen_since(s, ?2)})),
       count(*) FILTER (WHERE {seen_since(s, ?3)})
FROM ordering_seen_events s WHERE ?1 IS NULL OR s.scope = ?1
GROUP BY s.scope

-- name: lease_counts(scope, now)
SELECT l.scope, count(*) FILTER (WHERE NOT {lease_expired(l, ?2)}),
       count(*) FILTER (WHERE {lease_expired(l, ?2)})
FROM ordering_processing_leases l WHERE ?1 IS NULL OR l.scope = ?1
GROUP BY l.scope

-- name: waiting_counts(scope, now, cutoff)
SELECT f.scope,
       count(*) FILTER (WHERE f.claimed_by IS NULL),
       count(*) FILTER (WHERE f.claimed_until > ?2),
       count(*) FILTER (WHERE f.claimed_until <= ?2),
       count(*) FILTER (WHERE f.claimed_by IS NULL AND {lost(f, ?3, ?2)})
FROM ordering_waiting_followers f WHERE ?1 IS NULL OR f.scope = ?1
GROUP BY f.scope

-- name: oldest_waiting(scope)
SELECT scope, follower_id, leader_id, received, event_name FROM (
    SELECT scope, follower_id, leader_id, received, json_extract(event, '$.event') AS event_name,
           row_number() OVER (PARTITION BY scope ORDER BY received, follower_id) AS rank
    FROM ordering_waiting_followers WHERE ?1 IS NULL OR scope = ?1
) WHERE rank = 1

-- name: waiting_summary()
-- For the metrics: per scope, how many followers wait and when the oldest came.
SELECT scope, count(*), min(received) FROM ordering_waiting_followers GROUP BY scope

-- name: list_followers(scope, leader_id, lost_only, cutoff, now, row_limit)
SELECT f.scope, f.follower_id, f.leader_id, f.occurred, f.received, f.claimed_by,
       f.claimed_until, f.event, {lost(f, ?4, ?5)}
FROM ordering_waiting_followers f
WHERE (?1 IS NULL OR f.scope = ?1)
  AND (?2 IS NULL OR f.leader_id = ?2)
  AND (NOT ?3 OR {lost(f, ?4, ?5)})
ORDER BY f.occurred, f.received, f.follower_id, f.scope
LIMIT coalesce(?6, -1)

-- name: count_prunable_seen(scope, now, seen_after)
SELECT count(*) FROM ordering_seen_events s
WHERE (?1 IS NULL OR s.scope = ?1)
  AND ({past_expiry(s, ?2)} OR {unseen_without_expiry(s, ?3)})

-- name: count_prunable_leases(scope, now)
SELECT count(*) FROM ordering_processing_leases l
WHERE (?1 IS NULL OR l.scope = ?1) AND {lease_expired(l, ?2)}

-- name: prune_expired_seen(scope, now, batch_size)
-- One batch of rows past their own expiry, under the database's write lock (SQLite
-- has no row locks).
DELETE FROM ordering_seen_events
WHERE rowid IN (SELECT rowid FROM ordering_seen_events s
                WHERE (?1 IS NULL OR s.scope = ?1) AND {past_expiry(s, ?2)} LIMIT ?3)
RETURNING event_id

-- name: prune_seen(scope, seen_after, batch_size)
-- One batch of rows without an expiry (written by a release before revision 0006).
DELETE FROM ordering_seen_events
WHERE rowid IN (SELECT rowid FROM ordering_seen_events s
                WHERE (?1 IS NULL OR s.scope = ?1) AND {unseen_without_expiry(s, ?2)}
                LIMIT ?3)
RETURNING event_id

-- name: prune_leases(scope, now, batch_size)
DELETE FROM ordering_processing_leases
WHERE rowid IN (SELECT rowid FROM ordering_processing_leases l
                WHERE (?1 IS NULL OR l.scope = ?1) AND {lease_expired(l, ?2)} LIMIT ?3)
RETURNING event_id

-- name: take_pruner_lease(scope, event_id, owner, now, expires_at)
INSERT INTO ordering_processing_leases AS l (scope, event_id, owner, acquired_at, expires_at)
VALUES (?1, ?2, ?3, ?4, ?5)
{take_over_lease()}
RETURNING 1

-- name: waiting_extent(scope)
SELECT max(received), max(claimed_until), count(*) FROM ordering_waiting_followers
WHERE scope = ?1
