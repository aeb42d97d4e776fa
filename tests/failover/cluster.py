"""A PostgreSQL primary and a streaming standby on this machine, for failover tests.

Built from the server binaries (``initdb``, ``pg_basebackup``, ``pg_ctl``) run as the
``postgres`` OS user, in a directory of their own under /tmp or
``$ORDERING_FAILOVER_DIR`` (not pytest's, which may be its owner's alone), listening on
127.0.0.1 at ports of their own and on no Unix socket.  Nothing here touches another
server of the machine.  ``crash_primary`` kills the primary's postmaster and every
process it started with SIGKILL, as a machine that loses power; ``promote`` makes the
standby the primary.  ``destroy`` kills whatever is left of both and removes the
directory, whatever state they are in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Where Debian and Ubuntu put the server binaries (postgresql-15).
DEFAULT_BIN = Path("/usr/lib/postgresql/15/bin")
BIN = Path(os.environ.get("ORDERING_FAILOVER_PG_BIN", str(DEFAULT_BIN)))
TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
OS_USER = "postgres"
DIR_ENV = "ORDERING_FAILOVER_DIR"
STANDBY_NAME = "standby1"

#: Every wait below is bounded.
START_TIMEOUT_S = 60


def missing_prerequisites() -> str | None:
    """Why these clusters cannot be built here, or None."""
    missing = [tool for tool in TOOLS if not (BIN / tool).exists()]
    if missing:
        return f"PostgreSQL server binaries missing in {BIN}: {', '.join(missing)}"
    if os.geteuid() != 0:
        return f"the clusters run as the {OS_USER!r} user via runuser, which needs root"
    if shutil.which("runuser") is None:
        return "runuser is not installed"
    try:
        import pwd

        pwd.getpwnam(OS_USER)
    except KeyError:
        return f"there is no {OS_USER!r} OS user"
    return None


def _base_dir() -> str:
    """Where the clusters' directory goes: $ORDERING_FAILOVER_DIR, else /tmp (whose
    sticky, world-writable mode lets the postgres user in), else the temporary
    directory (which a CI runner may have made its own user's alone)."""
    chosen = os.environ.get(DIR_ENV)
    if chosen:
        return chosen
    tmp = Path("/tmp")
    if tmp.is_dir() and tmp.stat().st_mode & 0o1777 == 0o1777:
        return str(tmp)
    return tempfile.gettempdir()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_postgres(*args: str, timeout: float = START_TIMEOUT_S) -> str:
    result = subprocess.run(
        ["runuser", "-u", OS_USER, "--", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",  # the postgres user may not enter the checkout (a root's home, mode 700)
    )
    if result.returncode != 0:
        command = " ".join(args)
        raise RuntimeError(f"{command} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


@dataclass
class Server:
    name: str
    data: Path
    port: int

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.name}.log"

    def postmaster_pid(self) -> int | None:
        pid_file = self.data / "postmaster.pid"
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> None:
        pg_ctl = str(BIN / "pg_ctl")
        _as_postgres(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def configure(self, settings: dict[str, str]) -> None:
        """Append settings to postgresql.conf (a later line wins)."""
        with (self.data / "postgresql.conf").open("a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = '{value}'\n")

    def processes(self) -> list[int]:
        """The postmaster and every process it started (found through /proc)."""
        postmaster = self.postmaster_pid()
        if postmaster is None or not Path(f"/proc/{postmaster}").exists():
            return []
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after the ')'.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == postmaster:
                children.append(int(entry.name))
        return [postmaster, *children]

    def kill(self) -> int:
        """SIGKILL the postmaster and its children at once; how many were killed."""
        pids = self.processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: processes {pids} survived SIGKILL")
            time.sleep(0.01)
        return len(pids)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@dataclass
class Pair:
    """A primary and a standby streaming from it, synchronous or not."""

    synchronous: bool
    root: Path = field(init=False)
    primary: Server = field(init=False)
    standby: Server = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ordering-failover-", dir=_base_dir()))
        os.chown(self.root, _uid(), -1)  # the postgres user writes its data and logs here
        try:
            _as_postgres("test", "-w", str(self.root), timeout=10)
        except RuntimeError:
            shutil.rmtree(self.root, ignore_errors=True)
            raise RuntimeError(
                f"the {OS_USER!r} user cannot write to {self.root}: set "
                f"{DIR_ENV} to a directory it can reach"
            ) from None
        self.primary = Server("primary", self.root / "primary", free_port())
        self.standby = Server("standby", self.root / "standby", free_port())

    def url(self, database: str = "postgres") -> str:
        """Both servers in one URL, the primary first, as a user writes it."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql+asyncpg://postgres@{hosts}/{database}?target_session_attrs=read-write"

    def server_url(self, server: Server, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{server.port}/{database}"

    def build(self) -> None:
        _as_postgres(
            str(BIN / "initdb"),
            "-D",
            str(self.primary.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        )
        self.primary.configure(
            {
                "port": str(self.primary.port),
                "listen_addresses": "127.0.0.1",
                "unix_socket_directories": "",
                "wal_level": "replica",
                "max_wal_senders": "5",
                "hot_standby": "on",
                "synchronous_commit": "on",
                "synchronous_standby_names": STANDBY_NAME if self.synchronous else "",
                "max_connections": "200",
                # The crash is of processes, not of the machine's memory: what a killed
                # server wrote is in the page cache either way.
                "fsync": "off",
                "full_page_writes": "off",
            }
        )
        self.primary.start()
        _as_postgres(
            str(BIN / "pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.standby.data),
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-sync",
            "-R",
            "-d",
            f"application_name={STANDBY_NAME}",
        )
        # Once promoted, the standby must not wait for a standby of its own.
        self.standby.configure({"port": str(self.standby.port), "synchronous_standby_names": ""})
        self.standby.start()

    def replication_state(self) -> str | None:
        """The standby's sync_state as the primary sees it (None: not streaming)."""
        out = _psql(
            self.primary,
            "SELECT sync_state FROM pg_stat_replication "
            f"WHERE application_name = '{STANDBY_NAME}' AND state = 'streaming'",
        )
        return out or None

    def wait_streaming(self) -> str:
        expected = "sync" if self.synchronous else "async"
        deadline = time.monotonic() + START_TIMEOUT_S
        while (state := self.replication_state()) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"the standby is {state!r}, not {expected!r}, after 60s")
            time.sleep(0.1)
        return state

    def crash_primary(self) -> int:
        return self.primary.kill()

    def promote(self) -> None:
        _as_postgres(str(BIN / "pg_ctl"), "-D", str(self.standby.data), "-w", "-t", "60", "promote")

    def logs(self) -> str:
        return "\n".join(
            f"--- {s.name} ---\n{s.log.read_text()[-3000:]}"
            for s in (self.primary, self.standby)
            if s.log.exists()
        )

    def destroy(self) -> None:
        """Kill both servers' processes and remove everything (safe to call twice)."""
        for server in (self.primary, self.standby):
            with contextlib.suppress(AssertionError):
                server.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _psql(server: Server, sql: str) -> str:
    """Run one query through psql on the server (as its OS user); the unaligned output."""
    psql = BIN / "psql"
    if not psql.exists():
        psql = Path(shutil.which("psql") or "psql")
    return _as_postgres(
        str(psql),
        "-h",
        "127.0.0.1",
        "-p",
        str(server.port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-XAtqc",
        sql,
        timeout=30,
    ).strip()


def _uid() -> int:
    import pwd

    return pwd.getpwnam(OS_USER).pw_uid
