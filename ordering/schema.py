"""The tables, one definition for SQLite and PostgreSQL.

Every name starts with ``ordering_`` so the tables can live beside another
application's (Prefect's, for one) in the same database.  The migrations under
``migrations/`` create exactly this schema; a test checks that they agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Uuid,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

#: The alembic revision this code expects the database to be at.
SCHEMA_REVISION = "0002"

#: Alembic's bookkeeping table, named so it cannot clash with a host application's.
VERSION_TABLE = "ordering_alembic_version"

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime: refuses naive values; SQLite's naive text comes back as UTC.

    On SQLite the value is stored as fixed-width text in UTC, so text order is time order.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only takes aware UTC datetimes")
        value = value.astimezone(UTC)
        # a plain datetime, whatever subclass came in (Prefect's may be pendulum's)
        plain = datetime(*value.timetuple()[:6], value.microsecond, tzinfo=UTC)
        return plain.replace(tzinfo=None) if dialect.name == "sqlite" else plain

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


#: The event as JSON: JSONB on PostgreSQL (queryable), JSON text on SQLite.
EventJSON = JSON().with_variant(JSONB(), "postgresql")

seen_events = Table(
    "ordering_seen_events",
    metadata,
    Column("scope", String(200), nullable=False),
    Column("event_id", Uuid, nullable=False),
    Column("seen_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("scope", "event_id"),
    Index(None, "seen_at"),
)

processing_leases = Table(
    "ordering_processing_leases",
    metadata,
    Column("scope", String(200), nullable=False),
    Column("event_id", Uuid, nullable=False),
    Column("owner", String(200), nullable=False),
    Column("acquired_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    # Set by a follower waiting for this event in flight: completion then NOTIFYs.
    Column("has_waiters", Boolean, nullable=False, server_default=false()),
    # No index on expires_at: the table holds only leases in flight (and expired ones
    # until prune), and every event inserts and deletes its lease, so an index would
    # cost every event two writes to save prune a scan of a small table.
    PrimaryKeyConstraint("scope", "event_id"),
)

waiting_followers = Table(
    "ordering_waiting_followers",
    metadata,
    Column("scope", String(200), nullable=False),
    Column("follower_id", Uuid, nullable=False),
    Column("leader_id", Uuid, nullable=False),
    Column("occurred", UTCDateTime, nullable=False),
    Column("received", UTCDateTime, nullable=False),
    Column("event", EventJSON, nullable=False),
    Column("claimed_by", String(200), nullable=True),
    Column("claimed_until", UTCDateTime, nullable=True),
    PrimaryKeyConstraint("scope", "follower_id"),
    CheckConstraint(
        "(claimed_by IS NULL) = (claimed_until IS NULL)", name="claim_has_owner_and_expiry"
    ),
    CheckConstraint("follower_id <> leader_id", name="does_not_follow_itself"),
    # "followers of this leader, in occurred order" and "followers received before T"
    Index(
        "ix_ordering_waiting_followers_by_leader",
        "scope",
        "leader_id",
        "occurred",
        "received",
        "follower_id",
    ),
    Index("ix_ordering_waiting_followers_by_received", "scope", "received"),
)
