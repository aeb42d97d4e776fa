"""The store's metrics, through OpenTelemetry's metrics API.

Every instrument of the package is made here, once, at import, under the meter
``ordering``; the rest of the package calls the small functions below at its few
choke points.  Without an OpenTelemetry SDK the API's instruments are no-ops (a
fraction of a microsecond per call); an application that installs a MeterProvider,
before or after this module is imported, gets them all (the API's proxy instruments
pass through to the provider installed later).  Under Prefect, ``ordering.prefect``
installs one that Prefect's ``/api/metrics`` serves (``serve_on_prometheus``).

What each metric means, its Prometheus name and what to alert on: docs/metrics.md.

Attribute sets are built once per distinct value and kept (a dictionary per call
would cost more than the no-op call itself), so an attribute takes values from small
sets only: scope names, operation names, table names, the database system.

The waiting followers and the oldest one's age are observable gauges: their values
come from one cheap query per database (``waiting_summary``) run at most once per
``WAITING_INTERVAL`` seconds on the event loop that uses the database, and only when a
reader collects: nothing runs without an SDK.  A collection reports what the last
query found and asks for a fresh one, so the values lag by up to one collection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from opentelemetry import metrics as otel
from opentelemetry.metrics import CallbackOptions, Observation

if TYPE_CHECKING:
    from .backends.base import Backend

logger = logging.getLogger(__name__)

#: Seconds between two queries of the waiting followers, per database, at most.
WAITING_INTERVAL = 15.0

Attributes = Mapping[str, str]

_meter = otel.get_meter("ordering")


@dataclass(frozen=True)
class Instrument:
    """What docs/metrics.md and the dashboard rely on: an instrument's name, kind and
    unit, and its name once Prometheus exporters have translated it."""

    name: str
    kind: str  # "counter", "histogram" or "gauge"
    unit: str
    description: str

    @property
    def prometheus_name(self) -> str:
        """The name OpenTelemetry's Prometheus exporter gives it: dots become
        underscores, the unit is appended (``s`` as ``seconds``; an annotation in
        braces, ``{event}``, is dropped) and a counter ends in ``_total``.  A histogram
        is served as ``<name>_bucket``, ``<name>_sum`` and ``<name>_count``."""
        name = self.name.replace(".", "_")
        unit = _PROMETHEUS_UNITS.get(self.unit, "")
        if unit and not name.endswith(f"_{unit}"):
            name = f"{name}_{unit}"
        return f"{name}_total" if self.kind == "counter" else name

    @property
    def prometheus_series(self) -> frozenset[str]:
        """The names of the series Prometheus serves for it."""
        name = self.prometheus_name
        if self.kind == "histogram":
            return frozenset({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        return frozenset({name})


_PROMETHEUS_UNITS = {"s": "seconds"}

#: Every instrument of the package, by its OpenTelemetry name.
INSTRUMENTS: dict[str, Instrument] = {}


def _define(name: str, kind: str, unit: str, description: str) -> None:
    if not name.startswith("ordering.") or not unit or not description:
        raise ValueError(f"instrument {name!r}: a name under ordering., a unit, a description")
    INSTRUMENTS[name] = Instrument(name, kind, unit, description)


def _counter(name: str, *, unit: str, description: str) -> otel.Counter:
    _define(name, "counter", unit, description)
    return _meter.create_counter(name, unit=unit, description=description)


def _histogram(
    name: str, *, unit: str, description: str, buckets: Sequence[float]
) -> otel.Histogram:
    _define(name, "histogram", unit, description)
    return _meter.create_histogram(
        name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
    )


#: Bucket bounds of the operation durations, in seconds: from a fast SQLite statement
#: (well under a millisecond) to the default deadline (10 s).  The SDK's default bounds
#: (0 to 10,000) are meant for milliseconds and would put every operation in one bucket.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def _gauge(
    name: str, *, callbacks: list[otel.CallbackT], unit: str, description: str
) -> otel.ObservableGauge:
    _define(name, "gauge", unit, description)
    return _meter.create_observable_gauge(
        name, callbacks=callbacks, unit=unit, description=description
    )


# -- events, as the ordering sees them ------------------------------------------------

EVENTS_BEGUN = _counter(
    "ordering.events.begun",
    unit="{event}",
    description="Events whose processing lease was taken (delivered to the ordering)",
)
EVENTS_COMPLETED = _counter(
    "ordering.events.completed",
    unit="{event}",
    description="Events marked seen after their handler succeeded",
)
EVENTS_PARKED = _counter(
    "ordering.events.parked",
    unit="{event}",
    description="Events that arrived before their leader and were stored to wait for it",
)
EVENTS_RELEASED = _counter(
    "ordering.events.released",
    unit="{event}",
    description="Waiting followers handed to the handler by their leader's completion",
)
EVENTS_REFUSED = _counter(
    "ordering.events.refused",
    unit="{event}",
    description="Deliveries refused: another holder has a live lease (reason=held_elsewhere) "
    "or the event was processed already (reason=already_processed)",
)
LEASES_TAKEN_OVER = _counter(
    "ordering.leases.taken_over",
    unit="{lease}",
    description="Leases taken at begin from another owner that had let them expire "
    "(a worker that died or stalled mid-event)",
)
FOLLOWERS_LOST = _counter(
    "ordering.followers.lost",
    unit="{event}",
    description="Followers handed out by the lost-follower sweep: their leader never came "
    "within the lookback, or their handler died before finishing them",
)

# -- the database -------------------------------------------------------------------

STORE_RETRIES = _counter(
    "ordering.store.retries",
    unit="{retry}",
    description="Database operations tried again after a lost connection or a busy database",
)
STORE_UNAVAILABLE = _counter(
    "ordering.store.unavailable",
    unit="{error}",
    description="Calls that raised StoreUnavailable: the database did not answer in time",
)
STORE_RETRY_TIME = _counter(
    "ordering.store.retry_time",
    unit="s",
    description="Time calls spent between their first failed attempt and their end "
    "(success or StoreUnavailable)",
)
STORE_DURATION = _histogram(
    "ordering.store.duration",
    unit="s",
    description="Time of one database operation (a round trip, or one transaction on "
    "SQLite), retries included, by operation",
    buckets=DURATION_BUCKETS,
)
ROWS_PRUNED = _counter(
    "ordering.rows.pruned",
    unit="{row}",
    description="Rows deleted by retention, by table",
)


# -- attribute sets, built once each --------------------------------------------------

_attribute_sets: dict[tuple[tuple[str, str], ...], Attributes] = {}


def _kept(**attributes: str) -> Attributes:
    """The one attribute set with these values (built on first use)."""
    key = tuple(attributes.items())
    found = _attribute_sets.get(key)
    if found is None:
        found = _attribute_sets[key] = attributes
    return found


#: Refusal reasons, as the ``reason`` attribute says them.
HELD_ELSEWHERE = "held_elsewhere"
ALREADY_PROCESSED = "already_processed"


def scope_attributes(scope: str) -> Attributes:
    """The attribute set of a scope (an ordering keeps it)."""
    return _kept(scope=scope)


def system_of(url: str) -> str:
    """The database system of a store URL, as OpenTelemetry's ``db.system`` names it."""
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def system_attributes(system: str) -> Attributes:
    return _kept(**{"db.system": system})


