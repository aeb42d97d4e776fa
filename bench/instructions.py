"""``python -m bench.instructions``: instructions per event, counted by valgrind.

Wall and CPU time on a shared machine move by 10-30 % between runs; the number of
instructions a process executes hardly moves (callgrind counts them whatever else the
machine does).  For each dialect, workload and number of consumer tasks, this runs the
bench's workload in a fresh process under callgrind twice, at N and at 2N events, and
prints (count at 2N - count at N) / N: start-up, imports and warm-up cancel out.  Only
this process is counted: on PostgreSQL that is the client's share (the server's is in
``python -m bench``'s backend CPU column).  Slow: callgrind runs a process some 50
times slower, so the default N is small.

Needs valgrind on the PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ordering.backends import dispose_backends
from ordering.urls import with_prune_interval

from .databases import admin_url, postgres_database, sqlite_database
from .sql import run_consumers, run_workload, warm_up
from .workloads import WORKLOADS

_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument(
        "--dialect",
        action="append",
        choices=["sqlite", "postgresql"],
        help="repeat for both (default: both)",
    )
    parser.add_argument(
        "--workload",
        action="append",
        choices=WORKLOADS,
        help="repeatable (default: independent)",
    )
    parser.add_argument(
        "--consumers",
        default="1",
        help="consumer tasks sharing independent events, comma-separated (default 1)",
    )
    parser.add_argument("--events", type=int, default=1000, help="N (default 1000)")
    parser.add_argument("--pg-url", default=None, help="as for python -m bench")
    parser.add_argument(
        "--prune-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the store's ?prune_interval= (default: the store's, 60 s; 0: pruning off)",
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def _deliver(url: str, dialect: str, workload: str, consumers: int, events: int) -> None:
    await warm_up(url, seed=1)
    if workload == "independent":
        await run_consumers(url, dialect, consumers, events, seed=2)
    else:
        await run_workload(url, dialect, workload, events, seed=2, count=False)
    await dispose_backends()


def _collected(url: str, dialect: str, workload: str, consumers: int, events: int) -> int:
    """Instructions of one child process delivering ``events`` events."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "bench.instructions",
        "--child",
        url,
        dialect,
        workload,
        str(consumers),
        str(events),
    ]
    # A fixed hash seed: dictionaries then lay out, and so count, the same every run.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the counted run failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


@contextmanager
def _database(dialect: str, pg_url: str | None) -> Iterator[str]:
    if dialect == "sqlite":
        with sqlite_database() as (url, _):
            yield url
    else:
        with postgres_database(admin_url(pg_url)) as url:
            yield url


def _store_url(url: str, prune_interval: float | None) -> str:
    """The database's URL with the prune interval asked for, if any."""
    return url if prune_interval is None else with_prune_interval(url, prune_interval)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.child:
        url, dialect, workload, consumers, events = args.child
        asyncio.run(_deliver(url, dialect, workload, int(consumers), int(events)))
        return 0
    if shutil.which("valgrind") is None:
        print("error: valgrind is not on the PATH", file=sys.stderr)
        return 2
    consumers = [int(c) for c in args.consumers.split(",")]
    n = args.events
    print("| dialect | workload | consumers | instructions per event (this process) |")
    print("|---|---|---:|---:|")
    for dialect in args.dialect or ["sqlite", "postgresql"]:
        for workload in args.workload or ["independent"]:
            for c in consumers if workload == "independent" else [1]:
                with _database(dialect, args.pg_url) as database:
                    url = _store_url(database, args.prune_interval)
                    once = _collected(url, dialect, workload, c, n)
                    twice = _collected(url, dialect, workload, c, 2 * n)
                print(f"| {dialect} | {workload} | {c} | {(twice - once) / n:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
