"""docs/audit.md against the database: what it says of the tables holds on both dialects."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from ordering.schema import DEFAULT_SCHEMA

from .helpers import run_sql

#: The tables whose keys docs/audit.md documents, in its table of tables.
DOCUMENTED_TABLES = ("seen_events", "processing_leases", "waiting_followers")
AUDIT_DOC = Path(__file__).resolve().parents[1] / "docs" / "audit.md"


def _documented_keys(dialect: str) -> dict[str, list[str]]:
    """Each table's primary key as docs/audit.md gives it for ``dialect``: the cell is
    ``(a, b)``, or ``(a, b) on PostgreSQL, (b, a) on SQLite`` when the dialects differ."""
    name = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}[dialect]
    keys = {}
    for table, cell in re.findall(r"^\| `(\w+)` \| ([^|]+) \|", AUDIT_DOC.read_text(), re.M):
        if table in DOCUMENTED_TABLES:
            columns = {on: key for key, on in re.findall(r"\(([\w, ]+)\)(?: on (\w+))?", cell)}
            chosen = columns.get(name, columns.get(""))
            assert chosen is not None, f"docs/audit.md gives no key of {table} on {name}"
            keys[table] = [column.strip() for column in chosen.split(",")]
    assert sorted(keys) == sorted(DOCUMENTED_TABLES), "docs/audit.md's table of tables changed"
    return keys


async def _primary_keys(url: str) -> dict[str, list[str]]:
    """Each documented table's primary key columns, in order, as the database has it."""
    if url.startswith("sqlite"):
        rows = await run_sql(
            url,
            "SELECT m.name AS tbl, p.name AS col FROM sqlite_master m, pragma_table_info(m.name) p "
            "WHERE m.type = 'table' AND p.pk > 0 ORDER BY m.name, p.pk",
        )
        prefix = "ordering_"
    else:
        rows = await run_sql(
            url,
            "SELECT c.relname AS tbl, a.attname AS col FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN unnest(i.indkey) WITH ORDINALITY k(attnum, rank) ON true "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum "
            "WHERE i.indisprimary AND n.nspname = :schema ORDER BY c.relname, k.rank",
            {"schema": DEFAULT_SCHEMA},
        )
        prefix = ""
    keys: dict[str, list[str]] = {}
    for row in rows:
        keys.setdefault(row["tbl"].removeprefix(prefix), []).append(row["col"])
    return {table: keys.get(table, []) for table in DOCUMENTED_TABLES}


def test_the_audit_docs_give_each_tables_real_primary_key(db_url: str) -> None:
    documented = _documented_keys("sqlite" if db_url.startswith("sqlite") else "postgresql")
    assert asyncio.run(_primary_keys(db_url)) == documented
