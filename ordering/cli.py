"""The `ordering` command line: parsing and printing; the database work is in ordering/admin/.

Every command takes ``--url`` (default: $ORDERING_DATABASE_URL, else the embedded
SQLite file).  Errors are one line on stderr and exit status 1; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Collection, Coroutine, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TextIO, TypeVar
from uuid import UUID

from alembic.util import CommandError
from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from . import admin, migrate
from .causal import dispose
from .constants import PRECEDING_EVENT_LOOKBACK, SEEN_EXPIRATION
from .exceptions import OrderingError
from .models import ReceivedEvent, utc_now
from .urls import DEFAULT_URL, URL_ENV, resolve_url, safe_url

Command = Callable[[argparse.Namespace], int]
T = TypeVar("T")

#: Seconds between two refreshes of `ordering status --watch` when none are given.
DEFAULT_WATCH_SECONDS = 2.0

#: Exit status of `ordering check` when this code cannot run on the database, and of
#: any command that fails; argparse uses 2 for a bad command line.
EXIT_FAILURE = 1


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine, then close the pools it opened."""

    async def run() -> T:
        try:
            return await coroutine
        finally:
            await dispose()

    try:
        import uvloop  # the optional extra: a faster event loop when installed
    except ImportError:
        return asyncio.run(run())
    return uvloop.run(run())


# -- argument types -----------------------------------------------------------------


def _aware_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no timezone: add Z or +00:00")
    return moment.astimezone(UTC)


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an event id (a UUID): {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _minutes(text: str) -> timedelta:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, not {text!r}")
    return timedelta(minutes=value)


# -- formatting ---------------------------------------------------------------------


def _age(delta: timedelta) -> str:
    """45s, 3m 05s, 2h 03m, 3d 04h: enough precision to act on."""
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return f"in {_age(-delta)}"
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# Plain columns two spaces apart, no box, no colour but bold headings on a terminal:
# what `grep`, `cut` and a pager read as easily as a person.
def _table(headers: Sequence[str], right: Collection[str] = ()) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False)
    for header in headers:
        table.add_column(header, justify="right" if header in right else "left", no_wrap=True)
    return table


def print_table(table: Table) -> None:
    """Print at the table's natural width, whatever the terminal's: rich would otherwise
    squeeze it to 80 columns when piped, and cut ids short; a line longer than the
    terminal wraps as any long line does.  Trailing padding is dropped."""
    console = Console(markup=False, emoji=False, highlight=False)  # values are never markup
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    console.width = max(console.width, natural)
    with console.capture() as captured:
        console.print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


#: Column groups of `ordering status`, and the columns under each.
STATUS_GROUPS = (
    ("", ("scope",)),
    ("seen events", ("live", "expired")),
    ("leases", ("live", "expired")),
    ("waiting followers", ("unclaimed", "claimed", "claim expired", "past lookback")),
    ("oldest waiting follower", ("age", "waits for leader")),
)
STATUS_TEXT_COLUMNS = frozenset({"scope", "waits for leader"})  # the others are right-aligned


def _status_row(s: admin.ScopeStatus) -> list[str]:
    counts = (
        s.seen_live,
        s.seen_expired,
        s.leases_live,
        s.leases_expired,
        s.waiting_unclaimed,
        s.waiting_claimed,
        s.waiting_claim_expired,
        s.waiting_past_lookback,
    )
    oldest = s.oldest_waiting
    return [
        s.scope,
        *(str(n) for n in counts),
        "-" if oldest is None else _age(oldest.age),
        "-" if oldest is None else str(oldest.leader_id),
    ]


def status_table(scopes: Sequence[admin.ScopeStatus]) -> Table:
    """One row per scope, its columns under group headings.  rich has no cell that spans
    columns, so each group is a table of its own (every scope, the group's columns),
    set side by side in the one row of an outer table whose headings are the groups'.
    Cells never wrap, so the inner tables' rows stay level."""
    rows = [_status_row(s) for s in scopes]
    outer = _table([group for group, _ in STATUS_GROUPS])
    groups = []
    first = 0
    for _, headers in STATUS_GROUPS:
        right = [h for h in headers if h not in STATUS_TEXT_COLUMNS]
        group = _table(headers, right)
        for row in rows:
            group.add_row(*row[first : first + len(headers)])
        first += len(headers)
        groups.append(group)
    outer.add_row(*groups)
    return outer


FOLLOWER_HEADERS = (
    "scope",
    "occurred",
    "event",
    "follower id",
    "waits for leader",
    "waiting",
    "state",
)


