"""The event models accept Prefect's event JSON and refuse what ordering cannot use."""

from __future__ import annotations

import json
from datetime import UTC
from uuid import UUID

import pytest
from pydantic import ValidationError

from ordering import Event, ReceivedEvent, RelatedResource, Resource

PREFECT_EVENT_JSON = json.dumps(
    {
        "occurred": "2024-05-01T12:00:00.123456Z",
        "event": "prefect.flow-run.Completed",
        "resource": {
            "prefect.resource.id": "prefect.flow-run.2f7c4a52-9c6f-4b2a-8ad5-2b0c1d6a7e11",
            "prefect.resource.name": "crimson-otter",
            "prefect.state-name": "Completed",
        },
        "related": [
            {
                "prefect.resource.id": "prefect.flow.1b9d0b6e-2a67-4d0b-8d47-8a8b0a2c0c41",
                "prefect.resource.role": "flow",
                "prefect.resource.name": "etl",
            }
        ],
        "payload": {"intended": {"from": "RUNNING", "to": "COMPLETED"}},
        "id": "0b1f6a1e-8d7a-4d6e-9d3b-4a9b3f0f6c11",
        "follows": "8d9f2c4b-5b7e-4f0a-9a35-2c8e1f6b7d22",
        "received": "2024-05-01T12:00:00.200000+00:00",
    }
)


def test_prefect_event_json_round_trips() -> None:
    event = ReceivedEvent.model_validate_json(PREFECT_EVENT_JSON)
    assert event.id == UUID("0b1f6a1e-8d7a-4d6e-9d3b-4a9b3f0f6c11")
    assert event.follows == UUID("8d9f2c4b-5b7e-4f0a-9a35-2c8e1f6b7d22")
    assert event.occurred.tzinfo is UTC
    assert event.resource.id.startswith("prefect.flow-run.")
    assert event.related[0].role == "flow"
    assert event.payload["intended"]["to"] == "COMPLETED"
    assert ReceivedEvent.model_validate_json(event.model_dump_json()) == event


def test_offsets_are_converted_to_utc() -> None:
    data = json.loads(PREFECT_EVENT_JSON)
    data["occurred"] = "2024-05-01T14:00:00+02:00"
    event = ReceivedEvent.model_validate(data)
    assert event.occurred.tzinfo is UTC
    assert event.occurred.hour == 12


@pytest.mark.parametrize("field", ["occurred", "received"])
def test_naive_datetimes_are_refused_with_a_clear_error(field: str) -> None:
    data = json.loads(PREFECT_EVENT_JSON)
    data[field] = "2024-05-01T12:00:00"
    with pytest.raises(ValidationError) as error:
        ReceivedEvent.model_validate(data)
    assert field in str(error.value)
    assert "naive datetime" in str(error.value)


def test_a_resource_needs_an_id() -> None:
    with pytest.raises(ValidationError, match=r"prefect\.resource\.id"):
        Resource.model_validate({"prefect.resource.name": "x"})
    with pytest.raises(ValidationError, match=r"prefect\.resource\.role"):
        RelatedResource.model_validate({"prefect.resource.id": "x"})


def test_event_defaults() -> None:
    event = Event.model_validate(
        {"occurred": "2024-05-01T12:00:00Z", "event": "x", "resource": {"prefect.resource.id": "r"}}
    )
    assert isinstance(event.id, UUID)
    assert event.follows is None
    assert event.related == [] and event.payload == {}
