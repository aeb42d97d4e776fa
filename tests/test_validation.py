"""Values of the wrong kind are refused at the edge of CausalOrdering: every public
method raises ValueError or TypeError whose message starts with the name of the
argument at fault, before anything is written; and a UUID given as its string form is
taken wherever a UUID is."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import pytest

from ordering import CausalOrdering, ReceivedEvent

from .helpers import MutableClock, make_event, rows_of_scope

Ordering = CausalOrdering[ReceivedEvent]
Call = Callable[[Ordering, Any], Awaitable[Any]]


async def _handler(event: ReceivedEvent, depth: int = 0) -> None:  # pragma: no cover
    pass


async def _event_is_processing(ordering: Ordering, value: Any) -> None:
    async with ordering.event_is_processing(value):
        pass  # pragma: no cover


async def _preceding_event_confirmed(ordering: Ordering, value: Any) -> None:
    async with ordering.preceding_event_confirmed(_handler, value):
        pass  # pragma: no cover


#: Every public method that takes an event (or an event's id), with the name of that
#: argument.
TAKES_AN_EVENT: dict[str, tuple[Call, str]] = {
    "event_has_been_seen": (lambda o, v: o.event_has_been_seen(v), "event"),
    "record_event_as_seen": (lambda o, v: o.record_event_as_seen(v), "event"),
    "record_event_as_processing": (lambda o, v: o.record_event_as_processing(v), "event"),
    "event_has_started_processing": (lambda o, v: o.event_has_started_processing(v), "event"),
    "forget_event_is_processing": (lambda o, v: o.forget_event_is_processing(v), "event"),
    "event_is_processing": (_event_is_processing, "event"),
    "record_follower": (lambda o, v: o.record_follower(v), "event"),
    "forget_follower": (lambda o, v: o.forget_follower(v), "follower"),
    "get_followers": (lambda o, v: o.get_followers(v), "leader"),
    "wait_for_leader": (lambda o, v: o.wait_for_leader(v), "event"),
    "preceding_event_confirmed": (_preceding_event_confirmed, "event"),
}


def _naive_event(clock: MutableClock) -> ReceivedEvent:
    """A follower whose ``occurred`` has no timezone (built without validation, as a
    caller's own model might hand it over)."""
    valid = make_event(clock, follows=uuid4())
    return ReceivedEvent.model_construct(
        **{**dict(valid), "occurred": clock().replace(tzinfo=None)}
    )


def _without_id(clock: MutableClock) -> SimpleNamespace:
    return SimpleNamespace(follows=uuid4(), occurred=clock(), received=clock())


def _id_not_a_uuid(clock: MutableClock) -> SimpleNamespace:
    return SimpleNamespace(id="not-a-uuid", follows=uuid4(), occurred=clock(), received=clock())


#: Values of the wrong kind for an event argument, built on the test's clock.
WRONG_EVENTS: dict[str, Callable[[MutableClock], Any]] = {
    "a string that is not a UUID": lambda clock: "not-a-uuid",
    "None": lambda clock: None,
    "a number": lambda clock: 42,
    "an event with a naive datetime": _naive_event,
    "an object without id": _without_id,
    "an object whose id is not a UUID": _id_not_a_uuid,
}


def _names(message: str, argument: str) -> bool:
    """Whether the message starts with the argument's name (``event``, ``event.id``,
    ``follower_ids[]``, ...)."""
    return re.match(rf"{re.escape(argument)}\b", message) is not None


async def _assert_refused(ordering: Ordering, call: Awaitable[Any], argument: str) -> None:
    with pytest.raises((ValueError, TypeError)) as raised:
        await call
    message = str(raised.value)
    assert _names(message, argument), f"the message does not name {argument!r}: {message!r}"
    assert await rows_of_scope(ordering.url, ordering.scope) == (0, 0, 0), "a row was written"


@pytest.mark.parametrize("wrong", list(WRONG_EVENTS))
@pytest.mark.parametrize("method", list(TAKES_AN_EVENT))
async def test_an_event_of_the_wrong_kind_is_refused_naming_the_argument(
    ordering: Ordering,
    clock: MutableClock,
    method: str,
    wrong: str,
) -> None:
    call, argument = TAKES_AN_EVENT[method]
    value = WRONG_EVENTS[wrong](clock)
    await _assert_refused(ordering, call(ordering, value), argument)


@pytest.mark.parametrize(
    "value",
    [
        "not-a-uuid",
        None,
        42,
        ["not-a-uuid"],
        [None],
        [uuid4(), "not-a-uuid"],
        [SimpleNamespace(id=uuid4())],
    ],
    ids=[
        "a-string",
        "None",
        "a-number",
        "a-string-that-is-not-a-uuid",
        "None-in-the-list",
        "one-bad-among-good",
        "an-event-not-an-id",
    ],
)
async def test_followers_by_id_refuses_what_is_not_a_sequence_of_uuids(
    ordering: Ordering, value: Any
) -> None:
    await _assert_refused(ordering, ordering.followers_by_id(value), "follower_ids")


@pytest.mark.parametrize(
    ("handler", "depth", "argument"),
    [
        (None, 0, "handler"),
        ("not callable", 0, "handler"),
        (_handler, -1, "depth"),
        (_handler, "1", "depth"),
        (_handler, None, "depth"),
        (_handler, 1.5, "depth"),
        (_handler, True, "depth"),
    ],
    ids=[
        "handler-None",
        "handler-a-string",
        "depth-negative",
        "depth-a-string",
        "depth-None",
        "depth-a-float",
        "depth-a-bool",
    ],
)
async def test_preceding_event_confirmed_refuses_a_bad_handler_or_depth(
    ordering: Ordering, clock: MutableClock, handler: Any, depth: Any, argument: str
) -> None:
    event = make_event(clock)

    async def enter() -> None:
        async with ordering.preceding_event_confirmed(handler, event, depth):
            pass  # pragma: no cover

    await _assert_refused(ordering, enter(), argument)
    assert not await ordering.event_has_started_processing(event)


# -- a UUID's string form is a UUID ------------------------------------------------------


#: The string forms of a UUID that Python's UUID() reads.
STRING_FORMS: dict[str, Callable[[UUID], str]] = {
    "dashed": str,
    "upper-case": lambda u: str(u).upper(),
    "hex": lambda u: u.hex,
}


@pytest.mark.parametrize("form", list(STRING_FORMS))
async def test_event_has_been_seen_takes_a_uuid_string(
    ordering: Ordering, clock: MutableClock, form: str
) -> None:
    event = make_event(clock)
    as_text = STRING_FORMS[form](event.id)
    assert await ordering.event_has_been_seen(as_text) is False
    await ordering.record_event_as_seen(event)
    assert await ordering.event_has_been_seen(as_text) is True


@pytest.mark.parametrize("form", list(STRING_FORMS))
async def test_event_has_started_processing_takes_a_uuid_string(
    ordering: Ordering, clock: MutableClock, form: str
) -> None:
    event = make_event(clock)
    as_text = STRING_FORMS[form](event.id)
    assert await ordering.event_has_started_processing(as_text) is False
    assert await ordering.record_event_as_processing(event) is True
    assert await ordering.event_has_started_processing(as_text) is True
    await ordering.forget_event_is_processing(event)
    assert await ordering.event_has_started_processing(as_text) is False


@pytest.mark.parametrize("form", list(STRING_FORMS))
async def test_followers_by_id_takes_uuid_strings(
    ordering: Ordering, clock: MutableClock, form: str
) -> None:
    leader = make_event(clock)
    first = make_event(clock, name="first", follows=leader.id)
    later = clock() + timedelta(seconds=1)
    second = make_event(clock, name="second", follows=leader.id, occurred=later)
    for follower in (second, first):
        await ordering.record_follower(follower)
    to_text = STRING_FORMS[form]
    found = await ordering.followers_by_id([to_text(first.id), second.id, to_text(uuid4())])
    assert found == [first, second]
