"""Several PostgreSQL hosts in one URL (a primary and its standbys).

Users write the host list in any of the forms libpq, asyncpg and SQLAlchemy document:

- in the netloc: ``postgresql+asyncpg://u@h1:5432,h2:5432/db``
- one ``host`` parameter: ``postgresql+asyncpg://u@/db?host=h1:5432,h2:5432``
- repeated ``host`` parameters: ``postgresql+asyncpg://u@/db?host=h1:5432&host=h2:5432``
- libpq's parallel lists: ``postgresql+asyncpg://u@/db?host=h1,h2&port=5432,5433``

``canonical_url`` turns each into one form that SQLAlchemy can parse (repeated ``host``
parameters, each ``name:port``) and ``asyncpg_dsn`` renders that for asyncpg, which
reads only the last of repeated parameters but understands hosts in the netloc.  The
store writes on every call, so a URL with several hosts must say
``target_session_attrs=read-write`` (or ``primary``): asyncpg then tries the hosts in
order and keeps the first that accepts writes.  Without it, asyncpg (like libpq)
takes the first host that answers, which after a failover is a standby.

Messages never repeat the user name or password of a URL.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.engine import URL

logger = logging.getLogger(__name__)

#: target_session_attrs values that keep the store's writes off a standby.
WRITABLE_ATTRS = ("read-write", "primary")
#: Values that would let a connection land on a standby (``any`` does so only when
#: there are several hosts: with one, there is nothing to choose).
STANDBY_ATTRS = ("read-only", "standby", "prefer-standby")
KNOWN_ATTRS = (*WRITABLE_ATTRS, "any", *STANDBY_ATTRS)

#: The form named in messages.
WORKING_FORM = (
    "postgresql+asyncpg://USER@HOST1:PORT1,HOST2:PORT2/DB?target_session_attrs=read-write"
)

_BRACKETED = re.compile(r"\[(?P<address>[^\]]+)\](?::(?P<port>[^:]*))?")


@dataclass(frozen=True)
class Host:
    """One host of a URL: a name, an IP address or a socket directory, and its port
    (None: the default)."""

    name: str
    port: int | None = None

    def spec(self) -> str:
        """``name:port``, an IPv6 address in brackets."""
        name = f"[{self.name}]" if ":" in self.name else self.name
        return name if self.port is None else f"{name}:{self.port}"


def canonical_url(url: str) -> str:
    """``url`` with several hosts written as repeated ``host=name:port`` parameters,
    checked; any other URL unchanged (apart from the check of its
    target_session_attrs).  Raises ValueError naming the problem and the form that
    works."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith("postgres"):
        return url
    userinfo, hostlist, path, query = _split(rest)
    at = userinfo.endswith("@")
    userinfo = userinfo[:-1] if at else userinfo
    params = urllib.parse.parse_qsl(query, keep_blank_values=True)
    attrs = _target_session_attrs(params)
    in_query = [value for key, value in params if key == "host"]
    ports = [value for key, value in params if key == "port"]
    several = "," in hostlist or len(in_query) > 1 or any("," in v for v in in_query + ports)
    if not several:
        if attrs in STANDBY_ATTRS:
            raise ValueError(_standby_message(attrs))
        return url
    if hostlist and in_query:
        raise ValueError(
            f"the URL names hosts both before the database and in host=: give them once, "
            f"e.g. {WORKING_FORM}"
        )
    hosts = _hosts(hostlist.split(",") if hostlist else _flatten(in_query), ports)
    if attrs is None or attrs not in WRITABLE_ATTRS:
        raise ValueError(_attrs_message(attrs, len(hosts)))
    user, _, password = userinfo.partition(":")
    database = urllib.parse.unquote(path[1:]) if path.startswith("/") else ""
    rebuilt = URL.create(
        scheme,
        username=urllib.parse.unquote(user) if at else None,
        password=urllib.parse.unquote(password) if at and ":" in userinfo else None,
        database=database or None,
        query=_with_hosts(params, hosts),
    )
    return rebuilt.render_as_string(hide_password=False)


