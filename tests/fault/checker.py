"""The checker: reads back what was handled and what the ordering left in its tables.

Rules:
* every event was handled, by a handler call that completed;
* no event was handled by two handler calls that completed.  Rows of interrupted
  calls (the worker was killed, or the handler failed when the database went away,
  before the ordering marked the event seen) are told apart by their attempt id, and
  events handled again after one are counted on their own: that is the at-least-once
  cost of a crash.  A worker killed at a random moment leaves calls in flight that
  may or may not have completed (it notes each call that did, but the kill may come
  between the commit and the note): such a call's row counts as the completed
  handling of its event when no other call completed one and the store has the event
  seen, else as interrupted;
* every event was handled after its leader: every row of an event has a larger
  sequence number than the leader's completed handling;
* nothing is left in the store's waiting_followers or processing_leases tables.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.helpers import store_object

from . import handled

_LEFT_BEHIND = """
SELECT
    (SELECT COUNT(*) FROM {waiting_followers} WHERE scope = :scope),
    (SELECT COUNT(*) FROM {waiting_followers}
     WHERE scope = :scope AND claimed_by IS NOT NULL),
    (SELECT COUNT(*) FROM {processing_leases} WHERE scope = :scope)
"""


@dataclass(frozen=True)
class LeftBehind:
    followers: int
    claims: int
    leases: int

    @property
    def rows(self) -> int:
        # A claim is a follower row too: count the rows, not the markers.
        return self.followers + self.leases


async def left_behind(engine: AsyncEngine, scope: str) -> LeftBehind:
    url = engine.url.render_as_string(hide_password=False)
    statement = text(
        _LEFT_BEHIND.format(
            waiting_followers=store_object(url, "waiting_followers"),
            processing_leases=store_object(url, "processing_leases"),
        )
    )
    async with engine.connect() as connection:
        row = (await connection.execute(statement, {"scope": scope})).one()
    return LeftBehind(int(row[0]), int(row[1]), int(row[2]))


@dataclass
class WorkerResults:
    """The workers' own accounts (killed workers leave none)."""

    #: The handler calls that failed before the ordering marked their event seen.
    interrupted: set[str] = field(default_factory=set)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    lost_followers: int = 0
    #: Statements the store sent, by name.
    statements: Counter[str] = field(default_factory=Counter)

    @classmethod
    def read(cls, run_dir: Path) -> WorkerResults:
        results = cls()
        for path in sorted(run_dir.glob("*.result.json")):
            data = json.loads(path.read_text())
            results.interrupted.update(data["interrupted"])
            results.errors.update(data["errors"])
            results.error_samples.extend(f"{path.stem}: {s}" for s in data["error_samples"])
            results.lost_followers += data["lost_followers"]
            results.statements.update(data["statements"])
        return results


@dataclass
class Report:
    name: str
    events: int
    workers: int
    redelivery_workers: int
    duplicates: int
    kills: int
    db_restarts: int
    seed: int
    handled: int
    handlings: int
    missing: list[UUID]
    handled_twice: list[UUID]
    rehandled_after_interruption: list[UUID]
    out_of_order: list[tuple[UUID, UUID]]
    left: LeftBehind
    #: Events handled only by the final sweep: they waited for the lookback.
    swept: list[UUID]
    phases_by_event: dict[UUID, list[str]]
    workers_results: WorkerResults

    def summary(self) -> str:
        errors = dict(sorted(self.workers_results.errors.items()))
        # workers=3+2: three at the start, two more for killed workers' redeliveries.
        workers = f"{self.workers}" + (
            f"+{self.redelivery_workers}" if self.redelivery_workers else ""
        )
        return (
            f"fault {self.name}: events={self.events} workers={workers} "
            f"duplicates={self.duplicates} kills={self.kills} db_restarts={self.db_restarts} "
            f"handled={self.handled} handled_twice={len(self.handled_twice)} "
            f"rehandled_after_interruption={len(self.rehandled_after_interruption)} "
            f"out_of_order={len(self.out_of_order)} rows_left={self.left.rows} "
            f"(followers={self.left.followers} claims={self.left.claims} "
            f"leases={self.left.leases}) handled_in_final_sweep={len(self.swept)} "
            f"lost_followers_handed_out={self.workers_results.lost_followers} "
            f"errors={errors} seed={self.seed}"
        )

    def violations(self) -> list[str]:
        """The broken rules, each naming the events concerned."""
        problems = []
        if self.missing:
            problems.append(f"{len(self.missing)} events never handled, e.g. {self.missing[:3]}")
        if self.handled_twice:
            problems.append(
                f"{len(self.handled_twice)} events handled again after a completed handling, "
                f"e.g. {[(e, self.phases_by_event[e]) for e in self.handled_twice[:3]]}"
            )
        if self.out_of_order:
            problems.append(
                f"{len(self.out_of_order)} events handled before their leader "
                f"(event, leader), e.g. {self.out_of_order[:3]}"
            )
        if self.left.rows:
            problems.append(f"rows left behind: {self.left}")
        return problems

    def assert_rules(self) -> None:
        problems = self.violations()
        assert not problems, self.summary() + "\n" + "\n".join(problems)


def check(
    *,
    name: str,
    rows: list[handled.Handling],
    event_ids: list[UUID],
    leader_of: dict[UUID, UUID],
    left: LeftBehind,
    results: WorkerResults,
    killed_in_flight: set[str],
    unsure: set[str],
    seen: set[UUID],
    workers: int,
    redelivery_workers: int,
    duplicates: int,
    kills: int,
    db_restarts: int,
    seed: int,
) -> Report:
    interrupted = results.interrupted | killed_in_flight
    seqs: dict[UUID, list[int]] = defaultdict(list)
    completed: dict[UUID, list[int]] = defaultdict(list)
    maybe_completed: dict[UUID, list[int]] = defaultdict(list)
    phases: dict[UUID, list[str]] = defaultdict(list)
    for row in rows:
        seqs[row.event_id].append(row.seq)
        if row.attempt in interrupted:
            outcome = "/interrupted"
        elif row.attempt in unsure:
            outcome = "/killed"
            maybe_completed[row.event_id].append(row.seq)
        else:
            outcome = ""
            completed[row.event_id].append(row.seq)
        phases[row.event_id].append(f"{row.worker}/{row.phase}/d{row.depth}{outcome}")
    for event_id, candidates in maybe_completed.items():
        if not completed[event_id] and event_id in seen:
            completed[event_id].append(candidates[0])
    missing = [e for e in event_ids if not completed[e]]
    twice = [e for e in event_ids if len(completed[e]) > 1]
    again = [e for e in event_ids if completed[e] and len(seqs[e]) > len(completed[e])]
    # The leader's completed handling released the event: all of the event's rows,
    # interrupted ones included, must come after it.
    out_of_order = [
        (e, leader)
        for e, leader in leader_of.items()
        if seqs[e] and min(seqs[e]) < max(completed[leader] or seqs[leader] or [0])
    ]
    # Handled only by the final sweep: they waited for the lookback.
    swept = [e for e in event_ids if seqs[e] and all("/sweep/" in p for p in phases[e])]
    return Report(
        name=name,
        events=len(event_ids),
        workers=workers,
        redelivery_workers=redelivery_workers,
        duplicates=duplicates,
        kills=kills,
        db_restarts=db_restarts,
        seed=seed,
        handled=len(event_ids) - len(missing),
        handlings=len(rows),
        missing=missing,
        handled_twice=twice,
        rehandled_after_interruption=again,
        out_of_order=out_of_order,
        left=left,
        swept=swept,
        phases_by_event=dict(phases),
        workers_results=results,
    )
