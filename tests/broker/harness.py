"""The fault harness with consumer processes fed by a broker instead of files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from uuid import UUID

from ordering import ReceivedEvent
from tests.fault.harness import REPO, Harness, WorkerDied


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

    def start(self) -> None:
        for index in range(self.workers):
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

    def broker_counts(self) -> Counter[str]:
        """The surviving consumers' counts of messages (see ``<name>.broker.json``)."""
        counts: Counter[str] = Counter()
        for path in self.run_dir.glob("*.broker.json"):
            counts.update(json.loads(path.read_text()))
        return counts