def hosts_of(url: URL) -> list[Host]:
    """The hosts of a canonical URL's ``host`` parameters (empty: the netloc's one host)."""
    value = url.query.get("host", ())
    values = [value] if isinstance(value, str) else list(value)
    return _hosts(values, []) if len(values) > 1 else []


def asyncpg_dsn(url: URL) -> str:
    """What asyncpg connects to: a canonical URL (driver name ``postgresql``) with
    several hosts as ``user:password@host1:port1,host2:port2/db``; otherwise as is."""
    hosts = hosts_of(url)
    if not hosts:
        return url.render_as_string(hide_password=False)
    return _netloc_dsn(url, hosts)


def host_dsns(url: URL) -> list[str]:
    """One asyncpg DSN per host of a canonical URL (driver name ``postgresql``), in
    order; the URL's own rendering when it has one host."""
    hosts = hosts_of(url)
    if not hosts:
        return [url.render_as_string(hide_password=False)]
    return [_netloc_dsn(url, [host]) for host in hosts]


#: Errors after which the next host is tried: the host refused or did not answer in
#: its share of the time, is a standby (target_session_attrs), or is starting up.
_NEXT_HOST = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)


async def connect_in_order(
    dsns: Sequence[str], seconds: float, **options: Any
) -> asyncpg.Connection:
    """Connect to the first of ``dsns`` that answers and matches its
    target_session_attrs, giving each host an equal share of the ``seconds`` left.

    asyncpg's own multi-host connect spends its one timeout on the first host when
    that host never answers (a machine that died without closing its sockets), and so
    never reaches the new primary; libpq's connect_timeout is per host, as here.
    """
    loop = asyncio.get_running_loop()
    ends = loop.time() + seconds
    error: BaseException | None = None
    for index, dsn in enumerate(dsns):
        share = (ends - loop.time()) / (len(dsns) - index)
        if share <= 0:
            break
        try:
            connection: asyncpg.Connection = await asyncpg.connect(dsn, timeout=share, **options)
            return connection
        except _NEXT_HOST as exc:
            if len(dsns) == 1:
                raise
            logger.info("host %d of %d failed (%r), trying the next", index + 1, len(dsns), exc)
            error = exc
    if error is not None:
        raise error
    raise TimeoutError(f"no host answered within {seconds:g}s")


def _netloc_dsn(url: URL, hosts: Sequence[Host]) -> str:
    """``postgresql://user:password@host1:port1,.../db?query`` without ``host=``."""
    userinfo = ""
    if url.username is not None:
        userinfo = urllib.parse.quote(url.username, safe="")
        if url.password is not None:
            userinfo += ":" + urllib.parse.quote(str(url.password), safe="")
        userinfo += "@"
    netloc = ",".join(_netloc_spec(host) for host in hosts)
    database = urllib.parse.quote(url.database or "", safe="")
    rest = url.difference_update_query(["host"]).query
    query = urllib.parse.urlencode(
        [(k, item) for k, v in rest.items() for item in ([v] if isinstance(v, str) else v)]
    )
    return f"{url.drivername}://{userinfo}{netloc}/{database}" + (f"?{query}" if query else "")


# -- parsing ---------------------------------------------------------------------------


#: What follows ``scheme://``, split as SQLAlchemy splits it: the user name stops at
#: ``:`` or ``/``, the password (which may hold unquoted ``/`` and ``?``) at ``@``.
_AFTER_SCHEME = re.compile(
    r"(?:(?P<userinfo>[^:/]*(?::[^@]*)?)@)?(?P<hostlist>[^/?]*)(?P<path>/[^?]*)?(?:\?(?P<query>.*))?",
    re.DOTALL,
)


