"""The figures that shape causal ordering; the same as Prefect's, so behaviour matches."""

from datetime import datetime, timedelta

#: How long a follower waits for its leader before it is handed out as lost.
PRECEDING_EVENT_LOOKBACK = timedelta(minutes=15)


def lookback_cutoff(now: datetime, lookback: timedelta = PRECEDING_EVENT_LOOKBACK) -> datetime:
    """The cutoff the lost rule (``lost`` in ordering/sql/<dialect>/rules.sql) takes at
    ``now``: a follower received at or before it has waited out the lookback."""
    return now - lookback


#: How long a processed event is remembered, to avoid processing it twice.
PROCESSED_EVENT_LOOKBACK = timedelta(minutes=30)

#: How long an event counts as seen.
SEEN_EXPIRATION = max(PRECEDING_EVENT_LOOKBACK, PROCESSED_EVENT_LOOKBACK)

#: How deep followers may be handled recursively (a guard against cycles).
MAX_DEPTH_OF_PRECEDING_EVENT = 20

#: How long a follower waits for a leader that another worker is processing right now.
IN_FLIGHT_EVENT_TIMEOUT = timedelta(seconds=8)

#: How long a processing lease (and a claim on released followers) lasts before it
#: may be taken over; a live holder renews it, so only a crashed holder loses it.
LEASE_DURATION = timedelta(seconds=60)
