"""Handle events from a NATS JetStream stream in causal order, with OrderedConsumer.

    pip install sql-causal-ordering nats-py
    ordering migrate                           # the store: ./ordering.db by default
    python examples/nats_consumer.py publish   # a chain of five events, jumbled
    python examples/nats_consumer.py consume   # prints them in causal order; Ctrl-C stops

Consumers share the durable pull consumer ``ordered``; a message one of them does not
acknowledge is delivered again (``nak`` with the suggested delay, or after ``ack_wait``
if that consumer died).  NATS_URL (default nats://127.0.0.1:4222), STREAM (default
``EVENTS``) and ORDERING_DATABASE_URL choose the server, the stream and the store.
"""

import asyncio
import os
import random
import signal
import sys
from datetime import UTC, datetime, timedelta

import nats
from nats.aio.msg import Msg

from ordering import CausalOrdering, OrderedConsumer, ReceivedEvent

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
STREAM = os.environ.get("STREAM", "EVENTS")
SUBJECT = f"{STREAM.lower()}.received"


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
    connection = await nats.connect(NATS_URL)
    stream = connection.jetstream()
    await stream.add_stream(name=STREAM, subjects=[SUBJECT])
    for event in chain:
        await stream.publish(SUBJECT, event.model_dump_json().encode())
    await connection.close()
    print("published", ", ".join(e.event for e in chain))


async def handle(event: ReceivedEvent) -> None:
    # Your code.  It runs after the handling of the event it follows has finished.
    print("handled", event.event, flush=True)


async def consume() -> None:
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    ordering = CausalOrdering("nats-example")
    connection = await nats.connect(NATS_URL)
    async with OrderedConsumer(ordering, handle) as consumer:
        messages = await connection.jetstream().pull_subscribe(SUBJECT, "ordered", STREAM)

        async def on_message(message: Msg) -> None:
            outcome = await consumer.deliver(ReceivedEvent.model_validate_json(message.data))
            if outcome.acknowledge:  # handled, a duplicate, or parked for its leader
                await message.ack()
            else:  # held by another worker, the store down, or the handler failed
                await message.nak(delay=outcome.retry_after)

        while not stop.is_set():
            try:
                batch = await messages.fetch(16, timeout=1)
            except TimeoutError:  # nothing came within the second
                continue
            await asyncio.gather(*(on_message(message) for message in batch))
    await connection.close()


if __name__ == "__main__":
    asyncio.run(publish() if sys.argv[1:] == ["publish"] else consume())