def followers_table(followers: Sequence[admin.WaitingFollower], now: datetime) -> Table:
    table = _table(FOLLOWER_HEADERS, right={"waiting"})
    for f in followers:
        state = f.state(now)
        if f.lost:
            state += ", lost (get_lost_followers would hand it out)"
        if f.claimed_by is not None and f.claimed_until is not None:
            state += f" by {f.claimed_by} until {_time(f.claimed_until)}"
        table.add_row(
            f.scope,
            _time(f.occurred),
            f.event_name or "?",
            str(f.follower_id),
            str(f.leader_id),
            _age(now - f.received),
            state,
        )
    return table


#: Moves a progress bar on: ``bar(advance=n)``, or ``bar(completed=n, total=t)``.
Bar = Callable[..., None]


@contextmanager
def progress_bar(
    description: str, total: int | None = None, *, in_bytes: bool = False, show: bool = True
) -> Iterator[Bar | None]:
    """A progress bar on stderr, or None when nobody is watching: stderr is not a terminal
    (piped and logged output stays clean), or ``show`` is false.

    The bar is erased when done, leaving the line to the summary that follows; lines
    printed to stderr meanwhile appear above it.  Redrawn by rich's own thread, ten
    times a second, so a fast loop pays only for counting.
    """
    if not (show and sys.stderr.isatty()):
        yield None
        return
    amount = DownloadColumn(binary_units=True) if in_bytes else MofNCompleteColumn()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        amount,
        TimeRemainingColumn(),
        console=Console(stderr=True, soft_wrap=True),  # a long note above the bar stays one line
        transient=True,
        redirect_stdout=False,  # events and summaries on stdout must stay there
    ) as progress:
        yield partial(progress.update, progress.add_task(description, total=total))


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _note(message: str) -> None:
    print(message, file=sys.stderr)


# -- commands -----------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    url = resolve_url(args.url)
    if args.sql:
        with _naming_the_database(url):
            sys.stdout.write(migrate.upgrade_sql(url, args.revision))
        return 0
    _upgrade(url, args.revision)
    print(
        f"{safe_url(url)} is at revision "
        f"{migrate.head_revision() if args.revision == 'head' else args.revision}"
    )
    return 0


@contextmanager
def _naming_the_database(url: str) -> Iterator[None]:
    """Alembic's and the driver's failures, said with the database they were about."""
    try:
        yield
    except (SQLAlchemyError, OSError, CommandError) as exc:
        raise OrderingError(f"cannot migrate {safe_url(url)}: {describe_error(exc)}") from exc


def _upgrade(url: str, revision: str = "head") -> None:
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite") and parsed.database:
        folder = Path(parsed.database).parent
        if not folder.is_dir():  # SQLite would say only "unable to open database file"
            raise FileNotFoundError(f"no directory {folder} for the SQLite database")
    with _naming_the_database(url):
        migrate.upgrade(url, revision)


def cmd_check(args: argparse.Namespace) -> int:
    state = _run(admin.revision_state(args.url))
    # At the head, or ahead in a rolling deploy and still serving this code: a worker of
    # this release starts, so the gate passes.
    if state.usable:
        print(state.describe())
        return 0
    _note(f"ordering check: {state.describe()}")
    return EXIT_FAILURE


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    url = resolve_url(args.url)
    _upgrade(url)  # the demo's database is the user's scratch store: bring it to head
    return asyncio.run(run_demo(url, seed=args.seed))


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch is not None:
        return _watch_status(args)
    now = args.now or utc_now()
    url = resolve_url(args.url)
    scopes = _run(admin.status(url, scope=args.scope, now=now))
    if args.json:
        _print_json(
            {"url": safe_url(url), "now": now.isoformat(), "scopes": [s.to_json() for s in scopes]}
        )
        return 0
    print(f"ordering status of {safe_url(url)} at {_time(now)} UTC")
    if not scopes:
        print("(no scope holds any rows)")
        return 0
    print()
    print_table(status_table(scopes))
    print(
        f"\nSeen events count as seen for {_minutes_of(SEEN_EXPIRATION)} minutes. Followers "
        f"past the {_minutes_of(PRECEDING_EVENT_LOOKBACK)}-minute lookback, and claims that\n"
        "expired, are what get_lost_followers() hands out next."
    )
    return 0


