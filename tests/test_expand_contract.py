"""The expand and contract steps of docs/deploy.md, on SQLite and PostgreSQL, with
this code as the release being replaced: its statements keep working on a database
migrated to a later, additive revision, beside statements written for that revision,
until the contract step makes it refuse the database.

Both kinds of worker run this checkout's Python.  The later revision is 0099
(tests/deploy/versions): a nullable ``note`` on the seen events and, on PostgreSQL,
``complete_event_v3``, which writes it.  A ``--mode new`` worker (tests/deploy/worker.py)
is this code with that revision number and one statement swapped (completion through
``complete_event_v3``; on SQLite, the seen row written with its note); a ``--mode old``
worker is this code as it is, completing through ``complete_event_v2``.  So this shows
that the two sets of statements share the rows of one scope on the migrated database,
and that ``code_compatibility`` lets this code run there and then stops it; whether a
real previous release's code runs beside this one is tests/fault/test_previous_release.py's
question.

Each worker is a process of its own; they share a file in which the handler writes a
line per event it handles, in the order the handlers ran.  The steps:

1. an old worker handles a stream of causal chains, delivered out of order;
2. meanwhile the database is migrated to 0099 (the expand step);
3. a new worker starts beside the old one, and both get the rest of the stream,
   with some events delivered to both (a broker's redeliveries), and some that the
   old worker handled or parked before the migration delivered to the new one;
4. the contract step moves ``code_compatibility`` past this code's revision: from then
   on this code refuses the database, and asks to be upgraded.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from ordering import CausalOrdering, ReceivedEvent, SchemaError, dispose
from ordering.migrate import alembic_config, current_revision, upgrade
from ordering.models import utc_now
from ordering.schema import CODE_REVISION, resolve_schema

from .deploy.worker import NEXT_REVISION, NOTE, Stats, next_release_backend
from .fault.workload import make_chains

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
NEXT_VERSIONS = Path(__file__).parent / "deploy" / "versions"

CHAINS = 24
CHAIN_LENGTH = 5
SEED = 20261130
#: Events the old worker handles before the migration starts (of the first half).
HANDLED_BEFORE_MIGRATING = 10
#: Events delivered a second time, to the other worker.
REDELIVERED = 24
#: Seconds of work per event in the handler, so that the migration runs while the
#: old worker is busy, and the two workers overlap.
HANDLER_DELAY = 0.005
#: A bound on every wait of the test (it normally takes a few seconds).
WAIT_SECONDS = 40.0
#: The lines the test writes into the shared record: once the migration committed,
#: and before the second half of the stream goes out.
MIGRATED = "migrated"
SECOND_HALF = "second-half"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def next_release_config(url: str) -> Any:
    return alembic_config(url, extra_versions=NEXT_VERSIONS)


def table(url: str, name: str) -> str:
    """A table of the store, as raw SQL names it."""
    if make_url(url).drivername.startswith("sqlite"):
        return f"ordering_{name}"
    return f'"{resolve_schema()}".{name}'


# -- the workload ---------------------------------------------------------------------


@dataclass
class Workload:
    events: list[ReceivedEvent]
    #: What the old worker gets before the new one starts.
    first: list[ReceivedEvent]
    #: What each worker gets once both run.
    old: list[ReceivedEvent]
    new: list[ReceivedEvent]

    @property
    def leader_of(self) -> dict[UUID, UUID]:
        return {e.id: e.follows for e in self.events if e.follows is not None}


def make_workload(seed: int) -> Workload:
    """The chains shuffled; the first half to the old worker, the rest dealt to both
    in turn; then some events (of either half) delivered again to the worker that
    did not get them in the second half, each at a random place."""
    rng = random.Random(seed)
    events = make_chains(CHAINS, CHAIN_LENGTH, utc_now(), rng)
    stream = list(events)
    rng.shuffle(stream)
    half = len(stream) // 2
    first, rest = stream[:half], stream[half:]
    old, new = rest[0::2], rest[1::2]
    new_ids = {e.id for e in new}
    for event in rng.sample(events, REDELIVERED):
        other = old if event.id in new_ids else new
        other.insert(rng.randrange(len(other) + 1), event)
    return Workload(events, first, old, new)


def append_events(feed: Path, events: list[ReceivedEvent]) -> None:
    with feed.open("a") as file:
        file.write("".join(e.model_dump_json() + "\n" for e in events))


# -- the workers ------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    mode: str
    process: subprocess.Popen[bytes]
    run_dir: Path
    feed: Path

    def log(self) -> str:
        path = self.run_dir / f"{self.mode}.log"
        return path.read_text() if path.exists() else ""

    def ready(self) -> bool:
        return (self.run_dir / f"{self.mode}.ready").exists()

    def done_with(self, lines: int) -> bool:
        drained = self.run_dir / f"{self.mode}.drained"
        return drained.exists() and drained.read_text() == str(lines)

    def end_feed(self) -> None:
        self.feed.with_name(self.feed.name + ".end").touch()

    def stats(self) -> Stats:
        data = json.loads((self.run_dir / f"{self.mode}.result.json").read_text())
        return Stats(**data)


def start_worker(url: str, scope: str, mode: str, run_dir: Path, handled: Path) -> WorkerProcess:
    feed = run_dir / f"{mode}.feed"
    feed.touch()
    command_line = [
        sys.executable,
        "-m",
        "tests.deploy.worker",
        *("--url", url, "--scope", scope, "--mode", mode),
        *("--feed", str(feed), "--handled", str(handled), "--run-dir", str(run_dir)),
        *("--delay", str(HANDLER_DELAY)),
    ]
    # ``python -m`` from the checkout: ``tests`` imports as a package.
    process = subprocess.Popen(command_line, cwd=REPO)
    return WorkerProcess(mode, process, run_dir, feed)


def wait_for(condition: Callable[[], bool], what: str, workers: list[WorkerProcess]) -> None:
    """Poll ``condition`` (files the workers write) until it holds, failing with the
    workers' logs after ``WAIT_SECONDS`` or when a worker exits first."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        exited = [w for w in workers if w.process.poll() is not None]
        if exited or time.monotonic() > deadline:
            problem = f"exited with {exited[0].process.returncode}" if exited else "timed out"
            logs = "\n".join(f"--- {w.mode}\n{w.log()}" for w in workers)
            pytest.fail(f"waiting for {what}: {problem}\n{logs}")
        time.sleep(0.01)


