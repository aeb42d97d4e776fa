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
import sqlite3
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from ordering import CausalOrdering, ReceivedEvent, dispose

from .databases import asyncpg_connect
from .sql import run_workload, warm_up

RESULTS = Path(__file__).resolve().parent / "results"

#: (category, substring of the file path or built-in's name); first match wins.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("waiting in epoll (DB / thread)", ("select.epoll",)),
    ("sqlalchemy (incl. its greenlet bridge)", ("/sqlalchemy/", "sqlalchemy.", "greenlet")),
    ("asyncpg", ("/asyncpg/", "asyncpg.")),
    ("sqlite3 (SQLite itself, C)", ("sqlite3.",)),
    ("aiosqlite", ("/aiosqlite/",)),
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


async def _compare(
    actions: dict[str, Callable[[], Awaitable[Any]]], count: int, rounds: int = 10
) -> dict[str, tuple[float, float]]:
    """(wall µs, CPU µs) per call of each action.  The actions take turns in rounds and
    each gets the median of its rounds, so that a burst of load hits all alike; CPU
    time (this process, all threads) hardly changes with load at all."""
    per_round = max(1, count // rounds)
    for action in actions.values():
        for _ in range(min(50, per_round)):
            await action()
    walls: dict[str, list[float]] = {label: [] for label in actions}
    cpus: dict[str, list[float]] = {label: [] for label in actions}
    for _ in range(rounds):
        for label, action in actions.items():
            cpu = time.process_time()
            started = time.perf_counter()
            for _ in range(per_round):
                await action()
            walls[label].append((time.perf_counter() - started) / per_round * 1e6)
            cpus[label].append((time.process_time() - cpu) / per_round * 1e6)
    return {label: (_median(walls[label]), _median(cpus[label])) for label in actions}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


async def micro(url: str, count: int = 2000) -> dict[str, tuple[float, float]]:
    ordering = CausalOrdering(f"bench-micro-{uuid.uuid4().hex[:8]}", url=url)
    now = datetime.now(UTC)
    leader = uuid.uuid4()
    await ordering.event_has_been_seen(leader)  # version check, connections
    actions: dict[str, Callable[[], Awaitable[Any]]] = {}
    async with AsyncExitStack() as stack:
        # Before the backends the store ran on a SQLAlchemy engine: its costs, then.
        engine = getattr(getattr(ordering, "store", None), "engine", None)
        if isinstance(engine, AsyncEngine):
            await _sqlalchemy_actions(engine, stack, actions)
        elif url.startswith("postgresql"):
            raw = await asyncpg_connect(url)
            stack.push_async_callback(raw.close)

            async def bare_asyncpg() -> None:
                await raw.fetchval("SELECT 1")

            actions["SELECT 1, bare asyncpg fetchval"] = bare_asyncpg
        else:
            database = sqlite3.connect(make_url(url).database or ":memory:")
            stack.callback(database.close)

            async def bare_sqlite() -> None:
                database.execute("SELECT 1").fetchall()

            actions["SELECT 1, bare sqlite3 on the loop's thread"] = bare_sqlite

        async def seen() -> None:
            await ordering.event_has_been_seen(leader)

        actions["CausalOrdering.event_has_been_seen (one hot-path read, whole path)"] = seen
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

        async def construct() -> None:
            CausalOrdering("bench-micro", url=url)

        async def loop_turn() -> None:
            await asyncio.sleep(0)

        actions["pydantic ReceivedEvent.model_validate_json"] = parse
        actions["pydantic ReceivedEvent.model_dump_json"] = dump
        actions["CausalOrdering(scope) construction"] = construct
        actions["asyncio.sleep(0) (one loop turn)"] = loop_turn
        return await _compare(actions, count)


async def _sqlalchemy_actions(
    engine: AsyncEngine, stack: AsyncExitStack, actions: dict[str, Callable[[], Awaitable[Any]]]
) -> None:
    select_one = text("SELECT 1")

    async def checkout() -> None:
        connection = engine.connect()
        await connection.start()
        await connection.close()

    actions["pool checkout + return (AsyncConnection start/close)"] = checkout
    connection = await stack.enter_async_context(engine.connect())

    async def sa_text() -> None:
        (await connection.execute(select_one)).scalar()

    async def sa_driver_sql() -> None:
        (await connection.exec_driver_sql("SELECT 1")).scalar()

    raw: Any = (await connection.get_raw_connection()).driver_connection
    if engine.dialect.name == "postgresql":

        async def bare() -> None:
            await raw.fetchval("SELECT 1")

        actions["SELECT 1, bare asyncpg fetchval"] = bare
    else:

        async def bare() -> None:
            await raw.execute_fetchall("SELECT 1")

        actions["SELECT 1, bare aiosqlite execute_fetchall (1 hop)"] = bare
    actions["SELECT 1, SQLAlchemy exec_driver_sql"] = sa_driver_sql
    actions["SELECT 1, SQLAlchemy execute(text())"] = sa_text


# -- the report ----------------------------------------------------------------------


@contextmanager
def _profile_worker_thread(profiler: cProfile.Profile) -> Iterator[None]:
    """Profile what aiosqlite's worker thread runs for the store (cProfile only sees the
    thread that enables it, and on SQLite the statements run in that other thread)."""
    original: Callable[..., Awaitable[Any]] = aiosqlite.Connection._execute

    async def profiled(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await original(self, profiler.runcall, fn, *args, **kwargs)

    setattr(aiosqlite.Connection, "_execute", profiled)  # noqa: B010
    try:
        yield
    finally:
        setattr(aiosqlite.Connection, "_execute", original)  # noqa: B010


async def _profile(
    url: str, dialect: str, workloads: Sequence[str], events: int, seed: int
) -> dict[str, Any]:
    report: dict[str, Any] = {"workloads": {}, "micro_us": {}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        await warm_up(url, seed)
        for workload in workloads:
            plain = await run_workload(url, dialect, workload, events, seed, count=False)
            profiler = cProfile.Profile()
            worker = cProfile.Profile()
            with _profile_worker_thread(worker) if dialect == "sqlite" else nullcontext():
                profiled = await run_workload(
                    url, dialect, workload, events, seed, profiler=profiler
                )
            stats = pstats.Stats(profiler)
            stats.dump_stats(RESULTS / f"profile-{dialect}-{workload}.pstats")
            entry: dict[str, Any] = {
                "plain_us_per_event": plain.us_per_event,
                "plain_client_cpu_us_per_event": plain.client_cpu_us_per_event,
                "plain_server_cpu_us_per_event": plain.server_cpu_us_per_event,
                "profiled_us_per_event": profiled.us_per_event,
                "statements_per_event": plain.statements_per_event,
                "by_category_us": breakdown(stats, profiled.events),
                "key_functions_cumulative_us": key_functions(stats, profiled.events),
                "top_own_time_us": top_functions(stats, profiled.events),
            }
            # Only while the store ran SQLite on aiosqlite's thread is there anything here.
            if dialect == "sqlite" and worker.getstats():
                thread_stats = pstats.Stats(worker)
                thread_stats.dump_stats(RESULTS / f"profile-{dialect}-{workload}-thread.pstats")
                entry["worker_thread_by_category_us"] = breakdown(thread_stats, profiled.events)
                entry["worker_thread_top_own_time_us"] = top_functions(
                    thread_stats, profiled.events, 10
                )
            report["workloads"][workload] = entry
        report["micro_us"] = await micro(url)
    finally:
        await dispose()
    return report


def profile_dialect(
    url: str, dialect: str, workloads: Sequence[str], events: int, seed: int
) -> tuple[str, dict[str, Any]]:
    report = asyncio.run(_profile(url, dialect, workloads, events, seed))
    return render(dialect, report), report


def _category_rows(workloads: dict[str, Any], names: list[str], key: str) -> list[str]:
    categories: list[str] = []
    for name in names:
        for category in workloads[name].get(key, {}):
            if category not in categories:
                categories.append(category)
    return [
        f"| {category} | "
        + " | ".join(f"{workloads[n].get(key, {}).get(category, 0.0):,.1f}" for n in names)
        + " |"
        for category in categories
    ]


def _cells(values: list[Any], digits: int = 1) -> str:
    return " | ".join("-" if v is None else f"{v:,.{digits}f}" for v in values)


def render(dialect: str, report: dict[str, Any]) -> str:
    workloads = report["workloads"]
    names = list(workloads)
    head = ["| where | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines = [f"### profile ({dialect}): µs per event", "", *head]
    for label, key in (
        ("plain run (no counting hooks): wall", "plain_us_per_event"),
        ("plain run: client CPU (all threads)", "plain_client_cpu_us_per_event"),
        ("plain run: PostgreSQL backend CPU", "plain_server_cpu_us_per_event"),
        ("statements/event", "statements_per_event"),
        ("profiled run: wall", "profiled_us_per_event"),
    ):
        lines.append(f"| {label} | {_cells([workloads[n][key] for n in names])} |")
    lines.append("| **event loop thread, own time by library (profiled)** |" + " |" * len(names))
    lines += _category_rows(workloads, names, "by_category_us")
    if any("worker_thread_by_category_us" in workloads[n] for n in names):
        lines.append("| **aiosqlite worker thread, own time (profiled)** |" + " |" * len(names))
        lines += _category_rows(workloads, names, "worker_thread_by_category_us")
    lines += ["", "Cumulative µs per event (function and its callees, while running):", ""]
    lines += ["| function | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, _, _ in KEY_FUNCTIONS:
        cells = [workloads[n]["key_functions_cumulative_us"].get(label) for n in names]
        if any(cells):
            lines.append(f"| {label} | {_cells(cells)} |")
    if names:
        first = names[0]
        lines += ["", f"Top own time ({first}, event loop thread), µs per event:", ""]
        lines += [f"- {us:7.1f}  {where}" for where, us in workloads[first]["top_own_time_us"]]
        thread_top = workloads[first].get("worker_thread_top_own_time_us")
        if thread_top:
            lines += ["", f"Top own time ({first}, aiosqlite worker thread), µs per event:", ""]
            lines += [f"- {us:7.1f}  {where}" for where, us in thread_top]
    lines += [
        "",
        "Micro-measurements (no profiler; median of 10 interleaved rounds), per call:",
        "",
        "| call | wall µs | client CPU µs |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {label} | {wall:,.1f} | {cpu:,.1f} |"
        for label, (wall, cpu) in report["micro_us"].items()
    ]
    lines.append("")
    return "\n".join(lines)
