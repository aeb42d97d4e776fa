"""The migrations, on SQLite and PostgreSQL, each test on a database of its own (they
downgrade, so the shared session databases are no place for them).

On PostgreSQL our objects live in a schema of their own (``ordering`` unless told
otherwise), alembic's table included; revisions before 0003 kept the ``ordering_``
prefix there.  On SQLite every name of ours is prefixed ``ordering_``."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID, uuid4

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from ordering import CausalOrdering, SchemaError, dispose
from ordering.migrate import (
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    upgrade,
    upgrade_sql,
)
from ordering.schema import CODE_REVISION, SCHEMA_ENV
from ordering.sql import definitions

from .conftest import drop_postgres_database, fresh_postgres_database
from .helpers import MutableClock, make_event

T = TypeVar("T")

#: The store's tables and audit views, by their names inside the schema (PostgreSQL
#: from 0003 on); elsewhere they carry the ``ordering_`` prefix.
TABLES = ("seen_events", "processing_leases", "waiting_followers")
VIEWS = ("waiting", "stuck", "held_leases")
ALT_SCHEMA = "ordering_alt"

ID_COLUMNS = {"event_id", "follower_id", "leader_id"}
TIME_COLUMNS = {"seen_at", "acquired_at", "expires_at", "occurred", "received", "claimed_until"}

SEEN_AT = datetime(2026, 11, 28, 11, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _default_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema comes from the arguments here, never from the environment."""
    monkeypatch.delenv(SCHEMA_ENV, raising=False)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run async code from these synchronous tests (alembic runs its own event loop)."""

    async def main() -> T:
        try:
            return await coroutine
        finally:
            await dispose()

    return asyncio.run(main())


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions("base", "heads")))]


def newer_revision() -> str:
    """A revision id after every shipped one, for a database 'from the future'."""
    return f"{int(head_revision()) + 1:04d}"


@asynccontextmanager
async def _connect(url: str) -> AsyncIterator[AsyncConnection]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            yield connection
    finally:
        await engine.dispose()


async def sql(url: str, *statements: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run raw statements in one transaction; the rows of the last one."""
    rows: list[tuple[Any, ...]] = []
    async with _connect(url) as connection:
        for statement in statements:
            result = await connection.execute(text(statement), params)
            rows = [tuple(row) for row in result] if result.returns_rows else []
        await connection.commit()
    return rows


# -- what is in the database -------------------------------------------------------


async def _catalog(url: str, schema: str) -> dict[str, str]:
    """Our relations by name, each with its kind ('table' or 'view'): tables and views
    in ``schema`` on PostgreSQL, those named ``ordering_*`` on SQLite (alembic's
    table left out)."""
    if is_postgres(url):
        rows = await sql(
            url,
            """
            SELECT c.relname::text, CASE c.relkind WHEN 'v' THEN 'view' ELSE 'table' END
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = :schema AND c.relkind IN ('r', 'v')
              AND c.relname <> 'alembic_version'
            """,
            schema=schema,
        )
    else:
        rows = await sql(
            url,
            "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') "
            "AND name LIKE 'ordering\\_%' ESCAPE '\\' AND name <> 'ordering_alembic_version'",
        )
    return {name: kind for name, kind in rows}


def objects(url: str, schema: str = "ordering") -> dict[str, str]:
    return run(_catalog(url, schema))


def expected_objects(url: str, *, views: bool = True, compatibility: bool = True) -> dict[str, str]:
    """Our relations at head (or without views / code_compatibility, as at 0001)."""
    prefix = "" if is_postgres(url) else "ordering_"
    found = {prefix + t: "table" for t in TABLES}
    if compatibility:
        found[prefix + "code_compatibility"] = "table"
    if views:
        found.update({prefix + v: "view" for v in VIEWS})
    return found


def pg_functions(url: str, schema: str = "ordering") -> set[str]:
    rows = run(
        sql(
            url,
            "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = :schema",
            schema=schema,
        )
    )
    return {row[0] for row in rows}


