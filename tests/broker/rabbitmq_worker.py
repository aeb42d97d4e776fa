"""A consumer process on a RabbitMQ queue: the fault tests' worker, fed by aio-pika.

    python -m tests.broker.rabbitmq_worker --url DB --scope S --name c0 --run-dir D \
        --amqp-url URL --queue Q --prefetch 8 --lease-seconds 3 [--fail-once-on ID ...]

Each message is one event as JSON; ``OrderedConsumer.deliver``'s verdict decides
between ``ack`` and ``nack(requeue=True)`` (after the suggested pause).  Besides the
fault worker's files (see tests/fault/worker.py), it writes ``<name>.got`` and
``<name>.settled`` (one line per message received, and per message acknowledged or
nacked: the difference is what it holds unacknowledged) and, when it stops on SIGTERM,
``<name>.broker.json`` (its counts of messages).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from ordering import CausalOrdering, ReceivedEvent
from ordering.causal import dispose_engines
from tests.fault import handled
from tests.fault.worker import HandlerFailed, Worker

#: How long a stopping consumer waits for the messages it holds to be settled.
DRAIN_TIMEOUT_S = 30.0


class BrokerWorker(Worker):
    """The fault worker, whose handler fails the first time this process is
    delivered one of ``fail_once`` (never for a follower a leader released: a failed
    follower goes to the sweep, and the test wants the broker to redeliver)."""

    fail_once: set[UUID]

    async def record(self, event: ReceivedEvent, depth: int, attempt: str) -> None:
        if depth == 0 and event.id in self.fail_once:
            self.fail_once.discard(event.id)
            raise HandlerFailed(f"the handler failed once on {event.id}")
        await super().record(event, depth, attempt)


async def consume(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    ordering = CausalOrdering(
        args.scope, url=args.url, lease_duration=timedelta(seconds=args.lease_seconds)
    )
    engine = handled.open_engine(args.url)
    worker = BrokerWorker(ordering, engine, args.name, run_dir)
    worker.fail_once = set(args.fail_once_on)
    counts: Counter[str] = Counter()
    holding = 0
    idle = asyncio.Event()  # set while no message is held
    idle.set()
    got = (run_dir / f"{args.name}.got").open("a", buffering=1)
    settled = (run_dir / f"{args.name}.settled").open("a", buffering=1)

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal holding
        holding += 1
        idle.clear()
        got.write(f"{message.delivery_tag}\n")
        counts["received"] += 1
        counts["redelivered"] += bool(message.redelivered)
        try:
            event = ReceivedEvent.model_validate_json(message.body)
            if await worker.consume(event):
                await message.ack()
                counts["acked"] += 1
            else:
                await message.nack(requeue=True)
                counts["nacked"] += 1
            settled.write(f"{message.delivery_tag}\n")
        finally:
            holding -= 1
            if not holding:
                idle.set()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    connection = await aio_pika.connect(args.amqp_url, timeout=30)
    try:
        async with worker:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=args.prefetch)
            queue = await channel.get_queue(args.queue)
            tag = await queue.consume(on_message)
            (run_dir / f"{args.name}.consuming").touch()
            await stop.wait()
            # Stop the deliveries first, then let the messages held be settled.
            await queue.cancel(tag)
            try:
                await asyncio.wait_for(idle.wait(), DRAIN_TIMEOUT_S)
            except TimeoutError:
                logging.getLogger("broker.worker").error("%d messages still held", holding)
    finally:
        await connection.close()
        worker.close()
        got.close()
        settled.close()
        (run_dir / f"{args.name}.result.json").write_text(worker.stats.as_json())
        (run_dir / f"{args.name}.broker.json").write_text(json.dumps(dict(counts)))
        await engine.dispose()
        await dispose_engines()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.broker.rabbitmq_worker")
    parser.add_argument("--url", required=True, help="the store's database URL")
    parser.add_argument("--scope", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, default=8)
    parser.add_argument("--lease-seconds", type=float, default=3.0)
    parser.add_argument("--fail-once-on", type=UUID, nargs="*", default=[])
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args(sys.argv[1:])
    logging.basicConfig(
        filename=str(Path(args.run_dir) / f"{args.name}.log"),
        level=os.environ.get("ORDERING_FAULT_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(consume(args))


if __name__ == "__main__":
    main()
