"""The Redis peer: prefect-redis's ``CausalOrdering`` on a local Redis, through the same
workloads as ours, measured in the same run and next to ours.

prefect-redis is the store Prefect's server uses when it runs on more than one process,
so it is the peer to compare with; Prefect's in-memory ordering (reference.py) is a
ceiling.  The peer runs in this process when ``prefect_redis`` is importable here, else
in the interpreter given with ``--prefect-python`` (``python -m bench.redis_peer``, one
process per measurement), else not at all (a note says why).

prefect-redis takes its connection from Prefect's settings; the bench sets
``PREFECT_REDIS_MESSAGING_HOST``/``PORT``/``DB`` (and ``USERNAME``/``PASSWORD`` when
the URL has them) from ``--redis-url`` (default ``$ORDERING_BENCH_REDIS_URL``, else
``redis://127.0.0.1:6379/15``), drops ``PREFECT_REDIS_MESSAGING_URL`` (it would win),
and checks that the client really points there.  Every scope starts with
``ordering-bench:<run id>:``, so runs never share keys, and the run's keys are deleted
at the end.

Its commands and round trips are counted in a pass of their own, in redis-py's
connection: every command packed (a pipeline's ``MULTI``/``EXEC`` included) and every
send (a pipeline is one send, so one round trip).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .counting import Counts
from .results import WorkloadResult
from .workloads import (
    PREFECT_CALLS,
    WARM_UP_CONSUMERS,
    WORKLOADS,
    check_causal,
    deliver,
    deliver_among_consumers,
    make_consumer,
    make_specs,
    materialize,
)

MODULE = "prefect_redis.ordering"
IMPLEMENTATION = "prefect-redis"
DEFAULT_URL = "redis://127.0.0.1:6379/15"
URL_ENV = "ORDERING_BENCH_REDIS_URL"
KEY_ROOT = "ordering-bench"
SETTINGS_PREFIX = "PREFECT_REDIS_MESSAGING_"
WARM_UP_EVENTS = 50
ROOT = Path(__file__).resolve().parent.parent


def redis_url(flag: str | None) -> str:
    return flag or os.environ.get(URL_ENV) or DEFAULT_URL


def importable() -> bool:
    try:
        return importlib.util.find_spec(MODULE) is not None
    except ModuleNotFoundError:
        return False


def settings_environment(url: str) -> dict[str, str]:
    """Prefect's settings that point prefect-redis at ``url`` (redis://[user:pw@]host:port/db)."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"--redis-url must be a redis:// URL, not {url!r}")
    database = parts.path.lstrip("/") or "0"
    if not database.isdigit():
        raise ValueError(f"--redis-url: the database must be a number, not {database!r}")
    values = {
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or 6379),
        "DB": database,
    }
    if parts.username:
        values["USERNAME"] = unquote(parts.username)
    if parts.password:
        values["PASSWORD"] = unquote(parts.password)
    return {SETTINGS_PREFIX + name: value for name, value in values.items()}


def safe_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