def defined_functions() -> set[str]:
    """The functions the current definitions (ordering/sql) create on PostgreSQL."""
    return set(re.findall(r"^CREATE FUNCTION (\w+)\(", definitions("postgresql"), re.MULTILINE))


def table_name(url: str, base: str, schema: str = "ordering") -> str:
    """The name to use in raw SQL for one of the store's tables, at whatever revision
    the database is (``ordering_`` prefix or not, schema-qualified on PostgreSQL)."""
    present = objects(url, schema)
    for name in (base, f"ordering_{base}"):
        if name in present:
            return f"{schema}.{name}" if is_postgres(url) else name
    raise AssertionError(f"no table {base} in {sorted(present)}")


# -- up, down, up ------------------------------------------------------------------


def test_revisions_form_one_line_ending_at_the_code_revision() -> None:
    found = revisions()
    assert found[0] == "0001"
    assert found == sorted(found)
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [found[-1]]
    assert found[-1] == head_revision() == CODE_REVISION


def test_upgrade_empty_database_to_head(empty_url: str) -> None:
    assert run(current_revision(empty_url)) is None
    upgrade(empty_url)
    assert run(current_revision(empty_url)) == head_revision()
    assert objects(empty_url) == expected_objects(empty_url)
    if is_postgres(empty_url):
        assert pg_functions(empty_url) == defined_functions()
        # nothing of ours outside the schema
        assert objects(empty_url, "public") == {}


def test_downgrade_to_base_then_upgrade_again(empty_url: str) -> None:
    postgres = is_postgres(empty_url)
    upgrade(empty_url)
    functions = pg_functions(empty_url) if postgres else set()
    downgrade(empty_url, "base")
    assert run(current_revision(empty_url)) is None
    assert objects(empty_url) == {}
    if postgres:
        assert pg_functions(empty_url) == set()
    upgrade(empty_url)
    assert run(current_revision(empty_url)) == head_revision()
    assert objects(empty_url) == expected_objects(empty_url)
    if postgres:
        assert pg_functions(empty_url) == functions


def test_downgrading_the_audit_views_keeps_the_tables(empty_url: str) -> None:
    upgrade(empty_url, "0002")
    downgrade(empty_url, "0001")
    tables = objects(empty_url)
    assert tables == {f"ordering_{t}": "table" for t in TABLES}


def test_downgrade_from_head_to_0002_restores_its_layout(empty_url: str) -> None:
    """0003's downgrade leaves what 0002 made: prefixed names, the old functions."""
    upgrade(empty_url, "0002")
    at_0002 = objects(empty_url)
    functions = pg_functions(empty_url) if is_postgres(empty_url) else set()
    upgrade(empty_url)
    downgrade(empty_url, "0002")
    assert run(current_revision(empty_url)) == "0002"
    assert objects(empty_url) == at_0002
    if is_postgres(empty_url):
        assert pg_functions(empty_url) == functions


# -- data survives every step, up and down ------------------------------------------


def _ids(revision: str) -> dict[str, UUID]:
    """Fixed ids per revision: one seen, one leased, one follower and its leader."""
    n = int(revision) * 8
    return {
        "seen": UUID(int=n + 1),
        "leased": UUID(int=n + 2),
        "follower": UUID(int=n + 3),
        "leader": UUID(int=n + 4),
    }


def _scope(revision: str) -> str:
    return f"seed-{revision}"


def _clock() -> MutableClock:
    return MutableClock(SEEN_AT)


def _follower(revision: str) -> Any:
    ids = _ids(revision)
    return make_event(
        _clock(),
        name=f"seeded.at.{revision}",
        id=ids["follower"],
        follows=ids["leader"],
        occurred=SEEN_AT - timedelta(seconds=1),
    )


