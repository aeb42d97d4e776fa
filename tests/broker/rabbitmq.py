"""Reaching the RabbitMQ the broker tests use, and cleaning up after them."""

from __future__ import annotations

import asyncio
import os

import aio_pika
import pytest
from pamqp.commands import Queue as QueueMethods

from tests.conftest import IN_CI

AMQP_URL = os.environ.get("ORDERING_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def rabbitmq_url() -> str:
    """The broker's URL, once it answers; else a skip (a failure under CI=true)."""

    async def ping() -> None:
        connection = await aio_pika.connect(AMQP_URL, timeout=10)
        await connection.close()

    try:
        asyncio.run(ping())
    except Exception as exc:
        message = f"RabbitMQ at {AMQP_URL} is unreachable: {exc!r}"
        if IN_CI:
            pytest.fail(message + " (CI=true: this is a failure, not a skip)")
        pytest.skip(message)
    return AMQP_URL


async def queue_state(url: str, queue: str) -> QueueMethods.DeclareOk:
    """Messages ready and consumers, by a passive declare (no management plugin)."""
    connection = await aio_pika.connect(url, timeout=30)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result


async def delete_queue(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url, timeout=30)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
