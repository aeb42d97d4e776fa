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
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from ordering import ReceivedEvent
from ordering.models import utc_now
from tests.fault.harness import SEED
from tests.fault.workload import make_chains

from .harness import BrokerHarness, interleave
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
    rng = random.Random(SEED)
    events = make_chains(100, 5, utc_now(), rng)
    dialect = empty_url.split("+", 1)[0]
    queue = f"ordering-test-{uuid.uuid4().hex[:10]}"
    harness = BrokerHarness(
        name=f"rabbitmq-{dialect}",
        url=empty_url,
        run_dir=tmp_path,
        workers=CONSUMERS,
        duplicate_fraction=0.1,
        soon=0.5,
        lease_seconds=3.0,
        module="tests.broker.rabbitmq_worker",
        broker_args=["--amqp-url", amqp_url, "--queue", queue, "--prefetch", str(PREFETCH)],
        fail_first=[e.id for e in rng.sample(events, len(events) // 20)],
    )
    harnesses.append((harness, queue))
    workload = harness.prepare(events)
    stream = interleave(workload.queues)
    asyncio.run(publish(amqp_url, queue, stream))
    harness.start()

    harness.wait_for(lambda: harness.handled_share() >= 1 / 3, 120, "a third handled", poll=0.01)
    held_when_killed = harness.holding("c1")
    harness.kill("c1")
    harness.wait_for(harness.all_handled, 120, "every event handled")
    harness.wait_for(
        lambda: asyncio.run(queue_state(amqp_url, queue)).message_count == 0,
        60,
        "the queue to empty",
    )
    harness.stop()
    after = asyncio.run(queue_state(amqp_url, queue))
    report = harness.check()
    counts = harness.broker_counts()
    print(
        f"rabbitmq {dialect}: published={len(stream)} (events={len(events)}, "
        f"duplicates={workload.duplicates}) consumers={CONSUMERS} prefetch={PREFETCH} "
        f"by the surviving consumers: received={counts['received']} acked={counts['acked']} "
        f"nacked={counts['nacked']} redelivered={counts['redelivered']}; "
        f"held_by_killed_consumer={held_when_killed} "
        f"handled={report.handled} handlings={report.handlings} "
        f"lost_followers_handed_out={report.workers_results.lost_followers} "
        f"queue_after=(ready={after.message_count}, consumers={after.consumer_count})"
    )
    report.assert_rules()
    assert report.swept == []
    assert (after.message_count, after.consumer_count) == (0, 0), "messages left unacknowledged"
    assert held_when_killed > 0, "the killed consumer held no message: kill it earlier"
    assert counts["nacked"] > 0, "no message was nacked and requeued"
    assert counts["redelivered"] > 0, "RabbitMQ redelivered nothing"
    assert set(report.workers_results.errors) <= {"HandlerFailed"}, (
        report.workers_results.error_samples[:5]
    )
