"""Consumer processes written with ``OrderedConsumer`` on one NATS JetStream durable
consumer: smaller than the RabbitMQ test (tests/broker/test_rabbitmq.py), the same
checks.  Two processes fetch batches of eight from jumbled chains (a tenth of the
events published twice); some handlers fail once, so their messages are nak'ed with
the suggested delay; one consumer is killed with SIGKILL a third of the way through,
and JetStream delivers what it held again once ``ack_wait`` has passed.  At the end
the durable consumer has nothing pending and nothing waiting for an acknowledgement.

Needs NATS with JetStream (``ORDERING_TEST_NATS_URL``, default nats://127.0.0.1:4222);
under CI=true an unreachable server fails the test instead of skipping it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo

from ordering import ReceivedEvent

from .harness import BrokerHarness, broker_harness, run_with_a_kill
from .jetstream import NATS_URL, delete_stream, nats_url

CONSUMERS = 2
BATCH = 8
DURABLE = "ordered"
#: A message held by a dead consumer comes back after this many seconds.
ACK_WAIT_S = 3.0

pytestmark = pytest.mark.timeout(300)


async def publish(url: str, stream: str, events: list[ReceivedEvent]) -> None:
    connection = await nats.connect(url, connect_timeout=10)
    try:
        jetstream = connection.jetstream()
        subject = f"{stream}.events"
        await jetstream.add_stream(name=stream, subjects=[subject])
        await jetstream.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S
            ),
        )
        for event in events:
            await jetstream.publish(subject, event.model_dump_json().encode())
    finally:
        await connection.close()


async def consumer_state(url: str, stream: str) -> ConsumerInfo:
    connection = await nats.connect(url, connect_timeout=10)
    try:
        info: ConsumerInfo = await connection.jetstream().consumer_info(stream, DURABLE)
        return info
    finally:
        await connection.close()


@pytest.fixture
def harnesses() -> Iterator[list[tuple[BrokerHarness, str]]]:
    """Each harness with its stream: its processes are killed and its stream deleted."""
    made: list[tuple[BrokerHarness, str]] = []
    yield made
    for harness, stream in made:
        harness.stop_all()
        asyncio.run(delete_stream(NATS_URL, stream))


def test_consumers_on_one_durable_consumer_with_naks_and_a_consumer_killed(
    empty_url: str, tmp_path: Path, harnesses: list[tuple[BrokerHarness, str]]
) -> None:
    url = nats_url()
    dialect = empty_url.split("+", 1)[0]
    stream = f"ORDERING_TEST_{uuid.uuid4().hex[:10].upper()}"
    harness, events = broker_harness(
        f"nats-{dialect}",
        empty_url,
        tmp_path,
        consumers=CONSUMERS,
        chains=50,
        module="tests.broker.nats_worker",
        broker_args=[
            *("--nats-url", url, "--stream", stream, "--durable", DURABLE),
            *("--batch", str(BATCH)),
        ],
    )
    harnesses.append((harness, stream))

    def settled() -> bool:
        state = asyncio.run(consumer_state(url, stream))
        return (state.num_pending, state.num_ack_pending) == (0, 0)

    run = run_with_a_kill(
        harness, events, lambda published: asyncio.run(publish(url, stream, published)), settled
    )
    after = asyncio.run(consumer_state(url, stream))
    print(
        f"nats {dialect}: batch={BATCH} {run.summary()} "
        f"durable_after=(pending={after.num_pending}, ack_pending={after.num_ack_pending})"
    )
    run.assert_rules()
    assert (after.num_pending, after.num_ack_pending) == (0, 0), "messages left unacknowledged"
