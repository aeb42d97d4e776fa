"""The bench's output: markdown tables for people, JSON for comparing runs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .profiling import render as render_profile
from .results import BenchResults, DialectResults, WorkloadResult
from .workloads import CONSUMER_RUNS, consumer_kind, kind_of


def _number(value: float | int | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _workload_row(result: WorkloadResult, beside: str | None = None) -> list[str]:
    implementation = result.implementation
    if result.dialect:
        implementation = f"{implementation} ({result.dialect})"
    elif beside:
        implementation = f"{implementation} (next to {beside})"
    uncounted = result.counting == "n/a"

    def counted(value: float | None, digits: int) -> str:
        return "n/a" if uncounted else _number(value, digits)

    return [
        implementation,
        result.workload,
        _number(result.events),
        _number(result.events_per_s),
        _number(result.p50_ms, 2),
        _number(result.p99_ms, 2),
        _number(result.us_per_event),
        _number(result.commit_ratio, 2),
        counted(result.statements_per_event, 2),
        counted(result.transactions_per_event, 2),
        counted(result.round_trips_per_event, 2),
        counted(result.thread_hops_per_event, 1),
    ]


WORKLOAD_HEADER = [
    "implementation",
    "workload",
    "events",
    "events/s",
    "p50 ms",
    "p99 ms",
    "µs/event",
    "x commit",
    "stmts/event",
    "txns/event",
    "round trips/event",
    "thread hops/event",
]


def markdown(results: BenchResults) -> str:
    lines: list[str] = [f"## ordering bench — {results.meta.get('started', '')}", ""]
    rows = [_workload_row(r) for d in results.dialects for r in d.workloads]
    rows += [_workload_row(r, d.dialect) for d in results.dialects for r in _single(d.peer)]
    rows += [_workload_row(r) for r in results.reference]
    if rows:
        lines += [*_table(WORKLOAD_HEADER, rows, right_from=2), ""]
    lines += _peer_section(results.dialects)
    lines += _consumers_section(results.dialects)
    lines += _limits_section(results.dialects)
    lines += _cpu_section([r for d in results.dialects for r in d.workloads])
    for dialect in results.dialects:
        lines += _construction_section(dialect)
        lines += _wakeup_section(dialect)
        lines += _workers_section(dialect)
        lines += _growth_section(dialect)
        if dialect.profile is not None:
            lines += [render_profile(dialect.dialect, dialect.profile)]
    notes = results.notes + [f"{d.dialect}: {n}" for d in results.dialects for n in d.notes]
    if notes:
        lines += ["Notes:"] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def _single(rows: list[WorkloadResult]) -> list[WorkloadResult]:
    return [r for r in rows if r.consumers is None]


def _ratio(ours: float, theirs: float | None) -> str:
    return _number(ours / theirs, 2) if theirs else "-"


def _peer_section(dialects: list[DialectResults]) -> list[str]:
    """Ours against the Redis peer, workload by workload, each pair measured together."""
    rows = []
    for d in dialects:
        theirs = {r.workload: r for r in _single(d.peer)}
        for ours in d.workloads:
            peer = theirs.get(ours.workload)
            if peer is None:
                continue
            rows.append(
                [
                    d.dialect,
                    ours.workload,
                    _number(ours.events_per_s),
                    _number(peer.events_per_s),
                    _ratio(ours.events_per_s, peer.events_per_s),
                    _number(ours.p50_ms, 2),
                    _number(peer.p50_ms, 2),
                    "n/a" if ours.counting == "n/a" else _number(ours.round_trips_per_event, 2),
                    _number(peer.round_trips_per_event, 2),
                    _number(peer.statements_per_event, 2),
                ]
            )
    if not rows:
        return []
    header = [
        "ours vs prefect-redis",
        "workload",
        "ours events/s",
        "prefect-redis events/s",
        "ours / prefect-redis",
        "ours p50 ms",
        "prefect-redis p50 ms",
        "ours round trips/event",
        "prefect-redis round trips/event",
        "prefect-redis commands/event",
    ]
    return [*_table(header, rows, right_from=2), ""]


def _consumers_section(dialects: list[DialectResults]) -> list[str]:
    """C consumer tasks in one process sharing the events: a table for each of
    CONSUMER_RUNS."""
    lines: list[str] = []
    for workload, prefect_calls in CONSUMER_RUNS:
        lines += _consumers_table(dialects, consumer_kind(workload, prefect_calls))
    return lines


def _consumers_table(dialects: list[DialectResults], kind: str) -> list[str]:
    rows = []
    for d in dialects:
        ours_rows = [r for r in d.concurrency if kind_of(r.workload) == kind]
        theirs = {
            r.consumers: r
            for r in d.peer
            if r.consumers is not None and kind_of(r.workload) == kind
        }
        ours_one = next((r.events_per_s for r in ours_rows if r.consumers == 1), None)
        peer_one = theirs[1].events_per_s if 1 in theirs else None
        for ours in ours_rows:
            peer = theirs.get(ours.consumers or 0)
            rows.append(
                [
                    d.dialect,
                    _number(ours.consumers),
                    _number(ours.events),
                    _number(ours.events_per_s),
                    _ratio(ours.events_per_s, ours_one),
                    _number(ours.p50_ms, 2),
                    _number(ours.p99_ms, 2),
                    _number(peer.events_per_s if peer else None),
                    _ratio(peer.events_per_s, peer_one) if peer else "-",
                    _number(peer.p50_ms if peer else None, 2),
                    _ratio(ours.events_per_s, peer.events_per_s if peer else None),
                ]
            )
    if not rows:
        return []
    header = [
        f"consumer tasks, one process ({kind})",
        "consumers",
        "events",
        "ours events/s",
        "ours x 1 consumer",
        "ours p50 ms",
        "ours p99 ms",
        "prefect-redis events/s",
        "prefect-redis x 1 consumer",
        "prefect-redis p50 ms",
        "ours / prefect-redis",
    ]
    return [*_table(header, rows, right_from=1), ""]


def _limits_section(dialects: list[DialectResults]) -> list[str]:
    rows = [
        [
            d.dialect,
            _number(d.limits.insert_commit_per_s),
            _number(d.limits.insert_commit_us),
            _number(d.limits.insert_in_transaction_per_s),
            _number(d.limits.select1_p50_us),
            " / ".join(_number(r["insert_commit_per_s"]) for r in d.limits.runs) or "-",
        ]
        for d in dialects
        if d.limits is not None
    ]
    if not rows:
        return []
    header = [
        "database's own limit",
        "INSERT+COMMIT/s",
        "µs per INSERT+COMMIT",
        "BEGIN;INSERT;COMMIT/s",
        "SELECT 1 p50 µs",
        "INSERT+COMMIT/s before / after the workloads",
    ]
    return [*_table(header, rows), ""]


def _cpu_section(workloads: list[WorkloadResult]) -> list[str]:
    rows = []
    for w in workloads:
        if w.client_cpu_us_per_event is None:
            continue
        server = w.server_cpu_us_per_event or 0.0
        neither = w.us_per_event - w.client_cpu_us_per_event - server
        rows.append(
            [
                f"{w.dialect}: {w.workload}",
                _number(w.us_per_event),
                _share(w.client_cpu_us_per_event, w.us_per_event),
                _share(w.server_cpu_us_per_event, w.us_per_event),
                _share(neither, w.us_per_event),
            ]
        )
    if not rows:
        return []
    header = [
        "where one event's time goes",
        "wall µs",
        "client CPU µs (all threads)",
        "PostgreSQL backend CPU µs",
        "neither: waiting µs",
    ]
    return [*_table(header, rows), ""]


def _share(part: float | None, whole: float) -> str:
    if part is None:
        return "-"
    return f"{part:,.0f} ({part / whole:.0%})"


def _construction_section(dialect: DialectResults) -> list[str]:
    c = dialect.construction
    if c is None:
        return []
    if c.construct_and_store_us is None:
        shared = "what instances share is not visible from outside (n/a); live engines and backends"
    else:
        shared = (
            f"with what it shares looked up {c.construct_and_store_us:.2f} µs; "
            f"{c.distinct_engines} distinct engine(s) or backend(s); live"
        )
    return [
        f"Construction ({dialect.dialect}): `CausalOrdering(scope)` {c.construct_us:.2f} µs "
        f"(x{c.constructions:,}); {shared} {c.engines_before} before, {c.engines_after} after.",
        "",
    ]


def _wakeup_section(dialect: DialectResults) -> list[str]:
    if not dialect.wakeup:
        return []
    rows = [
        [
            w.configuration,
            _number(w.samples),
            _number(w.added_p50_ms, 1),
            _number(w.added_p90_ms, 1),
            _number(w.added_max_ms, 1),
        ]
        for w in dialect.wakeup
    ]
    header = [
        f"follower wake-up ({dialect.dialect})",
        "samples",
        "added p50 ms",
        "p90 ms",
        "max ms",
    ]
    return [*_table(header, rows), ""]


def _workers_section(dialect: DialectResults) -> list[str]:
    if not dialect.workers:
        return []
    single = {w.workload: w.events_per_s for w in dialect.workers if w.workers == 1}
    rows = []
    for w in dialect.workers:
        base = single.get(w.workload)
        rows.append(
            [
                w.workload,
                _number(w.workers),
                _number(w.events),
                _number(w.events_per_s),
                _number(w.events_per_s / base, 2) if base else "-",
                " / ".join(_number(x) for x in w.per_worker_events_per_s),
                _number(max(w.rss_kib) // 1024 if w.rss_kib else None),
            ]
        )
    header = [
        f"worker processes ({dialect.dialect})",
        "workers",
        "events",
        "total events/s",
        "x one worker",
        "per worker events/s",
        "max RSS MiB",
    ]
    return [*_table(header, rows, right_from=1), ""]


def _growth_section(dialect: DialectResults) -> list[str]:
    g = dialect.growth
    if g is None:
        return []
    lines = [
        f"Growth ({dialect.dialect}): preloaded {g.seen_rows:,} seen rows and "
        f"{g.waiting_rows:,} waiting followers in {g.preload_s:.1f} s; in-order p50 "
        f"{g.empty_p50_ms:.2f} ms empty → {g.grown_p50_ms:.2f} ms grown "
        f"(x{g.p50_ratio:.2f}, target ≤ 1.3), p99 {g.grown_p99_ms:.2f} ms, "
        f"{g.grown_events_per_s:,.0f} events/s.  RSS {g.rss_kib_before // 1024} MiB before, "
        f"{g.rss_kib_after_preload_run // 1024} MiB after"
        + (
            f", {g.rss_kib_after_prune // 1024} MiB after prune"
            if g.rss_kib_after_prune is not None
            else ""
        )
        + f" (peak {g.maxrss_kib // 1024} MiB).",
    ]
    p = g.prune
    if p is not None and "seconds" in p:
        lines.append(
            f"Prune (in another process) of {p['expired_rows_before']:,} expired seen rows: "
            f"deleted {p['deleted_seen']:,} in {p['seconds']:.1f} s, {p['batches']:,} batches "
            f"(median {p['median_batch_ms']:.1f} ms, longest {p['longest_batch_ms']:.1f} ms), "
            f"{p['expired_rows_after']:,} left; meanwhile the worker delivered "
            f"{p['worker_events_during_prune']:,} in-order events, p50 "
            f"{_number(p['worker_p50_ms'], 2)} ms, p99 {_number(p['worker_p99_ms'], 2)} ms."
        )
    elif p is not None:
        lines.append("Prune: " + ", ".join(f"{k} {_plain(v)}" for k, v in p.items()) + ".")
    return [*lines, ""]


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(results: BenchResults, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _jsonable(dataclasses.asdict(results))
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
