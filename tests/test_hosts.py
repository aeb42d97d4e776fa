"""URLs with several PostgreSQL hosts (a primary and standbys): every form users write is
accepted with target_session_attrs=read-write and reaches each host in order, or is
refused with a message naming the form that works, never the password.

The parsing is checked directly; the forms are then used for real, against the test
server behind a first host that refuses connections, by the command line, the
migrations and the store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy.engine import make_url

from ordering import CausalOrdering, ReceivedEvent, dispose
from ordering.cli import main
from ordering.hosts import canonical_url
from ordering.urls import asyncpg_dsn, resolve_url, safe_url

from .conftest import PG_URL, drop_postgres_database, fresh_postgres_database
from .netfaults import closed_port, silent_server

RW = "target_session_attrs=read-write"
#: The canonical form of two hosts (SQLAlchemy's repeated host parameters).
CANONICAL = f"postgresql+asyncpg://u:pw@/db?host=h1%3A5432&host=h2%3A5433&{RW}"
#: What asyncpg is given for it.
DSN = f"postgresql://u:pw@h1:5432,h2:5433/db?{RW}"

FORMS = {
    "netloc": f"postgresql+asyncpg://u:pw@h1:5432,h2:5433/db?{RW}",
    "one-host-parameter": f"postgresql+asyncpg://u:pw@/db?host=h1:5432,h2:5433&{RW}",
    "repeated-host-parameters": f"postgresql+asyncpg://u:pw@/db?host=h1:5432&host=h2:5433&{RW}",
    "libpq-host-and-port-lists": f"postgresql+asyncpg://u:pw@/db?host=h1,h2&port=5432,5433&{RW}",
    "driver-less-scheme": f"postgresql://u:pw@h1:5432,h2:5433/db?{RW}",
    "target-primary": f"postgresql+asyncpg://u:pw@h1:5432,h2:5433/db?{RW}".replace(
        "read-write", "primary"
    ),
}


@pytest.mark.parametrize("url", FORMS.values(), ids=FORMS.keys())
def test_every_multi_host_form_becomes_one_canonical_url(url: str) -> None:
    resolved = resolve_url(url)
    expected = CANONICAL if "primary" not in url else CANONICAL.replace("read-write", "primary")
    assert resolved == expected
    assert resolve_url(resolved) == resolved  # a fixed point
    assert asyncpg_dsn(resolved) == (
        DSN if "primary" not in url else DSN.replace("read-write", "primary")
    )
    assert "pw" not in safe_url(resolved)


def test_other_settings_in_the_query_stay_and_the_hosts_keep_their_order() -> None:
    url = f"postgresql+asyncpg://u@h3,h1:6000,h2/db?application_name=billing&{RW}"
    dsn, _, query = asyncpg_dsn(resolve_url(url)).partition("?")
    assert dsn == "postgresql://u@h3,h1:6000,h2/db"
    assert sorted(query.split("&")) == ["application_name=billing", RW]


def test_one_port_in_port_applies_to_every_host() -> None:
    url = f"postgresql+asyncpg://u@/db?host=h1,h2&port=6432&{RW}"
    assert asyncpg_dsn(resolve_url(url)) == f"postgresql://u@h1:6432,h2:6432/db?{RW}"


def test_a_password_with_reserved_characters_survives_the_round_trip() -> None:
    url = f"postgresql+asyncpg://app:p%40ss%2Fw%3Ard%2C@h1,h2/db?{RW}"
    resolved = resolve_url(url)
    assert make_url(resolved).password == "p@ss/w:rd,"
    assert asyncpg_dsn(resolved) == f"postgresql://app:p%40ss%2Fw%3Ard%2C@h1,h2/db?{RW}"
    assert "p@ss" not in safe_url(resolved) and "p%40ss" not in safe_url(resolved)


def test_ipv6_hosts_in_brackets_or_with_a_port_list() -> None:
    bracketed = f"postgresql+asyncpg://u@[::1]:5432,[fd00::2]/db?{RW}"
    assert asyncpg_dsn(resolve_url(bracketed)) == f"postgresql://u@[::1]:5432,[fd00::2]/db?{RW}"
    listed = f"postgresql+asyncpg://u@/db?host=::1,fd00::2&port=5432,5433&{RW}"
    assert asyncpg_dsn(resolve_url(listed)) == f"postgresql://u@[::1]:5432,[fd00::2]:5433/db?{RW}"


def test_socket_directories_as_hosts() -> None:
    url = f"postgresql+asyncpg://u@/db?host=/run/postgresql,h2&{RW}"
    assert asyncpg_dsn(resolve_url(url)) == f"postgresql://u@%2Frun%2Fpostgresql,h2/db?{RW}"


def test_one_host_urls_are_left_as_they_are() -> None:
    for url in (
        "postgresql+asyncpg://u:pw@h1:5432/db",
        "postgresql+asyncpg://u:pw@/db?host=h1&port=5433",
        "postgresql+asyncpg://u:pw@h1/db?target_session_attrs=any",
        "sqlite+aiosqlite:///a,b.db",
    ):
        assert canonical_url(url) == url


REFUSED = {
    "netloc-without-target-session-attrs": (
        "postgresql+asyncpg://u:secret@h1:5432,h2:5433/db",
        "2 hosts with no target_session_attrs",
    ),
    "repeated-host-without-target-session-attrs": (
        "postgresql+asyncpg://u:secret@/db?host=h1&host=h2",
        "2 hosts with no target_session_attrs",
    ),
    "any": (
        "postgresql+asyncpg://u:secret@h1,h2/db?target_session_attrs=any",
        "target_session_attrs=any",
    ),
    "prefer-standby": (
        "postgresql+asyncpg://u:secret@/db?host=h1,h2&target_session_attrs=prefer-standby",
        "target_session_attrs=prefer-standby",
    ),
    "read-only-on-one-host": (
        "postgresql+asyncpg://u:secret@h1/db?target_session_attrs=read-only",
        "sends connections to a standby",
    ),
    "standby-on-one-host": (
        "postgresql+asyncpg://u:secret@h1/db?target_session_attrs=standby",
        "sends connections to a standby",
    ),
    "unknown-value": (
        "postgresql+asyncpg://u:secret@h1/db?target_session_attrs=rw",
        "is not one of read-write, primary",
    ),
    "two-values": (
        f"postgresql+asyncpg://u:secret@h1,h2/db?{RW}&target_session_attrs=any",
        "target_session_attrs twice",
    ),
    "bad-port": (
        f"postgresql+asyncpg://u:secret@h1:54x2,h2/db?{RW}",
        "the port '54x2' of the URL's host 'h1' is not a port number",
    ),
    "port-out-of-range": (
        f"postgresql+asyncpg://u:secret@h1:70000,h2/db?{RW}",
        "is not a port number",
    ),
    "empty-host": (f"postgresql+asyncpg://u:secret@h1,,h2/db?{RW}", "an empty entry"),
    "ports-twice": (
        f"postgresql+asyncpg://u:secret@/db?host=h1:1,h2:2&port=3,4&{RW}",
        "ports both after the hosts and in port=",
    ),
    "port-count": (
        f"postgresql+asyncpg://u:secret@/db?host=h1,h2,h3&port=1,2&{RW}",
        "2 ports in port= for 3 hosts",
    ),
    "hosts-twice": (
        f"postgresql+asyncpg://u:secret@h1,h2/db?host=h3&{RW}",
        "both before the database and in host=",
    ),
    "bad-ipv6": (f"postgresql+asyncpg://u:secret@[::1,h2/db?{RW}", "not an IPv6 address"),
    "unquoted-at-in-password": (
        f"postgresql+asyncpg://u:sec@ret@h1,h2/db?{RW}",
        "write an @ in the password as %40",
    ),
}


@pytest.mark.parametrize(("url", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_bad_multi_host_urls_are_refused_naming_the_problem(url: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        resolve_url(url)
    text = str(raised.value)
    assert message in text
    assert "secret" not in text and "ret@" not in text
    if "hosts with" in message or "target_session_attrs=" in message:
        assert "target_session_attrs=read-write" in text


def test_the_command_line_refuses_a_multi_host_url_naming_the_fix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--url", "postgresql+asyncpg://u:secret@h1,h2/db"]) != 0
    err = capsys.readouterr().err
    assert "target_session_attrs=read-write" in err and "secret" not in err


# -- for real: a first host that refuses connections, then the test server ---------------


@pytest.fixture
def pg_database() -> Iterator[str]:
    url = fresh_postgres_database("ordering_hosts")
    yield url
    drop_postgres_database(url)


def multi_host_forms(url: str, first: int | None, second: int | None) -> dict[str, str]:
    """The test server's URL as two hosts on its address, in each form; None stands for
    the server's own port."""
    parsed = make_url(url)
    host, live = parsed.host or "127.0.0.1", parsed.port or 5432
    p1, p2 = first or live, second or live
    userinfo = parsed.render_as_string(hide_password=False).split("://", 1)[1].split("@")[0]
    base = f"postgresql+asyncpg://{userinfo}@"
    db = parsed.database
    return {
        "netloc": f"{base}{host}:{p1},{host}:{p2}/{db}?{RW}",
        "one-host-parameter": f"{base}/{db}?host={host}:{p1},{host}:{p2}&{RW}",
        "repeated-host-parameters": f"{base}/{db}?host={host}:{p1}&host={host}:{p2}&{RW}",
        "libpq-host-and-port-lists": f"{base}/{db}?host={host},{host}&port={p1},{p2}&{RW}",
    }


