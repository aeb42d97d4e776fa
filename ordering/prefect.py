"""Prefect's ``causal_ordering`` hook, backed by the SQL store.

Point a Prefect 3 server at it with one setting::

    PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=ordering.prefect

Prefect then builds ``CausalOrdering(scope="triggers")`` once per event.  Construction
does no I/O and opens nothing: every instance on the same URL shares the store's one
backend and its connections per event loop, and the URL is worked out once per
distinct setting.

The database is ``$ORDERING_DATABASE_URL`` when set, else Prefect's own database
(``PREFECT_API_DATABASE_CONNECTION_URL`` / ``PREFECT_SERVER_DATABASE_CONNECTION_URL``,
by default a SQLite file under ``PREFECT_HOME``).  On PostgreSQL our objects live in a
schema of their own (``ordering``), so Prefect's ``database reset`` neither trips on
nor drops them; on SQLite they are prefixed ``ordering_``, alembic's version table
included.  Create them with ``ordering migrate --url ...``.

With Prefect's metrics on (``PREFECT_SERVER_METRICS_ENABLED=true``) the store's metrics
appear on Prefect's own ``/api/metrics``: Prefect serves prometheus_client's default
registry there, and this module, when it is imported and no OpenTelemetry MeterProvider
was installed, installs one whose Prometheus reader registers with that registry (see
``serve_on_prometheus`` and docs/metrics.md).

This is the only module of the package that imports Prefect.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from functools import lru_cache
from uuid import UUID

import prefect.types._datetime as prefect_datetime
from prefect.server.events import ordering as prefect_ordering
from prefect.server.events.schemas.events import Event, ReceivedEvent
from prefect.settings import get_current_settings
from sqlalchemy.engine import make_url

from . import causal, exceptions
from .causal import EventHandler
from .events import as_uuid
from .hosts import canonical_url
from .urls import URL_ENV, resolve_url, safe_url

__all__ = [
    "CausalOrdering",
    "EventAlreadyProcessed",
    "EventArrivedEarly",
    "MaxDepthExceeded",
    "database_url",
    "serve_on_prometheus",
    "set_clock",
    "use_clock",
]

logger = logging.getLogger(__name__)

#: Where the URL came from when ``ORDERING_DATABASE_URL`` is not set (for messages).
PREFECT_URL_SETTING = "PREFECT_API_DATABASE_CONNECTION_URL"


# -- metrics ---------------------------------------------------------------------------


def serve_on_prometheus() -> bool:
    """Make the store's metrics part of what prometheus_client's default registry (so
    Prefect's ``/api/metrics``) serves: install an OpenTelemetry SDK MeterProvider with
    a Prometheus reader, unless a MeterProvider is installed already (then the
    application's own provider gets the metrics, and exports them its own way).

    Returns whether it installed one.  Called when this module is imported, if
    Prefect's metrics are enabled.
    """
    from opentelemetry import metrics as otel
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    # The API hands out a proxy until a provider is set (or one is named in
    # OTEL_PYTHON_METER_PROVIDER); setting one a second time is refused with a warning.
    if not isinstance(otel.get_meter_provider(), _ProxyMeterProvider):
        return False
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
    except ImportError:
        logger.warning(
            "Prefect's metrics are on but the store's cannot join them: install "
            "sql-causal-ordering[prefect] (opentelemetry-sdk and "
            "opentelemetry-exporter-prometheus)"
        )
        return False
    otel.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    logger.info("the store's metrics are served with Prefect's, on its /api/metrics")
    return True


if get_current_settings().server.metrics_enabled:
    serve_on_prometheus()


class EventArrivedEarly(prefect_ordering.EventArrivedEarly, exceptions.EventArrivedEarly):
    """Both Prefect's and our signal: Prefect's triggers consumer catches its own class."""

    def __init__(self, event: ReceivedEvent) -> None:
        # Prefect's __init__ only stores the event; ours also gives the message.
        exceptions.EventArrivedEarly.__init__(self, event)


class MaxDepthExceeded(prefect_ordering.MaxDepthExceeded, exceptions.MaxDepthExceeded):
    """Both Prefect's and our signal for followers handled too deep."""

    def __init__(self, event: ReceivedEvent) -> None:
        exceptions.MaxDepthExceeded.__init__(self, event)


class EventAlreadyProcessed(prefect_ordering.EventArrivedEarly, exceptions.EventAlreadyProcessed):
    """A redelivery of an event that was processed already.

    Also Prefect's EventArrivedEarly, which Prefect's triggers consumer catches and
    acknowledges: the right end for a duplicate (no error, no redelivery loop).
    """

    def __init__(self, event: ReceivedEvent) -> None:
        exceptions.EventAlreadyProcessed.__init__(self, event)


def _as_prefect(exc: BaseException) -> BaseException | None:
    """Our ordering signal as the class Prefect catches; None when it already is one."""
    if isinstance(exc, exceptions.EventAlreadyProcessed) and not isinstance(
        exc, prefect_ordering.EventArrivedEarly
    ):
        return EventAlreadyProcessed(exc.event)
    if isinstance(exc, exceptions.EventArrivedEarly) and not isinstance(
        exc, prefect_ordering.EventArrivedEarly
    ):
        return EventArrivedEarly(exc.event)
    if isinstance(exc, exceptions.MaxDepthExceeded) and not isinstance(
        exc, prefect_ordering.MaxDepthExceeded
    ):
        return MaxDepthExceeded(exc.event)
    return None


@contextmanager
def _prefect_signals() -> Iterator[None]:
    try:
        yield
    except (
        exceptions.EventArrivedEarly,
        exceptions.MaxDepthExceeded,
        exceptions.EventAlreadyProcessed,
    ) as exc:
        translated = _as_prefect(exc)
        if translated is None:
            raise
        raise translated from exc


# -- the clock ---------------------------------------------------------------------

_clock: Callable[[], datetime] | None = None


def set_clock(clock: Callable[[], datetime] | None) -> Callable[[], datetime] | None:
    """For tests: the clock that orderings built from now on read (None: real UTC time).

    Prefect builds the ordering with ``scope`` only, so a test cannot pass ``clock=``;
    it sets one here instead.  Returns the clock that was set before.
    """
    global _clock
    previous, _clock = _clock, clock
    return previous


def _prefect_now() -> datetime:
    """Prefect's own notion of now (its tests patch ``prefect.types._datetime.now``)."""
    now: datetime = prefect_datetime.now("UTC")
    return now


@contextmanager
def use_clock(clock: Callable[[], datetime]) -> Iterator[None]:
    """``set_clock`` for the duration of a ``with`` block."""
    previous = set_clock(clock)
    try:
        yield
    finally:
        set_clock(previous)


# -- the database URL ----------------------------------------------------------------


def database_url() -> str:
    """``$ORDERING_DATABASE_URL`` when set, else Prefect's database URL; normalized
    to ``sqlite+aiosqlite`` or ``postgresql+asyncpg``.

    Runs once per event (Prefect builds an ordering per event), so the answer is
    remembered per URL and per Prefect settings object.
    """
    explicit = os.environ.get(URL_ENV)
    if explicit:
        return _checked_url(explicit, URL_ENV)
    settings = get_current_settings()
    known = _url_by_settings.get(id(settings))
    if known is not None and known[0] is settings:
        return known[1]
    secret = settings.server.database.connection_url
    if secret is None:  # Prefect fills in its default when it loads settings
        raise ValueError(f"Prefect has no database URL: set {URL_ENV} or {PREFECT_URL_SETTING}")
    url = _checked_url(secret.get_secret_value(), PREFECT_URL_SETTING)
    if len(_url_by_settings) >= 32:  # settings objects come and go in tests: stay bounded
        _url_by_settings.clear()
    _url_by_settings[id(settings)] = (settings, url)
    return url


#: Prefect settings object id -> (that object, our URL).  Keeping the object makes the
#: identity check safe: its id cannot be reused while it is held here.
_url_by_settings: dict[int, tuple[object, str]] = {}


@lru_cache(maxsize=32)
def _checked_url(url: str, source: str) -> str:
    """Parse, check and normalize once per distinct URL.  Messages and logs never show
    the password, which the raw URL (from Prefect's secret setting) may hold."""
    try:
        url = canonical_url(url)  # several hosts: one form (see hosts.py)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    try:
        parsed = make_url(url)
    except Exception:
        raise ValueError(f"{source} is not a database URL") from None
    if _is_in_memory(parsed.database, dict(parsed.query)):
        raise ValueError(
            f"{source} names an in-memory SQLite database "
            f"({parsed.render_as_string(hide_password=True)}), which the ordering cannot "
            f"share or keep: set {URL_ENV} to a SQLite file or a PostgreSQL database"
        )
    resolved = resolve_url(parsed.render_as_string(hide_password=False))
    logger.info(
        "Prefect causal ordering uses %s (from %s)",
        safe_url(resolved),
        source,
        extra={"url": safe_url(resolved), "source": source},
    )
    return resolved


def _is_in_memory(database: str | None, query: dict[str, object]) -> bool:
    return ":memory:" in (database or "") or query.get("mode") == "memory"


# -- the ordering ----------------------------------------------------------------------


class CausalOrdering(causal.CausalOrdering[ReceivedEvent], prefect_ordering.CausalOrdering):
    """Prefect's ``CausalOrdering``, with its state in the SQL store.

    Reads and writes Prefect's own ``ReceivedEvent`` (followers come back as Prefect's
    class) and raises Prefect's ``EventArrivedEarly``/``MaxDepthExceeded`` (subclasses
    of ours too), so Prefect's triggers service uses it unchanged.
    """

    def __init__(
        self,
        scope: str,
        *,
        url: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        super().__init__(
            scope,
            url=url or database_url(),
            clock=clock or _clock or _prefect_now,
            event_type=ReceivedEvent,
        )

    async def event_has_been_seen(self, event: UUID | str | Event) -> bool:
        # Prefect's signature takes any Event (or an id), not only a ReceivedEvent: an
        # Event as emitted has no ``received`` yet, so only its id is read here.
        if isinstance(event, (UUID, str)):
            return await super().event_has_been_seen(event)
        return await super().event_has_been_seen(as_uuid(getattr(event, "id", None), "event.id"))

    async def wait_for_leader(self, event: ReceivedEvent) -> None:
        with _prefect_signals():
            await super().wait_for_leader(event)

    @asynccontextmanager
    async def preceding_event_confirmed(
        self,
        handler: EventHandler[ReceivedEvent],
        event: ReceivedEvent,
        depth: int = 0,
    ) -> AsyncIterator[None]:
        with _prefect_signals():
            async with super().preceding_event_confirmed(handler, event, depth):
                yield
