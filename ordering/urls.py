"""Database URLs: which one to use, checked once; the store's settings they carry
(``?deadline=``, ``?prune_interval=``); and how each driver is given them."""

from __future__ import annotations

import functools
import logging
import os
import re

from sqlalchemy.engine import URL, make_url

from . import hosts

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite+aiosqlite:///ordering.db"
URL_ENV = "ORDERING_DATABASE_URL"

SUPPORTED_DRIVERS = {"sqlite+aiosqlite", "postgresql+asyncpg"}


def resolve_url(url: str | None = None) -> str:
    """The URL to use: the argument, else $ORDERING_DATABASE_URL, else the embedded default.

    Checked here, once, so that a typo fails with a message that names it.
    """
    return _checked_url(url or os.environ.get(URL_ENV) or DEFAULT_URL)


@functools.lru_cache(maxsize=64)
def _checked_url(chosen: str) -> str:
    """Parsing a URL costs tens of microseconds: done once per distinct URL, since an
    ordering may be constructed for every event."""
    chosen = hosts.canonical_url(chosen)  # several hosts: one form, target_session_attrs
    try:
        parsed = make_url(chosen)
    except Exception:  # sqlalchemy's ArgumentError repeats the URL, password and all
        raise ValueError(f"not a database URL: {_mask_password(chosen)!r}") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    if parsed.drivername not in SUPPORTED_DRIVERS:
        raise ValueError(
            f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
            "use sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB"
        )
    if parsed.drivername.startswith("postgresql") and "search_path" in parsed.query:
        raise ValueError(
            "the URL sets search_path, which the store sets to its own schema: "
            "name the schema with schema= or $ORDERING_SCHEMA instead"
        )
    if DEADLINE_PARAMETER in parsed.query:
        _deadline_seconds(parsed.query[DEADLINE_PARAMETER])  # refuses a bad one
    if PRUNE_INTERVAL_PARAMETER in parsed.query:
        _prune_interval_seconds(parsed.query[PRUNE_INTERVAL_PARAMETER])
    if parsed.drivername.startswith("sqlite") and parsed.database in (None, "", ":memory:"):
        raise ValueError(
            "an in-memory SQLite database is not shared between connections: "
            "give a file, e.g. sqlite+aiosqlite:///ordering.db"
        )
    return parsed.render_as_string(hide_password=False)


#: The URL query's name for the deadline of every call of the store (seconds).
DEADLINE_PARAMETER = "deadline"

#: How long a call of the store may take, all attempts included, unless the URL or the
#: ordering says otherwise.
DEFAULT_DEADLINE = 10.0


def _seconds(given: object) -> tuple[float, object]:
    """A URL query value as seconds (nan when not a number), and the text given."""
    text = given[-1] if isinstance(given, tuple) else given
    try:
        return float(str(text)), text
    except ValueError:
        return float("nan"), text


def _deadline_seconds(given: object) -> float:
    seconds, text = _seconds(given)
    if not 0 < seconds < float("inf"):
        raise ValueError(
            f"the URL's {DEADLINE_PARAMETER}= must be a positive number of seconds, not {text!r}"
        )
    return seconds


def _with_seconds(url: str, name: str, seconds: float) -> str:
    """The checked URL with its query parameter ``name`` set to ``seconds``."""
    return (
        make_url(url)
        .update_query_dict({name: f"{seconds:g}"})
        .render_as_string(hide_password=False)
    )


@functools.lru_cache(maxsize=64)
def url_sets_deadline(url: str) -> bool:
    return DEADLINE_PARAMETER in make_url(url).query


@functools.lru_cache(maxsize=64)
def url_deadline(url: str) -> float:
    """The deadline of every call of the store on a checked URL, in seconds."""
    given = make_url(url).query.get(DEADLINE_PARAMETER)
    return DEFAULT_DEADLINE if given is None else _deadline_seconds(given)


@functools.lru_cache(maxsize=64)
def with_deadline(url: str, seconds: float) -> str:
    """The checked URL with its deadline set to ``seconds``."""
    if not 0 < seconds < float("inf"):
        raise ValueError(f"deadline must be a positive time, not {seconds} seconds")
    return _with_seconds(url, DEADLINE_PARAMETER, seconds)


#: The URL query's name for the seconds between two rounds of the store's own pruning
#: (ordering/retention.py); 0 turns it off.
PRUNE_INTERVAL_PARAMETER = "prune_interval"
DEFAULT_PRUNE_INTERVAL = 60.0


def _prune_interval_seconds(given: object) -> float:
    seconds, text = _seconds(given)
    if not 0 <= seconds < float("inf"):
        raise ValueError(
            f"the URL's {PRUNE_INTERVAL_PARAMETER}= must be a number of seconds, 0 or more "
            f"(0 turns the store's pruning off), not {text!r}"
        )
    return seconds


@functools.lru_cache(maxsize=64)
def url_prune_interval(url: str) -> float:
    """Seconds between two rounds of pruning on a checked URL; 0: off."""
    given = make_url(url).query.get(PRUNE_INTERVAL_PARAMETER)
    return DEFAULT_PRUNE_INTERVAL if given is None else _prune_interval_seconds(given)


@functools.lru_cache(maxsize=64)
def with_prune_interval(url: str, seconds: float) -> str:
    """The checked URL with its prune interval set to ``seconds`` (0: off)."""
    if not 0 <= seconds < float("inf"):
        raise ValueError(
            f"prune_interval must be a time of 0 or more (0 turns pruning off), "
            f"not {seconds} seconds"
        )
    return _with_seconds(url, PRUNE_INTERVAL_PARAMETER, seconds)


def driver_url(url: str) -> URL:
    """The URL as a driver takes it: without the store's own parameters."""
    return make_url(url).difference_update_query([DEADLINE_PARAMETER, PRUNE_INTERVAL_PARAMETER])


def _mask_password(text: str) -> str:
    """Hide what looks like a password in a string that would not parse as a URL."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def asyncpg_dsn(url: str) -> str:
    """What asyncpg connects to for a checked PostgreSQL URL: the same URL, query and
    all but the store's ``deadline`` and ``prune_interval``.  asyncpg reads connection
    options from the query (``sslmode``) and passes on the rest as server settings,
    e.g. ``?synchronous_commit=off``.  Several hosts go into the netloc (see hosts.py)."""
    return hosts.asyncpg_dsn(driver_url(url).set(drivername="postgresql"))


def asyncpg_dsns(url: str) -> list[str]:
    """As ``asyncpg_dsn``, one DSN per host, in order: for ``hosts.connect_in_order``."""
    return hosts.host_dsns(driver_url(url).set(drivername="postgresql"))