def _encode(url: str, value: Any) -> Any:
    """A value as the store keeps it: SQLite holds ids as 32 hex digits and times as
    UTC text; PostgreSQL takes them as they are."""
    if is_postgres(url):
        return value
    if isinstance(value, UUID):
        return value.hex
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def _decode(column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in ID_COLUMNS and isinstance(value, str):
        return UUID(value)
    if column in TIME_COLUMNS and isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    if column in TIME_COLUMNS and isinstance(value, datetime):
        return value.astimezone(UTC)
    if column == "event" and isinstance(value, str):
        return json.loads(value)
    return value


async def _seed_raw(url: str, revision: str, names: dict[str, str]) -> None:
    """One row in every table, in plain SQL (the store refuses a database this old)."""
    ids, scope = _ids(revision), _scope(revision)
    follower = _follower(revision)

    def e(value: Any) -> Any:
        return _encode(url, value)

    await sql(
        url,
        f"INSERT INTO {names['seen_events']} (scope, event_id, seen_at) "
        "VALUES (:scope, :seen, :at)",
        scope=scope,
        seen=e(ids["seen"]),
        at=e(SEEN_AT),
    )
    await sql(
        url,
        f"INSERT INTO {names['processing_leases']} "
        "(scope, event_id, owner, acquired_at, expires_at) "
        "VALUES (:scope, :leased, :owner, :at, :until)",
        scope=scope,
        leased=e(ids["leased"]),
        owner=f"seeder-{revision}",
        at=e(SEEN_AT),
        until=e(SEEN_AT + timedelta(minutes=1)),
    )
    await sql(
        url,
        f"INSERT INTO {names['waiting_followers']} "
        "(scope, follower_id, leader_id, occurred, received, event) "
        "VALUES (:scope, :follower, :leader, :occurred, :received, :event)",
        scope=scope,
        follower=e(ids["follower"]),
        leader=e(ids["leader"]),
        occurred=e(follower.occurred),
        received=e(follower.received),
        event=follower.model_dump_json(),
    )


async def _seed_api(url: str, revision: str) -> None:
    """The same rows, written by the public API."""
    ids = _ids(revision)
    ordering = CausalOrdering(_scope(revision), url=url, clock=_clock())
    await ordering.record_event_as_seen(make_event(_clock(), id=ids["seen"]))
    assert await ordering.record_event_as_processing(make_event(_clock(), id=ids["leased"]))
    await ordering.record_follower(_follower(revision))


async def _read(url: str, revision: str, names: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Every row of ``revision``'s scope, decoded, table by table."""
    found: dict[str, list[dict[str, Any]]] = {}
    async with _connect(url) as connection:
        for base in TABLES:
            result = await connection.execute(
                text(f"SELECT * FROM {names[base]} WHERE scope = :scope ORDER BY 2"),
                {"scope": _scope(revision)},
            )
            found[base] = [
                {column: _decode(column, value) for column, value in row._mapping.items()}
                for row in result
            ]
    return found


def _names(url: str) -> dict[str, str]:
    return {base: table_name(url, base) for base in TABLES}


def seed(url: str, revision: str) -> dict[str, list[dict[str, Any]]]:
    """Write ``revision``'s rows (through the API where this code runs on the
    database, else in plain SQL) and return them as read back."""
    names = _names(url)
    if revision >= CODE_REVISION:
        run(_seed_api(url, revision))
    else:
        run(_seed_raw(url, revision, names))
    rows = run(_read(url, revision, names))
    ids = _ids(revision)
    assert [r["event_id"] for r in rows["seen_events"]] == [ids["seen"]]
    assert [r["event_id"] for r in rows["processing_leases"]] == [ids["leased"]]
    assert [(r["follower_id"], r["leader_id"]) for r in rows["waiting_followers"]] == [
        (ids["follower"], ids["leader"])
    ]
    assert rows["waiting_followers"][0]["event"]["event"] == f"seeded.at.{revision}"
    return rows


def unchanged(
    url: str,
    seeded: dict[str, dict[str, list[dict[str, Any]]]],
    when: str,
    columns: dict[str, set[str]] | None = None,
) -> None:
    """Every row seeded so far is still there, each column it had as it was (columns a
    later revision added, or that stepping down below their revision dropped, are not
    compared; nor, given ``columns``, any column of a table but those)."""
    names = _names(url)
    for revision, before in seeded.items():
        now = run(_read(url, revision, names))
        for base, rows in before.items():
            if not rows or not now[base]:
                assert now[base] == rows, f"{base} rows seeded at {revision} changed {when}"
                continue
            shared = [
                c for c in rows[0] if c in now[base][0] and (columns is None or c in columns[base])
            ]
            kept = [{c: row[c] for c in shared} for row in now[base]]
            expected = [{c: row[c] for c in shared} for row in rows]
            assert kept == expected, f"{base} rows seeded at {revision} changed {when}"


def test_every_revision_up_and_down_keeps_the_data(empty_url: str) -> None:
    """Seed rows at each revision on the way up, then step down to the first revision
    and up again, and find every row seeded so far unchanged at every step."""
    steps = revisions()
    seeded: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for revision in steps:
        upgrade(empty_url, revision)
        unchanged(empty_url, seeded, f"on the way up to {revision}")
        seeded[revision] = seed(empty_url, revision)
    for revision in reversed(steps[:-1]):
        downgrade(empty_url, revision)
        assert run(current_revision(empty_url)) == revision
        unchanged(empty_url, seeded, f"on the way down to {revision}")
    # A column a later revision added lost its values when stepping down dropped it.
    bottom = run(_read(empty_url, steps[0], _names(empty_url)))
    kept_columns = {base: set(rows[0]) for base, rows in bottom.items()}
    upgrade(empty_url)
    unchanged(empty_url, seeded, "on the way up again", kept_columns)

    waiting = table_name(empty_url, "waiting")
    names = run(sql(empty_url, f"SELECT event_name FROM {waiting}"))
    assert {row[0] for row in names} == {f"seeded.at.{r}" for r in steps}

    async def through_the_api() -> None:
        for revision in steps:
            ids = _ids(revision)
            ordering = CausalOrdering(_scope(revision), url=empty_url, clock=_clock())
            assert await ordering.event_has_been_seen(ids["seen"]), revision
            assert await ordering.event_has_started_processing(ids["leased"]), revision
            leader = make_event(_clock(), id=ids["leader"])
            followers = await ordering.get_followers(leader)
            assert [f.id for f in followers] == [ids["follower"]], revision

    run(through_the_api())


# -- the host's objects are not ours -------------------------------------------------


def _host_setup(url: str) -> list[str]:
    if is_postgres(url):
        # Also objects named as ours are inside our schema: they are the host's.
        return [
            "CREATE TABLE public.host_things (id integer PRIMARY KEY, name text NOT NULL)",
            "INSERT INTO public.host_things VALUES (1, 'kept')",
            "CREATE TABLE public.seen_events (id integer PRIMARY KEY)",
            "INSERT INTO public.seen_events VALUES (7)",
            "CREATE VIEW public.waiting AS SELECT name FROM public.host_things",
        ]
    return [
        "CREATE TABLE host_things (id integer PRIMARY KEY, name text NOT NULL)",
        "INSERT INTO host_things VALUES (1, 'kept')",
    ]


async def _host_state(url: str) -> list[Any]:
    if is_postgres(url):
        catalog = await sql(
            url,
            """
            SELECT c.relname::text, c.relkind::text, a.attname::text,
                   format_type(a.atttypid, a.atttypmod)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
            WHERE n.nspname = 'public' ORDER BY 1, 3
            """,
        )
        things = await sql(url, "SELECT * FROM public.host_things")
        seen = await sql(url, "SELECT * FROM public.seen_events")
        view = await sql(url, "SELECT * FROM public.waiting")
        return [catalog, things, seen, view]
    catalog = await sql(url, "SELECT type, name, sql FROM sqlite_master WHERE name LIKE 'host%'")
    things = await sql(url, "SELECT * FROM host_things")
    return [catalog, things]


def test_migrations_leave_the_hosts_objects_alone(empty_url: str) -> None:
    run(sql(empty_url, *_host_setup(empty_url)))
    before = run(_host_state(empty_url))
    assert before[1] == [(1, "kept")]
    upgrade(empty_url)
    assert run(_host_state(empty_url)) == before
    downgrade(empty_url, "base")
    assert run(_host_state(empty_url)) == before
    upgrade(empty_url)
    assert run(_host_state(empty_url)) == before


# -- a database laid out by the first release (PostgreSQL) ----------------------------


@pytest.fixture
def postgres_empty_url() -> Iterator[str]:
    url = fresh_postgres_database("ordering_empty")
    yield url
    drop_postgres_database(url)


FIRST_RELEASE_FUNCTIONS = (
    "ordering_begin_event",
    "ordering_complete_event",
    "ordering_park_follower",
)


def first_release_database(url: str) -> None:
    """The layout the first release left: revision 0002 with every object in public,
    prefixed ``ordering_``, and alembic's table ``public.ordering_alembic_version``.

    Built by running the migrations to 0002 (into our schema, as the environment now
    always does) and moving each object back where the first release had it."""
    upgrade(url, "0002")
    statements = [
        *(f"ALTER TABLE ordering.ordering_{t} SET SCHEMA public" for t in TABLES),
        *(f"ALTER VIEW ordering.ordering_{v} SET SCHEMA public" for v in VIEWS),
        """
        DO $$
        DECLARE f regprocedure;
        BEGIN
            FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
                     JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = 'ordering'
            LOOP
                EXECUTE format('ALTER FUNCTION %s SET SCHEMA public', f);
            END LOOP;
        END
        $$
        """,
        "ALTER TABLE ordering.alembic_version RENAME TO ordering_alembic_version",
        "ALTER TABLE ordering.ordering_alembic_version "
        "RENAME CONSTRAINT alembic_version_pkc TO ordering_alembic_version_pkc",
        "ALTER TABLE ordering.ordering_alembic_version SET SCHEMA public",
        "DROP SCHEMA ordering",
    ]
    run(sql(url, *statements))
    ours = {n: k for n, k in objects(url, "public").items() if n.startswith("ordering_")}
    assert ours == {
        **{f"ordering_{t}": "table" for t in TABLES},
        **{f"ordering_{v}": "view" for v in VIEWS},
        "ordering_alembic_version": "table",
    }
    assert pg_functions(url, "public") >= set(FIRST_RELEASE_FUNCTIONS)


def _legacy_names() -> dict[str, str]:
    return {base: f"public.ordering_{base}" for base in TABLES}


def test_a_first_release_database_is_moved_into_the_schema(postgres_empty_url: str) -> None:
    url = postgres_empty_url
    run(sql(url, *_host_setup(url)))
    host = run(_host_state(url))
    first_release_database(url)
    run(_seed_raw(url, "0002", _legacy_names()))
    seeded = run(_read(url, "0002", _legacy_names()))
    assert run(current_revision(url)) == "0002"
    with pytest.raises(SchemaError, match="`ordering migrate"):
        run(CausalOrdering("x", url=url).event_has_been_seen(uuid4()))

    done = subprocess.run(
        [sys.executable, "-m", "ordering", "migrate", "--url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"is at revision {head_revision()}" in done.stdout

    assert run(current_revision(url)) == head_revision()
    assert objects(url) == expected_objects(url)
    # nothing of ours left in public, the host's objects as they were
    assert not [name for name in objects(url, "public") if name.startswith("ordering_")]
    assert not pg_functions(url, "public") & set(FIRST_RELEASE_FUNCTIONS)
    assert run(_host_state(url)) == host
    unchanged(url, {"0002": seeded}, "moving into the schema")  # later columns aside

    async def through_the_api() -> None:
        ids = _ids("0002")
        ordering = CausalOrdering(_scope("0002"), url=url, clock=_clock())
        assert await ordering.event_has_been_seen(ids["seen"])
        followers = await ordering.get_followers(make_event(_clock(), id=ids["leader"]))
        assert [f.id for f in followers] == [ids["follower"]]

    run(through_the_api())


def test_moving_a_first_release_database_leaves_host_tables_named_ordering_(
    postgres_empty_url: str,
) -> None:
    """A host table that merely starts with ``ordering_`` (an application's own
    ordering_customers, say) is not one of the first release's objects."""
    url = postgres_empty_url
    first_release_database(url)
    run(
        sql(
            url,
            "CREATE TABLE public.ordering_customers (id integer PRIMARY KEY)",
            "INSERT INTO public.ordering_customers VALUES (1)",
        )
    )
    upgrade(url)
    assert "ordering_customers" in objects(url, "public")
    assert run(sql(url, "SELECT id FROM public.ordering_customers")) == [(1,)]


# -- a schema of another name ----------------------------------------------------------


def test_a_configured_schema_holds_everything(empty_url: str) -> None:
    upgrade(empty_url, schema=ALT_SCHEMA)
    assert run(current_revision(empty_url, schema=ALT_SCHEMA)) == head_revision()
    if is_postgres(empty_url):
        assert objects(empty_url, ALT_SCHEMA) == expected_objects(empty_url)
        assert run(sql(empty_url, "SELECT to_regnamespace('ordering')")) == [(None,)]
        assert run(current_revision(empty_url)) is None
        with pytest.raises(SchemaError, match="has no ordering schema"):
            run(CausalOrdering("alt", url=empty_url).event_has_been_seen(uuid4()))

    async def use() -> None:
        ordering = CausalOrdering("alt", url=empty_url, schema=ALT_SCHEMA, clock=_clock())
        event = make_event(_clock())
        assert not await ordering.event_has_been_seen(event)
        await ordering.record_event_as_seen(event)
        assert await ordering.event_has_been_seen(event)

    run(use())
    if is_postgres(empty_url):
        rows = run(sql(empty_url, f"SELECT count(*) FROM {ALT_SCHEMA}.seen_events"))
        assert rows == [(1,)]
    downgrade(empty_url, "base", schema=ALT_SCHEMA)
    assert run(current_revision(empty_url, schema=ALT_SCHEMA)) is None
    assert objects(empty_url, ALT_SCHEMA) == {}


# -- the store checks the revision it runs on ------------------------------------------


async def _use_store(url: str) -> None:
    ordering = CausalOrdering("migrations-test", url=url, clock=_clock())
    await ordering.record_event_as_seen(make_event(_clock()))


def _version_tables(url: str) -> tuple[str, str]:
    if is_postgres(url):
        return "ordering.alembic_version", "ordering.code_compatibility"
    return "ordering_alembic_version", "ordering_code_compatibility"


def test_store_on_an_empty_database_names_ordering_migrate(empty_url: str) -> None:
    with pytest.raises(SchemaError, match="has no ordering schema") as error:
        run(_use_store(empty_url))
    assert "`ordering migrate" in str(error.value)


def test_store_on_a_database_behind_names_ordering_migrate(empty_url: str) -> None:
    upgrade(empty_url, "0002")
    with pytest.raises(SchemaError, match="`ordering migrate"):
        run(_use_store(empty_url))
    upgrade(empty_url)
    run(_use_store(empty_url))  # at head: no error


def test_store_on_a_database_behind_names_its_revision(empty_url: str) -> None:
    upgrade(empty_url, "0002")
    with pytest.raises(SchemaError, match="is at revision 0002"):
        run(_use_store(empty_url))


def _from_the_future(url: str, oldest_served: str) -> None:
    versions, compatibility = _version_tables(url)
    run(
        sql(
            url,
            f"UPDATE {versions} SET version_num = :newer",
            f"UPDATE {compatibility} SET oldest_code_revision = :oldest",
            newer=newer_revision(),
            oldest=oldest_served,
        )
    )


def test_store_on_a_newer_incompatible_database_says_upgrade_the_package(
    empty_url: str,
) -> None:
    upgrade(empty_url)
    _from_the_future(empty_url, newer_revision())
    with pytest.raises(SchemaError, match="upgrade this package") as error:
        run(_use_store(empty_url))
    assert f"is at revision {newer_revision()}" in str(error.value)
    assert "ordering migrate" not in str(error.value)


def test_store_on_a_newer_compatible_database_works(empty_url: str) -> None:
    upgrade(empty_url)
    _from_the_future(empty_url, CODE_REVISION)
    run(_use_store(empty_url))


# -- offline SQL for a DBA ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "sqlite+aiosqlite:///unused.db",
            [
                "CREATE TABLE ordering_seen_events",
                "CREATE TABLE ordering_code_compatibility",
                "CREATE VIEW ordering_waiting AS",
                "CREATE VIEW ordering_stuck AS",
                "CREATE VIEW ordering_held_leases AS",
                "json_extract(f.event, '$.event')",
                "INSERT INTO ordering_code_compatibility (oldest_code_revision) VALUES ('0003')",
                f"UPDATE ordering_alembic_version SET version_num='{CODE_REVISION}'",
            ],
        ),
        (
            "postgresql+asyncpg://dba@db.invalid/app",
            [
                'CREATE SCHEMA IF NOT EXISTS "ordering"',
                'SET search_path TO "ordering"',
                "CREATE TABLE ordering.alembic_version",
                "CREATE TABLE code_compatibility",
                "CREATE FUNCTION begin_event_v1(",
                "CREATE FUNCTION complete_event_v1(",
                "CREATE FUNCTION park_follower_v1(",
                "CREATE FUNCTION begin_events_v2(",
                "CREATE FUNCTION complete_events_v2(",
                "CREATE VIEW waiting AS",
                "CREATE VIEW stuck AS",
                "CREATE VIEW held_leases AS",
                "f.event ->> 'event'",
                "INSERT INTO code_compatibility (oldest_code_revision) VALUES ('0003')",
                f"UPDATE ordering.alembic_version SET version_num='{CODE_REVISION}'",
            ],
        ),
    ],
    ids=["sqlite", "postgresql"],
)
def test_offline_sql_renders_in_each_dialect(url: str, expected: list[str]) -> None:
    rendered = upgrade_sql(url)
    missing = [piece for piece in expected if piece not in rendered]
    assert not missing, f"not in the offline SQL: {missing}"


def test_offline_sql_follows_the_configured_schema() -> None:
    rendered = upgrade_sql("postgresql+asyncpg://dba@db.invalid/app", schema=ALT_SCHEMA)
    assert f'CREATE SCHEMA IF NOT EXISTS "{ALT_SCHEMA}"' in rendered
    assert f'SET search_path TO "{ALT_SCHEMA}"' in rendered
    assert f"UPDATE {ALT_SCHEMA}.alembic_version SET version_num='{CODE_REVISION}'" in rendered
    assert '"ordering"' not in rendered


def test_offline_sql_applied_by_hand_gives_a_working_database(empty_url: str) -> None:
    """What a DBA would do with the script: run it as it is, then start workers."""
    script = upgrade_sql(empty_url)
    if is_postgres(empty_url):
        import asyncpg

        async def apply() -> None:
            plain = make_url(empty_url).set(drivername="postgresql")
            connection = await asyncpg.connect(plain.render_as_string(hide_password=False))
            try:
                await connection.execute(script)
            finally:
                await connection.close()

        run(apply())
    else:
        import sqlite3

        path = make_url(empty_url).database
        assert path is not None
        with sqlite3.connect(path) as connection:
            connection.executescript(script)
        connection.close()
    assert run(current_revision(empty_url)) == head_revision()
    assert objects(empty_url) == expected_objects(empty_url)
    run(_use_store(empty_url))
