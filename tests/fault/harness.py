"""Runs a workload through worker processes, does damage on request, and checks.

The test process only orchestrates: it writes the queues, starts the workers
(``python -m tests.fault.worker``), kills them or cuts the database off when told,
redelivers what a killed worker had not acknowledged, asks the workers to stop once
the work is done, runs the final sweep with the clock past the lookback, and hands
the database's contents to the checker.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TypeVar
from uuid import UUID

from sqlalchemy import Uuid, bindparam, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from ordering import PRECEDING_EVENT_LOOKBACK, ReceivedEvent
from ordering.migrate import upgrade
from tests.helpers import store_object

from . import checker, handled
from .workload import Workload, deliver, write_queue

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]

#: Multiplies the number of chains of every fault test (1 in CI).
SCALE = float(os.environ.get("ORDERING_FAULT_SCALE", "1"))
#: The delivery order; a fixed default keeps CI reproducible.
SEED = int(os.environ.get("ORDERING_FAULT_SEED", "20261128"))

#: The sweep's clock runs this far ahead: past the lookback, well inside seen expiry.
SWEEP_CLOCK_OFFSET = PRECEDING_EVENT_LOOKBACK + timedelta(minutes=1)

_SEEN = "SELECT 1 FROM {seen_events} WHERE scope = :scope AND event_id = :event_id"
_ALL_SEEN = "SELECT event_id FROM {seen_events} WHERE scope = :scope"

_TERMINATE_BACKENDS = text("""
SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
""")


def read_done(path: Path) -> dict[str, UUID]:
    """A worker's completed handler calls: attempt id -> event id (``<name>.done``)."""
    if not path.exists():
        return {}
    lines = (line.split() for line in path.read_text().splitlines())
    return {fields[0]: UUID(fields[1]) for fields in lines if len(fields) == 2}


def scaled(chains: int) -> int:
    return max(1, round(chains * SCALE))


def run_sync(operation: Callable[[AsyncEngine], Awaitable[T]], url: str) -> T:
    """Run one coroutine against a short-lived engine on the database (from sync code)."""

    async def go() -> T:
        engine = handled.open_engine(url)
        try:
            return await operation(engine)
        finally:
            await engine.dispose()

    return asyncio.run(go())


class WorkerDied(AssertionError):
    pass


@dataclass(frozen=True)
class Blocked:
    """A worker hanging in its handler (see ``--block-on``)."""

    worker: str
    event_id: UUID
    depth: int
    phase: str
    attempt: str


