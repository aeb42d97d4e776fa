"""The migrations, on SQLite and PostgreSQL, each test on a database of its own (they
downgrade, so the shared session databases are no place for them)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID, uuid4

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, insert, inspect, select, text
from sqlalchemy.engine import Connection

from ordering import CausalOrdering, SchemaError
from ordering.causal import dispose_engines
from ordering.engine import create_engine
from ordering.migrate import (
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    upgrade,
    upgrade_sql,
)
from ordering.schema import SCHEMA_REVISION, VERSION_TABLE, metadata

T = TypeVar("T")

TABLES = {"ordering_seen_events", "ordering_processing_leases", "ordering_waiting_followers"}
VIEWS = {"ordering_waiting", "ordering_stuck", "ordering_held_leases"}


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run async code from these synchronous tests (alembic runs its own event loop)."""

    async def main() -> T:
        try:
            return await coroutine
        finally:
            await dispose_engines()

    return asyncio.run(main())


def revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions("base", "heads")))]


async def _inspect(url: str, look: Any) -> Any:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(lambda sync: look(inspect(sync), sync))
    finally:
        await engine.dispose()


def names(url: str) -> tuple[set[str], set[str]]:
    """The store's tables and views in the database (not alembic's version table)."""

    def look(inspector: Any, _: Connection) -> tuple[set[str], set[str]]:
        tables = {t for t in inspector.get_table_names() if t.startswith("ordering_")}
        views = {v for v in inspector.get_view_names() if v.startswith("ordering_")}
        return tables - {VERSION_TABLE}, views

    result: tuple[set[str], set[str]] = run(_inspect(url, look))
    return result


def pg_functions(url: str) -> set[str]:
    async def read() -> set[str]:
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                rows = await connection.execute(
                    text("SELECT proname FROM pg_proc WHERE proname LIKE 'ordering%'")
                )
                return {row[0] for row in rows}
        finally:
            await engine.dispose()

    return run(read())


# -- up, down, up ------------------------------------------------------------------


def test_revisions_form_one_line_ending_at_the_code_revision() -> None:
    found = revisions()
    assert found[0] == "0001"
    assert len(found) >= 2
    assert found[-1] == head_revision() == SCHEMA_REVISION


def test_upgrade_empty_database_to_head(empty_url: str) -> None:
    assert run(current_revision(empty_url)) is None
    upgrade(empty_url)
    assert run(current_revision(empty_url)) == head_revision()
    assert names(empty_url) == (TABLES, VIEWS)


def test_downgrade_to_base_then_upgrade_again(empty_url: str) -> None:
    postgres = empty_url.startswith("postgresql")
    upgrade(empty_url)
    functions = pg_functions(empty_url) if postgres else set()
    assert functions or not postgres
    downgrade(empty_url, "base")
    assert run(current_revision(empty_url)) is None
    assert names(empty_url) == (set(), set())
    if postgres:
        assert pg_functions(empty_url) == set()
    upgrade(empty_url)
    assert run(current_revision(empty_url)) == head_revision()
    assert names(empty_url) == (TABLES, VIEWS)
    if postgres:
        assert pg_functions(empty_url) == functions


def test_downgrading_the_audit_views_keeps_the_tables(empty_url: str) -> None:
    upgrade(empty_url)
    downgrade(empty_url, "0001")
    assert names(empty_url) == (TABLES, set())


# -- data survives every upgrade ------------------------------------------------------

SEEN_AT = datetime(2026, 11, 28, 11, 0, tzinfo=UTC)


def _seed_values(revision: str) -> dict[str, Any]:
    """A value for the columns of the store's tables, by name.  A new NOT NULL column
    without a server default must be added here, or the seed fails below."""
    follower, leader = _ids(revision)
    return {
        "scope": f"seed-{revision}",
        "event_id": follower,
        "follower_id": follower,
        "leader_id": leader,
        "seen_at": SEEN_AT,
        "owner": f"seeder-{revision}",
        "acquired_at": SEEN_AT,
        "expires_at": SEEN_AT + timedelta(minutes=1),
        "occurred": SEEN_AT - timedelta(seconds=1),
        "received": SEEN_AT,
        "event": {"event": f"seeded.at.{revision}", "id": str(follower)},
        "claimed_by": None,
        "claimed_until": None,
    }


def _ids(revision: str) -> tuple[UUID, UUID]:
    return UUID(int=int(revision) * 2 + 1), UUID(int=int(revision) * 2 + 2)


async def _seed(url: str, revision: str) -> None:
    """One row in every table, with the columns that exist at ``revision``."""
    values = _seed_values(revision)
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            columns: dict[str, list[Any]] = await connection.run_sync(
                lambda sync: {t: inspect(sync).get_columns(t) for t in TABLES}
            )
            for name, present in columns.items():
                table = metadata.tables[name]
                row = {}
                for column in present:
                    if column["name"] not in values:
                        if column["nullable"] or column.get("default") is not None:
                            continue  # the database fills it in
                        pytest.fail(f"the seed does not know column {name}.{column['name']}")
                    if column["name"] not in table.c:
                        pytest.fail(f"{name}.{column['name']} is in the database, not the models")
                    row[column["name"]] = values[column["name"]]
                await connection.execute(insert(table).values(row))
            await connection.commit()
    finally:
        await engine.dispose()


