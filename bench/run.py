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
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ordering import dispose
from ordering.backends import backend_for

from . import profiling, redis_peer, reference, wakeup, workers
from .cpu import cpu_sample
from .databases import (
    DatabaseUnavailable,
    admin_url,
    postgres_database,
    safe_url,
    sqlite_database,
)
from .limits import postgres_limits, sqlite_limits
from .report import markdown, write_json
from .results import BenchResults, DialectResults, Limits, WorkloadResult
from .sql import PER_CALL, measure_construction, run_consumers, run_workload, warm_up
from .workloads import CONSUMER_RUNS, PREFECT_CALLS, WORKLOADS, consumer_label

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


def _consumer_counts(text: str) -> list[int]:
    """``1,4,16,64``; ``0`` (or nothing) for none."""
    try:
        counts = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a comma-separated list of numbers, not {text!r}"
        ) from None
    if any(count < 0 for count in counts):
        raise argparse.ArgumentTypeError(f"consumer counts must not be negative: {text!r}")
    return list(dict.fromkeys(count for count in counts if count > 0))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the SQL causal ordering on SQLite and PostgreSQL.",
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
        "installed), e.g. ~/prefect-venv/bin/python",
    )
    parser.add_argument(
        "--consumers",
        type=_consumer_counts,
        default=[1, 4, 16, 64],
        metavar="C,C,...",
        help="concurrent consumer tasks in one process sharing the events, for ours and the "
        "Redis peer: independent events, the same with Prefect's calls, and jumbled chains "
        "(default 1,4,16,64; 0 skips)",
    )
    parser.add_argument(
        "--redis-url",
        help="Redis for the prefect-redis peer (default $ORDERING_BENCH_REDIS_URL, else "
        f"{redis_peer.DEFAULT_URL}); the run's keys are deleted at the end",
    )
    parser.add_argument(
        "--no-redis",
        action="store_true",
        help="skip the prefect-redis peer even when prefect_redis is importable",
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
    busy = _busy_cores()
    if busy is not None and busy >= 0.25:
        results.notes.append(
            f"before the run, other processes kept {busy:.1f} of {os.cpu_count()} cores busy: "
            "the store, the databases and the peer share the cores, so the ratios are "
            "unreliable (one busy core sped the Redis peer up by 20-60 %)"
        )
    peer = None if args.no_redis else _open_peer(args, results.notes)
    try:
        for dialect in args.dialect:
            _progress(f"{dialect}: starting")
            if dialect == "sqlite":
                with sqlite_database() as (url, directory):
                    results.dialects.append(_bench_dialect(args, dialect, url, directory, peer))
            else:
                with postgres_database(admin_url(args.pg_url)) as url:
                    results.dialects.append(_bench_dialect(args, dialect, url, None, peer))
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


def _open_peer(args: argparse.Namespace, notes: list[str]) -> redis_peer.Peer | None:
    """The prefect-redis peer, checked against its Redis; ``None`` (and a note) if not."""
    url = redis_peer.redis_url(args.redis_url)
    peer, why = redis_peer.open_peer(args.prefect_python, url)
    if peer is None:
        if why:
            notes.append(why)
        return None
    _progress(f"redis peer: prefect-redis on {redis_peer.safe_url(url)}")

    async def check() -> str:
        try:
            return await peer.check()
        finally:
            await peer.finish()

    try:
        server = asyncio.run(check())
    except Exception as exc:
        notes.append(f"the Redis peer is skipped: {redis_peer.safe_url(url)}: {exc!r}")
        return None
    notes.append(
        f"{redis_peer.IMPLEMENTATION}: prefect_redis.ordering.CausalOrdering on "
        f"{redis_peer.safe_url(url)} ({server}), keys under "
        f"{redis_peer.KEY_ROOT}:{peer.run_id}: (deleted at the end)"
    )
    return peer


def _bench_dialect(
    args: argparse.Namespace,
    dialect: str,
    url: str,
    directory: Path | None,
    peer: redis_peer.Peer | None,
) -> DialectResults:
    results = DialectResults(dialect=dialect, url=safe_url(url))
    asyncio.run(_measure(args, results, url, directory, peer))
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
            from . import growth  # imported here: it reaches into the tables directly

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
    args: argparse.Namespace,
    results: DialectResults,
    url: str,
    directory: Path | None,
    peer: redis_peer.Peer | None,
) -> None:
    async def limits() -> Limits:
        if directory is not None:
            return await sqlite_limits(directory, args.limit_samples)
        return await postgres_limits(url, args.limit_samples)

    dialect = results.dialect
    turn = 0

    async def paired(
        label: str, ours: Callable[[], Awaitable[WorkloadResult]], **peer_run: Any
    ) -> WorkloadResult:
        """Ours, and the peer's same measurement right before or after it (in turn),
        so that both see the same moment of a noisy machine."""
        nonlocal turn
        _progress(f"{dialect}: {label}")
        if peer is None:
            return await ours()
        turn += 1

        async def theirs() -> None:
            try:
                row = await peer.run(events=args.events, seed=args.seed, **peer_run)
            except Exception as exc:  # the peer's own failure: say so, measure on
                while isinstance(exc, ExceptionGroup):  # from the consumer tasks
                    exc = exc.exceptions[0]
                event = getattr(exc, "event", None)
                what = (
                    f"event {event.id}"
                    if event is not None and hasattr(event, "id")
                    else (str(exc).strip().splitlines() or [""])[0][:200]
                )
                failure = f"{type(exc).__name__} ({what})"
                results.notes.append(f"prefect-redis FAILED on {label}: {failure}")
                return
            row.dialect = None
            results.peer.append(row)

        if turn % 2:
            await theirs()
            return await ours()
        mine = await ours()
        await theirs()
        return mine

    notes = results.notes
    try:
        before = await limits()
        await warm_up(url, args.seed)
        if peer is not None:
            await peer.warm_up(args.seed)
        for workload in args.workload:
            results.workloads.append(
                await paired(
                    workload,
                    lambda w=workload: run_workload(  # type: ignore[misc]
                        url, dialect, w, args.events, args.seed, notes=notes
                    ),
                    workload=workload,
                )
            )
        if "in-order" in args.workload:
            _progress(f"{dialect}: {PER_CALL}")
            results.workloads.append(
                await run_workload(
                    url, dialect, "in-order", args.events, args.seed, per_call=True, notes=notes
                )
            )
            results.workloads.append(
                await paired(
                    PREFECT_CALLS,
                    lambda: run_workload(
                        url,
                        dialect,
                        "in-order",
                        args.events,
                        args.seed,
                        prefect_calls=True,
                        notes=notes,
                    ),
                    workload="in-order",
                    prefect_calls=True,
                )
            )
        for workload, prefect_calls in CONSUMER_RUNS:
            for consumers in args.consumers:
                results.concurrency.append(
                    await paired(
                        consumer_label(consumers, workload, prefect_calls),
                        lambda c=consumers, w=workload, p=prefect_calls: run_consumers(  # type: ignore[misc]
                            url, dialect, c, args.events, args.seed, w, p
                        ),
                        workload=workload,
                        consumers=consumers,
                        prefect_calls=prefect_calls,
                    )
                )
        if dialect == "postgresql":
            notes.append(await _durability(url))
        results.construction = await measure_construction(url, results.dialect, args.constructions)
        results.limits = Limits.average([before, await limits()])
        for workload in results.workloads + results.concurrency:
            workload.commit_ratio = workload.us_per_event / results.limits.insert_commit_us
        for workload in results.workloads:
            if workload.counting and workload.counting != "n/a" and not workload.statements:
                results.notes.append(
                    f"{workload.workload}: no statement reached the counter "
                    f"({workload.counting}): statements the store sends some other way "
                    "go uncounted, so the counts mean nothing"
                )
    finally:
        try:
            if peer is not None:
                await peer.finish()
        finally:
            await dispose()


async def _durability(url: str) -> str:
    """What the store's PostgreSQL sessions ran with: the default waits for the WAL
    flush on every completion; a URL with ``?synchronous_commit=off`` does not."""
    setting = await backend_for(url).connections.run(
        lambda connection: connection.fetchval("SHOW synchronous_commit")
    )
    if setting == "on":
        return "the store's sessions ran with synchronous_commit=on: completions are durable"
    return (
        f"the store's sessions ran with synchronous_commit={setting} (set in the URL): commits "
        "return before the WAL flush, so these are not the default's figures "
        "(docs/guarantees.md: what a database crash then loses)"
    )


def _busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores other processes kept busy over ``seconds`` (this one sleeps
    meanwhile), from /proc/stat; None where there is none."""
    try:
        before = cpu_sample(())
        time.sleep(seconds)
        spent = cpu_sample(()) - before
    except (OSError, ValueError, IndexError):
        return None
    if spent.busy + spent.idle <= 0:
        return None
    return (1 - spent.idle_share) * (os.cpu_count() or 1)


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
