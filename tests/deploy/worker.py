"""A worker process of this code ("old"), or of this code standing in for a later
revision's ("new"), for tests/test_expand_contract.py.

It writes its consumer loop by hand rather than with ``OrderedConsumer``, a class that
the release being replaced may not have.

    python -m tests.deploy.worker --url URL --scope S --mode old|new \
        --feed FILE --handled FILE --run-dir DIR

It talks to the test through files:

* ``--feed``: events, one JSON object a line, appended by the test while the worker
  runs; ``<feed>.end`` appears once nothing more will be appended.  The worker
  handles what the feed holds and exits when the feed has ended and it is done.
* ``--handled``: one line per handled event, ``<event id> <worker> <depth>``, written
  by the handler in one ``write`` to a file opened for appending, before the
  ordering marks the event seen.  Every worker (and the test) appends to the same
  file, so its order is the order things happened in.
* ``<run-dir>/<worker>.ready``: the worker checked the schema and runs.
* ``<run-dir>/<worker>.drained``: the number of feed lines the worker had read when
  it last ran out of work, i.e. was done with all of them (the test waits for it
  between the stages of the deploy).
* ``<run-dir>/<worker>.result.json``: what it did, written when it exits.

The later revision's code is simulated with the seams of the backends, not run: the
same backend classes, built with its code revision ("0099") and the statements it
changes (completion through ``complete_event_v3`` on PostgreSQL, the seen row with
its ``note`` on SQLite), made the shared backend of the URL before anything else
asks for one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from sqlalchemy.engine import make_url

from ordering import (
    CausalOrdering,
    EventAlreadyProcessed,
    EventArrivedEarly,
    EventBeingProcessed,
    ReceivedEvent,
    SchemaError,
    dispose,
    sql,
)
from ordering.backends import Backend, PostgresBackend, SqliteBackend, use_backend
from ordering.urls import resolve_url

logger = logging.getLogger("deploy.worker")

#: The schema revision the next release is written for (tests/deploy/versions).
NEXT_REVISION = "0099"
#: What the next release writes in the seen row's new column.
NOTE = "new"

#: The statements the next release changes; the others are this release's.
NEXT_QUERIES = {
    "postgresql": f"""
-- name: complete(scope, event_id, owner, now, claim_owner, claim_until, is_follower, seen_until)
SELECT released_event FROM complete_event_v3($1, $2, $3, $4, $5, $6, $7, $8, '{NOTE}')
""",
    "sqlite": f"""
-- name: record_seen(scope, event_id, now, seen_until)
INSERT INTO ordering_seen_events (scope, event_id, seen_at, expires_at, note)
VALUES (?1, ?2, ?3, ?4, '{NOTE}')
ON CONFLICT (scope, event_id) DO UPDATE
SET seen_at = excluded.seen_at, expires_at = excluded.expires_at, note = excluded.note
""",
}

#: How long to wait before trying again an event another worker holds.
RETRY_SLEEP_SECONDS = 0.02
#: How long to wait after an unexpected error before trying the event again.
ERROR_SLEEP_SECONDS = 0.2
#: Unexpected errors after which the worker gives up (the test then fails).
MAX_ERRORS = 20
FEED_POLL_SECONDS = 0.02

_VERSIONED_FUNCTION = re.compile(r"\b(\w+_v\d+)\s*\(")


def dialect_of(url: str) -> str:
    return "sqlite" if make_url(url).drivername.startswith("sqlite") else "postgresql"


def next_release_backend(url: str, schema: str | None = None) -> Backend:
    """The backend the next release's code would build for ``url``."""
    dialect = dialect_of(url)
    queries = {**sql.queries(dialect), **sql.parse_queries(NEXT_QUERIES[dialect], dialect)}
    if dialect == "sqlite":
        return SqliteBackend(url, queries=queries, code_revision=NEXT_REVISION)
    return PostgresBackend(url, schema=schema, queries=queries, code_revision=NEXT_REVISION)


@dataclass
class Stats:
    """What the worker did; written to ``<worker>.result.json``."""

    deliveries: int = 0
    handled: int = 0
    parked: int = 0
    already_processed: int = 0
    retried: int = 0
    errors: list[str] = field(default_factory=list)
    #: Statements sent, by name.
    statements: Counter[str] = field(default_factory=Counter)
    #: Versioned functions the statements called (PostgreSQL), by name.
    functions: Counter[str] = field(default_factory=Counter)
    #: Statements that wrote the seen row's note.
    wrote_note: int = 0
    schema_error: str | None = None

    def listen(self, name: str, text: str) -> None:
        self.statements[name] += 1
        self.functions.update(_VERSIONED_FUNCTION.findall(text))
        self.wrote_note += "note" in text

    def as_json(self) -> str:
        data: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["statements"] = dict(self.statements)
        data["functions"] = dict(self.functions)
        return json.dumps(data, indent=2, sort_keys=True)


