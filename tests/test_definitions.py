"""The migrations and the current definitions (ordering/sql/<dialect>/definitions.sql) build
the same database: one built by running every migration and one built from the
definitions are compared by their catalogs, function bodies and view texts included,
on both dialects.  Structure only: the rows a migration writes (code_compatibility's)
are not compared."""

from __future__ import annotations

import asyncio
import difflib
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from ordering import dispose
from ordering.migrate import upgrade
from ordering.schema import DEFAULT_SCHEMA, SCHEMA_ENV, SQLITE_VERSION_TABLE
from ordering.sql import definitions, queries, statements

from .conftest import drop_postgres_database, fresh_postgres_database

#: One line per fact about the database: "kind | object | detail".
Dump = list[str]


@pytest.fixture(autouse=True)
def _default_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our objects in the default schema, whatever the environment says."""
    monkeypatch.delenv(SCHEMA_ENV, raising=False)


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _migrated(url: str) -> None:
    upgrade(url)
    asyncio.run(dispose())


# -- PostgreSQL -------------------------------------------------------------------------

#: Catalog queries over the schema ``$1``, alembic's table left out; each row becomes
#: one line of the dump.  Column order is compared by rank, not attnum (a dropped
#: column leaves a gap in attnum that a fresh table does not have).  NOT NULL shows in
#: the column lines only: PostgreSQL 18 also lists it as a constraint named after the
#: table it was created in, and the migrations created ours under the first release's
#: names (``ordering_seen_events``) before moving them into the schema.
PG_CATALOG = {
    "relation": """
        SELECT c.relname, c.relkind::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname NOT IN ('alembic_version', 'alembic_version_pkc')
        ORDER BY 1
    """,
    "column": """
        SELECT c.relname,
               rank() OVER (PARTITION BY c.oid ORDER BY a.attnum),
               a.attname, format_type(a.atttypid, a.atttypmod),
               CASE WHEN a.attnotnull THEN 'not null' ELSE 'null' END,
               coalesce(pg_get_expr(d.adbin, d.adrelid), '(no default)')
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = $1 AND c.relkind IN ('r', 'v', 'p')
          AND c.relname <> 'alembic_version' AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2
    """,
    "constraint": """
        SELECT c.relname, k.conname, pg_get_constraintdef(k.oid)
        FROM pg_constraint k
        JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname <> 'alembic_version' AND k.contype <> 'n'
        ORDER BY 1, 2
    """,
    "index": """
        SELECT i.relname, pg_get_indexdef(i.oid)
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname = $1 AND t.relname <> 'alembic_version'
        ORDER BY 1
    """,
    "function": """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = $1 AND p.prokind IN ('f', 'p', 'w')
        ORDER BY 1
    """,
    "view": """
        SELECT c.relname, pg_get_viewdef(c.oid, true)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relkind IN ('v', 'm')
        ORDER BY 1
    """,
    "trigger": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND NOT t.tgisinternal
        ORDER BY 1, 2
    """,
    "type": """
        SELECT t.typname, t.typtype::text
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        LEFT JOIN pg_class c ON c.oid = t.typrelid
        WHERE n.nspname = $1 AND (c.oid IS NULL OR c.relkind = 'c')
          AND t.typname NOT LIKE '\\_%'
        ORDER BY 1
    """,
}


def _lines(kind: str, values: tuple[object, ...]) -> Dump:
    """A catalog row as dump lines; multi-line texts (function bodies, view texts)
    one line each, so that a difference shows as the line that differs.  A function
    body's lines are compared without their indentation, which PL/pgSQL ignores: a
    rule of several lines, written out in place, keeps the indentation it has in
    rules.sql wherever it is called."""
    key, *rest = (str(v) for v in values)
    head = f"{kind} | {key}"
    found: Dump = []
    for value in rest:
        parts = value.splitlines() or [""]
        if len(parts) == 1:
            head += f" | {parts[0]}"
        else:
            found.extend(
                f"{kind} | {key} |     {line.strip() if kind == 'function' else line.rstrip()}"
                for line in parts
            )
    return [head, *found]


async def _pg_dump(url: str, schema_name: str) -> Dump:
    connection = await asyncpg.connect(_dsn(url))
    try:
        dump: Dump = []
        for kind, query in PG_CATALOG.items():
            for row in await connection.fetch(query, schema_name):
                dump.extend(_lines(kind, tuple(row)))
        return dump
    finally:
        await connection.close()


