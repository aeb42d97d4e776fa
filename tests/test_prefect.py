"""``ordering.prefect``: our store as Prefect's ``causal_ordering`` backend.

Every test goes through Prefect's own machinery: the setting
PREFECT_SERVER_EVENTS_CAUSAL_ORDERING, the accessor ``get_triggers_causal_ordering()``,
Prefect's ``ReceivedEvent`` and Prefect's exceptions.  They skip when Prefect is not
installed, except under CI, where the extra must be installed and a skip would hide it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from .conftest import IN_CI

try:
    import prefect  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    if IN_CI:
        raise ImportError(
            f"Prefect is not importable ({exc}) but CI=true: install the extra, "
            "pip install -e '.[test,prefect]'"
        ) from exc
    pytest.skip(
        "Prefect is not installed: pip install -e '.[test,prefect]' to run these tests",
        allow_module_level=True,
    )

from prefect.server.events import ordering as prefect_ordering
from prefect.server.events import triggers
from prefect.server.events.ordering import get_triggers_causal_ordering
from prefect.server.events.schemas.events import Event, ReceivedEvent
from prefect.settings import (
    PREFECT_API_DATABASE_CONNECTION_URL,
    PREFECT_HOME,
    PREFECT_MESSAGING_BROKER,
    PREFECT_MESSAGING_CACHE,
    PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE,
    PREFECT_SERVER_EVENTS_CAUSAL_ORDERING,
    temporary_settings,
)

import ordering
from ordering import PRECEDING_EVENT_LOOKBACK, SchemaError
from ordering import prefect as ordering_prefect
from ordering.backends import _registry
from ordering.migrate import current_revision, downgrade, head_revision, upgrade
from ordering.models import utc_now
from ordering.schema import resolve_schema
from ordering.urls import URL_ENV, resolve_url

from .helpers import MutableClock, assert_causal, rows_of_scope, store_object
from .prefect_support import OUR_ORDERING, PrefectConsumer, causal_graph, prefect_event

ROOT = Path(__file__).resolve().parents[1]
PrefectOrdering = ordering_prefect.CausalOrdering


def ours() -> PrefectOrdering:
    """The ordering Prefect's own accessor builds, checked to be ours."""
    found = get_triggers_causal_ordering()
    assert isinstance(found, PrefectOrdering), f"Prefect built {type(found)}"
    return found


@pytest.fixture
def prefect_on(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Prefect configured as a user would: our ordering, Prefect's database URL pointing
    at the test database, and no ORDERING_DATABASE_URL (so Prefect's URL is used)."""
    monkeypatch.delenv(URL_ENV, raising=False)
    with temporary_settings(
        updates={
            PREFECT_SERVER_EVENTS_CAUSAL_ORDERING: OUR_ORDERING,
            PREFECT_API_DATABASE_CONNECTION_URL: db_url,
        }
    ):
        yield db_url


@pytest.fixture
async def triggers_scope(prefect_on: str, clock: MutableClock) -> AsyncIterator[PrefectOrdering]:
    """Prefect's ordering on a clean "triggers" scope, reading the test's clock."""
    with ordering_prefect.use_clock(clock):
        found = ours()
        await found.clear()
        yield found
        await found.clear()


async def _waiting(scope: PrefectOrdering) -> int:
    return (await rows_of_scope(scope.url, scope.scope)).followers


# -- wiring -----------------------------------------------------------------------------


async def test_prefect_accessor_builds_our_ordering_on_prefects_database(
    triggers_scope: PrefectOrdering, prefect_on: str
) -> None:
    built = get_triggers_causal_ordering()
    assert type(built) is PrefectOrdering
    assert isinstance(built, prefect_ordering.CausalOrdering)
    assert isinstance(built, ordering.CausalOrdering)
    assert built.scope == "triggers"
    assert built.event_type is ReceivedEvent
    assert built.url == ordering_prefect.database_url() == prefect_on


async def test_ordering_database_url_wins_over_prefects(
    db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(URL_ENV, db_url)
    with temporary_settings(
        updates={
            PREFECT_SERVER_EVENTS_CAUSAL_ORDERING: OUR_ORDERING,
            PREFECT_API_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{tmp_path}/prefect.db",
        }
    ):
        built = ours()
        assert built.url == db_url
        assert not await built.event_has_been_seen(prefect_event(utc_now, "z"))


def test_prefects_default_database_is_a_sqlite_file_under_prefect_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)
    with temporary_settings(
        updates={PREFECT_HOME: str(tmp_path)},
        restore_defaults={PREFECT_API_DATABASE_CONNECTION_URL},
    ):
        assert PrefectOrdering("triggers").url == f"sqlite+aiosqlite:///{tmp_path}/prefect.db"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true&check_same_thread=false",
        "sqlite+aiosqlite:///:memory:",
    ],
)
def test_an_in_memory_prefect_database_is_refused_with_advice(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)
    with (
        temporary_settings(updates={PREFECT_API_DATABASE_CONNECTION_URL: url}),
        pytest.raises(ValueError, match=f"in-memory.*set {URL_ENV}"),
    ):
        PrefectOrdering("triggers")


