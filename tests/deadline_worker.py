"""A worker for the dropped-path test, run in a network namespace of its own.

It reads commands from stdin, one a line, and answers each with a JSON line:
``handle`` delivers a fresh event through ``preceding_event_confirmed`` and reports
the outcome and how long the call took; ``quit`` ends it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from ordering import CausalOrdering, ReceivedEvent, StoreUnavailable, dispose

from .helpers import make_event, real_clock


async def _no_followers(event: ReceivedEvent, depth: int = 0) -> None:
    raise AssertionError("no event of this worker follows another")


async def main(url: str, scope: str) -> None:
    ordering = CausalOrdering(scope, url=url)
    clock = real_clock()
    loop = asyncio.get_running_loop()
    while (line := await loop.run_in_executor(None, sys.stdin.readline)) not in ("", "quit\n"):
        assert line == "handle\n", line
        event = make_event(clock, name="across-the-path")
        started = time.monotonic()
        outcome = "handled"
        try:
            async with ordering.preceding_event_confirmed(_no_followers, event):
                pass
        except StoreUnavailable as exc:
            outcome = f"unavailable: {exc}"
        answer = {
            "event": str(event.id),
            "outcome": outcome,
            "seconds": time.monotonic() - started,
        }
        print(json.dumps(answer), flush=True)
    await dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
