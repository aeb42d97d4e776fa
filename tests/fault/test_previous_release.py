"""The previous release's workers beside this code's on one database: the rolling
deploy of docs/deploy.md run with both codes, on SQLite and PostgreSQL.

``ORDERING_PREVIOUS_RELEASE_PYTHON`` names a Python whose ``ordering`` package is the
previous release's: ``.ci/previous-release`` builds one (from the commit named in
``.ci/previous-release-commit``) and prints its path, and .ci/run sets the variable.
Without it these tests are skipped, except under CI=true, where they fail.

The deploy:

1. the previous release migrates the database and a worker of it starts;
2. once it has handled an event, this code migrates the database under it (the expand
   step), and the previous release's ``ordering check`` still passes on the result;
3. this code's workers start beside it, on the same scope, with one more of the
   previous release's (deliveries keep reaching that release until its last worker is
   replaced), and all of them work through the stream: jumbled causal chains, some
   events delivered twice, eight deliveries in flight per worker.

When both releases are at the same schema revision, step 2 changes nothing; the summary
line says which revisions ran.  The previous release's workers run that release's own
worker module (tests/fault/worker.py from its tree) with its own ``ordering``; no
``?deadline=`` in their URL, which that release does not know.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ordering.migrate import current_revision, upgrade
from ordering.models import utc_now
from tests.conftest import IN_CI

from .checker import Report
from .harness import SEED, Harness, scaled
from .workload import Workload, make_chains

PREVIOUS_PYTHON = "ORDERING_PREVIOUS_RELEASE_PYTHON"

#: The workers (by queue) of each release; the first one starts before the migration.
PREVIOUS = (0, 1)
CURRENT = (2, 3)
CONSUMERS = 8

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def previous_python() -> str:
    path = os.environ.get(PREVIOUS_PYTHON)
    if not path:
        message = f"{PREVIOUS_PYTHON} is not set: set it to what .ci/previous-release prints"
        if IN_CI:
            pytest.fail(message + " (CI=true: this is a failure, not a skip)")
        pytest.skip(message)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{PREVIOUS_PYTHON}={path} is not an executable")
    return path


def previous_cli(python: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The previous release's command line (run away from this checkout, whose
    ``ordering`` would otherwise come first on the import path)."""
    command = [python, "-c", "import sys; from ordering.cli import main; sys.exit(main())"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def library_of(python: str, cwd: Path) -> str:
    probe = [python, "-c", "import ordering; print(ordering.__file__)"]
    return subprocess.run(probe, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def first_handler(report: Report, workload: Workload) -> dict[str, str]:
    """event id -> the worker that handled it first."""
    return {
        str(event.id): report.phases_by_event[event.id][0].split("/", 1)[0]
        for event in workload.events
        if report.phases_by_event.get(event.id)
    }


def test_previous_release_workers_beside_this_codes_across_the_migration(
    empty_url: str, tmp_path: Path, harnesses: list[Harness], previous_python: str
) -> None:
    neutral = tmp_path / "elsewhere"
    neutral.mkdir()
    previous_library = library_of(previous_python, neutral)
    assert previous_library != library_of(sys.executable, neutral), (
        f"{PREVIOUS_PYTHON} imports this code's ordering ({previous_library})"
    )

    migrated = previous_cli(previous_python, "migrate", "--url", empty_url, cwd=neutral)
    assert migrated.returncode == 0, migrated.stderr
    previous_revision = asyncio.run(current_revision(empty_url))

    events = make_chains(scaled(80), 5, utc_now(), random.Random(SEED))
    harness = Harness(
        name=f"previous-release-{empty_url.split('+', 1)[0]}",
        url=empty_url,
        run_dir=tmp_path,
        workers=len(PREVIOUS) + len(CURRENT),
        consumers=CONSUMERS,
        duplicate_fraction=0.1,
        soon=0.5,
        pythons=dict.fromkeys(PREVIOUS, previous_python),
    )
    harnesses.append(harness)
    workload = harness.prepare(events, migrate=False)
    harness.start(only=PREVIOUS[:1])
    started = time.monotonic()
    harness.wait_for(lambda: harness.handled_share() > 0, 120, "the first event handled")

    # The expand step, under the previous release's running workers.
    upgrade(empty_url)
    current = asyncio.run(current_revision(empty_url))
    check = previous_cli(previous_python, "check", "--url", empty_url, cwd=neutral)
    assert check.returncode == 0, f"the previous release's check failed: {check.stderr}"
    share_at_deploy = harness.handled_share()
    migrated_after = time.monotonic() - started

    harness.start(only=(*PREVIOUS[1:], *CURRENT))
    report = harness.finish()
    print(
        f"  revisions: previous release {previous_revision}, this code {current}; "
        f"handled when this code's workers started: {share_at_deploy:.0%}, "
        f"{migrated_after:.1f} s after the first worker started; "
        f"whole run {time.monotonic() - started:.1f} s"
    )
    report.assert_rules()
    assert report.rehandled_after_interruption == []
    assert report.swept == [], "a follower waited for the lookback"
    assert report.workers_results.errors == Counter(), report.workers_results.error_samples

    # The previous release's workers are its own (they write no .library file): they
    # start in its tree, where `ordering` is that release's.
    tree = Path(previous_python).parent.parent.parent / "tree"
    assert library_of(previous_python, tree) == previous_library
    for index in CURRENT:
        assert (tmp_path / f"w{index}.library").read_text() != previous_library

    # Both releases did work after the deploy, and followers parked or released by the
    # previous release were handled by this code.
    by = first_handler(report, workload)
    previous_names = {f"w{i}" for i in PREVIOUS}

    def release(worker: str) -> str:
        return "previous" if worker in previous_names else "current"

    handled = Counter(by.values())
    crossings = Counter(
        f"{release(by[str(leader)])} -> {release(by[str(event)])}"
        for event, leader in workload.leader_of.items()
    )
    print(
        f"  handled first by: {dict(sorted(handled.items()))}; "
        f"leader -> follower: {dict(crossings)}"
    )
    assert all(handled[f"w{i}"] for i in (*PREVIOUS, *CURRENT)), handled
    assert crossings["previous -> current"], crossings