def test_a_plain_prefect_postgres_url_gets_the_async_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)
    plain = "postgresql://prefect:pw@db.example:5432/prefect"
    with temporary_settings(updates={PREFECT_API_DATABASE_CONNECTION_URL: plain}):
        assert ordering_prefect.database_url() == (
            "postgresql+asyncpg://prefect:pw@db.example:5432/prefect"
        )


def test_the_core_package_does_not_import_prefect() -> None:
    """Only ordering.prefect imports Prefect: importing everything else leaves it out."""
    script = (
        "import importlib, pkgutil, sys, ordering\n"
        "names = [m.name for m in pkgutil.walk_packages(ordering.__path__, 'ordering.')]\n"
        "for name in names:\n"
        "    if name not in ('ordering.prefect', 'ordering.__main__'):\n"
        "        importlib.import_module(name)\n"
        "print(len(names), sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    count, imported = done.stdout.split(" ", 1)
    assert int(count) > 5
    assert imported.strip() == "[]"


def _with_password(url: str) -> str:
    """The URL with a password (PostgreSQL's trust authentication ignores it), to check
    that no message or log shows it."""
    if not url.startswith("postgresql"):
        return url
    return make_url(url).set(password="pr3fect-s3cret").render_as_string(hide_password=False)


@pytest.fixture
def throwaway_url(empty_url: str) -> Iterator[str]:
    """``empty_url``, taken off the list of databases that
    ``CausalOrdering.clear_all_scopes()`` walks once the test is over: the database is
    dropped (or has no schema), and later tests' calls would fail on it."""
    yield empty_url
    for url in (empty_url, _with_password(empty_url)):
        resolved = resolve_url(url)
        _registry.keys_opened.discard(resolved)  # SQLite's key
        _registry.keys_opened.discard(f"{resolved}#{resolve_schema()}")  # PostgreSQL's


async def test_a_missing_schema_names_the_migrate_command_without_the_password(
    throwaway_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)
    caplog.set_level(logging.DEBUG)
    with temporary_settings(
        updates={
            PREFECT_SERVER_EVENTS_CAUSAL_ORDERING: OUR_ORDERING,
            PREFECT_API_DATABASE_CONNECTION_URL: _with_password(throwaway_url),
        }
    ):
        built = get_triggers_causal_ordering()
        with pytest.raises(SchemaError, match="ordering migrate --url") as raised:
            await built.event_has_been_seen(prefect_event(utc_now, "z").id)
    assert "has no ordering schema" in str(raised.value)
    assert "pr3fect-s3cret" not in str(raised.value)
    assert "pr3fect-s3cret" not in caplog.text
    assert "Prefect causal ordering uses" in caplog.text  # the URL was logged, redacted


# -- the consumer pattern over Prefect's events -------------------------------------------


@pytest.mark.parametrize("delivery", ["in-order", "jumbled", "backwards"])
async def test_a_causal_graph_is_handled_in_causal_order(
    triggers_scope: PrefectOrdering, clock: MutableClock, delivery: str
) -> None:
    events = causal_graph(clock)
    if delivery == "backwards":
        events_in = events[::-1]
    elif delivery == "jumbled":
        events_in = events[:]
        random.Random(6).shuffle(events_in)
        assert events_in != events
    else:
        events_in = events
    consumer = PrefectConsumer()

    went = [await consumer.consume(event) for event in events_in]

    assert_causal(list[Any](consumer.handled), events)  # a checker written for our model
    assert all(type(e) is ReceivedEvent for e in consumer.handled)
    assert (not all(went)) == (delivery != "in-order")  # early arrivals were parked
    assert await _waiting(triggers_scope) == 0
    for event in events:
        assert await get_triggers_causal_ordering().event_has_been_seen(event.id)


async def test_prefects_own_reactive_evaluation_runs_on_our_ordering(
    triggers_scope: PrefectOrdering, clock: MutableClock
) -> None:
    """Prefect's triggers consumer catches Prefect's EventArrivedEarly: ours is one."""
    events = causal_graph(clock)
    for event in reversed(events):
        try:
            await triggers.reactive_evaluation(event)
        except prefect_ordering.EventArrivedEarly as early:
            assert isinstance(early, ordering.EventArrivedEarly)
            assert early.event.id == event.id
    assert await _waiting(triggers_scope) == 0
    for event in events:
        assert await triggers_scope.event_has_been_seen(event)


async def test_followers_parked_by_one_instance_are_released_by_another(
    triggers_scope: PrefectOrdering, clock: MutableClock
) -> None:
    leader, first, second = causal_graph(clock)[:3]
    parking = PrefectConsumer()
    assert not await parking.consume(second)
    assert not await parking.consume(first)
    waiting = await get_triggers_causal_ordering().get_followers(leader)
    assert [type(e) for e in waiting] == [ReceivedEvent]
    assert [e.id for e in waiting] == [first.id]

    async def release_elsewhere() -> list[str]:
        # Another event loop in another thread: another engine and pool, like another
        # worker; Prefect's settings and our clock come along in the copied context.
        releasing = PrefectConsumer()
        try:
            assert get_triggers_causal_ordering() is not triggers_scope
            await releasing.consume(leader)
        finally:
            await ordering.dispose()
        return releasing.names

    names = await asyncio.to_thread(asyncio.run, release_elsewhere())

    assert names == [leader.event, first.event, second.event]
    assert parking.handled == []
    assert await _waiting(triggers_scope) == 0


async def test_lost_followers_come_back_through_prefects_sweep_once(
    triggers_scope: PrefectOrdering, clock: MutableClock
) -> None:
    never_seen = prefect_event(clock, "never-delivered")
    early = prefect_event(clock, "early", follows=never_seen.id)
    later = prefect_event(clock, "later", follows=never_seen.id, occurred=early.occurred)
    consumer = PrefectConsumer()
    assert not await consumer.consume(later)
    assert not await consumer.consume(early)

    assert await triggers.get_lost_followers() == []
    clock.advance(PRECEDING_EVENT_LOOKBACK + timedelta(seconds=1))

    lost = await triggers.get_lost_followers()  # Prefect's own periodic-sweep function
    assert [type(e) for e in lost] == [ReceivedEvent, ReceivedEvent]
    assert {e.id for e in lost} == {early.id, later.id}
    assert await triggers.get_lost_followers() == []
    assert await _waiting(triggers_scope) == 0


async def test_the_clock_hook_only_reaches_orderings_built_while_it_is_set(
    prefect_on: str, clock: MutableClock
) -> None:
    with ordering_prefect.use_clock(clock):
        inside = ours()
    outside = ours()
    assert inside.clock is clock
    assert outside.clock is not clock


# -- cost of construction --------------------------------------------------------------


async def test_building_an_ordering_per_event_opens_no_engine(prefect_on: str) -> None:
    """Prefect builds one ordering per event: none of them may open anything."""
    await ordering.dispose()
    built = [ours() for _ in range(2_000)]
    assert _registry.current() == []  # construction touched no backend or connection
    backends = {id(o.backend) for o in built}
    assert len(backends) == 1
    assert len(_registry.current()) == 1


# -- Prefect's multi-worker check ------------------------------------------------------


def _multi_worker_refusal(
    causal_ordering: str, database: str, monkeypatch: pytest.MonkeyPatch
) -> str | None:
    """What ``prefect server start --workers 2`` says about this configuration (None:
    it starts), with every other setting it checks set to a non-memory value.

    Prefect's check takes the function that reports a refusal (3.7 and later, in
    ``prefect.cli._server_utils``) or calls its module's ``exit_with_error`` (3.6, in
    ``prefect.cli.server``); either way the refusal is caught here as an exception.
    """
    import inspect

    try:
        from prefect.cli import _server_utils as module
    except ImportError:
        from prefect.cli import server as module  # type: ignore[no-redef]
    if not hasattr(module, "_validate_multi_worker"):
        from prefect.cli import server as module  # type: ignore[no-redef]
    check: Any = module._validate_multi_worker

    class Refused(Exception):
        pass

    def refuse(message: object, *args: object, **kwargs: object) -> None:
        raise Refused(str(message))

    takes_exit_fn = len(inspect.signature(check).parameters) > 1
    if not takes_exit_fn:
        monkeypatch.setattr(module, "exit_with_error", refuse)
    with temporary_settings(
        updates={
            PREFECT_API_DATABASE_CONNECTION_URL: database,
            PREFECT_MESSAGING_BROKER: "prefect_redis.messaging",
            PREFECT_MESSAGING_CACHE: "prefect_redis.messaging",
            PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE: "prefect_redis.lease_storage",
            PREFECT_SERVER_EVENTS_CAUSAL_ORDERING: causal_ordering,
        }
    ):
        try:
            check(2, refuse) if takes_exit_fn else check(2)
        except Refused as refused:
            return str(refused)
    return None


def test_prefects_multi_worker_check_accepts_our_ordering_and_refuses_memory(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _multi_worker_refusal(OUR_ORDERING, postgres_url, monkeypatch) is None
    refusal = _multi_worker_refusal(
        "prefect.server.events.ordering.memory", postgres_url, monkeypatch
    )
    assert refusal is not None
    assert "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING" in refusal


# -- across processes and beside Prefect's own tables ------------------------------------


def _run(command: list[str], env: dict[str, str], stdin: str = "") -> str:
    done = subprocess.run(
        command, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _prefect_env(database: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != URL_ENV}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=OUR_ORDERING,
        PREFECT_API_DATABASE_CONNECTION_URL=database,
    )
    return env


async def test_parked_followers_survive_a_restart(
    triggers_scope: PrefectOrdering, prefect_on: str, tmp_path: Path
) -> None:
    env = _prefect_env(prefect_on, tmp_path)
    support = [sys.executable, "-m", "tests.prefect_support"]

    parked = json.loads(await asyncio.to_thread(_run, [*support, "park"], env))
    assert parked["parked"] == [True, True]
    assert await _waiting(triggers_scope) == 2  # the first process is gone; they are stored

    handled = json.loads(
        await asyncio.to_thread(_run, [*support, "release"], env, json.dumps(parked))
    )
    assert handled == ["leader", "f1", "f2"]
    assert await _waiting(triggers_scope) == 0


#: The store's tables, by the names they have in the store's own schema on PostgreSQL
#: (on SQLite they are prefixed ``ordering_``).
OUR_TABLES = {
    "alembic_version",
    "code_compatibility",
    "processing_leases",
    "seen_events",
    "waiting_followers",
}


async def _tables(url: str, schema: str | None = None) -> set[str]:
    """The tables of ``schema`` (default: the connection's own, Prefect's)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return set(
                await connection.run_sync(lambda c: inspect(c).get_table_names(schema=schema))
            )
    finally:
        await engine.dispose()


async def _our_tables(url: str) -> set[str]:
    """The store's tables in the database, by their names in OUR_TABLES: those of the
    store's schema on PostgreSQL, the prefixed ones on SQLite."""
    if url.startswith("sqlite"):
        prefixed = {t for t in await _tables(url) if t.startswith("ordering_")}
        return {t.removeprefix("ordering_") for t in prefixed}
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            schemas = await connection.run_sync(lambda c: inspect(c).get_schema_names())
    finally:
        await engine.dispose()
    schema = resolve_schema()
    return await _tables(url, schema=schema) if schema in schemas else set()


async def _require_prefects_extensions(url: str) -> None:
    """Prefect's own PostgreSQL migrations create the extension pg_trgm (from contrib),
    which servers built without contrib lack (the wheels of PostgreSQL 13, 14 and 16
    that .ci/postgres-server uses): such a server cannot hold Prefect's database at all.
    Under CI, whose servers have it, its absence is a failure."""
    if url.startswith("sqlite"):
        return
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            available = (
                await connection.exec_driver_sql(
                    "SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'"
                )
            ).first()
    finally:
        await engine.dispose()
    if available is None:
        message = "this PostgreSQL server has no pg_trgm, which Prefect's migrations create"
        if IN_CI:
            pytest.fail(message + " (CI=true: this is a failure, not a skip)")
        pytest.skip(message)


async def test_our_schema_lives_beside_prefects_in_prefects_database(
    throwaway_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_url = throwaway_url
    await _require_prefects_extensions(empty_url)
    env = _prefect_env(empty_url, tmp_path)
    prefect_cli = str(Path(sys.executable).with_name("prefect"))
    await asyncio.to_thread(_run, [prefect_cli, "server", "database", "upgrade", "-y"], env)
    prefects = await _tables(empty_url)
    migrate = [sys.executable, "-m", "ordering", "migrate", "--url", empty_url]
    await asyncio.to_thread(_run, migrate, env)

    tables = await _tables(empty_url)
    assert await _our_tables(empty_url) == OUR_TABLES
    # Beside Prefect's on SQLite, prefixed; on PostgreSQL in a schema of their own.
    beside = (
        {store_object(empty_url, t) for t in OUR_TABLES}
        if empty_url.startswith("sqlite")
        else set()
    )
    assert prefects & beside == set()
    assert tables == prefects | beside  # we added our tables and touched none of Prefect's
    assert "alembic_version" in prefects

    monkeypatch.delenv(URL_ENV, raising=False)
    with temporary_settings(
        updates={
            PREFECT_SERVER_EVENTS_CAUSAL_ORDERING: OUR_ORDERING,
            PREFECT_API_DATABASE_CONNECTION_URL: empty_url,
        }
    ):
        leader = prefect_event(utc_now, "leader")
        follower = prefect_event(utc_now, "follower", follows=leader.id)
        consumer = PrefectConsumer()
        assert not await consumer.consume(follower)
        assert await consumer.consume(leader)
        assert consumer.names == ["leader", "follower"]
        await ours().clear()


async def _prefect_drop_db(url: str) -> None:
    """What ``prefect server database reset`` does first: drop every table it reflects.

    Prefect caches its database configuration process-wide; each piece is set to None
    for the call so that it is built afresh for this URL, and restored afterwards.
    """
    from prefect.server.database import dependencies

    with (
        temporary_settings(updates={PREFECT_API_DATABASE_CONNECTION_URL: url}),
        dependencies.temporary_database_config(None),
        dependencies.temporary_query_components(None),
        dependencies.temporary_orm_config(None),
        dependencies.temporary_interface_class(None),
    ):
        interface: Any = dependencies.provide_database_interface()
        try:
            await interface.drop_db()
        finally:
            await (await interface.engine()).dispose()


async def test_ordering_migrate_restores_our_schema_after_prefects_database_reset(
    empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prefect server database reset`` first drops every table it finds in the
    default schema: on SQLite ours too, and ``ordering migrate`` must bring them back;
    on PostgreSQL ours live in a schema of their own, which the reset leaves alone
    (docs/prefect.md), and ``ordering migrate`` finds nothing to do."""
    monkeypatch.delenv(URL_ENV, raising=False)
    await asyncio.to_thread(upgrade, empty_url)

    await _prefect_drop_db(empty_url)
    survived = OUR_TABLES if empty_url.startswith("postgresql") else set()
    assert await _our_tables(empty_url) == survived

    await asyncio.to_thread(upgrade, empty_url)
    assert await current_revision(empty_url) == head_revision()
    assert await _our_tables(empty_url) == OUR_TABLES


async def test_the_documented_reset_procedure_restores_our_schema(
    empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/prefect.md: take our schema down to base, reset Prefect, migrate again."""
    monkeypatch.delenv(URL_ENV, raising=False)
    await asyncio.to_thread(upgrade, empty_url)

    await asyncio.to_thread(downgrade, empty_url, "base")
    await _prefect_drop_db(empty_url)
    # Nothing of ours is left but, on PostgreSQL, alembic's version table, empty, in
    # the store's schema (which Prefect's reset does not reach).
    assert await _our_tables(empty_url) <= {"alembic_version"}
    assert await current_revision(empty_url) is None

    await asyncio.to_thread(upgrade, empty_url)
    assert await current_revision(empty_url) == head_revision()
    assert await _our_tables(empty_url) == OUR_TABLES


async def test_event_has_been_seen_takes_prefects_event_as_its_interface_says(
    triggers_scope: PrefectOrdering, clock: MutableClock
) -> None:
    """Prefect's interface takes ``UUID | Event``; its ``Event`` (what was emitted,
    before the server received it) has no ``received``."""
    received = prefect_event(clock, "emitted")
    emitted = Event.model_validate(received.model_dump(exclude={"received"}))
    assert not hasattr(emitted, "received")
    assert await triggers_scope.event_has_been_seen(emitted) is False
    await triggers_scope.record_event_as_seen(received)
    assert await triggers_scope.event_has_been_seen(emitted) is True


async def test_a_duplicate_delivery_is_acknowledged_by_prefects_consumer(
    triggers_scope: PrefectOrdering, clock: MutableClock
) -> None:
    """A redelivery of an event already processed is refused as Prefect's
    EventArrivedEarly, which Prefect's consumer acknowledges: no second handling and no
    redelivery loop."""
    event = prefect_event(clock, "once")
    consumer = PrefectConsumer()
    assert await consumer.consume(event)
    assert not await consumer.consume(event)  # caught as Prefect's EventArrivedEarly
    assert consumer.handled == [event]


async def test_prefects_own_clock_drives_the_ordering_by_default(
    prefect_on: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect's tests move time by patching prefect.types._datetime.now: without a
    clock of its own, our ordering reads that too."""
    import prefect.types._datetime as prefect_datetime

    found = ours()
    await found.clear()
    clock = MutableClock(utc_now())
    leader = prefect_event(clock, "leader")
    follower = prefect_event(clock, "follower", follows=leader.id)
    await found.record_follower(follower)
    assert await found.get_lost_followers() == []
    later = clock() + PRECEDING_EVENT_LOOKBACK + timedelta(seconds=1)
    monkeypatch.setattr(prefect_datetime, "now", lambda tz="UTC": later)
    assert await found.get_lost_followers() == [follower]
