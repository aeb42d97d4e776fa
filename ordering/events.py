"""What the ordering needs of an event, and the checks at its public edge.

Any object with ``id``, ``follows``, ``occurred`` and ``received`` (and a JSON form,
since waiting followers are stored) can be ordered: Prefect's ``ReceivedEvent``,
``ordering.ReceivedEvent``, or a pydantic model of your own.  Values of the wrong
kind are refused here, before anything is written, with the argument's name.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol, TypeVar
from uuid import UUID

E_co = TypeVar("E_co", covariant=True)


class OrderedEvent(Protocol):
    """What an event must have to be ordered."""

    @property
    def id(self) -> UUID: ...

    @property
    def follows(self) -> UUID | None: ...

    @property
    def occurred(self) -> datetime: ...

    @property
    def received(self) -> datetime: ...

    def model_dump_json(self) -> str: ...


class EventModel(Protocol[E_co]):
    """A class of events that can be read back from the JSON they were stored as."""

    def model_validate_json(self, json_data: str | bytes) -> E_co: ...


def as_uuid(value: object, name: str) -> UUID:
    """A UUID given as a UUID or its string form."""
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            raise ValueError(f"{name} must be a UUID, not {value!r}") from None
    raise TypeError(f"{name} must be a UUID, not {type(value).__name__} {value!r}")


def event_id(value: object, name: str = "event") -> UUID:
    """The id of an event given as an event (checked whole, as everywhere), a UUID or a
    UUID's string form."""
    if isinstance(value, (UUID, str)):
        return as_uuid(value, name)
    if value is None or not hasattr(value, "id"):
        raise TypeError(
            f"{name} must be an event with an id, or an event id, "
            f"not {type(value).__name__} {value!r}"
        )
    checked: UUID = checked_event(value, name).id
    return checked


def aware(value: object, name: str) -> datetime:
    """An aware datetime (the store keeps UTC)."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__} {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware UTC datetime, not the naive {value!r}")
    return value


def checked_event(event: Any, name: str = "event") -> Any:
    """The event, if it has what ordering needs; TypeError or ValueError naming what not."""
    if event is None or isinstance(event, (UUID, str)):
        raise TypeError(f"{name} must be an event, not {type(event).__name__} {event!r}")
    for field in ("id", "follows", "occurred", "received"):
        if not hasattr(event, field):
            raise TypeError(
                f"{name} must be an event with {field!r}: {type(event).__name__} has none"
            )
    if not isinstance(event.id, UUID):
        raise TypeError(f"{name}.id must be a UUID, not {event.id!r}")
    if event.follows is not None and not isinstance(event.follows, UUID):
        raise TypeError(f"{name}.follows must be a UUID or None, not {event.follows!r}")
    aware(event.occurred, f"{name}.occurred")
    aware(event.received, f"{name}.received")
    return event


def is_follower(event: OrderedEvent) -> bool:
    """Whether the event follows another (only such an event can have been parked)."""
    return event.follows is not None and event.follows != event.id
