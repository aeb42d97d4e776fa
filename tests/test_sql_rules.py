"""The SQL loader (ordering/sql/__init__.py): rules written out in place, and the NOTIFY
payload the SQL sends and the listener waits for, both from one definition."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from ordering.sql import SEEN_CHANNEL, _Rule, event_key, expand, rules

RULES = {
    "pair": _Rule.declared(("a", "b"), "({a} AND {b})"),
    "assign": _Rule.declared(("target", "*more"), "SET {target} = 1{more}"),
}


def test_a_rule_is_written_out_with_its_arguments() -> None:
    assert expand("WHERE {pair(f(x, y), z)}", RULES) == "WHERE (f(x, y) AND z)"


def test_a_last_parameter_marked_with_a_star_takes_the_rest_or_nothing() -> None:
    assert expand("{assign(a)}", RULES) == "SET a = 1"
    assert expand("{assign(a, , b = 2, c = 3)}", RULES) == "SET a = 1, b = 2, c = 3"


def test_a_call_with_the_wrong_arguments_names_the_rule() -> None:
    with pytest.raises(TypeError, match="rule pair takes 2 arguments"):
        expand("{pair(x)}", RULES)
    with pytest.raises(KeyError, match="no rule named 'missing'"):
        expand("{missing(x)}", RULES)
    with pytest.raises(ValueError, match="only a rule's last parameter"):
        _Rule.declared(("*a", "b"), "{a}{b}")


def test_postgresql_notify_payload_is_the_key_the_listener_waits_for(postgres_url: str) -> None:
    """What the seen_notify rule sends is exactly ordering.sql.event_key, on the
    channel the listener listens to, for a scope that holds the separator itself."""
    scope, event_id = "tenant/a'b", uuid4()
    sent = expand("SELECT {seen_notify($1::text, $2::uuid)}", rules("postgresql"))

    async def notified() -> tuple[str, str]:
        dsn = make_url(postgres_url).set(drivername="postgresql")
        connection = await asyncpg.connect(dsn.render_as_string(hide_password=False))
        received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        try:
            await connection.add_listener(
                SEEN_CHANNEL,
                lambda _c, _p, channel, payload: received.put_nowait((channel, payload)),
            )
            await connection.execute(sent, scope, event_id)
            async with asyncio.timeout(10):
                return await received.get()
        finally:
            await connection.close()

    assert asyncio.run(notified()) == (SEEN_CHANNEL, event_key(scope, event_id))
