"""Handle events from a RabbitMQ queue in causal order, with OrderedConsumer.

    pip install 'sql-causal-ordering[rabbitmq]'
    ordering migrate                              # the store: ./ordering.db by default
    python examples/rabbitmq_consumer.py publish  # a chain of five events, jumbled
    python examples/rabbitmq_consumer.py consume  # prints them in causal order; Ctrl-C stops

Run several consumers at once to share the queue.  AMQP_URL (default
amqp://guest:guest@127.0.0.1:5672/), QUEUE (default ``events``) and
ORDERING_DATABASE_URL choose the broker, the queue and the store.
"""

import asyncio
import os
import random
import signal
import sys
from datetime import UTC, datetime, timedelta

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from ordering import CausalOrdering, OrderedConsumer, ReceivedEvent

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("QUEUE", "events")


async def publish(count: int = 5) -> None:
    chain: list[ReceivedEvent] = []
    for step in range(count):
        chain.append(
            ReceivedEvent(
                event=f"order.step-{step}",
                resource={"prefect.resource.id": "order.42"},
                occurred=datetime.now(UTC) + timedelta(milliseconds=step),
                follows=chain[-1].id if chain else None,
            )
        )
    random.shuffle(chain)
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        await channel.declare_queue(QUEUE, durable=True)
        for event in chain:
            message = aio_pika.Message(event.model_dump_json().encode())
            await channel.default_exchange.publish(message, routing_key=QUEUE)
    print("published", ", ".join(e.event for e in chain))


async def handle(event: ReceivedEvent) -> None:
    # Your code.  It runs after the handling of the event it follows has finished.
    print("handled", event.event, flush=True)


async def consume() -> None:
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    ordering = CausalOrdering("rabbitmq-example")
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, OrderedConsumer(ordering, handle) as consumer:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=16)
        queue = await channel.declare_queue(QUEUE, durable=True)

        async def on_message(message: AbstractIncomingMessage) -> None:
            outcome = await consumer.deliver(ReceivedEvent.model_validate_json(message.body))
            if outcome.acknowledge:  # handled, a duplicate, or parked for its leader
                await message.ack()
            else:  # held by another worker, the store down, or the handler failed
                await asyncio.sleep(outcome.retry_after or 0)
                await message.nack(requeue=True)

        tag = await queue.consume(on_message)
        await stop.wait()
        await queue.cancel(tag)  # then the consumer finishes what it is handling


if __name__ == "__main__":
    asyncio.run(publish() if sys.argv[1:] == ["publish"] else consume())