FORM_NAMES = list(multi_host_forms(PG_URL, None, None))


@pytest.mark.parametrize("live_first", [True, False], ids=["live-first", "dead-first"])
@pytest.mark.parametrize("form", FORM_NAMES)
def test_each_form_reaches_the_live_host_for_migrate_check_status_and_the_store(
    pg_database: str, form: str, live_first: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whichever of the two hosts is up, in each form: the hosts are tried in order.
    The other refuses connections (nothing listens on its port), as a crashed server's
    machine does."""
    dead = closed_port()
    ports = (None, dead) if live_first else (dead, None)
    url = multi_host_forms(pg_database, *ports)[form]
    assert main(["migrate", "--url", url]) == 0
    assert main(["check", "--url", url]) == 0
    assert main(["status", "--url", url]) == 0
    assert "target_session_attrs" in capsys.readouterr().out
    event = ReceivedEvent(
        occurred=datetime.now(UTC), event="hosts.test", resource={"prefect.resource.id": "r"}
    )

    async def use_the_store() -> None:
        ordering = CausalOrdering("hosts", url=url)
        assert not await ordering.event_has_been_seen(event)
        await ordering.record_event_as_seen(event)
        assert await ordering.event_has_been_seen(event)
        # The same row, through the server's one-host URL.
        assert await CausalOrdering("hosts", url=pg_database).event_has_been_seen(event)
        await dispose()

    asyncio.run(use_the_store())


def _round_trip(url: str) -> None:
    event = ReceivedEvent(
        occurred=datetime.now(UTC), event="hosts.test", resource={"prefect.resource.id": "r"}
    )

    async def go() -> None:
        ordering = CausalOrdering("hosts", url=url)
        await ordering.record_event_as_seen(event)
        assert await ordering.event_has_been_seen(event)
        await dispose()

    asyncio.run(go())


@pytest.mark.parametrize("form", ["netloc", "repeated-host-parameters"])
def test_a_first_host_that_never_answers_costs_its_share_of_the_time_not_all_of_it(
    pg_database: str, form: str
) -> None:
    """A primary whose machine died without closing its sockets (here: a server that
    accepts and never answers) must not hold every connection attempt until its
    timeout: each host gets its share, and the second is reached within the deadline,
    by the migrations and by the store."""
    with silent_server() as silent:
        url = multi_host_forms(pg_database, silent, None)[form] + "&deadline=3"
        started = time.monotonic()
        assert main(["migrate", "--url", url]) == 0
        _round_trip(url)
        assert time.monotonic() - started < 30
