"""The fault harness with consumer processes fed by a broker instead of files."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine

from ordering import ReceivedEvent
from ordering.models import utc_now
from tests.fault import checker
from tests.fault.harness import REPO, SEED, Harness, WorkerDied, run_sync
from tests.fault.workload import make_chains


def interleave(queues: list[list[ReceivedEvent]]) -> list[ReceivedEvent]:
    """The one stream that ``workload.deliver`` dealt round-robin into these queues."""
    longest = max(len(q) for q in queues)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


@dataclass
class BrokerHarness(Harness):
    """Consumer processes ``python -m <module>`` with the worker's common options
    and ``broker_args``; each writes ``<name>.consuming`` once it consumes."""

    module: str = ""
    broker_args: list[str] = field(default_factory=list)
    #: Events whose handler fails the first time a process is delivered them.
    fail_first: list[UUID] = field(default_factory=list)

    def start(self, only: Collection[int] | None = None) -> None:
        for index in range(self.workers):
            if only is not None and index not in only:
                continue
            name = f"c{index}"
            command = [
                sys.executable,
                "-m",
                self.module,
                *("--url", self.url, "--scope", self.scope, "--name", name),
                *("--run-dir", str(self.run_dir)),
                *("--lease-seconds", str(self.lease_seconds)),
                *self.broker_args,
                *("--fail-once-on", *map(str, self.fail_first)),
            ]
            with (self.run_dir / f"{name}.out").open("wb") as out:
                self.processes[name] = subprocess.Popen(
                    command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
                )
        for name in self.processes:
            consuming = self.run_dir / f"{name}.consuming"
            self.wait_for(consuming.exists, 60, f"{name} to start consuming")

    def holding(self, name: str) -> int:
        """Messages the consumer has received and not yet acknowledged or nacked."""
        got = (self.run_dir / f"{name}.got").read_text().split()
        settled = (self.run_dir / f"{name}.settled").read_text().split()
        return len(got) - len(settled)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM every live consumer: each stops consuming, settles what it holds,
        closes its consumer and its connection."""
        (self.run_dir / "stop").touch()
        for process in self.live().values():
            process.send_signal(signal.SIGTERM)
        for name, process in self.live().items():
            if process.wait(timeout=timeout) != 0:
                raise WorkerDied(f"consumer {name} exited with {process.returncode}")

    def store_is_empty(self) -> bool:
        """Nothing waiting, claimed or leased in the run's scope: every handling that
        began has ended."""
        scope = self.scope

        async def left(engine: AsyncEngine) -> checker.LeftBehind:
            return await checker.left_behind(engine, scope)

        return run_sync(left, self.url).rows == 0

    def broker_counts(self) -> Counter[str]:
        """The surviving consumers' counts of messages (see ``<name>.broker.json``)."""
        counts: Counter[str] = Counter()
        for path in self.run_dir.glob("*.broker.json"):
            counts.update(json.loads(path.read_text()))
        return counts


@dataclass
class BrokerRun:
    """What ``run_with_a_kill`` saw."""

    report: checker.Report
    #: The surviving consumers' counts of messages.
    counts: Counter[str]
    published: int
    duplicates: int
    #: Messages the killed consumer had received and not settled when it was killed.
    held_when_killed: int

    def summary(self) -> str:
        counts = self.counts
        return (
            f"published={self.published} (events={self.report.events}, "
            f"duplicates={self.duplicates}) consumers={self.report.workers}; "
            f"by the surviving consumers: received={counts['received']} "
            f"acked={counts['acked']} nacked={counts['nacked']} "
            f"redelivered={counts['redelivered']}; "
            f"held_by_killed_consumer={self.held_when_killed} handled={self.report.handled} "
            f"handlings={self.report.handlings} "
            f"lost_followers_handed_out={self.report.workers_results.lost_followers}"
        )

    def assert_rules(self) -> None:
        """The fault checker's rules, and that the run did what it is meant to test."""
        self.report.assert_rules()
        assert self.report.swept == [], "a follower waited for the lookback"
        assert self.held_when_killed > 0, "the killed consumer held no message: kill earlier"
        assert self.counts["nacked"] > 0, "no message was sent back to be redelivered"
        assert self.counts["redelivered"] > 0, "the broker redelivered nothing"
        errors = self.report.workers_results
        assert set(errors.errors) <= {"HandlerFailed"}, errors.error_samples[:5]


def broker_harness(
    name: str,
    url: str,
    run_dir: Path,
    *,
    consumers: int,
    chains: int,
    module: str,
    broker_args: list[str],
) -> tuple[BrokerHarness, list[ReceivedEvent]]:
    """The harness of a broker test and its events: ``chains`` chains of five,
    jumbled, a tenth of them published twice, a twentieth failing the first time
    each process is delivered them."""
    rng = random.Random(SEED)
    events = make_chains(chains, 5, utc_now(), rng)
    harness = BrokerHarness(
        name=name,
        url=url,
        run_dir=run_dir,
        workers=consumers,
        duplicate_fraction=0.1,
        soon=0.5,
        # Long enough for renewals to land on a loaded machine: a claim that expires
        # under a live holder sends its follower to another's sweep, and a consumer
        # killed while handling a swept follower loses it (docs/guarantees.md).
        lease_seconds=5.0,
        module=module,
        broker_args=broker_args,
        fail_first=[e.id for e in rng.sample(events, len(events) // 20)],
    )
    return harness, events


def run_with_a_kill(
    harness: BrokerHarness,
    events: list[ReceivedEvent],
    publish: Callable[[list[ReceivedEvent]], None],
    settled: Callable[[], bool],
) -> BrokerRun:
    """Publish the jumbled stream, start the consumers, SIGKILL ``c1`` once a third of
    the events are handled, wait until every event is handled and ``settled()`` (the
    broker holds nothing more), stop the others and check."""
    workload = harness.prepare(events)
    stream = interleave(workload.queues)
    publish(stream)
    harness.start()
    harness.wait_for(lambda: harness.handled_share() >= 1 / 3, 120, "a third handled", poll=0.01)
    held_when_killed = harness.holding("c1")
    harness.kill("c1")
    harness.wait_for(harness.all_handled, 120, "every event handled")
    # A follower the killed consumer had claimed, and was handling (its row written),
    # counts as handled above but is handled again once the claim expires (a lease,
    # then a sweep, later): the store empties only then.
    harness.wait_for(harness.store_is_empty, 60, "the store to hold nothing more")
    harness.wait_for(settled, 60, "the broker to hold nothing more")
    harness.stop()
    report = harness.check()
    return BrokerRun(
        report, harness.broker_counts(), len(stream), workload.duplicates, held_when_killed
    )