#: Columns of `ordering status --watch`.
WATCH_HEADERS = (
    "scope",
    "seen/s",
    "pruned/s",
    "leases live",
    "leases expired",
    "waiting",
    "change",
    "oldest waiting",
)
#: Moves the cursor home and clears the screen: each refresh redraws a terminal.
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def _watch_status(args: argparse.Namespace) -> int:
    """Print the status every ``args.watch`` seconds until Ctrl-C, which exits 0."""
    url = resolve_url(args.url)
    if args.json:
        show = partial(_watch_json, safe_url(url))
    else:
        show = partial(_watch_text, safe_url(url), args.watch, sys.stdout.isatty())

    async def watch() -> None:
        async for refresh in admin.watch(url, every=args.watch, scope=args.scope):
            show(refresh)
            sys.stdout.flush()

    with suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
        _run(watch())
    return 0


def _watch_text(url: str, every: float, terminal: bool, refresh: admin.Refresh) -> None:
    """One block a refresh: a terminal is cleared first, a pipe or a log gets the
    blocks one after another, a blank line apart."""
    if terminal:
        sys.stdout.write(CLEAR_SCREEN)
    elif refresh.seconds is not None:
        sys.stdout.write("\n")
    print(
        f"ordering status of {url} at {_time(refresh.now)} UTC, every {every:g} s"
        + (" (Ctrl-C to stop)" if terminal else "")
    )
    if refresh.seconds is not None:
        print(f"rates over the last {refresh.seconds:.1f} s")
    if not refresh.scopes:
        print("(no scope holds any rows)")
        return
    print()
    table = _table(WATCH_HEADERS, right=WATCH_HEADERS[1:])
    for s in refresh.scopes:
        change = refresh.changes.get(s.scope)
        oldest = s.oldest_waiting
        table.add_row(
            s.scope,
            "-" if change is None else f"{change.seen_per_second:.1f}",
            "-" if change is None else f"{change.pruned_per_second:.1f}",
            str(s.leases_live),
            str(s.leases_expired),
            str(s.waiting),
            "-" if change is None else f"{change.waiting:+d}",
            "-" if oldest is None else _age(oldest.age),
        )
    print_table(table)


def _watch_json(url: str, refresh: admin.Refresh) -> None:
    """One JSON object a line: what ``status --json`` prints, and per scope what changed
    since the line before (null on the first)."""
    scopes = []
    for s in refresh.scopes:
        change = refresh.changes.get(s.scope)
        scopes.append(
            {
                **s.to_json(),
                "change": None
                if change is None
                else {
                    "seen_per_second": change.seen_per_second,
                    "pruned_per_second": change.pruned_per_second,
                    "waiting": change.waiting,
                },
            }
        )
    line = {
        "url": url,
        "now": refresh.now.isoformat(),
        "seconds": refresh.seconds,
        "scopes": scopes,
    }
    sys.stdout.write(json.dumps(line) + "\n")


def cmd_followers(args: argparse.Namespace) -> int:
    now = args.now or utc_now()
    followers = _run(
        admin.list_followers(
            args.url,
            scope=args.scope,
            leader=args.leader,
            lost=args.lost,
            now=now,
            limit=args.limit,
        )
    )
    if args.json:
        _print_json([f.to_json(now) for f in followers])
        return 0
    if not followers:
        print("no waiting followers" + (" past the lookback" if args.lost else ""))
        return 0
    print_table(followers_table(followers, now))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    now = args.now or utc_now()
    with progress_bar("pruning") as bar:
        # No callback without a bar: the rows are counted first for it, which costs a query.
        progress = None if bar is None else lambda done, total: bar(completed=done, total=total)
        result = _run(
            admin.prune(
                args.url,
                scope=args.scope,
                now=now,
                seen_expiration=args.seen_expiration,
                batch_size=args.batch_size,
                dry_run=args.dry_run,
                progress=progress,
            )
        )
    verb = "would delete" if result.dry_run else "deleted"
    print(
        f"{verb} {_plural(result.seen_events, 'seen event')} and "
        f"{_plural(result.leases, 'expired lease')}"
        + (f" in scope {args.scope!r}" if args.scope else "")
    )
    return 0


def _numbered_lines(source: BinaryIO, bar: Bar | None = None) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(source, start=1):
        if bar is not None:
            bar(advance=len(raw))
        yield number, raw


def _open_events(path: str) -> tuple[BinaryIO, int]:
    """The events file and its size.  Stdin (``-``) and pipes (``<(zcat events.gz)``)
    are read whole, so that --strict can check them before replaying."""
    file = Path(path)
    if path == "-":
        data = sys.stdin.buffer.read()
    elif file.is_file():
        return file.open("rb"), file.stat().st_size
    elif file.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not an events file")
    elif not file.exists():
        raise FileNotFoundError(f"no such events file: {path}")
    else:
        data = file.read_bytes()
    return io.BytesIO(data), len(data)


