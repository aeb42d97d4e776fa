"""Consumer processes written with ``OrderedConsumer`` on one RabbitMQ queue.

Three consumer processes with a prefetch of eight share one queue of jumbled causal
chains (a tenth of the events published twice); some handlers fail once, so their
messages are nacked and requeued; one consumer is killed with SIGKILL a third of the
way through, and RabbitMQ hands the messages it held to the others.  The fault tests'
checker then reads back every handling: each event handled after its leader, none
handled again after a completed handling, nothing left in the store; and the queue
is empty with every consumer gone, so nothing was left unacknowledged (a closed
channel's unacknowledged messages go back to the queue).

Needs RabbitMQ (``ORDERING_TEST_AMQP_URL``, default ``amqp://guest:guest@127.0.0.1:5672/``);
under CI=true an unreachable broker fails the test instead of skipping it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from ordering import ReceivedEvent

from .harness import BrokerHarness, broker_harness, run_with_a_kill
from .rabbitmq import AMQP_URL, delete_queue, queue_state, rabbitmq_url

CONSUMERS = 3
PREFETCH = 8

pytestmark = pytest.mark.timeout(300)


async def publish(url: str, queue: str, events: list[ReceivedEvent]) -> None:
    connection = await aio_pika.connect(url, timeout=30)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=False)
        for event in events:
            body = event.model_dump_json().encode()
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)


@pytest.fixture
def harnesses() -> Iterator[list[tuple[BrokerHarness, str]]]:
    """Each harness with its queue: its processes are killed and its queue deleted."""
    made: list[tuple[BrokerHarness, str]] = []
    yield made
    for harness, queue in made:
        harness.stop_all()
        asyncio.run(delete_queue(AMQP_URL, queue))


def test_consumers_on_one_queue_with_requeues_and_a_consumer_killed(
    empty_url: str, tmp_path: Path, harnesses: list[tuple[BrokerHarness, str]]
) -> None:
    amqp_url = rabbitmq_url()
    dialect = empty_url.split("+", 1)[0]
    queue = f"ordering-test-{uuid.uuid4().hex[:10]}"
    harness, events = broker_harness(
        f"rabbitmq-{dialect}",
        empty_url,
        tmp_path,
        consumers=CONSUMERS,
        chains=100,
        module="tests.broker.rabbitmq_worker",
        broker_args=["--amqp-url", amqp_url, "--queue", queue, "--prefetch", str(PREFETCH)],
    )
    harnesses.append((harness, queue))

    def empty() -> bool:
        return asyncio.run(queue_state(amqp_url, queue)).message_count == 0

    run = run_with_a_kill(
        harness, events, lambda stream: asyncio.run(publish(amqp_url, queue, stream)), empty
    )
    after = asyncio.run(queue_state(amqp_url, queue))
    print(
        f"rabbitmq {dialect}: prefetch={PREFETCH} {run.summary()} "
        f"queue_after=(ready={after.message_count}, consumers={after.consumer_count})"
    )
    run.assert_rules()
    assert (after.message_count, after.consumer_count) == (0, 0), "messages left unacknowledged"
