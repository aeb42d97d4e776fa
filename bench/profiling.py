"""Where the Python time of one event goes: ``python -m bench --profile``.

Each workload is run twice on a warm engine: once plain (the honest time per event)
and once under cProfile, whose own time per function is then summed by library
(SQLAlchemy, asyncpg, aiosqlite, pydantic, asyncio, the ordering itself, ...).
cProfile sees only the event loop's thread: time the loop spends waiting in
``epoll`` is time it waits for the database (PostgreSQL) or for aiosqlite's worker
thread (SQLite).  Profiling slows Python down, so the profiled total is larger than
the plain one; compare the shares, and the plain time per event.

Micro-measurements without the profiler complete the picture: what one pool
checkout/return, one ``SELECT 1`` through SQLAlchemy against the bare driver, one
hot-path statement, and pydantic's parse and dump of one event cost.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from ordering import CausalOrdering, ReceivedEvent
from ordering.causal import dispose_engines

from .sql import run_workload, warm_up

RESULTS = Path(__file__).resolve().parent / "results"

#: (category, substring of the file path or built-in's name); first match wins.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("waiting in epoll (DB / thread)", ("select.epoll",)),
    ("sqlalchemy (incl. its greenlet bridge)", ("/sqlalchemy/", "sqlalchemy.", "greenlet")),
    ("asyncpg", ("/asyncpg/", "asyncpg.")),
    ("aiosqlite + sqlite3", ("/aiosqlite/", "sqlite3")),
    ("pydantic", ("/pydantic/", "pydantic_core", "pydantic")),
    ("ordering (the library)", ("/ordering/",)),
    ("bench harness", ("/bench/",)),
    ("socket send/recv syscalls", ("_socket.socket",)),
    ("asyncio", ("/asyncio/", "_asyncio", "select.", "selectors.py", "_contextvars")),
    ("logging", ("/logging/",)),
    ("threading / queue", ("threading.py", "queue.py", "_thread", "_queue")),
    ("contextlib", ("contextlib.py",)),
    ("uuid / datetime", ("uuid.py", "datetime", "UUID")),
]

#: Functions whose time *including callees* per event is worth a line of its own:
#: (label, file path substring, function name).
KEY_FUNCTIONS = [
    ("AsyncConnection.execute (incl. driver)", "sqlalchemy/ext/asyncio/engine.py", "execute"),
    ("AsyncConnection.exec_driver_sql", "sqlalchemy/ext/asyncio/engine.py", "exec_driver_sql"),
    ("AsyncConnection.start (pool checkout)", "sqlalchemy/ext/asyncio/engine.py", "start"),
    ("AsyncConnection.close (pool return)", "sqlalchemy/ext/asyncio/engine.py", "close"),
    (
        "Connection._execute_context (SQLAlchemy core)",
        "sqlalchemy/engine/base.py",
        "_execute_context",
    ),
    ("default.py compile/bind processing", "sqlalchemy/engine/default.py", "_init_compiled"),
    ("pydantic model_validate_json", "pydantic/main.py", "model_validate_json"),
    ("pydantic model_dump_json", "pydantic/main.py", "model_dump_json"),
    ("CausalOrdering._log", "ordering/causal.py", "_log"),
    ("CausalOrdering._keep_alive", "ordering/causal.py", "_keep_alive"),
    ("Store._with_retries", "ordering/store.py", "_with_retries"),
]


def categorize(filename: str, function: str) -> str:
    where = function if filename == "~" else filename
    for category, needles in CATEGORIES:
        if any(needle in where for needle in needles):
            return category
    return "other (stdlib, builtins)"


def breakdown(stats: pstats.Stats, events: int) -> dict[str, float]:
    """Own time per category, in µs per event, largest first."""
    totals: dict[str, float] = defaultdict(float)
    for (filename, _line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        totals[categorize(filename, function)] += row[2]
    return dict(sorted(((k, v / events * 1e6) for k, v in totals.items()), key=lambda kv: -kv[1]))


def key_functions(stats: pstats.Stats, events: int) -> dict[str, float]:
    """Cumulative time per event of the functions in KEY_FUNCTIONS, in µs."""
    found: dict[str, float] = {}
    for (filename, _line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        for label, path, name in KEY_FUNCTIONS:
            if function == name and path in filename:
                found[label] = found.get(label, 0.0) + row[3] / events * 1e6
    return found


def top_functions(stats: pstats.Stats, events: int, count: int = 15) -> list[tuple[str, float]]:
    """The functions with the most own time, µs per event."""
    rows = sorted(
        stats.stats.items(),  # type: ignore[attr-defined]
        key=lambda item: -item[1][2],
    )[:count]
    return [
        (f"{_short(filename)}:{line}({function})", row[2] / events * 1e6)
        for (filename, line, function), row in rows
    ]


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# -- micro-measurements ------------------------------------------------------------


async def _per_call_us(action: Callable[[], Awaitable[Any]], count: int) -> float:
    for _ in range(min(100, count)):
        await action()
    started = time.perf_counter_ns()
    for _ in range(count):
        await action()
    return (time.perf_counter_ns() - started) / count / 1000


async def micro(url: str, count: int = 2000) -> dict[str, float]:
    ordering = CausalOrdering(f"bench-micro-{uuid.uuid4().hex[:8]}", url=url)
    store = ordering.store
    engine = store.engine
    figures: dict[str, float] = {}

    async def checkout() -> None:
        connection = engine.connect()
        await connection.start()
        await connection.close()

    figures["pool checkout + return (AsyncConnection start/close)"] = await _per_call_us(
        checkout, count
    )
    select_one = text("SELECT 1")
    async with engine.connect() as connection:

        async def sa_text() -> None:
            (await connection.execute(select_one)).scalar()

        async def sa_driver_sql() -> None:
            (await connection.exec_driver_sql("SELECT 1")).scalar()

        raw: Any = (await connection.get_raw_connection()).driver_connection
        if engine.dialect.name == "postgresql":

            async def bare() -> None:
                await raw.fetchval("SELECT 1")

            bare_label = "SELECT 1, bare asyncpg fetchval"
        else:

            async def bare() -> None:
                await raw.execute_fetchall("SELECT 1")

            bare_label = "SELECT 1, bare aiosqlite execute_fetchall (1 hop)"
        figures[bare_label] = await _per_call_us(bare, count)
        figures["SELECT 1, SQLAlchemy exec_driver_sql"] = await _per_call_us(sa_driver_sql, count)
        figures["SELECT 1, SQLAlchemy execute(text())"] = await _per_call_us(sa_text, count)
    now = datetime.now(UTC)
    leader = uuid.uuid4()

    async def leader_status() -> None:
        await store.leader_status(ordering.scope, leader, now, now)

    figures["Store.leader_status (checkout + typed statement + return)"] = await _per_call_us(
        leader_status, count
    )
    event = ReceivedEvent(
        occurred=now,
        event="bench.event",
        resource={"prefect.resource.id": "bench.resource"},
        follows=uuid.uuid4(),
        received=now,
    )
    as_json = event.model_dump_json()

    async def parse() -> None:
        ReceivedEvent.model_validate_json(as_json)

    async def dump() -> None:
        event.model_dump_json()

    async def loop_turn() -> None:
        await asyncio.sleep(0)

    figures["pydantic ReceivedEvent.model_validate_json"] = await _per_call_us(parse, count)
    figures["pydantic ReceivedEvent.model_dump_json"] = await _per_call_us(dump, count)
    figures["CausalOrdering(scope) construction"] = await _per_call_us(
        _async(lambda: CausalOrdering("bench-micro", url=url)), count
    )
    figures["asyncio.sleep(0) (one loop turn)"] = await _per_call_us(loop_turn, count)
    return figures


def _async(function: Callable[[], Any]) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        function()

    return call


# -- the report ----------------------------------------------------------------------


async def _profile(
    url: str, dialect: str, workloads: Sequence[str], events: int, seed: int
) -> dict[str, Any]:
    report: dict[str, Any] = {"workloads": {}, "micro_us": {}}
    try:
        await warm_up(url, seed)
        for workload in workloads:
            plain = await run_workload(url, dialect, workload, events, seed)
            profiler = cProfile.Profile()
            profiled = await run_workload(url, dialect, workload, events, seed, profiler=profiler)
            stats = pstats.Stats(profiler)
            RESULTS.mkdir(parents=True, exist_ok=True)
            stats.dump_stats(RESULTS / f"profile-{dialect}-{workload}.pstats")
            report["workloads"][workload] = {
                "plain_us_per_event": plain.us_per_event,
                "profiled_us_per_event": profiled.us_per_event,
                "statements_per_event": plain.statements_per_event,
                "by_category_us": breakdown(stats, profiled.events),
                "key_functions_cumulative_us": key_functions(stats, profiled.events),
                "top_own_time_us": top_functions(stats, profiled.events),
            }
        report["micro_us"] = await micro(url)
    finally:
        await dispose_engines()
    return report


def profile_dialect(
    url: str, dialect: str, workloads: Sequence[str], events: int, seed: int
) -> tuple[str, dict[str, Any]]:
    report = asyncio.run(_profile(url, dialect, workloads, events, seed))
    return render(dialect, report), report


def render(dialect: str, report: dict[str, Any]) -> str:
    workloads = report["workloads"]
    names = list(workloads)
    lines = [f"### profile ({dialect}): µs of Python per event, by library (own time)", ""]
    header = ["where", *names]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for label, key in (
        ("plain run, µs/event", "plain_us_per_event"),
        ("profiled run, µs/event", "profiled_us_per_event"),
        ("statements/event", "statements_per_event"),
    ):
        lines.append(
            f"| {label} | " + " | ".join(f"{workloads[n][key]:,.1f}" for n in names) + " |"
        )
    categories: list[str] = []
    for name in names:
        for category in workloads[name]["by_category_us"]:
            if category not in categories:
                categories.append(category)
    for category in categories:
        cells = [workloads[n]["by_category_us"].get(category, 0.0) for n in names]
        lines.append(f"| {category} | " + " | ".join(f"{c:,.1f}" for c in cells) + " |")
    lines += ["", "Cumulative µs per event (function and its callees, while running):", ""]
    lines.append("| function | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    labels = [label for label, _, _ in KEY_FUNCTIONS]
    for label in labels:
        cells = [workloads[n]["key_functions_cumulative_us"].get(label) for n in names]
        if any(cells):
            lines.append(
                f"| {label} | "
                + " | ".join("-" if c is None else f"{c:,.1f}" for c in cells)
                + " |"
            )
    first = names[0] if names else None
    if first is not None:
        lines += ["", f"Top own time ({first}), µs per event:", ""]
        lines += [f"- {us:7.1f}  {where}" for where, us in workloads[first]["top_own_time_us"]]
    lines += ["", "Micro-measurements (no profiler), µs per call:", ""]
    lines += [f"- {us:8.1f}  {label}" for label, us in report["micro_us"].items()]
    lines.append("")
    return "\n".join(lines)
