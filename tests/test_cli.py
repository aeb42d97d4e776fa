"""The `ordering` command line on SQLite and PostgreSQL: replay, status and check through
the installed console script in a subprocess, the rest through ``main()`` in-process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from ordering import SEEN_EXPIRATION, CausalOrdering, ReceivedEvent, SchemaError, admin, dispose
from ordering.admin import Refresh, ScopeStatus
from ordering.cli import CLEAR_SCREEN, WATCH_HEADERS, _watch_text, build_parser, main
from ordering.migrate import head_revision, upgrade
from ordering.models import utc_now

from .helpers import MutableClock, assert_causal, make_chain, make_event

#: The console script pip installed beside this interpreter.
CONSOLE_SCRIPT = Path(sys.executable).with_name("ordering")

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def ordering_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `ordering` executable, as a user's shell would."""
    assert CONSOLE_SCRIPT.exists(), f"the console script is not installed at {CONSOLE_SCRIPT}"
    base = {k: v for k, v in os.environ.items() if k != "ORDERING_DATABASE_URL"}
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failure is one line on stderr, with no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_events(path: Path, events: list[ReceivedEvent]) -> Path:
    path.write_text("".join(e.model_dump_json() + "\n" for e in events))
    return path


def read_events(text: str) -> list[ReceivedEvent]:
    return [ReceivedEvent.model_validate_json(line) for line in text.splitlines() if line]


def jumbled_chains(seed: int = 3) -> tuple[list[ReceivedEvent], ReceivedEvent]:
    """Three chains of four (followers mostly before leaders) and an orphan whose
    leader never comes."""
    clock = MutableClock(T0)
    events = [e for c in range(3) for e in make_chain(clock, 4, name=f"chain{c}")]
    orphan = make_event(clock, name="orphan", follows=uuid4())
    random.Random(seed).shuffle(events)
    return events, orphan


def status_json(url: str, scope: str, now: datetime, *, console: bool = False) -> dict[str, Any]:
    """``ordering status --json`` for one scope: in-process, or through the console script."""
    argv = ["status", "--url", url, "--scope", scope, "--json", "--now", now.isoformat()]
    if console:
        result = ordering_cli(*argv)
        assert result.returncode == 0, result.stderr
        out = result.stdout
    else:
        capture = io.StringIO()
        with contextlib.redirect_stdout(capture):
            assert main(argv) == 0
        out = capture.getvalue()
    [found] = json.loads(out)["scopes"]
    assert isinstance(found, dict)
    return found


# -- check --------------------------------------------------------------------------


def test_check_exit_codes_for_ci(empty_url: str) -> None:
    empty = one_line_error(ordering_cli("check", "--url", empty_url))
    assert "no ordering schema" in empty or "does not exist" in empty
    assert "`ordering migrate --url" in empty

    head = head_revision()
    upgrade(empty_url, "0001")
    behind = one_line_error(ordering_cli("check", "--url", empty_url))
    assert f"is at revision 0001, behind the code's {head}" in behind
    assert "`ordering migrate --url" in behind

    upgrade(empty_url)
    at_head = ordering_cli("check", env={"ORDERING_DATABASE_URL": empty_url})
    assert at_head.returncode == 0, at_head.stderr
    assert f"is at revision {head}, the head" in at_head.stdout


def test_check_passes_a_newer_schema_only_while_it_serves_this_code(empty_url: str) -> None:
    """A rolling deploy: the database was migrated by the next release first."""
    head = head_revision()
    newer = f"{int(head) + 1:04d}"
    upgrade(empty_url)
    from_the_future(empty_url, newer, oldest_served=head)
    serving = ordering_cli("check", "--url", empty_url)
    assert serving.returncode == 0, serving.stderr
    assert f"is at revision {newer}, ahead of the code's {head}" in serving.stdout
    assert "nothing to do" in serving.stdout

    from_the_future(empty_url, newer, oldest_served=newer)
    stale = one_line_error(ordering_cli("check", "--url", empty_url))
    assert f"is at revision {newer}, which no longer serves this code" in stale
    assert "upgrade this package" in stale and "ordering migrate" not in stale


def from_the_future(url: str, revision: str, *, oldest_served: str) -> None:
    """Mark the database as migrated to a later release's ``revision``."""
    prefix = "ordering." if url.startswith("postgresql") else "ordering_"

    async def mark() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.execute(
                    text(f"UPDATE {prefix}alembic_version SET version_num = :revision"),
                    {"revision": revision},
                )
                await connection.execute(
                    text(f"UPDATE {prefix}code_compatibility SET oldest_code_revision = :oldest"),
                    {"oldest": oldest_served},
                )
        finally:
            await engine.dispose()

    asyncio.run(mark())


