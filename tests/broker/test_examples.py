"""The examples run as a user runs them: publish, then consume until stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ordering.migrate import upgrade
from tests.fault.harness import REPO

from .rabbitmq import delete_queue, rabbitmq_url

EXAMPLES = REPO / "examples"


def wait_for_lines(path: Path, prefix: str, count: int, timeout: float = 60) -> list[str]:
    """The first ``count`` lines of the file starting with ``prefix``; fails after
    ``timeout`` seconds with what the file holds."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in path.read_text().splitlines() if line.startswith(prefix)]
        if len(lines) >= count:
            return lines[:count]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {count} {prefix!r} lines:\n{path.read_text()}"
            )
        time.sleep(0.05)


def test_the_rabbitmq_example_prints_a_jumbled_chain_in_order(tmp_path: Path) -> None:
    amqp_url = rabbitmq_url()
    queue = f"ordering-example-{uuid.uuid4().hex[:10]}"
    database = f"sqlite+aiosqlite:///{tmp_path / 'ordering.db'}"
    upgrade(database)
    env = {**os.environ, "AMQP_URL": amqp_url, "QUEUE": queue, "ORDERING_DATABASE_URL": database}
    script = str(EXAMPLES / "rabbitmq_consumer.py")
    try:
        published = subprocess.run(
            [sys.executable, script, "publish"], env=env, capture_output=True, text=True, timeout=60
        )
        assert published.returncode == 0, published.stderr
        output = tmp_path / "consume.out"
        with output.open("w") as out:
            consumer = subprocess.Popen(
                [sys.executable, script, "consume"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            handled = wait_for_lines(output, "handled ", 5)
        finally:
            consumer.send_signal(signal.SIGTERM)
            code = consumer.wait(timeout=60)
        assert code == 0, output.read_text()
        assert handled == [f"handled order.step-{step}" for step in range(5)]
    finally:
        asyncio.run(delete_queue(amqp_url, queue))
