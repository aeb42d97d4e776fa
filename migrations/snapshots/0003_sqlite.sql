-- Revision 0003 on sqlite: the objects it creates, written out as they were when it was made.
-- Never edit: later revisions change objects in revisions of their own.

CREATE TABLE ordering_code_compatibility (
    oldest_code_revision VARCHAR(32) NOT NULL
);

CREATE VIEW ordering_waiting AS
SELECT
    f.scope,
    (substr(f.follower_id, 1, 8) || '-' || substr(f.follower_id, 9, 4) || '-' || substr(f.follower_id, 13, 4) || '-'
 || substr(f.follower_id, 17, 4) || '-' || substr(f.follower_id, 21)) AS follower_id,
    json_extract(f.event, '$.event') AS event_name,
    (substr(f.leader_id, 1, 8) || '-' || substr(f.leader_id, 9, 4) || '-' || substr(f.leader_id, 13, 4) || '-'
 || substr(f.leader_id, 17, 4) || '-' || substr(f.leader_id, 21)) AS leader_id,
    f.occurred,
    f.received,
    CAST((julianday('now') - julianday(f.received)) * 86400 AS INTEGER) AS waiting_seconds,
    CASE
        WHEN f.claimed_by IS NULL THEN 'waiting'
        WHEN f.claimed_until > (strftime('%Y-%m-%d %H:%M:%f', 'now') || '000') THEN 'claimed'
        ELSE 'claim expired'
    END AS state,
    f.claimed_by,
    f.claimed_until,
    f.received <= (strftime('%Y-%m-%d %H:%M:%f', 'now', '-15 minutes') || '000') AS past_lookback,
    ((f.claimed_until IS NULL AND f.received <= (strftime('%Y-%m-%d %H:%M:%f', 'now', '-15 minutes') || '000'))
 OR f.claimed_until <= (strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')) AS lost,
    s.seen_at AS leader_seen_at,
    f.event
FROM ordering_waiting_followers f
LEFT JOIN ordering_seen_events s ON s.scope = f.scope AND s.event_id = f.leader_id;

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
WHERE lost;

CREATE VIEW ordering_held_leases AS
SELECT
    l.scope,
    (substr(l.event_id, 1, 8) || '-' || substr(l.event_id, 9, 4) || '-' || substr(l.event_id, 13, 4) || '-'
 || substr(l.event_id, 17, 4) || '-' || substr(l.event_id, 21)) AS event_id,
    l.owner AS held_by,
    l.acquired_at,
    l.expires_at,
    CAST((julianday('now') - julianday(l.acquired_at)) * 86400 AS INTEGER) AS held_seconds,
    CASE WHEN (l.expires_at <= (strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')) THEN 'expired' ELSE 'live' END AS state
FROM ordering_processing_leases l;
