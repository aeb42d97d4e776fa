"""A one-line progress bar on stderr, drawn only when a person is watching.

Small on purpose: the command line needs a bar for two loops (prune, replay), and a
dependency for that would be the package's only one not about databases or events.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

BAR_WIDTH = 30


def count(n: int) -> str:
    return f"{n:,}"


def size(n: int) -> str:
    """Bytes, for people: 512 B, 3.4 MiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class Progress:
    """``label [#####.....]  45%  4,500/10,000``, redrawn in place on one line.

    Draws nothing unless ``stream`` is a terminal, so piped and logged output stays
    clean; redraws at most every ``min_interval`` seconds so that a fast loop does not
    spend its time writing to the terminal.  The line is erased on close, leaving the
    terminal for the summary that follows.
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        stream: TextIO | None = None,
        fmt: Callable[[int], str] = count,
        enabled: bool | None = None,
        min_interval: float = 0.1,
    ) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.fmt = fmt
        self.enabled = self._is_terminal() if enabled is None else enabled
        self.min_interval = min_interval
        self.done = 0
        self._drawn_at: float | None = None

    def _is_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.monotonic()
        finished = self.total > 0 and done >= self.total
        if self._drawn_at is None or finished or now - self._drawn_at >= self.min_interval:
            self._draw()
            self._drawn_at = now

    def render(self) -> str:
        if self.total <= 0:
            return f"{self.label} {self.fmt(self.done)}"
        fraction = min(self.done / self.total, 1.0)
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return (
            f"{self.label} [{bar}] {fraction:4.0%}  "
            f"{self.fmt(min(self.done, self.total))}/{self.fmt(self.total)}"
        )

    def _draw(self) -> None:
        self.stream.write("\r\x1b[K" + self.render())
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._drawn_at is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn_at = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