# -- what the package calls -------------------------------------------------------------
# The hot path (causal.py) adds to the event counters directly, with the attribute set
# its ordering keeps: one no-op call each without an SDK, no wrapper around it.


def refused(scope: str, reason: str) -> None:
    EVENTS_REFUSED.add(1, _kept(scope=scope, reason=reason))


def lost_followers(attributes: Attributes, count: int) -> None:
    if count:
        FOLLOWERS_LOST.add(count, attributes)


def retried(attributes: Attributes) -> None:
    STORE_RETRIES.add(1, attributes)


def unavailable(attributes: Attributes) -> None:
    STORE_UNAVAILABLE.add(1, attributes)


def retrying_took(attributes: Attributes, seconds: float) -> None:
    STORE_RETRY_TIME.add(seconds, attributes)


def operation_attributes(system: str, operation: str) -> Attributes:
    """The attribute set of ``ordering.store.duration`` for one operation (a caller
    keeps it: see Connections.run)."""
    return _kept(**{"db.system": system, "operation": operation})


def rows_pruned(table: str, count: int) -> None:
    """Count rows deleted by retention from ``table`` (``seen_events``,
    ``processing_leases``, ``waiting_followers``)."""
    if count < 0:
        raise ValueError(f"count must not be negative, not {count}")
    if not count:
        return
    ROWS_PRUNED.add(count, _kept(table=table))


