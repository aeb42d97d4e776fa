"""The soak bench (bench/soak.py) for a few seconds: its worker processes run, its
periods are reported, and its correctness check holds on both databases.  Its speed
verdicts are figures for a long run on a quiet machine, not asserted here."""

from __future__ import annotations

import uuid

from bench.soak import parser, soak


async def test_a_short_soak_handles_every_event_in_order(db_url: str) -> None:
    args = parser().parse_args(
        [
            "--dialect",
            "sqlite" if db_url.startswith("sqlite") else "postgresql",
            "--workers=2",
            "--tasks=8",
            "--warm-up=1",
            "--period=1",
            f"--minutes={2 / 60}",
            "--seen-expiration=2",
            "--prune-interval=1",
            "--lookback=0.5",
            "--sweep-interval=0.5",
            "--orphan-share=0.01",
        ]
    )
    result = await soak(db_url, args, scope=f"test-soak-{uuid.uuid4().hex[:8]}")

    assert [p.label for p in result.periods] == ["warm-up", "1", "2"]
    assert all(p.events > 0 for p in result.periods)
    failed = [c for c in result.correctness if not c.passed]
    assert not failed, failed
    assert result.totals["generated"]["soak.chained"] > 0
    assert result.totals["parked"] > 0
    assert result.totals["generated"]["soak.orphan"] > 0
