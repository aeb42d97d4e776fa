"""The `ordering` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from . import migrate
from .engine import URL_ENV, resolve_url, safe_url
from .exceptions import OrderingError

Command = Callable[[argparse.Namespace], int]


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help=f"database URL (default: ${URL_ENV}, else sqlite+aiosqlite:///ordering.db)",
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    url = resolve_url(args.url)
    if args.sql:
        sys.stdout.write(migrate.upgrade_sql(url, args.revision))
        return 0
    migrate.upgrade(url, args.revision)
    print(
        f"{safe_url(url)} is at revision "
        f"{migrate.head_revision() if args.revision == 'head' else args.revision}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    url = resolve_url(args.url)
    migrate.upgrade(url)  # the demo's database is the user's scratch store: bring it to head
    return asyncio.run(run_demo(url, seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ordering",
        description="A SQL-persisted causal-ordering store for event processing.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("migrate", help="bring the database schema up to date")
    _add_url(p)
    p.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.set_defaults(run=cmd_migrate)

    p = commands.add_parser("demo", help="feed a jumbled stream of events through the store")
    _add_url(p)
    p.add_argument("--seed", type=int, default=7, help="random seed for the delivery order")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    run: Command = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (OrderingError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"ordering {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"ordering {args.command}: error: {type(exc).__name__}: {exc} "
            "(--debug shows the traceback)",
            file=sys.stderr,
        )
        return 1