@dataclass
class Harness:
    name: str
    url: str
    run_dir: Path
    workers: int
    duplicate_fraction: float
    #: Deliveries each worker handles at once (tasks of one process sharing its store).
    consumers: int = 1
    #: The fraction of redeliveries that come right after the original (see deliver).
    soon: float = 0.0
    lease_seconds: float = 60.0
    #: Events that go first to one worker's queue, in order (see workload.deliver).
    pinned: dict[int, list[ReceivedEvent]] = field(default_factory=dict)
    #: The handler hangs after recording this event, so that the test can kill it...
    block_on: UUID | None = None
    #: ... in these workers (None: in every worker, redelivery workers included) ...
    blocking_workers: set[int] | None = None
    #: ... until it has hung this many times in all.
    block_times: int = 1
    #: worker index -> event id: that worker pauses after the event's seen check.
    pause: dict[int, UUID] = field(default_factory=dict)
    #: worker index -> event id: that worker's handler fails the first time it gets it.
    fail_once: dict[int, UUID] = field(default_factory=dict)
    seed: int = SEED
    #: worker index -> the Python that runs it (default: this one).  Another Python runs
    #: the same worker module with the ``ordering`` package of its own installation: a
    #: previous release's, say (tests/fault/test_previous_release.py).
    pythons: dict[int, str] = field(default_factory=dict)
    scope: str = field(default_factory=lambda: f"fault-{uuid.uuid4().hex[:10]}")

    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: Killed workers, with the attempt id of the handler call they hung in; None for
    #: one killed at a random moment, whatever it was doing.
    killed: dict[str, str | None] = field(default_factory=dict)
    db_restarts: int = 0
    workload: Workload | None = None

    # -- set-up -------------------------------------------------------------------

    def prepare(self, events: list[ReceivedEvent], migrate: bool = True) -> Workload:
        """Migrate the database (unless told not to), create the handler's table and
        deal the queues."""
        if migrate:
            upgrade(self.url)
        run_sync(handled.create_table, self.url)
        self.workload = deliver(
            events,
            workers=self.workers,
            duplicate_fraction=self.duplicate_fraction,
            seed=self.seed,
            pinned=self.pinned,
            soon=self.soon,
        )
        return self.workload

    def start(self, only: Collection[int] | None = None) -> None:
        """Start the workers of the queues (of those numbered in ``only``)."""
        assert self.workload is not None, "prepare() the workload first"
        for index, queue in enumerate(self.workload.queues):
            if only is not None and index not in only:
                continue
            options: dict[str, object] = {
                "--pause-before-confirm": self.pause.get(index),
                "--fail-once-on": self.fail_once.get(index),
            }
            if self.blocking_workers is None or index in self.blocking_workers:
                options.update(self._block_options())
            self.start_worker(f"w{index}", queue, options, self.pythons.get(index))

    def _block_options(self) -> dict[str, object]:
        return {"--block-on": self.block_on, "--block-times": self.block_times}

    def start_worker(
        self,
        name: str,
        queue: list[ReceivedEvent],
        options: dict[str, object] | None = None,
        python: str | None = None,
    ) -> None:
        queue_path = self.run_dir / f"{name}.queue.json"
        write_queue(queue_path, queue)
        extra = ["--queue", str(queue_path), "--consumers", str(self.consumers)]
        for option, value in (options or {}).items():
            if value is not None:
                extra += [option, str(value)]
        self.processes[name] = self._spawn("run", name, extra, python)

    def _spawn(
        self, mode: str, name: str, extra: list[str], python: str | None = None
    ) -> subprocess.Popen[bytes]:
        command = [
            python or sys.executable,
            "-m",
            "tests.fault.worker",
            mode,
            "--url",
            self.url,
            "--scope",
            self.scope,
            "--name",
            name,
            "--run-dir",
            str(self.run_dir),
            "--lease-seconds",
            str(self.lease_seconds),
            *extra,
        ]
        with (self.run_dir / f"{name}.out").open("wb") as out:
            return subprocess.Popen(
                command, cwd=self._cwd(python), stdout=out, stderr=subprocess.STDOUT
            )

    def _cwd(self, python: str | None) -> Path:
        """Where a worker starts: ``-m`` puts that directory first on the import path.
        This checkout for this Python; for the previous release's (made by
        .ci/previous-release: ``DIR/venv/bin/python`` beside ``DIR/tree``), that
        release's own tree, so that its worker, written against its own ``ordering``,
        runs on it."""
        if python is None:
            return REPO
        tree = Path(python).parent.parent.parent / "tree"  # not resolved: a venv link
        if not (tree / "tests" / "fault" / "worker.py").is_file():
            raise RuntimeError(f"{python} is not a previous release made by .ci/previous-release")
        return tree

    # -- waiting ------------------------------------------------------------------

    def live(self) -> dict[str, subprocess.Popen[bytes]]:
        return {n: p for n, p in self.processes.items() if n not in self.killed}

    def _check_alive(self) -> None:
        for name, process in self.live().items():
            code = process.poll()
            if code is not None and not (self.run_dir / "stop").exists():
                raise WorkerDied(f"worker {name} exited with {code}:\n{self.output(name)}")

    def output(self, name: str) -> str:
        out = (self.run_dir / f"{name}.out").read_text()[-3000:]
        log_path = self.run_dir / f"{name}.log"
        log = log_path.read_text()[-3000:] if log_path.exists() else ""
        return out + log

    def wait_for(
        self, condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.1
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self._check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(poll)

    def drained(self) -> bool:
        return all((self.run_dir / f"{n}.drained").exists() for n in self.live())

    def handled_share(self) -> float:
        """The share of the workload's events handled so far."""
        assert self.workload is not None
        return run_sync(handled.distinct_events, self.url) / len(self.workload.events)

    def all_handled(self) -> bool:
        return self.handled_share() == 1

    def is_seen(self, event_id: UUID) -> bool:
        statement = text(
            _SEEN.format(seen_events=store_object(self.url, "seen_events"))
        ).bindparams(bindparam("event_id", type_=Uuid()))

        async def seen(engine: AsyncEngine) -> bool:
            async with engine.connect() as connection:
                params = {"scope": self.scope, "event_id": event_id}
                return (await connection.execute(statement, params)).first() is not None

        return run_sync(seen, self.url)

    def wait_paused(self, name: str, timeout: float = 60.0) -> None:
        paused = self.run_dir / f"{name}.paused"
        self.wait_for(paused.exists, timeout, f"{name} to pause after its seen check")

    def resume(self, name: str) -> None:
        (self.run_dir / f"{name}.resume").touch()

    # -- damage ---------------------------------------------------------------------

    def blocked(self) -> dict[str, Blocked]:
        """The live workers hanging in a handler, by name."""
        found = {}
        for name in self.live():
            path = self.run_dir / f"{name}.blocked"
            if path.exists() and len(fields := path.read_text().split()) == 4:
                found[name] = Blocked(name, UUID(fields[0]), int(fields[1]), fields[2], fields[3])
        return found

    def wait_blocked(self, timeout: float = 60.0) -> Blocked:
        """Wait until a live worker hangs in a handler."""
        self.wait_for(lambda: bool(self.blocked()), timeout, "a worker to block in its handler")
        return next(iter(self.blocked().values()))

    def kill(self, name: str) -> None:
        """SIGKILL the worker: no cleanup runs, its leases and claims stay behind."""
        blocked = self.blocked().get(name)
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        self.killed[name] = blocked.attempt if blocked else None

    def redeliver(self, name: str) -> str:
        """Deliver what the killed worker had not acknowledged to a new worker, as a
        broker does with a dead consumer's messages."""
        assert self.workload is not None
        acks_path = self.run_dir / f"{name}.acks"
        # A broker tracks messages, not events: an event delivered twice to the worker
        # (a duplicate) and acknowledged once still has a message to deliver again, and
        # that copy may be the one holding the event's lease when the worker died.
        acks = Counter(acks_path.read_text().split() if acks_path.exists() else [])
        queue = self.workload.queues[int(name[1:])]
        unacked: list[ReceivedEvent] = []
        for event in queue:
            if acks[str(event.id)] > 0:
                acks[str(event.id)] -= 1
            else:
                unacked.append(event)
        new_name = f"w{len(self.processes)}"
        options = self._block_options() if self.blocking_workers is None else {}
        self.start_worker(new_name, unacked, options)
        return new_name

    def terminate_backends(self) -> int:
        """Cut every connection to this database (ours excepted), as a failover would."""

        async def terminate(engine: AsyncEngine) -> int:
            async with engine.connect() as connection:
                return int((await connection.execute(_TERMINATE_BACKENDS)).scalar_one())

        count = run_sync(terminate, self.url)
        self.db_restarts += 1
        return count

    def restart_cluster(self) -> None:
        """Restart the whole PostgreSQL server and wait until it accepts connections:
        with the command in ``ORDERING_FAULT_PG_RESTART_COMMAND`` (say, a throwaway
        server's ``.ci/postgres-server restart 5418``), else the machine's Debian
        cluster."""
        command = os.environ.get("ORDERING_FAULT_PG_RESTART_COMMAND")
        if command:
            restart = shlex.split(command)
        else:
            version = sorted(os.listdir("/etc/postgresql"))[-1]
            restart = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"]
        subprocess.run(restart, check=True, timeout=60)
        self.db_restarts += 1
        url = make_url(self.url)
        where = ["-h", url.host or "127.0.0.1", "-p", str(url.port or 5432)]
        for _ in range(300):
            if subprocess.run(["pg_isready", "-q", *where]).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("PostgreSQL did not come back within 30s of a restart")

    # -- the end --------------------------------------------------------------------

    def finish(self, timeout: float = 180.0) -> checker.Report:
        """Let the work settle, stop the workers, sweep, and check."""
        timeout *= max(1.0, SCALE)
        self.wait_for(self.drained, timeout, "every worker's queue to drain")
        # Claims of a dead worker only expire after a lease: give them that long
        # (plus a poll), then stop even if something is missing: the checker says what.
        settle = time.monotonic() + min(2 * self.lease_seconds + 5, 60)
        while not self.all_handled() and time.monotonic() < settle:
            self._check_alive()
            time.sleep(0.2)
        (self.run_dir / "stop").touch()
        for name, process in self.live().items():
            code = process.wait(timeout=timeout)
            if code != 0:
                raise WorkerDied(f"worker {name} exited with {code}:\n{self.output(name)}")
        self.sweep()
        return self.check()

    def sweep(self) -> None:
        offset = str(SWEEP_CLOCK_OFFSET.total_seconds())
        process = self._spawn("sweep", "sweep", ["--clock-offset-seconds", offset])
        code = process.wait(timeout=120 * max(1.0, SCALE))
        if code != 0:
            raise WorkerDied(f"the final sweep exited with {code}:\n{self.output('sweep')}")

    def check(self) -> checker.Report:
        assert self.workload is not None

        all_seen = text(_ALL_SEEN.format(seen_events=store_object(self.url, "seen_events")))

        async def read(
            engine: AsyncEngine,
        ) -> tuple[list[handled.Handling], checker.LeftBehind, set[UUID]]:
            async with engine.connect() as connection:
                found = await connection.execute(all_seen, {"scope": self.scope})
                seen = {UUID(str(event_id)) for (event_id,) in found}
            rows = await handled.read_all(engine)
            return rows, await checker.left_behind(engine, self.scope), seen

        rows, left, seen = run_sync(read, self.url)
        report = checker.check(
            name=self.name,
            rows=rows,
            event_ids=[e.id for e in self.workload.events],
            leader_of=self.workload.leader_of,
            left=left,
            results=checker.WorkerResults.read(self.run_dir),
            killed_in_flight={a for a in self.killed.values() if a is not None},
            unsure=self._in_flight_when_killed(rows),
            seen=seen,
            workers=self.workers,
            redelivery_workers=len(self.processes) - self.workers,
            duplicates=self.workload.duplicates,
            kills=len(self.killed),
            db_restarts=self.db_restarts,
            seed=self.seed,
        )
        print(report.summary())
        return report

    def _in_flight_when_killed(self, rows: list[handled.Handling]) -> set[str]:
        """The handler calls of workers killed at a random moment (not hanging in a
        handler) that they had not noted as completed."""
        unsure: set[str] = set()
        for name, hung_in in self.killed.items():
            if hung_in is not None:
                continue
            done_path = self.run_dir / f"{name}.done"
            done = read_done(done_path)
            unsure |= {r.attempt for r in rows if r.worker == name and r.attempt not in done}
        return unsure

    def stop_all(self) -> None:
        """Leave no process behind, whatever happened (for the tests' finally)."""
        (self.run_dir / "stop").touch()
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