def finish(workers: list[WorkerProcess]) -> None:
    """Wait for the workers to exit (they do once their feeds ended and they are done)."""
    deadline = time.monotonic() + WAIT_SECONDS
    for worker in workers:
        code = worker.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        assert code == 0, f"the {worker.mode} worker exited with {code}:\n{worker.log()}"


def read_handled(path: Path) -> list[tuple[UUID | None, str]]:
    """(event id, worker) per line; the test's own lines are (None, line)."""
    found: list[tuple[UUID | None, str]] = []
    for line in path.read_text().splitlines():
        if line in (MIGRATED, SECOND_HALF):
            found.append((None, line))
            continue
        event_id, worker, _depth = line.split()
        found.append((UUID(event_id), worker))
    return found


def append_line(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


# -- the database -----------------------------------------------------------------------


async def seen_notes(url: str, scope: str) -> dict[UUID, str | None]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text(f"SELECT event_id, note FROM {table(url, 'seen_events')} WHERE scope = :s"),
                {"s": scope},
            )
            return {UUID(str(event_id)): note for event_id, note in rows}
    finally:
        await engine.dispose()


async def leftovers(url: str, scope: str) -> dict[str, int]:
    """Rows of the scope that should be gone once every event was handled."""
    engine = create_async_engine(url)
    found: dict[str, int] = {}
    try:
        async with engine.connect() as connection:
            for name in ("waiting_followers", "processing_leases"):
                query = text(f"SELECT count(*) FROM {table(url, name)} WHERE scope = :s")
                found[name] = int((await connection.execute(query, {"s": scope})).scalar_one())
    finally:
        await engine.dispose()
    return found


