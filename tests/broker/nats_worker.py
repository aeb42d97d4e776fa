"""A consumer process on a NATS JetStream durable pull consumer (see
tests/broker/worker.py).

    python -m tests.broker.nats_worker --url DB --scope S --name c0 --run-dir D \
        --nats-url URL --stream S --durable D --batch 8 --lease-seconds 3 \
        [--fail-once-on ID ...]

Each message is one event as JSON; ``OrderedConsumer.deliver``'s verdict decides
between ``ack`` and ``nak`` with the suggested delay.  A message held by a consumer
that died comes back once the durable consumer's ``ack_wait`` has passed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import nats
from nats.aio.msg import Msg

from ordering import ReceivedEvent

from .worker import BrokerWorker, Tally, main, parser


async def consume(
    args: argparse.Namespace, worker: BrokerWorker, tally: Tally, stop: asyncio.Event
) -> None:
    async def on_message(message: Msg) -> None:
        delivered = message.metadata.num_delivered or 1
        async with tally.message(message.metadata.sequence.stream, delivered > 1):
            tally.counts["deliveries"] += 1
            outcome = await worker.deliver(ReceivedEvent.model_validate_json(message.data))
            if outcome.acknowledge:
                await message.ack()
                tally.counts["acked"] += 1
            else:
                await message.nak(delay=outcome.retry_after)
                tally.counts["nacked"] += 1

    connection = await nats.connect(args.nats_url, connect_timeout=10)
    try:
        subscription = await connection.jetstream().pull_subscribe_bind(args.durable, args.stream)
        (Path(args.run_dir) / f"{args.name}.consuming").touch()
        while not stop.is_set():
            try:
                batch = await subscription.fetch(args.batch, timeout=0.5)
            except TimeoutError:  # nothing came
                continue
            await asyncio.gather(*(on_message(message) for message in batch))
        await tally.drained()
    finally:
        await connection.close()


if __name__ == "__main__":
    options = parser("python -m tests.broker.nats_worker")
    options.add_argument("--nats-url", required=True)
    options.add_argument("--stream", required=True)
    options.add_argument("--durable", required=True)
    options.add_argument("--batch", type=int, default=8)
    main(options.parse_args(sys.argv[1:]), consume)
