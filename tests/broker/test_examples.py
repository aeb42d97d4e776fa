"""The examples run as a user runs them: publish, then consume until stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from ordering.migrate import upgrade
from tests.fault.harness import REPO

from . import jetstream, rabbitmq

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
            held = path.read_text()
            raise AssertionError(f"timed out waiting for {count} {prefix!r} lines:\n{held}")
        time.sleep(0.05)


def rabbitmq_example() -> tuple[dict[str, str], Callable[[], Coroutine[Any, Any, None]]]:
    url = rabbitmq.rabbitmq_url()
    queue = f"ordering-example-{uuid.uuid4().hex[:10]}"
    return {"AMQP_URL": url, "QUEUE": queue}, lambda: rabbitmq.delete_queue(url, queue)


def nats_example() -> tuple[dict[str, str], Callable[[], Coroutine[Any, Any, None]]]:
    url = jetstream.nats_url()
    stream = f"ORDERING_EXAMPLE_{uuid.uuid4().hex[:10].upper()}"
    return {"NATS_URL": url, "STREAM": stream}, lambda: jetstream.delete_stream(url, stream)


@pytest.mark.parametrize(
    ("script", "broker"),
    [("rabbitmq_consumer.py", rabbitmq_example), ("nats_consumer.py", nats_example)],
    ids=["rabbitmq", "nats"],
)
def test_an_example_prints_a_jumbled_chain_in_order(
    tmp_path: Path,
    script: str,
    broker: Callable[[], tuple[dict[str, str], Callable[[], Coroutine[Any, Any, None]]]],
) -> None:
    settings, clean_up = broker()
    database = f"sqlite+aiosqlite:///{tmp_path / 'ordering.db'}"
    upgrade(database)
    env = {**os.environ, **settings, "ORDERING_DATABASE_URL": database}
    path = str(EXAMPLES / script)
    try:
        published = subprocess.run(
            [sys.executable, path, "publish"], env=env, capture_output=True, text=True, timeout=60
        )
        assert published.returncode == 0, published.stderr
        output = tmp_path / "consume.out"
        with output.open("w") as out:
            consumer = subprocess.Popen(
                [sys.executable, path, "consume"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            handled = wait_for_lines(output, "handled ", 5)
        finally:
            consumer.send_signal(signal.SIGTERM)
            code = consumer.wait(timeout=60)
        assert code == 0, output.read_text()
        assert handled == [f"handled order.step-{step}" for step in range(5)]
    finally:
        asyncio.run(clean_up())