def test_check_does_not_create_a_missing_sqlite_file(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    line = one_line_error(ordering_cli("check", "--url", f"sqlite:///{missing}"))
    assert f"{missing} does not exist" in line
    assert not missing.exists()


def test_python_dash_m_runs_the_same_command_line(db_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ordering", "check", "--url", db_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "the head" in result.stdout


# -- replay and status --------------------------------------------------------------


def test_replay_continues_across_runs_and_status_counts_it(
    db_url: str, scope: str, tmp_path: Path
) -> None:
    events, orphan = jumbled_chains()
    first_half, second_half = events[:6], events[6:]
    part1 = write_events(tmp_path / "part1.jsonl", [*first_half, orphan])
    part2 = write_events(tmp_path / "part2.jsonl", second_half)
    try:
        run1 = ordering_cli("replay", str(part1), "--url", db_url, "--scope", scope)
        assert run1.returncode == 0, run1.stderr
        after_run1 = status_json(db_url, scope, T0 + timedelta(minutes=1))
        assert after_run1["waiting"]["unclaimed"] > 1  # parked, waiting for run 2

        run2 = ordering_cli("replay", str(part2), "--url", db_url, "--scope", scope)
        assert run2.returncode == 0, run2.stderr
        written = read_events(run1.stdout) + read_events(run2.stdout)
        assert_causal(written, events)  # all twelve, each after its leader, once

        # Replay time is the events' own: one minute after them, all twelve are live.
        found = status_json(db_url, scope, T0 + timedelta(minutes=1), console=True)
        assert found["seen"] == {"live": 12, "expired": 0}
        assert found["leases"] == {"live": 0, "expired": 0}
        assert found["waiting"] == {
            "unclaimed": 1,
            "claimed": 0,
            "claim_expired": 0,
            "past_lookback": 0,
            "lost": 0,
        }
        assert found["oldest_waiting"]["follower_id"] == str(orphan.id)
        assert found["oldest_waiting"]["leader_id"] == str(orphan.follows)
        assert found["oldest_waiting"]["age_seconds"] == 60.0
        later = status_json(db_url, scope, T0 + SEEN_EXPIRATION + timedelta(minutes=1))
        assert later["seen"] == {"live": 0, "expired": 12}
        assert later["waiting"]["past_lookback"] == 1
        assert "1 follower waits" in run2.stderr
    finally:
        _clear(db_url, scope)


def test_replay_skips_bad_lines_or_fails_strictly_without_touching_the_store(
    db_url: str, scope: str, tmp_path: Path
) -> None:
    clock = MutableClock(T0)
    chain = make_chain(clock, 3)
    naive = json.loads(chain[2].model_dump_json())
    naive["occurred"] = "2026-01-05T09:00:00"
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                chain[1].model_dump_json(),
                "{not json",
                chain[0].model_dump_json(),
                json.dumps({"event": "no.id"}),
                json.dumps(naive),
                "",
            ]
        )
    )
    out = tmp_path / "ordered.jsonl"
    try:
        strict = ordering_cli(
            "replay", str(path), "--url", db_url, "--scope", scope, "--strict", "--out", str(out)
        )
        assert strict.returncode == 1
        assert "Traceback" not in strict.stderr
        assert "line 2: invalid JSON" in strict.stderr
        assert "line 4: missing fields 'id', 'occurred', 'received', 'resource'" in strict.stderr
        assert "line 5: occurred: naive datetime" in strict.stderr
        assert "nothing was replayed (--strict)" in strict.stderr
        assert not out.exists()
        untouched = status_json(db_url, scope, T0)
        assert untouched["seen"]["live"] == untouched["waiting"]["unclaimed"] == 0

        lenient = ordering_cli(
            "replay", str(path), "--url", db_url, "--scope", scope, "--out", str(out)
        )
        assert lenient.returncode == 0, lenient.stderr
        assert lenient.stdout == ""
        for number in (2, 4, 5):
            assert f"line {number}: " in lenient.stderr
        assert "3 bad lines skipped" in lenient.stderr
        assert [e.id for e in read_events(out.read_text())] == [chain[0].id, chain[1].id]
    finally:
        _clear(db_url, scope)