def _split(rest: str) -> tuple[str, str, str, str]:
    """userinfo (with its ``@``), host list, path and query of what follows ``scheme://``."""
    match = _AFTER_SCHEME.fullmatch(rest)
    assert match is not None  # every part is optional
    userinfo = match.group("userinfo")
    return (
        "" if userinfo is None else userinfo + "@",
        match.group("hostlist"),
        match.group("path") or "",
        match.group("query") or "",
    )


def _flatten(values: list[str]) -> list[str]:
    return [spec for value in values for spec in value.split(",")]


def _hosts(specs: list[str], ports: list[str]) -> list[Host]:
    hosts = [_host(urllib.parse.unquote(spec)) for spec in specs]
    if not ports:
        return hosts
    port_list = _flatten(ports)
    if any(host.port is not None for host in hosts):
        raise ValueError("the URL gives ports both after the hosts and in port=: give them once")
    if len(port_list) == 1:
        port_list *= len(hosts)
    if len(port_list) != len(hosts):
        raise ValueError(
            f"the URL gives {len(port_list)} ports in port= for {len(hosts)} hosts: "
            "give one port, or one per host in the same order"
        )
    return [
        Host(host.name, _port(port, host.name)) for host, port in zip(hosts, port_list, strict=True)
    ]


def _host(spec: str) -> Host:
    spec = spec.strip()
    if not spec:
        raise ValueError(f"the URL's host list has an empty entry: write it as {WORKING_FORM}")
    if "@" in spec:  # not echoed: it may be the end of a password
        raise ValueError("a host in the URL holds '@': write an @ in the password as %40")
    if spec.startswith("/"):  # a socket directory
        return Host(spec)
    if spec.startswith("["):
        match = _BRACKETED.fullmatch(spec)
        if match is None:
            raise ValueError(f"the URL's host {spec!r} is not an IPv6 address in brackets")
        port = match.group("port")
        address = match.group("address")
        return Host(address, _port(port, address) if port is not None else None)
    if spec.count(":") > 1:  # a bare IPv6 address: its port comes from port=
        return Host(spec)
    name, colon, port = spec.partition(":")
    return Host(name, _port(port, name) if colon else None)


def _port(text: str, host: str) -> int:
    if not text.strip().isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"the port {text!r} of the URL's host {host!r} is not a port number")
    return int(text)


def _target_session_attrs(params: list[tuple[str, str]]) -> str | None:
    values = {value for key, value in params if key == "target_session_attrs"}
    if len(values) > 1:
        raise ValueError("the URL gives target_session_attrs twice, with different values")
    value = values.pop() if values else None
    if value is not None and value not in KNOWN_ATTRS:
        raise ValueError(
            f"target_session_attrs={value!r} is not one of {', '.join(KNOWN_ATTRS)}: "
            "the store needs target_session_attrs=read-write"
        )
    return value


def _with_hosts(params: list[tuple[str, str]], hosts: list[Host]) -> dict[str, str | list[str]]:
    query: dict[str, str | list[str]] = {"host": [host.spec() for host in hosts]}
    for key, value in params:
        if key not in ("host", "port"):
            query[key] = value
    return query


def _netloc_spec(host: Host) -> str:
    """A host as asyncpg reads it in the netloc (it unquotes names, not brackets)."""
    if ":" in host.name:
        return host.spec()
    name = urllib.parse.quote(host.name, safe="")
    return name if host.port is None else f"{name}:{host.port}"


def _attrs_message(attrs: str | None, hosts: int) -> str:
    given = "no target_session_attrs" if attrs is None else f"target_session_attrs={attrs}"
    return (
        f"the URL names {hosts} hosts with {given}: a connection could land on a standby, "
        f"where the store's writes fail. Use target_session_attrs=read-write, "
        f"e.g. {WORKING_FORM}"
    )


def _standby_message(attrs: str) -> str:
    return (
        f"target_session_attrs={attrs} sends connections to a standby, where the store's "
        "writes fail: use target_session_attrs=read-write"
    )