async def _pg_define(url: str, script: str) -> None:
    connection = await asyncpg.connect(_dsn(url))
    try:
        async with connection.transaction():
            await connection.execute(f"CREATE SCHEMA {DEFAULT_SCHEMA}")
            await connection.execute(f"SET LOCAL search_path TO {DEFAULT_SCHEMA}")
            for statement in statements(script):
                await connection.execute(statement)
    finally:
        await connection.close()


# -- SQLite -----------------------------------------------------------------------------


def _normalized(sql: str | None) -> str:
    if sql is None:
        return "(none)"
    sql = re.sub(r"\s+", " ", sql).strip()
    return re.sub(r"\( | (?=[),])", lambda m: m.group(0).strip(), sql)


def _sqlite_dump(path: str) -> Dump:
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master "
            "WHERE tbl_name <> ? ORDER BY type, name",
            (SQLITE_VERSION_TABLE,),
        ).fetchall()
    finally:
        connection.close()
    # each statement split after its commas, so that a difference shows as one clause
    return [
        f"{kind} | {name} | on {table} | {part}"
        for kind, name, table, sql in rows
        for part in re.split(r"(?<=,) ", _normalized(sql))
    ]


def _sqlite_define(path: str, script: str) -> None:
    connection = sqlite3.connect(path)
    try:
        with connection:
            for statement in statements(script):
                connection.execute(statement)
    finally:
        connection.close()


# -- both -------------------------------------------------------------------------------


@pytest.fixture
def second_url(empty_url: str, tmp_path: Path) -> Iterator[str]:
    """Another empty database of the same dialect as ``empty_url``."""
    if not empty_url.startswith("postgresql"):
        yield f"sqlite+aiosqlite:///{tmp_path / 'definitions.db'}"
        return
    url = fresh_postgres_database("ordering_definitions")
    yield url
    drop_postgres_database(url)


def _dialect(url: str) -> str:
    return "postgresql" if url.startswith("postgresql") else "sqlite"


def _dump(url: str) -> Dump:
    if _dialect(url) == "postgresql":
        return asyncio.run(_pg_dump(url, DEFAULT_SCHEMA))
    database = make_url(url).database
    assert database is not None
    return _sqlite_dump(database)


def _define(url: str, script: str) -> None:
    if _dialect(url) == "postgresql":
        asyncio.run(_pg_define(url, script))
        return
    database = make_url(url).database
    assert database is not None
    _sqlite_define(database, script)


def _differences(migrated: Dump, defined: Dump) -> str:
    return "\n".join(
        difflib.unified_diff(
            migrated,
            defined,
            "built by the migrations",
            "built from definitions.sql",
            lineterm="",
            n=2,
        )
    )


def test_migrations_build_what_definitions_sql_defines(empty_url: str, second_url: str) -> None:
    _migrated(empty_url)
    _define(second_url, definitions(_dialect(empty_url)))
    migrated, defined = _dump(empty_url), _dump(second_url)
    assert migrated, "the dump of the migrated database is empty"
    kinds = {line.split(" | ")[0] for line in migrated}
    expected = (
        {"relation", "column", "constraint", "index", "function", "view"}
        if _dialect(empty_url) == "postgresql"
        else {"table", "index", "view"}
    )
    assert expected <= kinds, f"the dump misses {expected - kinds}"
    assert migrated == defined, (
        "the migrations and definitions.sql build different databases:\n"
        + _differences(migrated, defined)
    )


#: A change to the definitions the comparison must notice, by dialect: (what to
#: replace, what with, a word the difference shows).
CHANGES: dict[str, tuple[str, str, str]] = {
    "postgresql": ("RETURN true;", "RETURN false;", "RETURN false;"),
    "sqlite": ("THEN 'claimed'", "THEN 'held'", "'held'"),
}


def test_the_comparison_sees_a_changed_body(empty_url: str, second_url: str) -> None:
    """The comparison is live: one changed line in a function body (PostgreSQL) or a
    view (SQLite) shows up in the difference."""
    old, new, shown = CHANGES[_dialect(empty_url)]
    script = definitions(_dialect(empty_url))
    assert old in script
    _migrated(empty_url)
    _define(second_url, script.replace(old, new, 1))
    differences = _differences(_dump(empty_url), _dump(second_url))
    changed = [line for line in differences.splitlines() if line.startswith("+") and shown in line]
    assert changed, differences


