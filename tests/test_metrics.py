"""The store's metrics, read through a real OpenTelemetry SDK (an in-memory reader)
after known workloads, on both dialects.

The SDK's MeterProvider is installed for the whole process the first time a test here
needs it (OpenTelemetry takes one global provider, once).  Counts by scope are read
as they are, each test having a scope of its own; counts by database are compared
before and after.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import pytest
from opentelemetry import metrics as otel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from sqlalchemy.engine import make_url

from ordering import (
    CausalOrdering,
    EventAlreadyProcessed,
    EventBeingProcessed,
    StoreUnavailable,
)
from ordering import metrics as store_metrics
from ordering.models import utc_now

from .helpers import Consumer, MutableClock, assert_causal, make_chain, make_event, real_clock
from .netfaults import closed_port

_reader: InMemoryMetricReader | None = None


@pytest.fixture
def reader() -> InMemoryMetricReader:
    global _reader
    if _reader is None:
        _reader = InMemoryMetricReader()
        otel.set_meter_provider(MeterProvider(metric_readers=[_reader]))
    return _reader


def _points(reader: InMemoryMetricReader) -> dict[str, list[NumberDataPoint | HistogramDataPoint]]:
    found: dict[str, list[NumberDataPoint | HistogramDataPoint]] = {}
    data = reader.get_metrics_data()
    if data is None:  # nothing recorded yet
        return found
    for resource in data.resource_metrics:
        for scoped in resource.scope_metrics:
            for metric in scoped.metrics:
                found.setdefault(metric.name, []).extend(
                    p
                    for p in metric.data.data_points
                    if isinstance(p, (NumberDataPoint, HistogramDataPoint))
                )
    return found


def _value(
    points: Mapping[str, list[NumberDataPoint | HistogramDataPoint]],
    name: str,
    **attributes: str,
) -> float:
    """The sum (or for a histogram, the count) of the points of ``name`` that carry
    these attributes."""
    total: float = 0
    for point in points.get(name, []):
        if all((point.attributes or {}).get(k) == v for k, v in attributes.items()):
            total += point.count if isinstance(point, HistogramDataPoint) else point.value
    return total


def _system(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


async def test_a_jumbled_chain_is_counted(
    reader: InMemoryMetricReader, db_url: str, clock: MutableClock, scope: str
) -> None:
    ordering = CausalOrdering(scope, url=db_url, clock=clock)
    chain = make_chain(clock, 8)
    delivery = list(chain)
    random.Random(7).shuffle(delivery)
    consumer = Consumer(ordering)
    before = _points(reader)
    parked = 0
    for event in delivery:
        if not await consumer.consume(event):
            parked += 1
    assert_causal(consumer.handled, chain)
    assert parked > 0, "the shuffle should make some events arrive early"
    # a redelivery of a processed event is refused
    with pytest.raises(EventAlreadyProcessed):
        async with ordering.preceding_event_confirmed(consumer.handler, chain[0]):
            pass
    points = _points(reader)
    assert _value(points, "ordering.events.begun", scope=scope) == len(chain)
    assert _value(points, "ordering.events.parked", scope=scope) == parked
    assert _value(points, "ordering.events.released", scope=scope) == parked
    assert _value(points, "ordering.events.completed", scope=scope) == len(chain)
    assert _value(points, "ordering.events.refused", scope=scope, reason="already_processed") == 1
    assert _value(points, "ordering.events.refused", scope=scope, reason="held_elsewhere") == 0
    # every begin and every completion or parking was a timed database operation
    system = _system(db_url)

    def operations(found: Mapping[str, list[NumberDataPoint | HistogramDataPoint]]) -> float:
        return sum(
            _value(found, "ordering.store.duration", operation=name, **{"db.system": system})
            for name in ("begin", "begin_batch", "complete", "complete_batch", "park")
        )

    assert operations(points) - operations(before) >= len(chain) + parked
    (histogram, *_) = points["ordering.store.duration"]
    assert isinstance(histogram, HistogramDataPoint)
    assert tuple(histogram.explicit_bounds) == store_metrics.DURATION_BUCKETS  # seconds
    await ordering.clear()


async def test_a_lease_held_elsewhere_is_refused_by_reason(
    reader: InMemoryMetricReader, db_url: str, clock: MutableClock, scope: str
) -> None:
    ordering = CausalOrdering(scope, url=db_url, clock=clock)
    event = make_event(clock)
    async with ordering.event_is_processing(event):
        with pytest.raises(EventBeingProcessed):
            async with ordering.preceding_event_confirmed(Consumer(ordering).handler, event):
                pass
    points = _points(reader)
    assert _value(points, "ordering.events.refused", scope=scope, reason="held_elsewhere") == 1
    assert _value(points, "ordering.events.begun", scope=scope) == 1
    assert _value(points, "ordering.events.completed", scope=scope) == 1
    await ordering.clear()


async def test_a_lease_taken_over_after_its_worker_stalled_is_counted(
    reader: InMemoryMetricReader, db_url: str, clock: MutableClock, scope: str
) -> None:
    stalled = CausalOrdering(scope, url=db_url, clock=clock, lease_duration=timedelta(seconds=30))
    survivor = CausalOrdering(scope, url=db_url, clock=clock)
    consumer = Consumer(survivor)
    event, other = make_event(clock), make_event(clock)
    assert await stalled.record_event_as_processing(event)
    assert await stalled.record_event_as_processing(other)
    clock.advance(timedelta(seconds=29))
    with pytest.raises(EventBeingProcessed):  # still live: refused, not taken over
        async with survivor.preceding_event_confirmed(consumer.handler, event):
            pass
    assert await consumer.consume(make_event(clock))  # a fresh lease
    assert _value(_points(reader), "ordering.leases.taken_over", scope=scope) == 0

    clock.advance(timedelta(seconds=1))
    assert await consumer.consume(event)
    assert await survivor.record_event_as_processing(other)
    points = _points(reader)
    assert _value(points, "ordering.leases.taken_over", scope=scope) == 2
    assert _value(points, "ordering.events.begun", scope=scope) == 2
    await survivor.clear()


async def test_waiting_followers_and_lost_ones_are_reported(
    reader: InMemoryMetricReader, db_url: str, clock: MutableClock, scope: str
) -> None:
    ordering = CausalOrdering(scope, url=db_url, clock=clock)
    consumer = Consumer(ordering)
    leader = make_event(clock, name="leader")
    followers = [make_event(clock, name=f"f{i}", follows=leader.id) for i in range(3)]
    for follower in followers:
        assert await consumer.consume(follower) is False
    await store_metrics.refresh_waiting()
    points = _points(reader)
    assert _value(points, "ordering.followers.waiting", scope=scope) == 3
    # ages are by the real time; the followers were received at the test clock's time
    expected = (utc_now() - followers[0].received).total_seconds()
    oldest = _value(points, "ordering.followers.oldest_age", scope=scope)
    assert abs(oldest - expected) < 60

    clock.advance(ordering.preceding_event_lookback + timedelta(seconds=1))
    lost = await ordering.get_lost_followers()
    assert len(lost) == 3
    await store_metrics.refresh_waiting()
    points = _points(reader)
    assert _value(points, "ordering.followers.lost", scope=scope) == 3
    # a scope whose followers are gone reads 0 rather than its last count
    assert _value(points, "ordering.followers.waiting", scope=scope) == 0
    await ordering.clear()


async def test_an_unreachable_database_counts_retries_and_unavailability(
    reader: InMemoryMetricReader, postgres_url: str
) -> None:
    url = (
        make_url(postgres_url)
        .set(host="127.0.0.1", port=closed_port())
        .render_as_string(hide_password=False)
    )
    ordering = CausalOrdering("refused", url=url, deadline=timedelta(seconds=1))
    attributes = {"db.system": "postgresql"}
    before = _points(reader)
    with pytest.raises(StoreUnavailable):
        await ordering.event_has_been_seen(make_event(real_clock()))
    after = _points(reader)

    def grew(name: str) -> float:
        return _value(after, name, **attributes) - _value(before, name, **attributes)

    assert grew("ordering.store.unavailable") == 1
    assert grew("ordering.store.retries") >= 1
    assert 0 < grew("ordering.store.retry_time") <= 2  # within the deadline, and some slack


def test_rows_pruned_are_counted_by_table(reader: InMemoryMetricReader) -> None:
    before = _points(reader)
    store_metrics.rows_pruned("seen_events", 5)
    store_metrics.rows_pruned("seen_events", 0)
    store_metrics.rows_pruned("processing_leases", 2)
    after = _points(reader)
    for table, count in (("seen_events", 5), ("processing_leases", 2)):
        grown = _value(after, "ordering.rows.pruned", table=table) - _value(
            before, "ordering.rows.pruned", table=table
        )
        assert grown == count
    with pytest.raises(ValueError, match="must not be negative"):
        store_metrics.rows_pruned("seen_events", -1)


def test_every_instrument_is_named_under_ordering_with_a_unit_and_description() -> None:
    instruments = store_metrics.INSTRUMENTS.values()
    assert len(instruments) == 14
    for instrument in instruments:
        assert instrument.name.startswith("ordering."), instrument.name
        assert instrument.unit, instrument.name
        assert instrument.description, instrument.name
    assert {i.prometheus_name for i in instruments} >= {
        "ordering_events_begun_total",
        "ordering_store_duration_seconds",
        "ordering_store_retry_time_seconds_total",
        "ordering_followers_oldest_age_seconds",
        "ordering_followers_waiting",
    }


DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"
#: A metric name in a query.
_METRIC_NAME = re.compile(r"\bordering_[a-z_]+\b")


def test_the_grafana_dashboard_parses_and_queries_only_metrics_the_store_defines() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert queries
    defined = {s for i in store_metrics.INSTRUMENTS.values() for s in i.prometheus_series}
    used = {name for query in queries for name in _METRIC_NAME.findall(query)}
    assert used <= defined, f"the dashboard queries unknown metrics: {sorted(used - defined)}"
    # every metric the store defines has a panel
    assert {n.removesuffix("_bucket") for n in used} >= {
        i.prometheus_name for i in store_metrics.INSTRUMENTS.values()
    }