class Feed:
    """The events the test appends to a file, read as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.end = path.with_name(path.name + ".end")
        self._offset = 0
        self._partial = b""
        #: Lines read so far.
        self.lines = 0

    def read_new(self) -> list[ReceivedEvent]:
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                chunk = file.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        events = [ReceivedEvent.model_validate_json(line) for line in lines if line.strip()]
        self.lines += len(events)
        return events


class Worker:
    def __init__(
        self, ordering: CausalOrdering[ReceivedEvent], name: str, handled: Path, delay: float
    ) -> None:
        self.ordering = ordering
        self.name = name
        self.delay = delay
        self.stats = Stats()
        self._handled = os.open(handled, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def handler(self, event: ReceivedEvent, depth: int = 0) -> None:
        """The handler given to the ordering: it also takes the followers the ordering
        releases to it, each through preceding_event_confirmed again."""
        async with self.ordering.preceding_event_confirmed(self.handler, event, depth=depth):
            if self.delay:
                await asyncio.sleep(self.delay)  # some work, so that workers overlap
            # One write to a file opened for appending: whole lines, in the order the
            # workers wrote them, and on disk before the event is marked seen.
            os.write(self._handled, f"{event.id} {self.name} {depth}\n".encode())
            self.stats.handled += 1

    async def consume(self, event: ReceivedEvent) -> bool:
        """One delivery, as a user's consumer takes it; False: deliver it again later."""
        self.stats.deliveries += 1
        try:
            await self.handler(event)
        except EventArrivedEarly:
            self.stats.parked += 1  # its leader's completion hands it out
        except EventAlreadyProcessed:
            self.stats.already_processed += 1  # a redelivery: skip it
        except EventBeingProcessed:
            self.stats.retried += 1  # another worker holds it: try again later
            await asyncio.sleep(RETRY_SLEEP_SECONDS)
            return False
        except Exception as exc:
            logger.warning("delivery of %s failed: %r", event.id, exc)
            self.stats.errors.append(f"{type(exc).__name__}: {exc}"[:500])
            if len(self.stats.errors) >= MAX_ERRORS:
                raise
            await asyncio.sleep(ERROR_SLEEP_SECONDS)
            return False
        return True

    async def run(self, feed: Feed, drained: Path) -> None:
        pending: deque[ReceivedEvent] = deque()
        reported = -1
        while True:
            ended = feed.end.exists()  # before reading: what came before the end is read
            pending.extend(feed.read_new())
            if pending:
                event = pending.popleft()
                if not await self.consume(event):
                    pending.append(event)
                continue
            if feed.lines != reported:
                _write_atomically(drained, str(feed.lines))
                reported = feed.lines
            if ended:
                return
            await asyncio.sleep(FEED_POLL_SECONDS)

    def close(self) -> None:
        os.close(self._handled)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


async def main_async(args: argparse.Namespace) -> int:
    url = resolve_url(args.url)
    run_dir = Path(args.run_dir)
    name = args.name or args.mode
    ordering = CausalOrdering(args.scope, url=url)
    if args.mode == "new":
        use_backend(url, next_release_backend(url, ordering.schema), schema=ordering.schema)
    worker = Worker(ordering, name, Path(args.handled), args.delay)
    ordering.backend.listeners.append(worker.stats.listen)
    code = 0
    try:
        try:
            await ordering.event_has_been_seen(uuid4())  # checks the revision, once
        except SchemaError as exc:
            worker.stats.schema_error = str(exc)
            return 3
        (run_dir / f"{name}.ready").touch()
        await worker.run(Feed(Path(args.feed)), run_dir / f"{name}.drained")
    except Exception as exc:
        logger.exception("the worker failed")
        worker.stats.errors.append(f"{type(exc).__name__}: {exc}"[:500])
        code = 1
    finally:
        worker.close()
        (run_dir / f"{name}.result.json").write_text(worker.stats.as_json())
        await dispose()
    return code


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.deploy.worker")
    parser.add_argument("--url", required=True)
    parser.add_argument("--scope", required=True)
    parser.add_argument("--mode", choices=["old", "new"], required=True)
    parser.add_argument("--name", help="the worker's name (default: the mode)")
    parser.add_argument("--feed", required=True, help="events, one JSON object a line")
    parser.add_argument("--handled", required=True, help="the shared record of handled events")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds of work in the handler, per event"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        filename=str(Path(args.run_dir) / f"{args.name or args.mode}.log"),
        level=logging.WARNING,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
