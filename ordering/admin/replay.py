"""``ordering replay``: put a file of events through the store, in causal order."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from ..backends import Backend
from ..causal import CausalOrdering
from ..consumer import OrderedConsumer, Verdict
from ..models import ReceivedEvent, utc_now
from .database import open_backend

#: The scope ``ordering replay`` uses unless told otherwise.
DEFAULT_REPLAY_SCOPE = "replay"


#: What a line must carry to be replayed: without ``id`` a later line cannot refer to
#: it, and without ``received`` the model would stamp the replay's own time on it.
REPLAY_REQUIRED_FIELDS = ("id", "occurred", "received", "event", "resource")


@dataclass(frozen=True)
class LineProblem:
    """A line (or, with no number, a lost follower) that was not replayed, and why."""

    number: int | None
    problem: str

    def __str__(self) -> str:
        return self.problem if self.number is None else f"line {self.number}: {self.problem}"


def parse_line(number: int, raw: bytes | str) -> ReceivedEvent | LineProblem | None:
    """One line of a JSON-lines file: the event, what is wrong with it, or None if blank."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return LineProblem(number, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    text = raw.removeprefix("\ufeff")  # a byte order mark some editors write
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return LineProblem(number, f"invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(data, dict):
        return LineProblem(number, f"not a JSON object but {type(data).__name__}")
    missing = [name for name in REPLAY_REQUIRED_FIELDS if name not in data]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        return LineProblem(number, f"missing field{'s' if len(missing) > 1 else ''} {names}")
    try:
        return ReceivedEvent.model_validate(data)
    except ValidationError as exc:
        return LineProblem(number, _describe_validation(exc))


def _describe_validation(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "event"
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def check_lines(lines: Iterable[tuple[int, bytes | str]]) -> list[LineProblem]:
    """Every bad line of a file, without touching any database (for ``--strict``)."""
    return [parsed for n, raw in lines if isinstance(parsed := parse_line(n, raw), LineProblem)]


class ReplayClock:
    """Replay judges each event as of the moment it was received, as the worker that
    received it live would have: a follower waits for its leader even when the file
    is days old, and the lookback means fifteen minutes of the events' own time."""

    def __init__(self) -> None:
        self.now: datetime | None = None

    def __call__(self) -> datetime:
        return self.now if self.now is not None else utc_now()


@dataclass
class ReplayReport:
    """What a replay did; ``waiting`` is what the scope holds at the end."""

    scope: str
    lines: int = 0
    written: int = 0
    parked: int = 0
    already_seen: int = 0
    busy: int = 0
    bad: int = 0
    flushed: int = 0
    waiting: int = 0
    problems: list[LineProblem] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "lines": self.lines,
            "written": self.written,
            "parked": self.parked,
            "already_seen": self.already_seen,
            "busy": self.busy,
            "bad": self.bad,
            "flushed": self.flushed,
            "waiting": self.waiting,
        }


async def replay(
    lines: Iterable[tuple[int, bytes | str]],
    write: Callable[[ReceivedEvent], None],
    *,
    url: str | None = None,
    scope: str = DEFAULT_REPLAY_SCOPE,
    flush_lost: bool = False,
    on_problem: Callable[[LineProblem], None] | None = None,
    schema: str | None = None,
) -> ReplayReport:
    """Put events through the store and ``write`` them in causal order.

    Each event goes through an ``OrderedConsumer`` whose handler writes it, so an
    event is written only after the event it follows; one that arrives first is
    parked in the database and written when its leader comes, in this run or a
    later one.  Events already seen are skipped, so a file can be
    replayed again with more lines appended.  ``flush_lost`` then moves the clock
    past the lookback and writes what still waits, through ``get_lost_followers``.

    Bad lines are passed to ``on_problem`` and skipped; they never reach the store.
    Use a scope of its own: live workers must not share it.
    """
    report = ReplayReport(scope)
    clock = ReplayClock()
    ordering = CausalOrdering(scope, url=url, clock=clock, schema=schema)
    backend = await open_backend(ordering.url, schema=schema)

    def problem(found: LineProblem) -> None:
        report.problems.append(found)
        if on_problem is not None:
            on_problem(found)

    async def write_event(event: ReceivedEvent) -> None:
        write(event)
        report.written += 1

    async def deliver(event: ReceivedEvent, number: int | None) -> None:
        outcome = await consumer.deliver(event)
        if outcome.verdict is Verdict.PARKED:
            report.parked += 1
        elif outcome.verdict is Verdict.DUPLICATE:
            report.already_seen += 1
        elif outcome.verdict is Verdict.BUSY:
            report.busy += 1
            problem(
                LineProblem(
                    number, f"event {event.id} is being processed by another worker: not replayed"
                )
            )
        elif outcome.error is not None:
            raise outcome.error  # the store unavailable, or writing failed: stop here

    # No background sweep: lost followers are flushed at the end, on the replay clock.
    async with OrderedConsumer(ordering, write_event, sweep_interval=None) as consumer:
        for number, raw in lines:
            parsed = parse_line(number, raw)
            if parsed is None:
                continue
            report.lines += 1
            if isinstance(parsed, LineProblem):
                report.bad += 1
                problem(parsed)
                continue
            clock.now = parsed.received
            await deliver(parsed, number)

        if flush_lost:
            flush_at = await _flush_time(backend, scope, ordering.preceding_event_lookback)
            if flush_at is not None:
                clock.now = max(flush_at, clock.now) if clock.now else flush_at
                lost = await ordering.get_lost_followers()
                report.flushed = len(lost)
                for event in lost:
                    await deliver(event, None)
    report.waiting = await _count_waiting(backend, scope)
    return report


async def _flush_time(backend: Backend, scope: str, lookback: timedelta) -> datetime | None:
    """When to flush: once every follower waiting in the scope now has waited out the
    lookback and every claim on one has ended; None if none waits.  Which followers
    are handed out is the database's lost rule, through ``get_lost_followers``; this is
    a later time than that rule needs for a claimed follower, so that a follower
    handed out is past the lookback when delivered, and goes rather than parks again."""
    ((latest_received, latest_claim, _),) = await backend.query(
        "waiting_extent", scope=scope, types=(datetime, datetime, int)
    )
    if latest_received is None:
        return None
    waited_out: datetime = latest_received + lookback
    return waited_out if latest_claim is None else max(waited_out, latest_claim)


async def _count_waiting(backend: Backend, scope: str) -> int:
    ((_, _, count),) = await backend.query("waiting_extent", scope=scope)
    return int(count)
