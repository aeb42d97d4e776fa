"""A consumer process on a RabbitMQ queue (see tests/broker/worker.py).

    python -m tests.broker.rabbitmq_worker --url DB --scope S --name c0 --run-dir D \
        --amqp-url URL --queue Q --prefetch 8 --lease-seconds 3 [--fail-once-on ID ...]

Each message is one event as JSON; ``OrderedConsumer.deliver``'s verdict decides
between ``ack`` and ``nack(requeue=True)`` (after the suggested pause).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from ordering import ReceivedEvent

from .worker import BrokerWorker, Tally, main, parser


async def consume(
    args: argparse.Namespace, worker: BrokerWorker, tally: Tally, stop: asyncio.Event
) -> None:
    async def on_message(message: AbstractIncomingMessage) -> None:
        async with tally.message(message.delivery_tag, bool(message.redelivered)):
            event = ReceivedEvent.model_validate_json(message.body)
            if await worker.consume(event):  # after the pause, if it is to come again
                await message.ack()
                tally.counts["acked"] += 1
            else:
                await message.nack(requeue=True)
                tally.counts["nacked"] += 1

    connection = await aio_pika.connect(args.amqp_url, timeout=30)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=args.prefetch)
        queue = await channel.get_queue(args.queue)
        tag = await queue.consume(on_message)
        (Path(args.run_dir) / f"{args.name}.consuming").touch()
        await stop.wait()
        # Stop the deliveries first, then let the messages held be settled.
        await queue.cancel(tag)
        await tally.drained()


if __name__ == "__main__":
    options = parser("python -m tests.broker.rabbitmq_worker")
    options.add_argument("--amqp-url", required=True)
    options.add_argument("--queue", required=True)
    options.add_argument("--prefetch", type=int, default=8)
    main(options.parse_args(sys.argv[1:]), consume)
