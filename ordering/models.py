"""Event models, wire-compatible with Prefect's event JSON.

Only what ordering needs is validated strictly (ids, times); labels and payloads are
kept as they come, so that events round-trip through the store unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID, uuid4

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, model_validator


def ensure_utc(value: datetime) -> datetime:
    """Refuse naive datetimes and convert aware ones to UTC."""
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError("naive datetime: give a timezone, e.g. '2024-05-01T12:00:00Z' or '+00:00'")
    return value.astimezone(UTC)


UTCDateTime = Annotated[datetime, AfterValidator(ensure_utc)]


def utc_now() -> datetime:
    """The default clock: the current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Labelled(RootModel[dict[str, str]]):
    """A mapping of string labels."""

    def __getitem__(self, label: str) -> str:
        return self.root[label]

    # pydantic's BaseModel.__iter__ yields (field, value) pairs; labels iterate like the
    # mapping they are, as Prefect's own Labelled does: a deliberate override.
    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.root)

    def __len__(self) -> int:
        return len(self.root)

    def get(self, label: str, default: str | None = None) -> str | None:
        return self.root.get(label, default)

    def items(self) -> Iterator[tuple[str, str]]:
        return iter(self.root.items())


class Resource(Labelled):
    """A resource: labels that include `prefect.resource.id`."""

    @model_validator(mode="after")
    def _requires_id(self) -> Resource:
        if not self.root.get("prefect.resource.id"):
            raise ValueError("a resource needs a non-empty 'prefect.resource.id' label")
        return self

    @property
    def id(self) -> str:
        return self.root["prefect.resource.id"]


class RelatedResource(Resource):
    """A resource related to an event, in a role (`prefect.resource.role`)."""

    @model_validator(mode="after")
    def _requires_role(self) -> RelatedResource:
        if not self.root.get("prefect.resource.role"):
            raise ValueError("a related resource needs a non-empty 'prefect.resource.role' label")
        return self

    @property
    def role(self) -> str:
        return self.root["prefect.resource.role"]


class Event(BaseModel):
    """Something that happened to a resource; it may declare the event it `follows`."""

    model_config = ConfigDict(extra="ignore")

    occurred: UTCDateTime
    event: str = Field(min_length=1)
    resource: Resource
    related: list[RelatedResource] = Field(default_factory=list)
    payload: dict[str, Any] = Field(default_factory=dict)
    id: UUID = Field(default_factory=uuid4)
    follows: UUID | None = None


class ReceivedEvent(Event):
    """An event as the server received it."""

    received: UTCDateTime = Field(default_factory=utc_now)