async def _read_seed(url: str, revision: str) -> dict[str, Any]:
    scope = f"seed-{revision}"
    engine = create_engine(url)
    found: dict[str, Any] = {}
    try:
        async with engine.connect() as connection:
            for name in sorted(TABLES):
                table = metadata.tables[name]
                # The columns the seed wrote, not ones a later revision added.
                wanted = [table.c[c] for c in _expected_seed(revision)[name][0]]
                query = select(*wanted).where(table.c.scope == scope)
                found[name] = [row._asdict() for row in await connection.execute(query)]
    finally:
        await engine.dispose()
    return found


def _expected_seed(revision: str) -> dict[str, Any]:
    v = _seed_values(revision)
    pick = {
        "ordering_seen_events": ("scope", "event_id", "seen_at"),
        "ordering_processing_leases": ("scope", "event_id", "owner", "acquired_at", "expires_at"),
        "ordering_waiting_followers": (
            "scope",
            "follower_id",
            "leader_id",
            "occurred",
            "received",
            "event",
            "claimed_by",
            "claimed_until",
        ),
    }
    return {table: [{c: v[c] for c in columns}] for table, columns in pick.items()}


def test_every_revision_upgrades_with_data_present(empty_url: str) -> None:
    """Seed rows at each revision, upgrade one step, and find every row seeded so far
    unchanged."""
    steps = revisions()
    seeded: list[str] = []
    for revision in steps:
        upgrade(empty_url, revision)
        for earlier in seeded:
            assert run(_read_seed(empty_url, earlier)) == _expected_seed(earlier), (
                f"rows seeded at {earlier} changed on the way to {revision}"
            )
        run(_seed(empty_url, revision))
        seeded.append(revision)
    for earlier in seeded:
        assert run(_read_seed(empty_url, earlier)) == _expected_seed(earlier)

    async def waiting_in_view() -> set[str]:
        engine = create_engine(empty_url)
        try:
            async with engine.connect() as connection:
                rows = await connection.execute(text("SELECT event_name FROM ordering_waiting"))
                return {row[0] for row in rows}
        finally:
            await engine.dispose()

    assert run(waiting_in_view()) == {f"seeded.at.{r}" for r in steps}


# -- the models match the migrations -----------------------------------------------


def _ours(name: str | None, type_: str, parent_names: Any) -> bool:
    if type_ == "table":
        return name is not None and name.startswith("ordering_") and name != VERSION_TABLE
    return True


def differences(url: str, target: MetaData = metadata) -> list[Any]:
    """What alembic autogenerate would change to make the database match ``target``."""

    def compare(_: Any, connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "include_name": _ours,
                "version_table": VERSION_TABLE,
                "target_metadata": target,
            },
        )
        return list(compare_metadata(context, target))

    result: list[Any] = run(_inspect(url, compare))
    return result


def test_models_match_head(empty_url: str) -> None:
    upgrade(empty_url)
    # The audit views are in the database, not in the models: autogenerate must not
    # take them for tables to drop (it reflects tables only).
    assert names(empty_url)[1] == VIEWS
    assert differences(empty_url) == []


def test_the_model_comparison_sees_a_difference(empty_url: str) -> None:
    """The comparison above is live: one extra column in the models is reported."""
    upgrade(empty_url)
    changed = MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["ordering_seen_events"].append_column(Column("extra", Integer))
    found = differences(empty_url, changed)
    assert [d[0] for d in found] == ["add_column"]
    assert found[0][3].name == "extra"


# -- a store on a database that is not at head -------------------------------------


async def _use_store(url: str) -> None:
    await CausalOrdering("migrations-test", url=url).event_has_been_seen(uuid4())


def test_store_on_an_empty_database_names_ordering_migrate(empty_url: str) -> None:
    with pytest.raises(SchemaError, match="has no ordering schema") as error:
        run(_use_store(empty_url))
    assert "`ordering migrate" in str(error.value)


def test_store_on_a_database_behind_names_ordering_migrate(empty_url: str) -> None:
    upgrade(empty_url, "0001")
    with pytest.raises(SchemaError, match="is at revision 0001") as error:
        run(_use_store(empty_url))
    assert "`ordering migrate" in str(error.value)
    upgrade(empty_url)
    run(_use_store(empty_url))  # at head: no error


# -- offline SQL for a DBA ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "dialect_sql"),
    [
        ("sqlite+aiosqlite:///unused.db", "json_extract(f.event, '$.event')"),
        ("postgresql+asyncpg://dba@db.invalid/app", "(f.event ->> 'event')"),
    ],
)
def test_offline_sql_creates_the_views_in_each_dialect(url: str, dialect_sql: str) -> None:
    sql = upgrade_sql(url)
    for view in VIEWS:
        assert f"CREATE VIEW {view} AS" in sql
    assert dialect_sql in sql
    assert "UPDATE ordering_alembic_version SET version_num='0002'" in sql