def test_replay_flush_lost_writes_what_still_waits(
    db_url: str, scope: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = MutableClock(T0)
    orphan = make_event(clock, name="orphan", follows=uuid4())
    child = make_event(clock, name="child", follows=orphan.id, occurred=T0 + timedelta(seconds=1))
    path = write_events(tmp_path / "orphans.jsonl", [child, orphan])
    out = tmp_path / "out.jsonl"
    try:
        assert main(["replay", str(path), "--url", db_url, "--scope", scope]) == 0
        assert capsys.readouterr().out == ""  # both wait
        code = main(
            ["replay", "-", "--url", db_url, "--scope", scope, "--flush-lost", "--out", str(out)]
        )
        assert code == 0
        assert "2 lost followers flushed" in capsys.readouterr().err
        assert [e.event for e in read_events(out.read_text())] == ["orphan", "child"]
        found = status_json(db_url, scope, T0)
        assert found["waiting"]["unclaimed"] == 0
    finally:
        _clear(db_url, scope)


@pytest.fixture(autouse=True)
def _empty_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ordering replay -` reads stdin; in-process tests give it nothing."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))


def _clear(url: str, scope: str) -> None:
    async def clear() -> None:
        await CausalOrdering(scope, url=url).clear()
        await dispose()

    asyncio.run(clear())


# -- status, followers and prune, in-process ------------------------------------------


def test_status_after_the_demo(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--url", db_url]) == 0
    capsys.readouterr()
    assert main(["status", "--url", db_url, "--scope", "demo", "--json"]) == 0
    [demo] = json.loads(capsys.readouterr().out)["scopes"]
    assert demo["seen"] == {"live": 12, "expired": 0}
    assert demo["leases"] == {"live": 0, "expired": 0}
    assert demo["waiting"]["unclaimed"] == 1
    assert demo["oldest_waiting"]["event"] == "orphan.step-2"

    assert main(["status", "--url", db_url, "--scope", "demo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    [groups] = [line for line in lines if "seen events" in line]
    [headers] = [line for line in lines if line.startswith("scope ")]
    [row] = [line for line in lines if line.startswith("demo ")]
    assert re.split(r"\s{2,}", headers) == [
        "scope",
        "live",
        "expired",
        "live",
        "expired",
        "unclaimed",
        "claimed",
        "claim expired",
        "past lookback",
        "age",
        "waits for leader",
    ]
    assert row.split()[1:9] == ["12", "0", "0", "0", "1", "0", "0", "0"]
    assert row.split()[-1] == demo["oldest_waiting"]["leader_id"]
    # Each group's heading starts over its first column; numbers end under their header.
    for group, first in [("seen events", "live"), ("waiting followers", "unclaimed")]:
        assert groups.index(group) == headers.index(first)
    assert row.index("12") + 2 == headers.index("live") + 4
    assert all(line == line.rstrip() for line in lines)


def test_followers_lists_filters_and_prints_json(
    db_url: str, scope: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = MutableClock(T0)
    leader = uuid4()
    first = make_event(clock, name="first", follows=leader)
    second = make_event(clock, name="second", follows=leader, occurred=T0 + timedelta(seconds=1))
    other = make_event(clock, name="other", follows=uuid4(), occurred=T0 + timedelta(seconds=2))
    path = write_events(tmp_path / "f.jsonl", [other, second, first])
    try:
        assert main(["replay", str(path), "--url", db_url, "--scope", scope]) == 0
        capsys.readouterr()
        base = ["followers", "--url", db_url, "--scope", scope]

        assert main([*base, "--json", "--now", "2026-01-05T09:01:00Z"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [f["event_name"] for f in listed] == ["first", "second", "other"]
        assert listed[0]["event"]["id"] == str(first.id)
        assert listed[0]["waiting_seconds"] == 60.0

        assert main([*base, "--leader", str(leader), "--json"]) == 0
        assert [f["event_name"] for f in json.loads(capsys.readouterr().out)] == [
            "first",
            "second",
        ]

        assert main([*base, "--lost", "--now", "2026-01-05T09:01:00Z"]) == 0
        assert capsys.readouterr().out.strip() == "no waiting followers past the lookback"
        assert main([*base, "--lost", "--now", "2026-01-05T09:16:00Z"]) == 0
        headers, *rows = capsys.readouterr().out.splitlines()
        assert re.split(r"\s{2,}", headers) == [
            "scope",
            "occurred",
            "event",
            "follower id",
            "waits for leader",
            "waiting",
            "state",
        ]
        assert len(rows) == 3
        assert re.split(r"\s{2,}", rows[0]) == [
            scope,
            "2026-01-05 09:00:00",
            "first",
            str(first.id),
            str(leader),
            "16m 00s",
            "waiting, lost (get_lost_followers would hand it out)",
        ]
        assert all("lost (get_lost_followers would hand it out)" in row for row in rows)
    finally:
        _clear(db_url, scope)


def test_prune_deletes_only_expired_rows(
    db_url: str, scope: str, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = MutableClock(T0)

    async def seed() -> None:
        ordering = CausalOrdering(scope, url=db_url, clock=clock)
        await ordering.record_event_as_seen(make_event(clock))
        await ordering.record_event_as_seen(make_event(clock))
        assert await ordering.record_event_as_processing(make_event(clock))
        clock.advance(SEEN_EXPIRATION)
        await ordering.record_event_as_seen(make_event(clock))
        await dispose()

    asyncio.run(seed())
    now = (T0 + SEEN_EXPIRATION + timedelta(seconds=1)).isoformat()
    base = ["prune", "--url", db_url, "--scope", scope, "--now", now]
    try:
        assert main([*base, "--dry-run"]) == 0
        assert capsys.readouterr().out.strip() == (
            f"would delete 2 seen events and 1 expired lease in scope {scope!r}"
        )
        assert main([*base, "--batch-size", "1"]) == 0
        assert capsys.readouterr().out.strip() == (
            f"deleted 2 seen events and 1 expired lease in scope {scope!r}"
        )
        assert main(["status", "--url", db_url, "--scope", scope, "--json", "--now", now]) == 0
        [found] = json.loads(capsys.readouterr().out)["scopes"]
        assert found["seen"] == {"live": 1, "expired": 0}
        assert found["leases"] == {"live": 0, "expired": 0}
    finally:
        _clear(db_url, scope)


# -- status --watch, a real process -------------------------------------------------

#: Seconds a watch's next line may take: the interpreter starts, connects and queries
#: on a machine that may be busy.
WATCH_PATIENCE = 60.0


class Watch:
    """`ordering status --watch ...` running in a process of its own, its output a pipe."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def line(self) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), WATCH_PATIENCE)
        assert raw, "the watch ended before printing the next line"
        return raw.decode()

    async def interrupt(self) -> tuple[int, str, str]:
        """Ctrl-C: its exit status, and the rest of its stdout and its stderr."""
        self.process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(self.process.communicate(), WATCH_PATIENCE)
        assert self.process.returncode is not None
        return self.process.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def watching(*args: str) -> AsyncIterator[Watch]:
    assert CONSOLE_SCRIPT.exists(), f"the console script is not installed at {CONSOLE_SCRIPT}"
    env = {k: v for k, v in os.environ.items() if k != "ORDERING_DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        str(CONSOLE_SCRIPT),
        "status",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        yield Watch(process)
    finally:
        if process.returncode is None:  # a failed test: leave no process behind
            process.kill()
            await process.wait()


async def test_status_watch_prints_json_lines_with_rates_until_ctrl_c(
    db_url: str, scope: str
) -> None:
    """Rows seen and pruned between two refreshes appear in the rates of the lines
    that follow: summed over those lines, rate times seconds gives the rows."""
    past = MutableClock(utc_now() - 2 * SEEN_EXPIRATION)
    earlier = CausalOrdering(scope, url=db_url, clock=past)
    for _ in range(3):
        await earlier.record_event_as_seen(make_event(past))
    ordering = CausalOrdering(scope, url=db_url)  # the wall clock, as the watch's
    async with watching("--url", db_url, "--scope", scope, "--json", "--watch", "1") as watch:
        first = json.loads(await watch.line())
        [found] = first["scopes"]
        assert first["seconds"] is None and found["change"] is None
        assert found["seen"] == {"live": 0, "expired": 3}
        for _ in range(4):
            await ordering.record_event_as_seen(make_event(utc_now))
        assert (await admin.prune(db_url, scope=scope)).seen_events == 3
        seen = pruned = 0.0
        while found["seen"] != {"live": 4, "expired": 0}:
            line = json.loads(await watch.line())
            [found] = line["scopes"]
            assert line["seconds"] > 0 and line["url"] == first["url"]
            seen += found["change"]["seen_per_second"] * line["seconds"]
            pruned += found["change"]["pruned_per_second"] * line["seconds"]
            assert found["change"]["waiting"] == 0
        code, rest, err = await watch.interrupt()
    assert (round(seen, 6), round(pruned, 6)) == (4, 3)
    assert (code, err) == (0, "")
    assert all(json.loads(line)["scopes"] for line in rest.splitlines())
    await ordering.clear()


async def test_status_watch_piped_prints_one_block_a_refresh_until_ctrl_c(
    db_url: str, scope: str
) -> None:
    ordering = CausalOrdering(scope, url=db_url)
    await ordering.record_event_as_seen(make_event(utc_now))
    async with watching("--url", db_url, "--scope", scope, "--watch", "0.5") as watch:
        lines = [await watch.line() for _ in range(10)]
        code, rest, err = await watch.interrupt()
    assert (code, err) == (0, "")
    assert "\x1b" not in "".join(lines) + rest  # no terminal codes in a pipe or a log
    first, second = lines[:4], lines[4:]
    assert first[0].startswith("ordering status of ") and first[0].endswith("every 0.5 s\n")
    assert re.split(r"\s{2,}", first[2].strip()) == list(WATCH_HEADERS)
    assert first[3].split() == [scope, "-", "-", "0", "0", "0", "-", "-"]
    assert second[0] == "\n"  # blocks a blank line apart
    assert second[1].startswith("ordering status of ")
    assert second[2].startswith("rates over the last ")
    assert second[5].split() == [scope, "0.0", "0.0", "0", "0", "0", "+0", "-"]
    await ordering.clear()


def test_status_watch_on_a_terminal_clears_it_before_each_refresh(
    capsys: pytest.CaptureFixture[str],
) -> None:
    refresh = Refresh(utc_now(), [ScopeStatus("s", seen_live=2)])
    for _ in range(2):
        _watch_text("sqlite+aiosqlite:///x.db", 2.0, True, refresh)
    blocks = capsys.readouterr().out.split(CLEAR_SCREEN)
    assert blocks[0] == "" and len(blocks) == 3
    assert blocks[1] == blocks[2] and blocks[1].startswith("ordering status of ")
    assert "(Ctrl-C to stop)" in blocks[1]


# -- errors and help ----------------------------------------------------------------


def test_errors_are_one_line_and_debug_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    assert main(["status", "--url", missing]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("ordering status: error: ")
    assert "`ordering migrate --url" in err[0]

    assert main(["followers", "--url", "mysql://nope"]) == 1
    assert "unsupported database URL" in capsys.readouterr().err

    assert main(["replay", str(tmp_path / "none.jsonl"), "--url", missing]) == 1
    assert "no such events file" in capsys.readouterr().err
    assert main(["replay", str(tmp_path), "--url", missing]) == 1
    assert f"{tmp_path} is a directory, not an events file" in capsys.readouterr().err

    nowhere = tmp_path / "no-such-dir"
    assert main(["migrate", "--url", f"sqlite:///{nowhere / 'x.db'}"]) == 1
    assert f"error: no directory {nowhere} for the SQLite database" in capsys.readouterr().err
    scratch = f"sqlite:///{tmp_path / 'scratch.db'}"
    assert main(["migrate", "--url", scratch, "--revision", "9999"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "cannot migrate sqlite+aiosqlite:///" in line and "'9999'" in line
    assert "--debug" not in line  # a known failure: no traceback to offer

    events = write_events(tmp_path / "events.jsonl", [make_event(MutableClock(T0))])
    out = tmp_path / "out.jsonl"
    assert main(["replay", str(events), "--url", missing, "--out", str(out)]) == 1
    assert "`ordering migrate --url" in capsys.readouterr().err
    assert not out.exists()  # nothing made before the database was found wanting

    with pytest.raises(SchemaError):
        main(["status", "--url", missing, "--debug"])
    with pytest.raises(SchemaError):
        main(["--debug", "status", "--url", missing])


def test_bad_options_are_refused_by_the_parser_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv, expected in (
        (["prune", "--batch-size", "0"], "argument --batch-size: must be a whole number"),
        (["followers", "--leader", "nope"], "argument --leader: not an event id (a UUID): 'nope'"),
        (
            ["status", "--now", "2026-01-05T09:00:00"],
            "has no timezone: add Z",
        ),
        (["status", "--now", "yesterday"], "argument --now: not an ISO 8601 time: 'yesterday'"),
        (["status", "--watch", "0"], "argument --watch: must be a positive number of seconds"),
        (["status", "--watch", "abc"], "argument --watch: must be a positive number of seconds"),
        (["status", "--watch", "-1"], "argument --watch: must be a positive number of seconds"),
        (
            ["status", "--watch", "--now", "2026-01-05T09:00:00Z"],
            "argument --now: not allowed with argument --watch",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        [line] = capsys.readouterr().err.splitlines()
        assert expected in line
        assert line.endswith("--help`)")


def test_every_command_names_the_url_environment_variable() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    choices: dict[str, Any] = subparsers.choices  # type: ignore[assignment]
    assert set(choices) == {"status", "followers", "prune", "replay", "migrate", "check", "demo"}
    for name, command in choices.items():
        assert "ORDERING_DATABASE_URL" in command.format_help(), name
        assert "--now" not in command.format_help()  # for tests: documented, not advertised


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///unused.db", "json_extract(f.event, '$.event')"),
        ("postgresql://dba@db.invalid/app", "(f.event ->> 'event')"),
    ],
)
def test_migrate_sql_prints_the_views_for_a_dba(
    url: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--sql", "--url", url]) == 0
    sql = capsys.readouterr().out
    assert "CREATE VIEW ordering_waiting AS" in sql
    assert expected in sql


# -- the progress bar ---------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What rich reads besides isatty(), set as in a person's terminal."""
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


def seed_prunable(url: str, scope: str) -> None:
    """Two seen events and one lease, all expired at T0 + SEEN_EXPIRATION + 1s."""
    clock = MutableClock(T0)

    async def seed() -> None:
        ordering = CausalOrdering(scope, url=url, clock=clock)
        await ordering.record_event_as_seen(make_event(clock))
        await ordering.record_event_as_seen(make_event(clock))
        assert await ordering.record_event_as_processing(make_event(clock))
        await dispose()

    asyncio.run(seed())


def test_prune_draws_a_bar_only_on_a_terminal(
    db_url: str, scope: str, monkeypatch: pytest.MonkeyPatch, terminal_env: None
) -> None:
    now = (T0 + SEEN_EXPIRATION + timedelta(seconds=1)).isoformat()
    argv = ["prune", "--url", db_url, "--scope", scope, "--now", now]
    seed_prunable(db_url, scope)
    try:
        # Piped or logged: no bar.
        stdout, piped = io.StringIO(), io.StringIO()
        monkeypatch.setattr(sys, "stdout", stdout)
        monkeypatch.setattr(sys, "stderr", piped)
        assert main([*argv, "--dry-run"]) == 0
        assert (
            stdout.getvalue()
            == f"would delete 2 seen events and 1 expired lease in scope {scope!r}\n"
        )
        assert piped.getvalue() == ""

        stdout, terminal = io.StringIO(), Terminal()
        monkeypatch.setattr(sys, "stdout", stdout)
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main([*argv, "--batch-size", "1"]) == 0
        assert (
            stdout.getvalue() == f"deleted 2 seen events and 1 expired lease in scope {scope!r}\n"
        )
        drawn = terminal.getvalue()
        assert "pruning" in drawn and "3/3" in drawn  # the rows are counted first
        assert drawn.endswith("\x1b[2K")  # erased, leaving the line to what follows
    finally:
        _clear(db_url, scope)


def test_replay_draws_a_bar_unless_the_events_go_to_the_same_terminal(
    db_url: str, scope: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal_env: None
) -> None:
    chain = make_chain(MutableClock(T0), 3)
    path = tmp_path / "events.jsonl"
    path.write_text("".join(e.model_dump_json() + "\n" for e in chain[:2]) + "{not json\n")
    try:
        # Events piped on, stderr a terminal: a bar, and the bad line's note above it.
        piped, terminal = io.StringIO(), Terminal()
        monkeypatch.setattr(sys, "stdout", piped)
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(["replay", str(path), "--url", db_url, "--scope", scope]) == 0
        assert [e.id for e in read_events(piped.getvalue())] == [chain[0].id, chain[1].id]
        drawn = terminal.getvalue()
        assert "replaying" in drawn
        [note] = [line for line in drawn.splitlines() if "line 3: invalid JSON" in line]
        assert note.endswith(", skipped")  # one line, however wide the terminal
        assert drawn.rstrip().endswith("1 bad line skipped")

        # Events on the terminal: no bar to mix with them.
        shared = Terminal()
        monkeypatch.setattr(sys, "stdout", shared)
        monkeypatch.setattr(sys, "stderr", shared)
        assert main(["replay", str(path), "--url", db_url, "--scope", scope]) == 0
        assert "replaying" not in shared.getvalue()
        assert "2 already seen (skipped)" in shared.getvalue()
    finally:
        _clear(db_url, scope)
