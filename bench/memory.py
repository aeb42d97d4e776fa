"""This process's memory, to show that it stays flat as the tables grow."""

from __future__ import annotations

import resource
from pathlib import Path


def rss_kib(pid: int | None = None) -> int:
    """Resident set size now, in KiB, of this process or another (from /proc; this
    process's peak where /proc is missing)."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return maxrss_kib()


def maxrss_kib() -> int:
    """The peak resident set size of this process so far, in KiB (Linux units)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
