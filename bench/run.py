"""``python -m bench``: the ordering's speed on SQLite and PostgreSQL, beside the
databases' own limits, as a markdown table on stdout and JSON in a file.

Everything runs in one process per dialect except where processes are the point
(``--workers``, the follower wake-up's leader, the growth run's prune).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import logging
import os
import platform
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ordering.causal import dispose_engines
from ordering.engine import safe_url

from . import growth, profiling, reference, wakeup, workers
from .databases import DatabaseUnavailable, admin_url, postgres_database, sqlite_database
from .limits import postgres_limits, sqlite_limits
from .report import markdown, write_json
from .results import BenchResults, DialectResults, Limits
from .sql import PER_CALL, measure_construction, run_workload, warm_up
from .workloads import WORKLOADS

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
DIALECTS = ("sqlite", "postgresql")
DEFAULT_GROWTH_SIZE = 1_000_000

logger = logging.getLogger("bench")


def _positive(text: str) -> int:
    value = int(text.replace("_", "").replace(",", ""))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return value


def _not_negative(text: str) -> int:
    value = int(text.replace("_", "").replace(",", ""))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text!r}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the SQL causal ordering on SQLite and PostgreSQL (issue 4).",
    )
    parser.add_argument(
        "--dialect",
        action="append",
        choices=DIALECTS,
        help="run only this dialect (repeat for both; default: both)",
    )
    parser.add_argument(
        "--events", type=_positive, default=2000, help="events per workload (default 2000)"
    )
    parser.add_argument(
        "--workload",
        action="append",
        choices=WORKLOADS,
        help="run only this workload (repeatable; default: all three)",
    )
    parser.add_argument(
        "--pg-url",
        help="PostgreSQL server to create a fresh bench database on "
        "(default $ORDERING_TEST_POSTGRES_URL, else postgresql+asyncpg://postgres@127.0.0.1:5432/test)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help="where to write the results as JSON (default bench/results/latest.json)",
    )
    parser.add_argument("--seed", type=int, default=4, help="shuffle seed for 'jumbled'")
    parser.add_argument(
        "--limit-samples",
        type=_positive,
        default=1000,
        help="INSERT+COMMITs and SELECT 1s for the database's own limits (default 1000)",
    )
    parser.add_argument(
        "--constructions",
        type=_positive,
        default=10_000,
        help="CausalOrdering constructions to time (default 10000)",
    )
    parser.add_argument(
        "--size",
        type=_positive,
        nargs="?",
        const=DEFAULT_GROWTH_SIZE,
        help="growth run: preload SIZE seen rows and SIZE/10 waiting followers, rerun "
        "in-order, then prune SIZE expired rows while a worker goes on "
        f"(--size alone: {DEFAULT_GROWTH_SIZE:,}; default: no growth run)",
    )
    parser.add_argument(
        "--workers",
        type=_not_negative,
        default=0,
        help="also run N worker processes on one PostgreSQL database and compare "
        "with one (default 0: skip)",
    )
    parser.add_argument(
        "--wakeup-samples",
        type=_not_negative,
        default=20,
        help="follower wake-up samples per configuration on PostgreSQL (default 20; 0 skips)",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip Prefect's in-memory ordering even when prefect is importable",
    )
    parser.add_argument(
        "--prefect-python",
        metavar="PYTHON",
        help="take the Prefect reference rows from this interpreter (one with prefect "
        "installed), e.g. /work/venv-prefect/bin/python",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the workloads with cProfile and print where the time goes",
    )
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="run this process's event loops on uvloop (when installed; the worker, "
        "wake-up and prune processes keep asyncio's loop)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a smoke run (200 events, 200 limit samples, 5 wake-ups)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.events = min(args.events, 200)
        args.limit_samples = min(args.limit_samples, 200)
        args.wakeup_samples = min(args.wakeup_samples, 5)
        args.constructions = min(args.constructions, 1000)
    args.dialect = list(dict.fromkeys(args.dialect or DIALECTS))
    args.workload = list(dict.fromkeys(args.workload or WORKLOADS))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.uvloop:
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            print("error: --uvloop: uvloop is not installed in this environment", file=sys.stderr)
            return 2
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    results = BenchResults(meta=_meta(args))
    try:
        for dialect in args.dialect:
            _progress(f"{dialect}: starting")
            if dialect == "sqlite":
                with sqlite_database() as (url, directory):
                    results.dialects.append(_bench_dialect(args, dialect, url, directory))
            else:
                with postgres_database(admin_url(args.pg_url)) as url:
                    results.dialects.append(_bench_dialect(args, dialect, url, None))
    except DatabaseUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_reference:
        _progress("reference: Prefect's in-memory ordering")
        if args.prefect_python:
            rows, note = reference.run_elsewhere(
                args.prefect_python, args.workload, args.events, args.seed
            )
        else:
            rows, note = asyncio.run(
                reference.run_prefect_memory(args.workload, args.events, args.seed)
            )
        results.reference = rows
        if note:
            results.notes.append(note)
    print(markdown(results))
    write_json(results, args.json)
    print(f"JSON written to {args.json}")
    return 1 if any(d.failed for d in results.dialects) else 0


def _bench_dialect(
    args: argparse.Namespace, dialect: str, url: str, directory: Path | None
) -> DialectResults:
    results = DialectResults(dialect=dialect, url=safe_url(url))
    asyncio.run(_measure(args, results, url, directory))
    sections: list[tuple[str, Callable[[], None]]] = []
    if dialect == "postgresql" and args.wakeup_samples:

        def measure_wakeup() -> None:
            results.wakeup = wakeup.measure(url, args.wakeup_samples, args.seed)

        sections.append(("follower wake-up latency", measure_wakeup))
    if dialect == "postgresql" and args.workers:

        def measure_workers() -> None:
            results.workers = workers.measure(url, args.workers, args.events, args.seed)

        sections.append((f"1 and {args.workers} worker processes", measure_workers))
    if args.size:

        def measure_growth() -> None:
            empty = next((w.p50_ms for w in results.workloads if w.workload == "in-order"), None)
            results.growth = growth.measure(
                url, dialect, args.size, args.events, args.seed, empty, results.notes
            )

        sections.append((f"growth run with {args.size:,} rows", measure_growth))
    if args.profile:

        def measure_profile() -> None:
            _, results.profile = profiling.profile_dialect(
                url, dialect, args.workload, args.events, args.seed
            )

        sections.append(("profiling", measure_profile))
    for name, section in sections:
        _progress(f"{dialect}: {name}")
        try:
            section()
        except Exception as exc:
            # The other sections' figures are still worth having: report and go on.
            traceback.print_exc()
            results.notes.append(f"FAILED: {name}: {exc!r}")
            results.failed = True
    return results


async def _measure(
    args: argparse.Namespace, results: DialectResults, url: str, directory: Path | None
) -> None:
    async def limits() -> Limits:
        if directory is not None:
            return await sqlite_limits(directory, args.limit_samples)
        return await postgres_limits(url, args.limit_samples)

    try:
        before = await limits()
        await warm_up(url, args.seed)
        for workload in args.workload:
            _progress(f"{results.dialect}: {workload}")
            results.workloads.append(
                await run_workload(url, results.dialect, workload, args.events, args.seed)
            )
        if "in-order" in args.workload:
            _progress(f"{results.dialect}: {PER_CALL}")
            results.workloads.append(
                await run_workload(
                    url, results.dialect, "in-order", args.events, args.seed, per_call=True
                )
            )
        results.construction = await measure_construction(url, results.dialect, args.constructions)
        results.limits = Limits.average([before, await limits()])
        for workload in results.workloads:
            workload.commit_ratio = workload.us_per_event / results.limits.insert_commit_us
            if not workload.statements_per_event:
                results.notes.append(
                    f"{workload.workload}: no statement reached SQLAlchemy's cursor hooks; "
                    "statements run on the driver directly must fire before_cursor_execute "
                    "(when it has listeners) for the counts to mean anything"
                )
    finally:
        await dispose_engines()


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in ("sql-causal-ordering", "sqlalchemy", "asyncpg", "aiosqlite", "pydantic"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "git": _git_revision(),
        "python": platform.python_version(),
        "event_loop": type(asyncio.get_event_loop_policy()).__module__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "versions": versions,
    }


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "ordering", "migrations"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return revision + ("+dirty" if dirty else "")
