"""`ledger serve DIR --cluster URL --shard NAME [--node NAME]` (docs/CLUSTER.md, "Serving a shard"): one node of a
shard in the foreground. It opens the clustered Ledger (ledger.open(..., cluster=URL): a ClusterNode) and runs a
request Service on it that matches the node's role: while the node is primary a Service that answers commands and
reads (`ledger.request.<shard>` and `ledger.read.<shard>`), while it is a standby one that answers reads only
(`ledger.read.<shard>`, for consistency="standby").

`ShardServer(handle, url, shard, options)` does the switching: the node calls it back on every role change (on
its control thread), and it stops the Service it runs before it starts the one the new role wants, so a node that
steps down never has a command Service subscribed (and the store itself refuses commands on a standby anyway).
A Service that fails to start (NATS unreachable) is tried again by `poll()`, which the foreground loop calls every
SERVE_POLL_INTERVAL_S; poll() also says when a standby's primary changed and starts the periodic snapshot.

Each change is one line through `announce` (stderr in the command): "node a of shard eu is primary (epoch 7)",
"node b of shard eu is standby, following node a (epoch 7)". `serve_shard` runs it all until `stop` is set (the
command's SIGTERM or Ctrl-C), then stops the Service and closes the node, which releases the lease so that a
standby takes over at once rather than after LEASE_TTL_S."""
from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Any, Callable

from ledger.cluster.connection import ConnectionOptions
from ledger.cluster.names import SERVE_POLL_INTERVAL_S, SERVE_RETRY_INTERVAL_S, check_shard
from ledger.cluster.service import Service
from ledger.errors import LedgerError

__all__ = ["ShardServer", "serve_shard"]

PRIMARY, STANDBY = "primary", "standby"   # the node's roles (ledger.cluster.node), without importing it here


