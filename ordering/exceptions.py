"""Everything the package raises, in one small hierarchy."""

from __future__ import annotations

from typing import Any


class EventArrivedEarly(Exception):
    """The event's leader has not been seen yet; the event is parked as a follower."""

    def __init__(self, event: Any):
        super().__init__(f"event {getattr(event, 'id', event)} arrived before its leader")
        self.event = event


class MaxDepthExceeded(Exception):
    """Followers were handled recursively deeper than the configured maximum."""

    def __init__(self, event: Any):
        super().__init__(f"event {getattr(event, 'id', event)} exceeded the maximum follower depth")
        self.event = event


class EventBeingProcessed(Exception):
    """Another worker holds a live processing lease on this event; try it again later."""

    def __init__(self, event: Any):
        super().__init__(f"event {getattr(event, 'id', event)} is being processed elsewhere")
        self.event = event


class EventAlreadyProcessed(EventBeingProcessed):
    """The event was processed (marked seen) already: a redelivery to skip.

    A subclass of EventBeingProcessed, so a consumer that delivers those again later
    and skips what was seen handles it right without knowing this class.
    """

    def __init__(self, event: Any):
        Exception.__init__(self, f"event {getattr(event, 'id', event)} was processed already")
        self.event = event


class OrderingError(Exception):
    """Base class of the store's own errors (not the ordering signals above)."""


class SchemaError(OrderingError):
    """The store's objects in the database (tables, views, functions) are not at a
    revision this code runs on: missing, older than this code (run ``ordering
    migrate``), or newer and no longer serving this code (upgrade the package).

    "Schema" here is the database schema in the general sense, the objects' layout;
    the PostgreSQL schema that holds them (``schema=``) is a namespace, and a missing
    one shows as missing objects.  The message says which case it is."""


class StoreUnavailable(OrderingError):
    """The database could not be reached, even after the bounded retries."""
