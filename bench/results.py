"""What the bench measures, as plain dataclasses (rendered by report.py, dumped as JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .counting import Counts
from .workloads import ConsumersRun, Timing, percentile


@dataclass
class WorkloadResult:
    implementation: str
    dialect: str | None
    workload: str
    events: int
    seconds: float
    events_per_s: float
    p50_ms: float
    p99_ms: float
    us_per_event: float
    parked: int
    statements_per_event: float | None = None
    transactions_per_event: float | None = None
    round_trips_per_event: float | None = None
    thread_hops_per_event: float | None = None
    checkouts_per_event: float | None = None
    connections_opened: int | None = None
    #: per-event cost divided by one single-row INSERT+COMMIT on the same database
    commit_ratio: float | None = None
    statements: dict[str, float] = field(default_factory=dict)
    #: CPU of the bench process (every thread) and of the PostgreSQL backends, per event
    client_cpu_us_per_event: float | None = None
    server_cpu_us_per_event: float | None = None
    #: how the statements were counted; "n/a" when they could not be
    counting: str = ""
    #: concurrent consumer tasks in the process (the consumers table)
    consumers: int | None = None

    @classmethod
    def of_consumers(
        cls, implementation: str, dialect: str | None, run: ConsumersRun
    ) -> WorkloadResult:
        result = cls.build(
            implementation, dialect, run.label, run.events, run.timing, run.parked, None
        )
        result.consumers = run.consumers
        return result

    @classmethod
    def build(
        cls,
        implementation: str,
        dialect: str | None,
        workload: str,
        events: int,
        timing: Timing,
        parked: int,
        counts: Counts | None,
    ) -> WorkloadResult:
        result = cls(
            implementation=implementation,
            dialect=dialect,
            workload=workload,
            events=events,
            seconds=timing.seconds,
            events_per_s=events / timing.seconds,
            p50_ms=percentile(timing.latencies_ns, 0.50),
            p99_ms=percentile(timing.latencies_ns, 0.99),
            us_per_event=timing.seconds / events * 1e6,
            parked=parked,
        )
        if counts is not None:
            result.counting = counts.method
            result.statements_per_event = counts.statements / events
            if counts.transactions_counted:
                result.transactions_per_event = counts.transactions / events
            # PostgreSQL: one round trip per statement; SQLite: statements stand for
            # thread hops (the measured hops are in thread_hops_per_event).  Redis:
            # the client's sends, a pipeline being one.
            trips = counts.statements if counts.round_trips is None else counts.round_trips
            result.round_trips_per_event = trips / events
            if counts.checkouts_counted:
                result.checkouts_per_event = counts.checkouts / events
                result.connections_opened = counts.connects
            if dialect == "sqlite" and counts.thread_hops_counted:
                result.thread_hops_per_event = counts.thread_hops / events
            result.statements = {
                name: round(count / events, 3)
                for name, count in sorted(counts.by_statement.items())
            }
        return result


@dataclass
class Limits:
    """The database's own speed, measured beside the store in the same run."""

    dialect: str
    how: str
    insert_commit_per_s: float
    insert_commit_us: float
    select1_p50_us: float
    #: PostgreSQL only: BEGIN; INSERT; COMMIT (three round trips)
    insert_in_transaction_per_s: float | None = None
    server_version: str = ""
    #: the separate measurements (before and after the workloads) this one averages
    runs: list[dict[str, float | None]] = field(default_factory=list)

    @classmethod
    def average(cls, measured: list[Limits]) -> Limits:
        """One figure from measurements taken before and after the workloads, so that
        the ratio to the store's cost does not hinge on a moment's load."""
        first = measured[0]
        insert_us = sum(m.insert_commit_us for m in measured) / len(measured)
        in_transaction = [m.insert_in_transaction_per_s for m in measured]
        return cls(
            dialect=first.dialect,
            how=first.how,
            insert_commit_per_s=1e6 / insert_us,
            insert_commit_us=insert_us,
            select1_p50_us=sum(m.select1_p50_us for m in measured) / len(measured),
            insert_in_transaction_per_s=(
                None
                if None in in_transaction
                else len(measured) / sum(1 / r for r in in_transaction if r)
            ),
            server_version=first.server_version,
            runs=[
                {
                    "insert_commit_per_s": m.insert_commit_per_s,
                    "insert_in_transaction_per_s": m.insert_in_transaction_per_s,
                    "select1_p50_us": m.select1_p50_us,
                }
                for m in measured
            ],
        )


@dataclass
class Construction:
    dialect: str
    constructions: int
    construct_us: float
    #: None when the shared backend (or engine) is not visible from outside
    construct_and_store_us: float | None
    distinct_engines: int | None
    engines_before: int
    engines_after: int


@dataclass
class Wakeup:
    configuration: str
    poll_interval: float | None
    samples: int
    added_p50_ms: float
    added_p90_ms: float
    added_max_ms: float
    hold_s: tuple[float, float]


@dataclass
class WorkersRun:
    workload: str
    workers: int
    events: int
    seconds: float
    events_per_s: float
    per_worker_events_per_s: list[float]
    rss_kib: list[int]


@dataclass
class Growth:
    dialect: str
    size: int
    seen_rows: int
    waiting_rows: int
    preload_s: float
    empty_p50_ms: float
    grown_p50_ms: float
    grown_p99_ms: float
    p50_ratio: float
    grown_events_per_s: float
    rss_kib_before: int
    rss_kib_after_preload_run: int
    rss_kib_after_prune: int | None = None
    maxrss_kib: int = 0
    #: the in-order p50 of the main run, for comparison with the baseline taken here
    main_run_empty_p50_ms: float | None = None
    prune: dict[str, Any] | None = None


@dataclass
class DialectResults:
    dialect: str
    url: str
    limits: Limits | None = None
    workloads: list[WorkloadResult] = field(default_factory=list)
    #: the Redis peer's rows, each measured next to the workload of ours it is paired with
    peer: list[WorkloadResult] = field(default_factory=list)
    #: several consumer tasks in one process, ours and the Redis peer's
    concurrency: list[WorkloadResult] = field(default_factory=list)
    construction: Construction | None = None
    wakeup: list[Wakeup] = field(default_factory=list)
    workers: list[WorkersRun] = field(default_factory=list)
    growth: Growth | None = None
    #: ``--profile``: see bench/profiling.py
    profile: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    #: a section raised: its note says which, and the bench exits non-zero
    failed: bool = False


@dataclass
class BenchResults:
    meta: dict[str, Any]
    dialects: list[DialectResults] = field(default_factory=list)
    reference: list[WorkloadResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