class ShardServer:
    """Runs the Service a clustered Ledger handle's role asks for (see the module docstring). `start()` registers
    with the node (and starts the Service for its current role at once); `stop()` stops the Service for good."""

    def __init__(self, handle: Any, url: str, shard: str, options: ConnectionOptions | None = None,
                 announce: Callable[[str], None] | None = None, snapshot_every_s: float | None = None) -> None:
        assert handle.cluster_node is not None, "a ShardServer serves a clustered Ledger handle"
        assert snapshot_every_s is None or snapshot_every_s > 0, snapshot_every_s
        self.handle = handle
        self.node = handle.cluster_node
        self.url = url
        self.shard = check_shard(shard)
        self.options = options
        self.announce = announce or (lambda line: None)
        self.snapshot_every_s = snapshot_every_s
        self.service: Service | None = None
        self.role: str | None = None        # the role the running (or wanted) Service is for
        self.error: str | None = None        # the last Service start that failed, tried again by poll()
        self.changes = 0                     # Services started, for tests
        self._lock = threading.Lock()        # one switch at a time: the control thread's and poll()'s
        self._stopped = False
        self._said: tuple[str, str | None, int] | None = None   # (role, primary, epoch) last announced
        self._retry_due = 0.0
        self._snapshot_due = time.monotonic() + (snapshot_every_s or 0.0)
        self._snapshot_position = -1
        self._snapshot_job: Any = None

    def start(self) -> None:
        """Follow the node's role from now on (the callback runs at once with the current role)."""
        self.node.on_role(self._on_role)

    def stop(self) -> None:
        """Stop the Service (it answers what it accepted first) and switch no more. Idempotent."""
        with self._lock:
            self._stopped = True
            self._stop_service()
        self._reap_snapshot(wait=True)

    # -- switching --

    def _on_role(self, role: str, epoch: int) -> None:
        """The node's role changed (or is being told at registration): switch the Service, say so."""
        with self._lock:
            if not self._stopped and role != self.role:
                self._stop_service()        # first: never a command Service on a node that is no longer primary
                self.role = role if role in (PRIMARY, STANDBY) else None
                self._start_service()
            self._say()

    def _stop_service(self) -> None:
        service, self.service = self.service, None
        if service is not None:
            service.stop()

    def _start_service(self) -> None:
        """Start the Service self.role wants (none when stopped); a failure is kept for poll() to retry."""
        assert self.service is None
        if self.role is None:
            return
        service = Service(self.handle, self.url, self.shard, self.options, primary=self.role == PRIMARY)
        try:
            service.start()
        except Exception as error:   # NATS unreachable, a timeout: poll() tries again
            self.error = f"the {self.role} request service did not start: {type(error).__name__}: {error}"
            self._retry_due = time.monotonic() + SERVE_RETRY_INTERVAL_S
            self.announce(f"node {self.node.name} of shard {self.shard}: {self.error} (retrying)")
            return
        self.service, self.error = service, None
        self.changes += 1

    def _say(self) -> None:
        """One line when the role, or a standby's primary, differs from the last line's."""
        role, primary, epoch = self.node.role, self.node.primary, self.node.epoch
        if (role, primary, epoch) == self._said or (role == STANDBY and self._said is not None
                                                    and self._said[0] == STANDBY and primary is None):
            return   # a standby's primary unknown for a moment (a failover under way): said once it is known
        self._said = (role, primary, epoch)
        name = f"node {self.node.name} of shard {self.shard}"
        if role == PRIMARY:
            self.announce(f"{name} is primary (epoch {epoch})")
        elif role == STANDBY:
            following = f"following node {primary} (epoch {epoch})" if primary is not None else \
                "no primary now (a failover is under way)"
            self.announce(f"{name} is standby, {following}")
        else:
            self.announce(f"{name} stopped")

    # -- the foreground loop's look --

    def poll(self) -> None:
        """Retry a Service that did not start, announce a standby's new primary, snapshot when due."""
        with self._lock:
            if not self._stopped and self.service is None and self.role is not None \
                    and time.monotonic() >= self._retry_due:
                if self.node.role == self.role:
                    self._start_service()
            self._say()
        self._snapshot_if_due()

    def _snapshot_if_due(self) -> None:
        """Every snapshot_every_s, when the journal moved: a snapshot of the node's store in a forked child (as
        the ring server takes them), so a restart replays little. A failure is warned about, never fatal."""
        if self.snapshot_every_s is None:
            return
        if self._snapshot_job is not None and not self._reap_snapshot(wait=False):
            return
        now = time.monotonic()
        if now < self._snapshot_due:
            return
        self._snapshot_due = now + self.snapshot_every_s
        position = self.node.report()["position"]
        if position == self._snapshot_position or self.node.store is None:
            return
        try:
            self._snapshot_job = self.handle.snapshot(wait=False)
        except (OSError, LedgerError) as error:
            warnings.warn(f"ledger serve: snapshot failed (the journal is intact): {error}", RuntimeWarning,
                          stacklevel=2)
            return
        self._snapshot_position = position

    def _reap_snapshot(self, wait: bool) -> bool:
        """Whether no snapshot is in progress any more (a finished one's failure is warned about)."""
        job = self._snapshot_job
        if job is None:
            return True
        if not wait and not job.done():
            return False
        self._snapshot_job = None
        try:
            job.wait()
        except (OSError, LedgerError) as error:
            warnings.warn(f"ledger serve: snapshot failed (the journal is intact): {error}", RuntimeWarning,
                          stacklevel=2)
        return True


def serve_shard(directory: str, url: str, shard: str, node: str | None, stop: threading.Event, *,
                create: bool = False, options: ConnectionOptions | None = None,
                announce: Callable[[str], None] | None = None, snapshot_every_s: float | None = None,
                open_options: dict[str, Any] | None = None) -> None:
    """Open `directory` as node `node` of `shard` on the NATS servers `url`, serve requests as its role asks
    until `stop` is set, then stop the Service and close the node (releasing the lease if it holds it)."""
    import ledger   # here: ledger imports its cluster modules lazily, and this one is only for `serve --cluster`
    say = announce or (lambda line: None)
    handle = ledger.open(os.fspath(directory), create=create, cluster=url, shard=shard, node=node,
                         cluster_options=options, **(open_options or {}))
    server = ShardServer(handle, url, shard, options, announce=say, snapshot_every_s=snapshot_every_s)
    try:
        if stop.is_set():
            return
        say(f"serving {directory} as node {handle.cluster_node.name} of shard {shard} (pid {os.getpid()}, "
            f"durability=replicated); Ctrl-C or SIGTERM stops")
        server.start()
        while not stop.wait(SERVE_POLL_INTERVAL_S):
            server.poll()
    finally:
        server.stop()
        handle.close()
