-- The store's rules, each written once for SQLite (see the PostgreSQL file for how
-- they are used).  Ids are stored as 32 hex digits and times as fixed-width UTC text,
-- 'YYYY-MM-DD HH:MM:SS.ffffff', so that text order is time order.

-- rule: seen(scope, event_id, seen_after)
EXISTS (SELECT 1 FROM ordering_seen_events s
        WHERE s.scope = {scope} AND s.event_id = {event_id} AND {seen_since(s, {seen_after})})

-- rule: seen_since(row, seen_after)
{row}.seen_at > {seen_after}

-- rule: past_expiry(row, now)
{row}.expires_at <= {now}

-- rule: unseen_without_expiry(row, seen_after)
({row}.expires_at IS NULL AND NOT ({seen_since({row}, {seen_after})}))

-- rule: lease_expired(lease, at)
({lease}.expires_at <= {at})

-- rule: may_take_lease(lease, owner, at)
({lease_expired({lease}, {at})} OR {lease}.owner = {owner})

-- rule: take_over_lease(*also_set)
ON CONFLICT (scope, event_id) DO UPDATE
SET owner = excluded.owner, acquired_at = excluded.acquired_at, expires_at = excluded.expires_at{also_set}
WHERE {may_take_lease(l, excluded.owner, excluded.acquired_at)}

-- rule: held_by(lease, scope, event_id, owner)
{lease}.scope = {scope} AND {lease}.event_id = {event_id} AND {lease}.owner = {owner}

-- rule: in_flight(scope, event_id, now)
EXISTS (SELECT 1 FROM ordering_processing_leases p
        WHERE p.scope = {scope} AND p.event_id = {event_id} AND NOT {lease_expired(p, {now})})

-- rule: may_claim(follower, owner, now)
({follower}.claimed_until IS NULL OR {follower}.claimed_until <= {now}
 OR {follower}.claimed_by = {owner})

-- rule: lost(follower, cutoff, now)
(({follower}.claimed_until IS NULL AND {follower}.received <= {cutoff})
 OR {follower}.claimed_until <= {now})

-- rule: now()
-- The database's clock in the stored layout (for the audit views).
(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')

-- rule: minutes_ago(minutes)
(strftime('%Y-%m-%d %H:%M:%f', 'now', '-{minutes} minutes') || '000')

-- rule: dashed(id)
-- An id as events show it, for the audit views.
(substr({id}, 1, 8) || '-' || substr({id}, 9, 4) || '-' || substr({id}, 13, 4) || '-'
 || substr({id}, 17, 4) || '-' || substr({id}, 21))
