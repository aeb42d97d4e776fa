-- The store's objects on SQLite as this code expects them, written out whole (the
-- tables as the first migration created them, and as SQLite writes out a column
-- added later).  The migrations build the same
-- objects step by step; a test builds a database both ways and compares them.

CREATE TABLE ordering_seen_events (
	scope VARCHAR(200) NOT NULL, 
	event_id CHAR(32) NOT NULL, 
	seen_at DATETIME NOT NULL, expires_at DATETIME, 
	CONSTRAINT pk_ordering_seen_events PRIMARY KEY (scope, event_id)
);
CREATE INDEX ix_ordering_seen_events_seen_at ON ordering_seen_events (seen_at);
-- expires_at (revision 0006): when the row may go, its writer's seen_at +
-- seen_expiration; NULL in rows written by earlier releases.
CREATE INDEX ix_ordering_seen_events_expires_at ON ordering_seen_events (expires_at);

CREATE TABLE ordering_processing_leases (
	scope VARCHAR(200) NOT NULL, 
	event_id CHAR(32) NOT NULL, 
	owner VARCHAR(200) NOT NULL, 
	acquired_at DATETIME NOT NULL, 
	expires_at DATETIME NOT NULL, 
	has_waiters BOOLEAN DEFAULT 0 NOT NULL, 
	CONSTRAINT pk_ordering_processing_leases PRIMARY KEY (scope, event_id)
);

CREATE TABLE ordering_waiting_followers (
	scope VARCHAR(200) NOT NULL, 
	follower_id CHAR(32) NOT NULL, 
	leader_id CHAR(32) NOT NULL, 
	occurred DATETIME NOT NULL, 
	received DATETIME NOT NULL, 
	event JSON NOT NULL, 
	claimed_by VARCHAR(200), 
	claimed_until DATETIME, 
	CONSTRAINT pk_ordering_waiting_followers PRIMARY KEY (scope, follower_id), 
	CONSTRAINT ck_ordering_waiting_followers_claim_has_owner_and_expiry CHECK ((claimed_by IS NULL) = (claimed_until IS NULL)), 
	CONSTRAINT ck_ordering_waiting_followers_does_not_follow_itself CHECK (follower_id <> leader_id)
);
CREATE INDEX ix_ordering_waiting_followers_by_leader ON ordering_waiting_followers (scope, leader_id, occurred, received, follower_id);
CREATE INDEX ix_ordering_waiting_followers_by_received ON ordering_waiting_followers (scope, received);

CREATE TABLE ordering_code_compatibility (
    oldest_code_revision VARCHAR(32) NOT NULL
);

-- The audit views (see the PostgreSQL file); ids shown dashed, times as UTC text.
CREATE VIEW ordering_waiting AS
SELECT
    f.scope,
    {dashed(f.follower_id)} AS follower_id,
    json_extract(f.event, '$.event') AS event_name,
    {dashed(f.leader_id)} AS leader_id,
    f.occurred,
    f.received,
    CAST((julianday('now') - julianday(f.received)) * 86400 AS INTEGER) AS waiting_seconds,
    CASE
        WHEN f.claimed_by IS NULL THEN 'waiting'
        WHEN f.claimed_until > {now()} THEN 'claimed'
        ELSE 'claim expired'
    END AS state,
    f.claimed_by,
    f.claimed_until,
    f.received <= {minutes_ago(15)} AS past_lookback,
    {lost(f, {minutes_ago(15)}, {now()})} AS lost,
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
    {dashed(l.event_id)} AS event_id,
    l.owner AS held_by,
    l.acquired_at,
    l.expires_at,
    CAST((julianday('now') - julianday(l.acquired_at)) * 86400 AS INTEGER) AS held_seconds,
    CASE WHEN {lease_expired(l, {now()})} THEN 'expired' ELSE 'live' END AS state
FROM ordering_processing_leases l;
