-- The store's rules, each written once for PostgreSQL.  A rule is an SQL expression
-- with named holes; queries.sql and definitions.sql use it as {rule(arg, ...)} and the
-- loader (ordering/sql/__init__.py) writes it out in place, so the database runs
-- plain SQL with nothing to call.

-- rule: seen(scope, event_id, seen_after)
-- The event was processed within the seen expiration.
EXISTS (SELECT 1 FROM seen_events s
        WHERE s.scope = {scope} AND s.event_id = {event_id} AND {seen_since(s, {seen_after})})

-- rule: seen_since(row, seen_after)
-- A seen_events row that still counts: written after seen_after (the reader's now less
-- its seen expiration).  A bare comparison: negate it as NOT (...).
{row}.seen_at > {seen_after}

-- rule: past_expiry(row, now)
-- A seen_events row the pruner may delete: past the expiry its writer gave it.
{row}.expires_at <= {now}

-- rule: unseen_without_expiry(row, seen_after)
-- A seen_events row the pruner may delete that was written without an expiry (by a
-- release before revision 0006): it no longer counts as seen.
({row}.expires_at IS NULL AND NOT ({seen_since({row}, {seen_after})}))

-- rule: lease_expired(lease, at)
-- A lease at or past its expiry no longer protects its event: anyone may take it over.
({lease}.expires_at <= {at})

-- rule: may_take_lease(lease, owner, at)
-- Taking a lease succeeds over an expired one, or over one the same owner holds
-- (a retried statement whose reply was lost takes its own lease again).
({lease_expired({lease}, {at})} OR {lease}.owner = {owner})

-- rule: take_over_lease(*also_set)
-- The conflict clause of an insert into processing_leases AS l: where the event has a
-- lease already, the inserted owner takes it over if may_take_lease allows.  also_set,
-- when given, is more assignments, starting with a comma.
ON CONFLICT (scope, event_id) DO UPDATE
    SET owner = excluded.owner, acquired_at = excluded.acquired_at,
        expires_at = excluded.expires_at{also_set}
    WHERE {may_take_lease(l, excluded.owner, excluded.acquired_at)}

-- rule: held_by(lease, scope, event_id, owner)
-- The lease row is the event's and the owner holds it: what releasing a lease deletes.
{lease}.scope = {scope} AND {lease}.event_id = {event_id} AND {lease}.owner = {owner}

-- rule: expired_elsewhere(scope, event_id, owner, now)
-- Another owner holds the event's lease and it has expired: taking it is taking over
-- (what ordering.leases.taken_over counts).
EXISTS (SELECT 1 FROM processing_leases p
        WHERE p.scope = {scope} AND p.event_id = {event_id} AND p.owner <> {owner}
          AND {lease_expired(p, {now})})

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

-- rule: event_key(scope, event_id)
-- The event as one text: the payload of seen_notify, and what event_lock hashes.
-- ordering.sql.event_key writes the same in Python, for the listener.
{scope} || {key_separator()} || {event_id}::text

-- rule: event_lock(scope, event_id)
-- The key of the advisory lock on an event.  Parking a follower takes it on the leader
-- and completing the leader on itself, so that whichever runs second sees the first.
hashtextextended({event_key({scope}, {event_id})}, 0)

-- rule: seen_notify(scope, event_id)
-- Wake the followers that wait for the event in flight (ordering/notify.py listens).
pg_notify({seen_channel()}, {event_key({scope}, {event_id})})