def cmd_replay(args: argparse.Namespace) -> int:
    source, total = _open_events(args.events)
    with ExitStack() as stack:
        stack.enter_context(source)
        if args.strict:
            with progress_bar("checking", total, in_bytes=True) as checking:
                problems = admin.check_lines(_numbered_lines(source, checking))
            if problems:
                shown = problems[:20]
                for bad in shown:
                    _note(f"ordering replay: {bad}")
                more = len(problems) - len(shown)
                _note(
                    f"ordering replay: {_plural(len(problems), 'bad line')}"
                    + (f" ({more} more not shown)" if more else "")
                    + "; nothing was replayed (--strict)"
                )
                return EXIT_FAILURE
            source.seek(0)
        _run(
            admin.open_backend(args.url)
        )  # a database that is not ready fails before --out is made
        out: TextIO = (
            stack.enter_context(open(args.out, "w", encoding="utf-8")) if args.out else sys.stdout
        )

        def write(event: ReceivedEvent) -> None:
            # Flushed before the store marks the event seen: an event is never marked
            # handled while its line still sits in a buffer.
            out.write(event.model_dump_json() + "\n")
            out.flush()

        def report_problem(found: admin.LineProblem) -> None:
            _note(f"ordering replay: {found}, skipped")  # above the bar, if one is drawn

        # Not when the events themselves go to the same terminal: the two would mix.
        to_terminal = out is sys.stdout and sys.stdout.isatty()
        bar = stack.enter_context(
            progress_bar("replaying", total, in_bytes=True, show=not to_terminal)
        )
        report = _run(
            admin.replay(
                _numbered_lines(source, bar),
                write,
                url=args.url,
                scope=args.scope,
                flush_lost=args.flush_lost,
                on_problem=report_problem,
            )
        )
    _note(_replay_summary(report, args.flush_lost))
    return 0


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def _replay_summary(report: admin.ReplayReport, flushed: bool) -> str:
    parts = [
        f"{report.written} written in causal order",
        f"{report.parked} parked on arrival to wait for their leader",
    ]
    if report.already_seen:
        parts.append(f"{report.already_seen} already seen (skipped)")
    if report.bad:
        parts.append(f"{_plural(report.bad, 'bad line')} skipped")
    if report.busy:
        parts.append(f"{report.busy} held by another worker (skipped)")
    if flushed:
        parts.append(f"{_plural(report.flushed, 'lost follower')} flushed")
    summary = f"ordering replay: {_plural(report.lines, 'line')} read; " + ", ".join(parts)
    if report.waiting:
        summary += (
            f"; {_plural(report.waiting, 'follower waits', 'followers wait')} in scope "
            f"{report.scope!r} (a later run with their leaders, or --flush-lost, writes them)"
        )
    return summary


# -- the parser ---------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help=f"database URL (env: {URL_ENV}; default: {DEFAULT_URL})",
    )
    # Also accepted after the command; SUPPRESS keeps `ordering --debug CMD` working.
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and debug logs",
    )


def _add_now(parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup) -> None:
    # For tests and investigations: judge expiry as of this time instead of the wall
    # clock, as an ordering with clock= would.  Documented in the README, not in --help.
    parser.add_argument("--now", type=_aware_time, default=None, help=argparse.SUPPRESS)


