"""Reaching the NATS server (with JetStream) the broker tests use, and cleaning up."""

from __future__ import annotations

import asyncio
import os

import nats
import pytest

from tests.conftest import IN_CI

NATS_URL = os.environ.get("ORDERING_TEST_NATS_URL", "nats://127.0.0.1:4222")


def nats_url() -> str:
    """The server's URL, once its JetStream answers; else a skip (a failure under CI=true)."""

    async def ping() -> None:
        connection = await nats.connect(NATS_URL, connect_timeout=10, max_reconnect_attempts=0)
        try:
            await connection.jetstream().account_info()
        finally:
            await connection.close()

    try:
        asyncio.run(ping())
    except Exception as exc:
        message = f"NATS JetStream at {NATS_URL} is unreachable: {exc!r}"
        if IN_CI:
            pytest.fail(message + " (CI=true: this is a failure, not a skip)")
        pytest.skip(message)
    return NATS_URL


async def delete_stream(url: str, stream: str) -> None:
    connection = await nats.connect(url, connect_timeout=10, max_reconnect_attempts=0)
    try:
        await connection.jetstream().delete_stream(stream)
    finally:
        await connection.close()
