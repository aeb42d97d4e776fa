"""The store's metrics on a real Prefect server's own ``/api/metrics``.

A ``prefect server start`` process, with our ordering as its causal ordering and
Prefect's metrics on, takes events over its HTTP API (a follower before its leader, so
that one parks and is released); its triggers service sends them through the store, and
its ``/api/metrics`` must then show the store's series.  The store's database is the test
database of each dialect (``ORDERING_DATABASE_URL``); Prefect's own is a SQLite file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import pytest

from ordering import metrics
from ordering.urls import URL_ENV

from .conftest import IN_CI
from .netfaults import closed_port

try:
    import opentelemetry.exporter.prometheus  # noqa: F401
    import prefect  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    if IN_CI:
        raise
    pytest.skip(f"the prefect extra is not installed: {exc}", allow_module_level=True)

#: How long the server may take to start, and the events to show up in its metrics.
STARTUP_SECONDS = 240.0
EVENTS_SECONDS = 120.0


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            body: bytes = answer.read()
            return body.decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _post(url: str, payload: object) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 204, answer.status


@contextmanager
def prefect_server(store_url: str, home: Path) -> Iterator[str]:
    """A Prefect server process on a free port, our ordering on ``store_url`` and
    Prefect's metrics on; yields its API URL."""
    port = closed_port()  # free: nothing listens on it yet
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_EVENTS_CAUSAL_ORDERING="ordering.prefect",
        PREFECT_SERVER_METRICS_ENABLED="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        **{URL_ENV: store_url},
    )
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-scheduler",
            "--no-late-runs",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        give_up = time.monotonic() + STARTUP_SECONDS
        while _get(f"{api}/health") is None:
            if server.poll() is not None or time.monotonic() > give_up:
                raise AssertionError(
                    f"the Prefect server did not start within {STARTUP_SECONDS:g} s:\n"
                    + (home / "server.log").read_text()[-4000:]
                )
            time.sleep(0.5)
        yield api
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def _samples(text: str, name: str, **labels: str) -> list[float]:
    """The values of the samples of ``name`` whose labels include these."""
    found: list[float] = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        given = match.group(2) or ""
        if all(f'{k}="{v}"' in given for k, v in labels.items()):
            found.append(float(match.group(3)))
    return found


def _event(name: str, follows: str | None = None) -> dict[str, object]:
    return {
        "id": str(uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": name,
        "resource": {"prefect.resource.id": f"test.metrics.{name}"},
        "follows": follows,
    }


# A Prefect server takes a while to start on a busy machine.
@pytest.mark.timeout(600)
def test_the_stores_metrics_are_on_prefects_own_api_metrics(db_url: str, tmp_path: Path) -> None:
    with prefect_server(db_url, tmp_path) as api:
        leader = _event("metrics.leader")
        follower = _event("metrics.follower", follows=str(leader["id"]))
        orphan = _event("metrics.orphan", follows=str(uuid4()))  # its leader never comes
        _post(f"{api}/events", [follower, orphan])  # before their leaders: they park
        time.sleep(2)
        _post(f"{api}/events", [leader])  # releases it
        scope = {"scope": "triggers"}
        give_up = time.monotonic() + EVENTS_SECONDS
        text = ""
        while time.monotonic() < give_up:
            text = _get(f"{api}/metrics") or ""
            if sum(_samples(text, "ordering_events_completed_total", **scope)) >= 2:
                break
            time.sleep(1)
        # The first scrape asked for the waiting followers' figures; a later one has them.
        while time.monotonic() < give_up and not _samples(
            text, "ordering_followers_waiting", **scope
        ):
            time.sleep(1)
            text = _get(f"{api}/metrics") or ""
    print("\n".join(line for line in text.splitlines() if line.startswith("ordering_")))

    assert sum(_samples(text, "ordering_events_begun_total", **scope)) == 3
    assert sum(_samples(text, "ordering_events_parked_total", **scope)) == 2
    assert sum(_samples(text, "ordering_events_released_total", **scope)) == 1
    assert sum(_samples(text, "ordering_events_completed_total", **scope)) == 2
    system = "sqlite" if db_url.startswith("sqlite") else "postgresql"
    begins = _samples(
        text, "ordering_store_duration_seconds_count", db_system=system, operation="begin"
    )
    assert sum(begins) >= 1
    latency = _samples(
        text, "ordering_store_duration_seconds_sum", db_system=system, operation="begin"
    )
    assert 0 < sum(latency) < 60
    # seconds, in buckets from half a millisecond up
    assert _samples(
        text, "ordering_store_duration_seconds_bucket", operation="begin", le="0.0005"
    ), "no bucket for sub-millisecond operations"
    # The gauge shows its last periodic query (at most one per 15 s), which may have
    # run before the leader released one of the two parked followers.
    assert _samples(text, "ordering_followers_waiting", **scope) in ([1.0], [2.0])
    (age,) = _samples(text, "ordering_followers_oldest_age_seconds", **scope)
    assert 0 < age < 600
    # every ordering_ family served is named as metrics.Instrument.prometheus_name says
    served = {m.group(1) for line in text.splitlines() if (m := _SAMPLE.match(line))}
    expected = {s for i in metrics.INSTRUMENTS.values() for s in i.prometheus_series}
    ours = {name for name in served if name.startswith("ordering_")}
    assert ours, "no ordering_ series on /api/metrics"
    assert ours <= expected, ours - expected
