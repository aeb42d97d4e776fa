"""A SQL-persisted causal-ordering store for event processing.

Prefect's ``CausalOrdering`` interface, with seen events, processing leases and
waiting followers kept in SQLite or PostgreSQL tables, so that the state survives
restarts and is shared safely by many workers.
"""

from .causal import CausalOrdering, EventHandler, dispose
from .constants import (
    IN_FLIGHT_EVENT_TIMEOUT,
    LEASE_DURATION,
    MAX_DEPTH_OF_PRECEDING_EVENT,
    PRECEDING_EVENT_LOOKBACK,
    PROCESSED_EVENT_LOOKBACK,
    SEEN_EXPIRATION,
)
from .consumer import OrderedConsumer, Outcome, Verdict
from .exceptions import (
    EventAlreadyProcessed,
    EventArrivedEarly,
    EventBeingProcessed,
    MaxDepthExceeded,
    OrderingError,
    SchemaError,
    StoreUnavailable,
)
from .models import Event, ReceivedEvent, RelatedResource, Resource

__all__ = [
    "IN_FLIGHT_EVENT_TIMEOUT",
    "LEASE_DURATION",
    "MAX_DEPTH_OF_PRECEDING_EVENT",
    "PRECEDING_EVENT_LOOKBACK",
    "PROCESSED_EVENT_LOOKBACK",
    "SEEN_EXPIRATION",
    "CausalOrdering",
    "Event",
    "EventAlreadyProcessed",
    "EventArrivedEarly",
    "EventBeingProcessed",
    "EventHandler",
    "MaxDepthExceeded",
    "OrderedConsumer",
    "OrderingError",
    "Outcome",
    "ReceivedEvent",
    "RelatedResource",
    "Resource",
    "SchemaError",
    "StoreUnavailable",
    "Verdict",
    "dispose",
]