class RedisPeer:
    """prefect-redis in this process.  ``run`` measures; ``finish`` (on every event loop
    that ran something) deletes the run's keys and closes that loop's client."""

    def __init__(self, url: str, run_id: str | None = None) -> None:
        self.url = url
        self.run_id = run_id or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.prefix = f"{KEY_ROOT}:{self.run_id}"
        environment = settings_environment(url)
        os.environ.pop(SETTINGS_PREFIX + "URL", None)
        os.environ.update(environment)
        self._expected = environment
        module = importlib.import_module(MODULE)
        # prefect-redis logs every follower that parks at INFO (through Prefect's
        # handlers, to stderr): quiet, as ours is, so neither pays for log lines.
        logging.getLogger(module.logger.name).setLevel(logging.WARNING)
        self.ordering_class: Any = module.CausalOrdering
        self.arrived_early: type[BaseException] = importlib.import_module(
            "prefect.server.events.ordering"
        ).EventArrivedEarly
        self.model: type = importlib.import_module(
            "prefect.server.events.schemas.events"
        ).ReceivedEvent
        self._client_module: Any = importlib.import_module("prefect_redis.client")

    def _scope(self, label: str) -> str:
        return f"{self.prefix}:{label.split(',')[0]}-{uuid.uuid4().hex[:10]}"

    async def check(self) -> str:
        """Raise unless prefect-redis's client points at ``self.url`` and Redis answers;
        the server's version and persistence settings, for the notes."""
        client = self.ordering_class(self._scope("check")).redis
        kwargs = client.connection_pool.connection_kwargs
        got = (str(kwargs.get("host")), str(kwargs.get("port")), str(kwargs.get("db")))
        want = tuple(self._expected[SETTINGS_PREFIX + k] for k in ("HOST", "PORT", "DB"))
        if got != want:
            raise RuntimeError(
                f"prefect-redis's client points at host/port/db {got}, not {want}: "
                "a Prefect profile setting PREFECT_REDIS_MESSAGING_URL overrides the bench's"
            )
        await client.ping()
        version = (await client.info("server")).get("redis_version", "?")
        settings = {}
        for name in ("appendonly", "appendfsync", "save"):
            try:
                settings.update(await client.config_get(name))
            except Exception:  # CONFIG may be disabled on a managed server
                settings[name] = "?"
        persistence = ", ".join(f"{k} {v!r}" for k, v in settings.items())
        return f"Redis {version}; persistence: {persistence}"

    async def warm_up(self, seed: int) -> None:
        for workload in WORKLOADS:
            await self.run(workload, WARM_UP_EVENTS, seed, count=False)
        await self._run_consumers(WARM_UP_CONSUMERS, "independent", 4 * WARM_UP_CONSUMERS, seed)

    async def run(
        self,
        workload: str,
        events: int,
        seed: int,
        *,
        prefect_calls: bool = False,
        consumers: int | None = None,
        count: bool = True,
    ) -> WorkloadResult:
        """One measurement: ``workload`` (in-order for ``prefect_calls``) with one
        consumer, or ``consumers`` tasks sharing the events."""
        if consumers is not None:
            return await self._run_consumers(consumers, workload, events, seed, prefect_calls)
        counts = None
        if count:
            counts = await self._count(workload, events, seed, prefect_calls=prefect_calls)
        specs = make_specs(workload, events, seed)
        scope = self._scope(workload)
        consumer = make_consumer(
            lambda: self.ordering_class(scope), self.arrived_early, prefect_calls=prefect_calls
        )
        timing = await deliver(consumer, materialize(specs, self.model))
        check_causal(consumer.handled, specs)
        return WorkloadResult.build(
            IMPLEMENTATION,
            None,
            PREFECT_CALLS if prefect_calls else workload,
            len(specs),
            timing,
            consumer.parked,
            counts,
        )

    async def _run_consumers(
        self, consumers: int, workload: str, events: int, seed: int, prefect_calls: bool = False
    ) -> WorkloadResult:
        """As ours: each consumer task with an instance of its own on one scope (they
        share prefect-redis's client and its connection pool)."""
        scope = self._scope(workload)
        run = await deliver_among_consumers(
            lambda: self.ordering_class(scope),
            self.arrived_early,
            self.model,
            consumers=consumers,
            workload=workload,
            events=events,
            seed=seed,
            prefect_calls=prefect_calls,
        )
        return WorkloadResult.of_consumers(IMPLEMENTATION, None, run)

    async def _count(self, workload: str, events: int, seed: int, *, prefect_calls: bool) -> Counts:
        scope = self._scope(workload)
        consumer = make_consumer(
            lambda: self.ordering_class(scope), self.arrived_early, prefect_calls=prefect_calls
        )
        models = materialize(make_specs(workload, events, seed), self.model)
        counts = Counts(
            method="redis client",
            round_trips=0,
            transactions_counted=False,
            thread_hops_counted=False,
            checkouts_counted=False,
        )
        with _counting_commands(counts):
            await deliver(consumer, models)
        return counts

    async def finish(self) -> int:
        """Delete the run's keys and close this event loop's client; the keys deleted."""
        client = self.ordering_class(self._scope("cleanup")).redis
        deleted = 0
        try:
            batch: list[str] = []
            async for key in client.scan_iter(match=f"{self.prefix}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += await client.delete(*batch)
                    batch = []
            if batch:
                deleted += await client.delete(*batch)
        finally:
            await client.aclose()
            await self._client_module.clear_cached_clients()
        return int(deleted)


@contextmanager
def _counting_commands(counts: Counts) -> Iterator[None]:
    """Count in redis-py's connection class: each command packed, each send."""
    connection_class: Any = importlib.import_module("redis.asyncio.connection").AbstractConnection
    pack = connection_class.pack_command
    send = connection_class.send_packed_command

    def pack_command(self: Any, *args: Any) -> Any:
        counts.statements += 1
        name = str(args[0]).upper() if args else "?"
        counts.by_statement[name] = counts.by_statement.get(name, 0) + 1
        return pack(self, *args)

    async def send_packed_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts.round_trips = (counts.round_trips or 0) + 1
        return await send(self, *args, **kwargs)

    setattr(connection_class, "pack_command", pack_command)  # noqa: B010
    setattr(connection_class, "send_packed_command", send_packed_command)  # noqa: B010
    try:
        yield
    finally:
        setattr(connection_class, "pack_command", pack)  # noqa: B010
        setattr(connection_class, "send_packed_command", send)  # noqa: B010


class RemotePeer:
    """The peer in another interpreter (one with prefect-redis): one process per
    measurement, each warming up, measuring and deleting its keys."""

    def __init__(self, python: str, url: str) -> None:
        self.python = python
        self.url = url
        self.run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    async def check(self) -> str:
        return str(json.loads(await self._call(["--check"])))

    async def warm_up(self, seed: int) -> None:
        """Each process warms up by itself."""

    async def run(
        self,
        workload: str,
        events: int,
        seed: int,
        *,
        prefect_calls: bool = False,
        consumers: int | None = None,
        count: bool = True,
    ) -> WorkloadResult:
        arguments = ["--workload", workload, "--events", str(events), "--seed", str(seed)]
        if prefect_calls:
            arguments.append("--prefect-calls")
        if consumers is not None:
            arguments += ["--consumers", str(consumers)]
        if not count:
            arguments.append("--no-count")
        return WorkloadResult(**json.loads(await self._call(arguments)))

    async def finish(self) -> int:
        return 0

    async def _call(self, arguments: list[str]) -> str:
        root = ROOT
        command = [
            self.python,
            "-m",
            "bench.redis_peer",
            "--redis-url",
            self.url,
            "--run-id",
            self.run_id,
            *arguments,
        ]
        environment = {**os.environ, "PYTHONPATH": str(root)}

        def call() -> str:
            try:
                done = subprocess.run(
                    command, cwd=root, env=environment, capture_output=True, text=True, check=True
                )
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(
                    f"the Redis peer failed under {self.python}: {exc.stderr[-800:]}"
                ) from exc
            return done.stdout

        return await asyncio.to_thread(call)


Peer = RedisPeer | RemotePeer


def open_peer(python: str | None, url: str) -> tuple[Peer | None, str | None]:
    """The peer to measure against, or ``None`` and why not."""
    try:
        if importable():
            return RedisPeer(url), None
        if python:
            return RemotePeer(python, url), None
    except Exception as exc:
        return None, f"the Redis peer is skipped: {exc!r}"
    return None, (
        "the Redis peer is skipped: prefect_redis is not importable here "
        "(install prefect-redis, or give --prefect-python an interpreter that has it)"
    )


async def _main(args: argparse.Namespace) -> str:
    peer = RedisPeer(args.redis_url, args.run_id)
    try:
        server = await peer.check()
        if args.check:
            return json.dumps(server)
        await peer.warm_up(args.seed)
        result = await peer.run(
            args.workload,
            args.events,
            args.seed,
            prefect_calls=args.prefect_calls,
            consumers=args.consumers,
            count=not args.no_count,
        )
        return json.dumps(dataclasses.asdict(result))
    finally:
        await peer.finish()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.redis_peer``: one measurement of the peer, as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.redis_peer")
    parser.add_argument("--redis-url", default=redis_url(None))
    parser.add_argument("--run-id")
    parser.add_argument("--workload", choices=WORKLOADS, default="in-order")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--prefect-calls", action="store_true")
    parser.add_argument("--consumers", type=int)
    parser.add_argument("--no-count", action="store_true")
    parser.add_argument("--check", action="store_true", help="only check that Redis answers")
    args = parser.parse_args(argv)
    print(asyncio.run(_main(args)))


if __name__ == "__main__":
    main()