#: The statements of queries.sql that look up one follower, or one leader's followers.
FOLLOWER_QUERIES = ("forget_follower", "followers_of")

#: The index a lookup must use, by the column it looks up.
INDEX_BY_COLUMN = {
    "follower_id": "pk_waiting_followers",
    "leader_id": "ix_waiting_followers_by_leader",
}

#: The types of the record fields the functions' statements read (``claimed.<field>``).
RECORD_FIELDS = {"follower_id": "uuid"}

_LOOKUP = re.compile(r"(?:UPDATE|DELETE FROM) waiting_followers f\b.*?(?=;|\n\s*LOOP\b)", re.S)
_VARIABLE = re.compile(r"\b(p_\w+|claimed\.\w+)\b")


def _function_lookups() -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(statement, parameter types, column looked up) for each update or delete of
    waiting followers in definitions.sql's functions of one event (the batch forms join
    arrays instead), the functions' variables turned into parameters."""
    for definition in statements(definitions("postgresql")):
        head = re.match(r"CREATE FUNCTION (\w+)\((.*?)\) RETURNS", definition, re.S)
        if head is None or "[]" in head.group(2):
            continue
        types = dict(part.split(None, 1) for part in re.split(r",\s*", head.group(2).strip()))
        types |= {f"claimed.{field}": kind for field, kind in RECORD_FIELDS.items()}
        body = definition.split("$$")[1]
        for found in _LOOKUP.finditer(body):
            used: list[str] = []

            def parameter(match: re.Match[str], used: list[str] = used) -> str:
                if match.group(1) not in used:
                    used.append(match.group(1))
                return f"${used.index(match.group(1)) + 1}"

            statement = _VARIABLE.sub(parameter, found.group(0))
            column = re.search(r"f\.(follower_id|leader_id) = ", statement)
            assert column, f"a lookup of waiting followers by neither key: {statement}"
            yield statement, tuple(types[name] for name in used), column.group(1)


def _query_lookups() -> Iterator[tuple[str, tuple[str, ...], str]]:
    for name in FOLLOWER_QUERIES:
        statement = queries("postgresql")[name].sql
        column = re.search(r"\b(follower_id|leader_id) = ", statement)
        assert column, f"{name} looks followers up by neither key: {statement}"
        yield statement, (), column.group(1)


def test_postgresql_follower_lookups_use_their_indexes_without_statistics() -> None:
    """A scope with many waiting followers, on a table never analyzed (a new database,
    or one autovacuum has not reached yet): the generic plans PL/pgSQL caches must
    still find a follower by its key and a leader's followers by the leader, not read
    the whole scope through another index.  The statements are the shipped ones: those
    of queries.sql, and those in definitions.sql's function bodies."""
    lookups = [*_function_lookups(), *_query_lookups()]
    assert {column for _, _, column in lookups} == set(INDEX_BY_COLUMN), lookups
    url = fresh_postgres_database("ordering_plans")
    _migrated(url)

    async def plans() -> list[str]:
        connection = await asyncpg.connect(_dsn(url))
        try:
            await connection.execute(f"SET search_path = {DEFAULT_SCHEMA}")
            await connection.execute(
                "INSERT INTO waiting_followers "
                "(scope, follower_id, leader_id, occurred, received, event) "
                "SELECT 's', gen_random_uuid(), gen_random_uuid(), now(), now(), '{}' "
                "FROM generate_series(1, 2000)"
            )
            await connection.execute("SET plan_cache_mode = force_generic_plan")
            found = []
            for n, (statement, types, _) in enumerate(lookups):
                declared = f"({', '.join(types)})" if types else ""
                await connection.execute(f"PREPARE lookup_{n}{declared} AS {statement}")
                holes = max((int(n) for n in re.findall(r"\$(\d+)", statement)), default=0)
                params = ", ".join("NULL" for _ in range(holes))
                rows = await connection.fetch(
                    f"EXPLAIN EXECUTE lookup_{n}" + (f"({params})" if params else "")
                )
                found.append("\n".join(row[0] for row in rows))
            return found
        finally:
            await connection.close()

    try:
        found = asyncio.run(plans())
    finally:
        drop_postgres_database(url)
    for (statement, _, column), plan in zip(lookups, found, strict=True):
        assert f"using {INDEX_BY_COLUMN[column]}" in plan.lower(), (statement, plan)