# -- waiting followers: observed by a reader, queried in the background ---------------------


@dataclass
class _Database:
    """The last waiting-followers figures of one database, and how to refresh them."""

    system: str
    #: Each loop's backend, weakly both: a backend refers to its loop, and a loop
    #: that is gone must take its backend with it.
    backends: weakref.WeakKeyDictionary[
        asyncio.AbstractEventLoop, weakref.ReferenceType[Backend]
    ] = field(default_factory=weakref.WeakKeyDictionary)
    #: scope -> (waiting followers, received time of the oldest one)
    found: dict[str, tuple[int, datetime | None]] = field(default_factory=dict)
    asked_at: float = float("-inf")
    running: bool = False


_databases: dict[str, _Database] = {}
_databases_lock = threading.Lock()
_refreshes: set[asyncio.Task[None]] = set()


def watch(key: str, backend: Backend) -> None:
    """Have the waiting followers of ``backend``'s database reported (once per backend,
    when it is built): ``key`` names the database (URL and schema)."""
    loop = asyncio.get_running_loop()
    with _databases_lock:
        database = _databases.get(key)
        if database is None:
            database = _databases[key] = _Database(system_of(backend.url))
        database.backends[loop] = weakref.ref(backend)


def _refresh_due(now: float) -> None:
    """Ask each database whose figures are older than the interval for fresh ones, on
    an event loop that uses it (at most one query under way per database)."""
    with _databases_lock:
        databases = list(_databases.values())
    for database in databases:
        if database.running or now - database.asked_at < WAITING_INTERVAL:
            continue
        for loop, backend_ref in list(database.backends.items()):
            backend = backend_ref()
            if backend is None or loop.is_closed() or not loop.is_running():
                continue
            database.running, database.asked_at = True, now
            try:
                loop.call_soon_threadsafe(_start_refresh, database, backend)
            except RuntimeError:  # closed meanwhile
                database.running = False
                continue
            break


def _start_refresh(database: _Database, backend: Backend) -> None:
    task = asyncio.get_running_loop().create_task(_refresh(database, backend))
    _refreshes.add(task)
    task.add_done_callback(_refreshes.discard)


async def _refresh(database: _Database, backend: Backend) -> None:
    try:
        rows = await backend.query("waiting_summary", types=(str, int, datetime))
        # A scope whose followers are all gone reads 0 rather than vanishing.
        found: dict[str, tuple[int, datetime | None]] = dict.fromkeys(database.found, (0, None))
        found.update((scope, (count, oldest)) for scope, count, oldest in rows)
        database.found = found
    except Exception:
        logger.warning("counting the waiting followers for metrics failed", exc_info=True)
    finally:
        database.running = False


def _observe(pick: int) -> Iterable[Observation]:
    _refresh_due(time.monotonic())
    now = datetime.now(UTC)
    with _databases_lock:
        databases = list(_databases.values())
    for database in databases:
        for scope, (count, oldest) in database.found.items():
            attributes = {"scope": scope, "db.system": database.system}
            if pick == 0:
                yield Observation(count, attributes)
            elif oldest is not None:
                yield Observation(max(0.0, (now - oldest).total_seconds()), attributes)


def _waiting(options: CallbackOptions) -> Iterable[Observation]:
    return list(_observe(0))


def _oldest_age(options: CallbackOptions) -> Iterable[Observation]:
    return list(_observe(1))


FOLLOWERS_WAITING = _gauge(
    "ordering.followers.waiting",
    callbacks=[_waiting],
    unit="{event}",
    description="Followers stored and waiting for their leader, by scope (sampled: see "
    "WAITING_INTERVAL)",
)
FOLLOWERS_OLDEST_AGE = _gauge(
    "ordering.followers.oldest_age",
    callbacks=[_oldest_age],
    unit="s",
    description="Age of the oldest waiting follower (since it was received), by scope",
)


async def refresh_waiting() -> None:
    """Query the waiting followers of every database watched on this event loop now
    (for tests, and for a reader that wants fresh figures on its first collection)."""
    loop = asyncio.get_running_loop()
    with _databases_lock:
        databases = list(_databases.values())
    for database in databases:
        backend_ref = database.backends.get(loop)
        backend = None if backend_ref is None else backend_ref()
        if backend is not None:
            database.asked_at = time.monotonic()
            database.running = True
            await _refresh(database, backend)