async def serve_code_from(url: str, revision: str) -> None:
    """Set the oldest code revision the database serves (the contract step's move)."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text(f"UPDATE {table(url, 'code_compatibility')} SET oldest_code_revision = :r"),
                {"r": revision},
            )
    finally:
        await engine.dispose()


async def this_release_runs(url: str, scope: str) -> None:
    try:
        await CausalOrdering(scope, url=url).event_has_been_seen(uuid.uuid4())
    finally:
        await dispose()


async def next_release_runs(url: str) -> None:
    backend = next_release_backend(url)
    try:
        await backend.check_version()
    finally:
        await backend.dispose()


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_both_sets_of_statements_share_the_expanded_database_until_the_contract_step(
    empty_url: str, tmp_path: Path
) -> None:
    url, postgres = empty_url, empty_url.startswith("postgresql")
    scope = f"deploy-{uuid.uuid4().hex[:12]}"
    workload = make_workload(SEED)
    leader_of = workload.leader_of
    handled = tmp_path / "handled"
    handled.touch()
    upgrade(url)
    assert run(current_revision(url)) == CODE_REVISION

    # The next release's code does not run before its migration.
    with pytest.raises(SchemaError, match=f"older than this code's {NEXT_REVISION}"):
        run(next_release_runs(url))

    # 1. This release's worker, with the first half of the stream.
    old = start_worker(url, scope, "old", tmp_path, handled)
    workers = [old]
    try:
        wait_for(old.ready, "the old worker to start", workers)
        append_events(old.feed, workload.first)
        wait_for(
            lambda: len(handled.read_text().splitlines()) >= HANDLED_BEFORE_MIGRATING,
            "the old worker to handle events",
            workers,
        )

        # 2. The expand step, while the old worker works on.
        command.upgrade(next_release_config(url), NEXT_REVISION)
        append_line(handled, MIGRATED)
        assert run(current_revision(url)) == NEXT_REVISION
        wait_for(lambda: old.done_with(len(workload.first)), "the first half", workers)

        # 3. The next release's worker beside it; both get the rest of the stream.
        new = start_worker(url, scope, "new", tmp_path, handled)
        workers.append(new)
        wait_for(new.ready, "the new worker to start", workers)
        append_line(handled, SECOND_HALF)
        append_events(old.feed, workload.old)
        append_events(new.feed, workload.new)
        old.end_feed()
        new.end_feed()
        finish(workers)
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()

    old_stats, new_stats = old.stats(), new.stats()
    assert old_stats.errors == [] and new_stats.errors == []
    lines = read_handled(handled)
    migrated_at = lines.index((None, MIGRATED))
    order = {event_id: i for i, (event_id, _) in enumerate(lines) if event_id is not None}
    by_worker = {event_id: worker for event_id, worker in lines if event_id is not None}

    # Every event handled exactly once, each follower after its leader.
    handled_ids = [event_id for event_id, _ in lines if event_id is not None]
    assert len(handled_ids) == len(set(handled_ids)), "an event was handled twice"
    assert set(handled_ids) == {e.id for e in workload.events}
    for follower, leader in leader_of.items():
        assert order[leader] < order[follower], f"{follower} was handled before its leader"
    assert run(leftovers(url, scope)) == {"waiting_followers": 0, "processing_leases": 0}

    # Both releases handled events after the migration; the new one only after it.
    after = [worker for _, worker in lines[migrated_at + 1 :]]
    assert after.count("old") > 0 and after.count("new") > 0
    assert all(worker != "new" for _, worker in lines[:migrated_at])
    assert old_stats.already_processed + new_stats.already_processed > 0, "no redelivery"

    # Followers the old release parked before the new one started, whose leader only
    # the new one got, and could handle at once (its own leader seen before): the new
    # release's completion released them.
    second_half_at = lines.index((None, SECOND_HALF))
    first_ids = {e.id for e in workload.first}
    only_new = {e.id for e in workload.new} - {e.id for e in workload.first + workload.old}
    crossing = [
        follower
        for follower, leader in leader_of.items()
        if follower in first_ids
        and leader in only_new
        and (leader not in leader_of or order[leader_of[leader]] < second_half_at)
    ]
    assert crossing, "the workload has no follower waiting across the deploy"
    assert {by_worker[f] for f in crossing} == {"new"}

    # Each seen row was written by the release that handled the event: the new one
    # through complete_event_v3 (its note), the old one still through v2 (none).
    notes = run(seen_notes(url, scope))
    assert notes == {e: (NOTE if w == "new" else None) for e, w in by_worker.items()}
    if postgres:
        assert old_stats.functions.get("complete_event_v2", 0) > 0
        assert "complete_event_v3" not in old_stats.functions
        assert new_stats.functions.get("complete_event_v3", 0) > 0
        assert "complete_event_v2" not in new_stats.functions
    else:
        assert old_stats.wrote_note == 0 and new_stats.wrote_note > 0

    # 4. The contract step: the database stops serving this release's code.
    run(serve_code_from(url, NEXT_REVISION))
    with pytest.raises(SchemaError, match="upgrade this package"):
        run(this_release_runs(url, scope))
    run(next_release_runs(url))


@pytest.mark.timeout(60)
def test_the_next_revision_downgrades_to_what_this_release_runs_on(empty_url: str) -> None:
    url, postgres = empty_url, empty_url.startswith("postgresql")
    upgrade(url)
    command.upgrade(next_release_config(url), NEXT_REVISION)
    assert run(columns_and_functions(url)) == (
        {"note"},
        {"complete_event_v3"} if postgres else set(),
    )
    run(this_release_runs(url, "deploy"))  # additive: this release runs on it

    command.downgrade(next_release_config(url), CODE_REVISION)
    assert run(current_revision(url)) == CODE_REVISION
    assert run(columns_and_functions(url)) == (set(), set())
    run(this_release_runs(url, "deploy"))


async def columns_and_functions(url: str) -> tuple[set[str], set[str]]:
    """The seen table's note column and the complete_event functions past v2, if any."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            if make_url(url).drivername.startswith("sqlite"):
                rows = await connection.exec_driver_sql("PRAGMA table_info(ordering_seen_events)")
                return {row[1] for row in rows if row[1] == "note"}, set()
            schema = resolve_schema()
            columns = await connection.execute(
                text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = :s AND table_name = 'seen_events' "
                    "AND column_name = 'note'"
                ),
                {"s": schema},
            )
            functions = await connection.execute(
                text(
                    "SELECT p.proname FROM pg_proc p "
                    "JOIN pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE n.nspname = :s AND p.proname LIKE 'complete_event_v%' "
                    "AND p.proname NOT IN ('complete_event_v1', 'complete_event_v2')"
                ),
                {"s": schema},
            )
            return {c for (c,) in columns}, {f for (f,) in functions}
    finally:
        await engine.dispose()