class _Parser(argparse.ArgumentParser):
    """Refuses a bad command line in one line, as every other error is, with exit
    status 2; the subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ordering",
        description="A SQL-persisted causal-ordering store for event processing.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "status",
        help="what each scope holds: seen events, leases, waiting followers",
        description="Per scope: seen events and leases (live and expired), waiting followers "
        "(unclaimed, claimed, claim expired, past the lookback) and the oldest waiting "
        "follower's age and the leader it waits for.",
    )
    _add_common(p)
    p.add_argument("--scope", help="only this scope (default: every scope with rows)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON for machines (with --watch, one object a line)",
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--watch",
        nargs="?",
        const=DEFAULT_WATCH_SECONDS,
        type=_seconds,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C, with "
        "the rates since the refresh before: events seen and pruned per second, the change "
        "in waiting followers",
    )
    _add_now(when)
    p.set_defaults(run=cmd_status)

    p = commands.add_parser(
        "followers",
        help="list waiting followers in the order they occurred",
        description="List the events that wait for their leader, in the order they occurred. "
        "Reads only: nothing is handed out or changed.",
    )
    _add_common(p)
    p.add_argument("--scope", help="only this scope (default: every scope)")
    p.add_argument("--leader", type=_uuid, help="only followers of this leader event id")
    p.add_argument(
        "--lost",
        action="store_true",
        help="only those get_lost_followers() would hand out now "
        "(past the 15-minute lookback, or their claim expired)",
    )
    p.add_argument("--limit", type=_positive_int, help="list at most N followers")
    p.add_argument("--json", action="store_true", help="print JSON (with each event) for machines")
    _add_now(p)
    p.set_defaults(run=cmd_followers)

    p = commands.add_parser(
        "prune",
        help="delete expired seen events and leases, in small batches",
        description="Delete seen events past their expiry and expired leases, in batches "
        "that each run as one short transaction, so workers keep going. The store does "
        "this by itself while workers run (every 60 s unless ?prune_interval= says "
        "otherwise); this command is for databases whose workers turned that off, and for "
        "seen events written before schema revision 0006, which carry no expiry. "
        "Waiting followers are never pruned: get_lost_followers() hands them out.",
    )
    _add_common(p)
    p.add_argument("--scope", help="only this scope (default: every scope)")
    p.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=admin.DEFAULT_BATCH_SIZE,
        help=f"rows per batch (default: {admin.DEFAULT_BATCH_SIZE})",
    )
    p.add_argument(
        "--seen-expiration",
        type=_minutes,
        default=SEEN_EXPIRATION,
        metavar="MINUTES",
        help="for seen events without an expiry (written before schema revision 0006): "
        f"keep those younger than this (default: {_minutes_of(SEEN_EXPIRATION)}, "
        "ordering.SEEN_EXPIRATION; give the longest seen_expiration those workers used). "
        "Seen events with an expiry go by it",
    )
    _add_now(p)
    p.set_defaults(run=cmd_prune)

    p = commands.add_parser(
        "replay",
        help="write a JSON-lines file of events in causal order, through the store",
        description="Read events (one JSON ReceivedEvent a line, any order; Prefect's event "
        "JSON works as-is) and write them as JSON lines in causal order. Events that "
        "arrive before their leader wait in the database, so a later run with more lines "
        "continues where this one left off. Each event is judged as of its own 'received' "
        "time. Bad lines are reported with their number and skipped.",
    )
    p.add_argument("events", metavar="EVENTS.jsonl", help="the events file ('-' for stdin)")
    _add_common(p)
    p.add_argument(
        "--scope",
        default=admin.DEFAULT_REPLAY_SCOPE,
        help=f"the scope to replay in; not one live workers use "
        f"(default: {admin.DEFAULT_REPLAY_SCOPE})",
    )
    p.add_argument("--out", metavar="FILE", help="write events to FILE (default: stdout)")
    p.add_argument(
        "--flush-lost",
        action="store_true",
        help="at the end, write the followers whose leader never came "
        "(moves the replay clock past the lookback)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="check every line first; on any bad line, fail without touching the store",
    )
    p.set_defaults(run=cmd_replay)

    p = commands.add_parser("migrate", help="bring the database schema up to date")
    _add_common(p)
    p.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.set_defaults(run=cmd_migrate)

    p = commands.add_parser(
        "check",
        help="exit 0 if this code runs on the schema, 1 if it needs `ordering migrate`",
        description="For CI and deploy scripts: exit 0 when this code runs on the database "
        "schema (it is at this code's revision, or at a later one that still serves it), "
        "else print one line saying what to do (`ordering migrate`, or upgrade this "
        "package) and exit 1. A SQLite file that does not exist is reported, not created.",
    )
    _add_common(p)
    p.set_defaults(run=cmd_check)

    p = commands.add_parser("demo", help="feed a jumbled stream of events through the store")
    _add_common(p)
    p.add_argument("--seed", type=int, default=7, help="random seed for the delivery order")
    p.set_defaults(run=cmd_demo)
    return parser


def _minutes_of(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:g}"


# -- errors -------------------------------------------------------------------------


def describe_error(exc: BaseException) -> str:
    """One line that says what went wrong, without the driver's noise."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        text = f"{type(exc.orig).__name__}: {exc.orig}"
    elif isinstance(exc, (OrderingError, ValueError, OSError, CommandError)):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


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
    except BrokenPipeError:
        # The reader went away (`ordering replay x | head`): stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as exc:
        if args.debug:
            raise
        known = (OrderingError, SQLAlchemyError, OSError, ValueError)
        hint = "" if isinstance(exc, known) else " (--debug shows the traceback)"
        print(f"ordering {args.command}: error: {describe_error(exc)}{hint}", file=sys.stderr)
        return EXIT_FAILURE
