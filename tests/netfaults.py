"""Network faults for tests, made with real sockets: a server that accepts and never
answers, a proxy that can stop passing bytes mid-conversation, and a network namespace
whose link to this one can be taken down (packets dropped, no reset)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port whose server completes the TCP handshake (the kernel does it, from the
    listen backlog) and then never reads nor answers: a hung server."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def closed_port() -> int:
    """A port nothing listens on: connections to it are refused."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


class Proxy:
    """Passes TCP connections on to ``target``, from a thread with a loop of its own.

    ``freeze()`` makes the server behind it stop answering, mid-statement: the bytes
    of open connections go nowhere from then on (a hung or dead server, a dropped
    path), and nothing is closed.  ``thaw()`` lets new connections through again; the
    frozen ones stay dead, as after a server restart."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1"):
        self._target = (target_host, target_port)
        self._listen_host = listen_host
        self._loop = asyncio.new_event_loop()
        self._flowing = threading.Event()
        self._flowing.set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def __enter__(self) -> Proxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._flowing.set()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, self._listen_host, 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, upstream_writer),
            self._pipe(upstream_reader, writer),
            return_exceptions=True,
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frozen = False
        try:
            while data := await reader.read(65536):
                frozen = frozen or not self._flowing.is_set()
                if not frozen:
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()


@dataclass
class Namespace:
    """A network namespace joined to this one by a veth pair: ``host_address`` is this
    side's end, ``name`` the namespace to run a process in (``ip netns exec``)."""

    name: str
    host_link: str
    host_address: str
    inner_address: str

    def link(self, up: bool) -> None:
        """Take this side's end of the pair down (packets to and from the namespace are
        dropped: no reset, no error) or bring it back up."""
        _ip("link", "set", self.host_link, "up" if up else "down")

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


def can_make_namespaces() -> str | None:
    """Why network namespaces cannot be made here, or None if they can."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    return None


@contextlib.contextmanager
def namespace() -> Iterator[Namespace]:
    """A fresh namespace and veth pair, removed afterwards.  The addresses are the
    test's own, on a link that exists only between the two ends."""
    tag = uuid.uuid4().hex[:6]
    name, host_link, inner_link = f"ordering-{tag}", f"ordh{tag}", f"ordi{tag}"
    octet = int(tag[:2], 16) % 250 + 1
    host_address, inner_address = f"169.254.{octet}.1", f"169.254.{octet}.2"
    _ip("netns", "add", name)
    try:
        _ip("link", "add", host_link, "type", "veth", "peer", "name", inner_link)
        _ip("link", "set", inner_link, "netns", name)
        _ip("addr", "add", f"{host_address}/30", "dev", host_link)
        _ip("link", "set", host_link, "up")
        _ip("-n", name, "addr", "add", f"{inner_address}/30", "dev", inner_link)
        _ip("-n", name, "link", "set", inner_link, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield Namespace(name, host_link, host_address, inner_address)
    finally:
        subprocess.run(["ip", "link", "del", host_link], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {done.stderr.strip()}")
