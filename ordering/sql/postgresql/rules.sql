-- The store's rules, each written once for PostgreSQL.  A rule is an SQL expression
-- with named holes; queries.sql and schema.sql use it as {rule(arg, ...)} and the
-- loader (ordering/sql/__init__.py) writes it out in place, so the database runs
-- plain SQL with nothing to call.

-- rule: seen(scope, event_id, seen_after)
-- The event was processed within the seen expiration.
EXISTS (SELECT 1 FROM seen_events s
        WHERE s.scope = {scope} AND s.event_id = {event_id} AND s.seen_at > {seen_after})

-- rule: lease_expired(lease, at)
-- A lease at or past its expiry no longer protects its event: anyone may take it over.
({lease}.expires_at <= {at})

-- rule: may_take_lease(lease, owner, at)
-- Taking a lease succeeds over an expired one, or over one the same owner holds
-- (a retried statement whose reply was lost takes its own lease again).
({lease_expired({lease}, {at})} OR {lease}.owner = {owner})

-- rule: in_flight(scope, event_id, now)
-- Someone holds a live lease on the event: it is being processed.
EXISTS (SELECT 1 FROM processing_leases p
        WHERE p.scope = {scope} AND p.event_id = {event_id} AND NOT {lease_expired(p, {now})})

-- rule: may_claim(follower, owner, now)
-- A waiting follower may be claimed unless someone else's claim on it is live.
({follower}.claimed_until IS NULL OR {follower}.claimed_until <= {now}
 OR {follower}.claimed_by = {owner})

-- rule: lost(follower, cutoff, now)
-- What get_lost_followers hands out: unclaimed followers received at or before the
-- lookback cutoff (their leader never came), and claimed ones whose claim expired
-- (the worker handling them stopped).
(({follower}.claimed_until IS NULL AND {follower}.received <= {cutoff})
 OR {follower}.claimed_until <= {now})
