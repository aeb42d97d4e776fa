"""Operating the store: revision state, status, followers, prune and replay.

The database side of the ``ordering`` command line, callable from Python as well (a
service can schedule ``await prune(url)``).  Each concern has a module of its own;
all of them reach the database through the same backend, and so the same
connection handling and retries, as the hot path, with their statements in
ordering/sql/<dialect>/queries.sql.

Every function takes ``now`` (default: the wall clock) because the store's notion of
time is the clock its orderings were given: tests and investigations pass their own.
"""

from .database import RevisionState, open_backend, revision_state
from .followers import WaitingFollower, list_followers
from .prune import DEFAULT_BATCH_SIZE, PruneResult, prune
from .replay import (
    DEFAULT_REPLAY_SCOPE,
    REPLAY_REQUIRED_FIELDS,
    LineProblem,
    ReplayClock,
    ReplayReport,
    check_lines,
    parse_line,
    replay,
)
from .status import OldestWaiting, Refresh, ScopeChange, ScopeStatus, status, watch

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_REPLAY_SCOPE",
    "REPLAY_REQUIRED_FIELDS",
    "LineProblem",
    "OldestWaiting",
    "PruneResult",
    "Refresh",
    "ReplayClock",
    "ReplayReport",
    "RevisionState",
    "ScopeChange",
    "ScopeStatus",
    "WaitingFollower",
    "check_lines",
    "list_followers",
    "open_backend",
    "parse_line",
    "prune",
    "replay",
    "revision_state",
    "status",
    "watch",
]
