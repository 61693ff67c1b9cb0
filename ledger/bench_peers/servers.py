"""PostgreSQL and Redis servers started for the benchmark: on 127.0.0.1 only, on a free port, with their data in
the benchmark's temporary directory, and always stopped again (context managers; the caller turns SIGTERM into
an exception so that Ctrl-C, errors and kill all run the stop path).

Both are started in a session of their own, so a Ctrl-C in the terminal reaches only the benchmark, which then
stops them in order instead of racing their own signal handling."""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
POSTGRES_USER = "postgres"
# Settings that keep every durability guarantee (fsync, synchronous_commit, full_page_writes stay on) and only
# give the server room: more shared buffers, no checkpoint forced by WAL volume in the middle of a run.
POSTGRES_SETTINGS = {
    "listen_addresses": f"'{LOOPBACK}'",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "'512MB'",
    "max_wal_size": "'8GB'",
    "checkpoint_timeout": "'30min'",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout_s} s")


# -- PostgreSQL --

def postgres_binaries() -> Path | None:
    """The bin directory holding initdb and pg_ctl: the newest /usr/lib/postgresql/*/bin (Debian), else PATH."""
    def version(path: str) -> int:
        match = re.search(r"/postgresql/(\d+)/bin$", path)
        return int(match.group(1)) if match else 0

    # The environment variable lets a test hide the Debian directory (it cannot uninstall PostgreSQL).
    pattern = os.environ.get("LEDGER_BENCH_POSTGRES_GLOB", "/usr/lib/postgresql/*/bin")
    candidates = sorted(glob.glob(pattern), key=version, reverse=True)
    for found in (shutil.which("initdb"), shutil.which("pg_ctl")):
        if found:
            candidates.append(os.path.dirname(os.path.realpath(found)))
    for candidate in candidates:
        if all(os.access(os.path.join(candidate, name), os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    return None


def postgres_missing() -> str | None:
    """Why PostgreSQL cannot run here, or None."""
    if postgres_binaries() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl); apt-get install -y postgresql"
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run it as the postgres user.
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing (PostgreSQL refuses to run as root)"
        try:
            pwd.getpwnam(POSTGRES_USER)
        except KeyError:
            return f"running as root and there is no {POSTGRES_USER!r} user to run PostgreSQL as"
    return None


class PostgresServer:
    def __init__(self, directory: Path) -> None:
        self.bin = postgres_binaries()
        assert self.bin is not None, postgres_missing()
        self.data = directory / "pgdata"
        self.log = directory / "postgres.log"
        self.port = free_port()
        self.running = False

    def _command(self, *arguments: str) -> list[str]:
        as_postgres = ["runuser", "-u", POSTGRES_USER, "--"] if os.geteuid() == 0 else []
        return as_postgres + list(arguments)

    def _run(self, *arguments: str, timeout_s: float = START_TIMEOUT_S) -> None:
        completed = subprocess.run(self._command(*arguments), check=False, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=timeout_s, start_new_session=True,
                                   cwd=self.data.parent)  # a directory the postgres user may enter
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(arguments[:2])} failed ({completed.returncode}): "
                               f"{(completed.stderr or completed.stdout).strip()[-2000:]}")

    def start(self) -> None:
        self.data.mkdir(mode=0o700)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(POSTGRES_USER)
            for path in (self.data, self.data.parent):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        # --no-sync: the cluster's own catalog files need no durability for a benchmark; the benchmark's
        # transactions are synced by the running server as configured.
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", POSTGRES_USER, "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        settings = {**POSTGRES_SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self.data}'"}
        with open(self.data / "postgresql.conf", "a") as configuration:
            configuration.write("\n# ledger bench\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
        self.running = True  # from here on, stop() must run even if the start below fails half-way
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", str(START_TIMEOUT_S), "start")
        wait_for_port(self.port, START_TIMEOUT_S)

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", str(STOP_TIMEOUT_S),
                      "stop", timeout_s=STOP_TIMEOUT_S + 10)
        except (RuntimeError, subprocess.TimeoutExpired):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop",
                          timeout_s=STOP_TIMEOUT_S)

    def version(self) -> str:
        completed = subprocess.run([str(self.bin / "postgres"), "--version"], capture_output=True, text=True,
                                   check=False)
        match = re.search(r"\d+(\.\d+)+", completed.stdout)  # "postgres (PostgreSQL) 15.18 (Debian ...)"
        return match.group(0) if match else "unknown version"


@contextlib.contextmanager
def postgres_server(directory: Path) -> Iterator[PostgresServer]:
    """A server with its data under `directory`, or, when the postgres user (as which a root caller runs it)
    cannot reach `directory` (a parent without o+x, like pytest's temporary directories), under a directory of
    its own in the system temporary directory, removed afterwards."""
    directory.mkdir(parents=True)
    own_directory = None
    if os.geteuid() == 0 and not _traversable_by_others(directory):
        own_directory = Path(tempfile.mkdtemp(prefix="ledger-bench-postgres-"))
        own_directory.chmod(0o711)
        directory = own_directory / "server"
        directory.mkdir()
    server = PostgresServer(directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if own_directory is not None:
            shutil.rmtree(own_directory, ignore_errors=True)


def _traversable_by_others(directory: Path) -> bool:
    """Whether every directory from / down to `directory` lets other users through (o+x)."""
    path = directory.resolve()
    for part in [path, *path.parents]:
        if not os.stat(part).st_mode & stat.S_IXOTH:
            return False
    return True


# -- Redis --

def redis_missing() -> str | None:
    if shutil.which("redis-server") is None:
        return "no redis-server binary; apt-get install -y redis-server"
    return None


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[int]:
    """Start redis-server with the append-only file on (appendfsync always; callers switch it per row with
    CONFIG SET) and no RDB snapshots; yield its port."""
    directory.mkdir(parents=True)
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", LOOPBACK, "--dir", str(directory),
               "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
               "--logfile", str(directory / "redis.log")]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, START_TIMEOUT_S, process)
        yield port
    finally:
        process.terminate()  # SIGTERM: Redis flushes the append-only file and exits
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)
