"""One node of a shard (docs/CLUSTER.md "The lease and the epoch", "Failover", "Fencing and step-down"):
`ClusterNode(path, url, shard, node)` opens the ledger in `path` and is the shard's primary or a standby, changing
role on its own. `ledger.open(path, cluster=URL, shard=NAME)` makes one and wraps its store in a Ledger;
`ledger serve --cluster` runs the same.

- standby: the store follows (commands raise LedgerNotPrimaryError naming the primary), a StreamFollower applies
  the stream; every LEASE_POLL_INTERVAL_S it reads the lease, and when nobody holds it, takes it: it applies the
  stream to its end, publishes the epoch marker (retrying after following again if the old primary appended
  meanwhile), stops following and publishes its own batches from there.
- primary: renews the lease every LEASE_RENEW_INTERVAL_S (an asyncio task); its publish hook acknowledges
  nothing unless the last renewal is younger than LEASE_TTL_S less LEASE_SAFETY_MARGIN_S by the monotonic clock,
  checked before and after the publish. A lost lease, a refused publish (the fence) or any failed publish makes
  it step down: it closes its store, drops the local batches the stream did not acknowledge (each logged with
  its range), reopens and follows as a standby. The same Ledger handle goes on (`on_store` rebinds it).
- both: put `node.<shard>.<node>` (role, epoch, position, sequence, error) every NODE_REPORT_INTERVAL_S.
- rejoin and retention (docs/CLUSTER.md "Rejoin and retention"): a directory missing, empty or behind the
  trimmed stream is rebuilt from the shard's snapshot bucket at start, and a standby whose follower finds the
  stream trimmed past it rejoins the same way; a primary's snapshots (Ledger.snapshot -> snapshot_written) are
  uploaded and the bucket pruned on the node's archive thread.

Threads: the node's LoopThread (one NATS connection: the lease, the reports, the renewal task), one control
thread (polls, takes over, steps down; one role change at a time), and the follower's or publisher's own
LoopThread; the archive thread (uploads, each on a connection of its own). Role callbacks (`on_role`) run on
the control thread."""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import queue
import re
import socket
import threading
import time
from typing import Any, Callable

import nats.errors

from ledger.cluster import archive
from ledger.cluster.connection import ConnectionOptions
from ledger.cluster.lease import Lease, LeaseHolder, ensure_bucket
from ledger.cluster.names import (
    FENCE_ATTEMPTS_MAX,
    HEADER_END_POSITION,
    HEADER_MESSAGE_ID,
    LEASE_POLL_INTERVAL_S,
    LEASE_RENEW_INTERVAL_S,
    LEASE_SAFETY_MARGIN_S,
    LEASE_TTL_S,
    NODE_REPORT_INTERVAL_S,
    REPLICAS_DEFAULT,
    REQUEST_TIMEOUT_S,
    SNAPSHOTS_KEPT,
    START_REQUEST_TIMEOUT_S,
    STEP_DOWN_RETRY_S,
    STREAM_READY_RETRY_S,
    STREAM_READY_TIMEOUT_S,
    TAKEOVER_CATCH_UP_TIMEOUT_S,
    TAKEOVER_DEFER_MAX_S,
    TAKEOVER_DEFER_MIN_S,
    TAKEOVER_DEFER_PER_POSITION_S,
    TAKEOVER_REQUEST_TIMEOUT_S,
    check_name,
    check_shard,
    node_key,
    stream_name,
)
from ledger.cluster.stream import (LoopThread, StreamFollower, StreamPublisher, ensure_stream, header_int,
                                   marker_epoch)
from ledger import recovery
from ledger.errors import LedgerNotPrimaryError, LedgerReplicationError, LedgerTimeoutError
from ledger.store import Store, open_store

__all__ = ["PRIMARY", "ROLES", "STANDBY", "STOPPED", "ClusterNode", "cluster_size", "default_node_name"]

PRIMARY, STANDBY, STOPPED = "primary", "standby", "stopped"
ROLES = (PRIMARY, STANDBY, STOPPED)
NODE_NAME_HOST_CHARS_MAX = 55   # the host part of a default node name: with "-" and 8 hex digits, 64 at most
DROPS_LOGGED = 10               # the ranges a step-down's summary names (drop_batches_from logs every one)
log = logging.getLogger("ledger.cluster.node")


def default_node_name(path: str) -> str:
    """A node name from the host name and the data directory (two nodes on one machine differ, a node restarted
    on the same directory keeps its name): `<host>-<8 hex digits of the directory's real path>`."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:NODE_NAME_HOST_CHARS_MAX] or "node"
    return f"{host}-{hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:8]}"


def cluster_size(connection: Any) -> int:
    """How many servers a nats-py connection knows of (those given and those the servers announced)."""
    return max(1, len({server.netloc for server in connection.servers}))


class PublishHook:
    """A node's publish hook for its store's commit pipeline: called plainly (publish and wait), or through send()
    when the pipeline is pipelined; either way the node's lease checks come first and after the ack."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def __call__(self, start: int, end: int) -> None:
        """Publish journal [start, end) and return once the stream acknowledged it (and the lease still holds)."""
        self.node.publish_range(start, end)

    def send(self, start: int, end: int) -> concurrent.futures.Future:
        """Publish journal [start, end); a Future resolved once acknowledged (and the lease still holds)."""
        return self.node.send_range(start, end)


class FreshFuture(concurrent.futures.Future):
    """The Future of a pipelined publish (ClusterNode.send_range): resolved when the ack arrives (the lease checked
    then), and result() checks the lease once more on the thread that waits for it, before that caller is
    answered: a process paused between the ack's arrival and the caller's wake-up must not answer after its
    lease may have lapsed (as the plain hook checks after the ack, on the caller's thread)."""

    def __init__(self, node: ClusterNode, start: int, end: int) -> None:
        super().__init__()
        self.node, self.start, self.end = node, start, end

    def result(self, timeout: float | None = None) -> Any:
        """The ack, if the lease is still certainly held now; LedgerNotPrimaryError (and a step-down) if not."""
        value = super().result(timeout)
        self.node._check_fresh(self.start, self.end)
        return value


class ClusterNode:
    """One node of shard `shard` on the NATS servers `url` (comma-separated; `options`: authentication and TLS),
    its ledger in directory `path` (created with create=True; `open_options`: ledger.open's clock,
    segment_records_log2 and capacities). `start()` opens it and returns once it is primary or standby; `close()`
    stops it. `role`, `epoch` (of the primary it knows), `primary` (that node's name, None during a failover)
    and `error` (the last problem, for status), `archived_position` (the newest snapshot it uploaded) are
    read-only for others."""

    def __init__(self, path: str | os.PathLike[str], url: str, shard: str, node: str | None = None, *,
                 options: ConnectionOptions | None = None, create: bool = False, replicas: int | None = None,
                 open_options: dict[str, Any] | None = None) -> None:
        self.path = os.fspath(path)
        self.url = url
        self.shard = check_shard(shard)
        self.name = check_name("node", node if node is not None else default_node_name(self.path))
        self.options = options
        self.replicas = replicas
        self.role = STOPPED
        self.epoch = 0
        self.primary: str | None = None
        self.error: str | None = None
        self.store: Store | None = None
        self._create = create
        self._open_options = dict(open_options or {})
        assert not {"durability", "publish", "readonly"} & set(self._open_options), "the node chooses these"
        self._loop = LoopThread(url, options)
        self._lease: Lease | None = None
        self._follower: StreamFollower | None = None
        self._publisher: StreamPublisher | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._reporting: Any = None
        self._trouble = threading.Event()      # set (with a reason) when a primary must step down
        self._trouble_reason = ""
        self._stopping = threading.Event()
        self._closed = False
        self._changing = threading.RLock()     # one role change at a time
        self._role_changed = threading.Condition()
        self._role_callbacks: list[Callable[[str, int], None]] = []
        self._store_callbacks: list[Callable[[Store], None]] = []
        self._thread = threading.Thread(target=self._run, name=f"ledger-node-{self.name}", daemon=True)
        self.archived_position: int | None = None   # the newest snapshot this node uploaded (None: none yet)
        self._archived = threading.Condition()
        self._archive_jobs: queue.Queue[Any] = queue.Queue()   # snapshot jobs to upload; None stops the thread
        self._archiver = threading.Thread(target=self._archive_forever, name=f"ledger-archive-{self.name}",
                                          daemon=True)

    # -- lifecycle --

    def start(self) -> None:
        """Connect, create the KV bucket and the stream if missing, open the ledger as a standby, and take the
        lease at once if nobody holds it (so the first node of a shard is its primary when start returns)."""
        assert self.store is None, "started already"
        self._loop.start()
        try:
            servers = cluster_size(self._loop.connection)
            self.replicas = self.replicas or min(REPLICAS_DEFAULT, servers)
            kv = self._when_ready("the KV bucket", lambda: self._loop.run(
                ensure_bucket(self._loop.js, servers), START_REQUEST_TIMEOUT_S))
            self._when_ready("the stream", lambda: self._loop.run(
                ensure_stream(self._loop.js, self.shard, self.replicas), START_REQUEST_TIMEOUT_S))
            self._lease = Lease(kv, self.shard, self.name)
            with self._changing:
                built = self._when_ready("the snapshot bucket", self._rejoin_if_behind)
                self._become_standby(self._reconciled(self._open_store(self._create and not built)))
                self._poll()
        except BaseException:
            self._release_everything()
            raise
        self._reporting = asyncio.run_coroutine_threadsafe(self._report_forever(), self._loop.loop)
        self._thread.start()
        self._archiver.start()

    def close(self) -> None:
        """Stop: no more role changes, the store closed (after the call in progress), the lease released if held
        (deleted, so a standby takes over at once rather than after the TTL), a last report ("stopped").
        Idempotent."""
        self._stopping.set()
        self._archive_jobs.put(None)   # an upload in progress ends on its own connection (bounded by its timeout)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        with self._changing:
            if self._closed:
                return
            self._closed = True
            self._set_role(STOPPED)
            self._release_everything()

    def _release_everything(self) -> None:
        """Close the store, the follower, the publisher, the lease and the connection, whichever are open."""
        if self.store is not None:
            with self.store.engine:
                self.store.close()
        if self._follower is not None:
            self._follower.stop()
        if self._publisher is not None:
            self._publisher.__exit__(None, None, None)
        self._follower = self._publisher = None
        if self._lease is not None and self._loop.thread.is_alive():
            try:
                self._loop.run(self._end_lease(), REQUEST_TIMEOUT_S)
                self._loop.run(self._report_once(), REQUEST_TIMEOUT_S)
            except Exception as error:   # the servers gone: the lease and the report expire by themselves
                log.info("node %s of shard %s: stopping without NATS (%s)", self.name, self.shard, error)
        self._loop.stop()

    # -- for the Ledger handle and a server process --

    def on_role(self, callback: Callable[[str, int], None]) -> None:
        """Call `callback(role, epoch)` now with the current role, then on every change ("primary", "standby",
        "stopped"), on the node's control thread (or the one calling close()). A server starts answering
        requests on "primary" and stops on anything else. An exception it raises is logged, never raised."""
        with self._changing:
            self._role_callbacks.append(callback)
            self._call(callback, self.role, self.epoch)

    def on_store(self, callback: Callable[[Store], None]) -> None:
        """Call `callback(store)` now and whenever the node reopens its store (a step-down closes it): how a
        Ledger handle follows its node."""
        with self._changing:
            self._store_callbacks.append(callback)
            if self.store is not None:
                callback(self.store)

    def wait_role(self, role: str, timeout_s: float) -> bool:
        """Wait until the node's role is `role`; whether it is."""
        assert role in ROLES, role
        with self._role_changed:
            return self._role_changed.wait_for(lambda: self.role == role, timeout_s)

    def report(self) -> dict[str, Any]:
        """What the node puts at `node.<shard>.<node>` (docs/CLUSTER.md): role, epoch, journal position, the last
        stream sequence it applied or had acknowledged, its last error."""
        follower, publisher, store = self._follower, self._publisher, self.store
        sequence = publisher.last_sequence if publisher is not None else follower.sequence if follower else 0
        position = store.engine.write_position if store is not None else 0
        return {"node": self.name, "role": self.role, "epoch": self.epoch, "position": position,
                "sequence": sequence, "error": self.error, "updated_ns": time.time_ns()}

    # -- the control thread --

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.role == PRIMARY:
                    if self._trouble.wait(LEASE_RENEW_INTERVAL_S):
                        with self._changing:
                            if not self._stopping.is_set():
                                self._step_down(self._trouble_reason)
                elif not self._stopping.wait(LEASE_POLL_INTERVAL_S):
                    with self._changing:
                        if self._stopping.is_set():
                            break
                        if self.store is None:   # a step-down or rejoin that failed after closing it
                            self._rejoin_if_behind()
                            self._become_standby(self._reconciled(self._open_store(False)))
                        self._poll()
            except Exception as error:   # NATS unreachable, a reopen failing: said, and tried again
                self.error = f"{type(error).__name__}: {error}"
                log.warning("node %s of shard %s: %s", self.name, self.shard, self.error)
                self._stopping.wait(STEP_DOWN_RETRY_S)

    def _poll(self) -> None:
        """A standby's look at the lease: note who holds it; take it when nobody does and this node's follower
        is healthy (one that refused a message is never made primary: it says why in `error`)."""
        assert self._lease is not None
        # Bounded short: the lease's KV stream without a Raft leader (its server just killed) answers nothing,
        # and a read waiting REQUEST_TIMEOUT_S would keep this standby from taking over long after the election.
        holder = self._loop.run(asyncio.wait_for(self._lease.read(), TAKEOVER_REQUEST_TIMEOUT_S),
                                TAKEOVER_REQUEST_TIMEOUT_S + 1.0)
        self._note(holder)
        follower = self._follower
        if follower is not None and follower.error is not None:
            self.error = f"{type(follower.error).__name__}: {follower.error}"
            if isinstance(follower.error, LedgerReplicationError):
                self._rejoin_trimmed()   # the stream trimmed past this standby: rebuilt from the bucket, if it can
                return
            follower.stop()
            self._start_follower()     # a connection lost, not a refused message: follow again
            return
        if holder is None and not self._deferred():
            self._take_over()

    def _deferred(self) -> bool:
        """Whether another node took the lease while this one let a live standby further along go first: a
        standby that knows (from the node reports) of one ahead of it waits a moment, longer the further behind
        it is (TAKEOVER_DEFER_*: under a second), so that the most caught-up standby usually takes it. Only a
        preference: whoever takes the lease applies the stream to its end before serving."""
        assert self._lease is not None and self.store is not None
        try:
            lag = self._loop.run(self._behind_a_standby(self.store.engine.write_position), LEASE_TTL_S)
        except Exception as error:   # the reports are a hint: without them, take the lease as before
            log.info("node %s of shard %s: node reports not read (%s)", self.name, self.shard, error)
            return False
        if lag <= 0:
            return False
        delay_s = min(TAKEOVER_DEFER_MAX_S, TAKEOVER_DEFER_MIN_S + TAKEOVER_DEFER_PER_POSITION_S * lag)
        log.info("node %s of shard %s: a standby is %d journal positions ahead; taking the lease only after "
                 "%.2f s", self.name, self.shard, lag, delay_s)
        if self._stopping.wait(delay_s):
            return True
        holder = self._loop.run(asyncio.wait_for(self._lease.read(), TAKEOVER_REQUEST_TIMEOUT_S),
                                TAKEOVER_REQUEST_TIMEOUT_S + 1.0)
        self._note(holder)
        return holder is not None

    async def _behind_a_standby(self, position: int) -> int:
        """How many journal positions the furthest-along other standby of the shard (by its last report, still
        in the bucket: it reported within the TTL) is ahead of `position`; 0 if none is. A standby whose
        follower refused a message is left out: it never takes the lease."""
        assert self._lease is not None
        watcher = await self._lease.kv.watch(f"{node_key(self.shard, self.name).rsplit('.', 1)[0]}.*",
                                             ignore_deletes=True)
        furthest = position
        try:
            async for entry in watcher:
                if entry is None:              # the values there were when the watch began: all seen
                    break
                try:
                    report = json.loads(entry.value or b"")
                    if report.get("node") != self.name and report.get("role") == STANDBY \
                            and "LedgerReplicationError" not in str(report.get("error")):
                        furthest = max(furthest, int(report.get("position") or 0))
                except (ValueError, TypeError, AttributeError):
                    continue                   # an unreadable report: no hint
        finally:
            await watcher.stop()
        return furthest - position

    def _note(self, holder: LeaseHolder | None) -> None:
        if holder is None:
            self.primary = None
        else:
            self.primary, self.epoch = holder.node, holder.epoch

    def _take_over(self) -> None:
        """Take the lease; if this node gets it, fence the old primary and serve."""
        assert self._lease is not None and self.store is not None
        holder = self._loop.run(self._lease.take(), REQUEST_TIMEOUT_S)
        if holder is None:
            return                                 # another standby was first
        log.info("node %s of shard %s took the lease: epoch %d", self.name, self.shard, holder.epoch)
        self._trouble.clear()
        self._renewal = self._loop.run(self._start_renewing(), REQUEST_TIMEOUT_S)
        try:
            publisher = self._fence(holder.epoch)
        except Exception as error:
            self.error = f"taking over as the primary of epoch {holder.epoch} failed: {error}"
            log.warning("node %s of shard %s: %s", self.name, self.shard, self.error)
            self._loop.run(self._end_lease(), REQUEST_TIMEOUT_S)
            if self._follower is None:
                self._start_follower()
            return
        with self.store.engine:
            self._publisher = publisher
            self.store.stop_following()
            self.primary, self.error = self.name, None
        self._set_role(PRIMARY, holder.epoch)

    def _fence(self, epoch: int) -> StreamPublisher:
        """Apply the stream to its end, then publish the epoch marker fenced on that end; follow again and retry
        while the old primary still appends. Returns the publisher, attached to the store."""
        assert self._lease is not None and self.store is not None
        for _ in range(FENCE_ATTEMPTS_MAX):
            if self._trouble.is_set():
                raise LedgerNotPrimaryError(self._trouble_reason)
            last = self._loop.run(self._last_sequence(), TAKEOVER_REQUEST_TIMEOUT_S + 1.0)
            if self._follower is None:
                self._start_follower()
            assert self._follower is not None
            self._follower.follow_until(sequence=last, timeout_s=TAKEOVER_CATCH_UP_TIMEOUT_S)
            self._follower.stop()
            self._follower = None
            publisher = StreamPublisher(self.url, self.shard, self.options, replicas=self.replicas or 1)
            publisher.__enter__()
            try:
                # A ledger made before its stream (the stream holds no batch) publishes its journal first, as
                # this epoch's batches, so that standbys follow it from position 1.
                publisher.epoch, publisher.node = epoch, self.name
                publisher.attach(self.store, publish_journal=True)
                publisher.publish_marker(epoch, self.name)
                return publisher
            except LedgerNotPrimaryError as error:     # the old primary appended since: follow it again
                publisher.__exit__(None, None, None)
                log.info("node %s of shard %s: epoch %d marker refused, following again: %s", self.name,
                         self.shard, epoch, error)
            except BaseException:
                publisher.__exit__(None, None, None)
                raise
        raise LedgerNotPrimaryError(f"stream {stream_name(self.shard)}: the epoch {epoch} marker was refused "
                                    f"{FENCE_ATTEMPTS_MAX} times (another publisher keeps appending)")

    def _step_down(self, reason: str) -> None:
        """Stop serving, close the store (after the call in progress), release the lease, drop the local batches
        the stream did not acknowledge, reopen and follow as a standby."""
        assert self.store is not None and self._publisher is not None
        log.warning("node %s of shard %s steps down from epoch %d: %s", self.name, self.shard, self.epoch, reason)
        store, publisher = self.store, self._publisher
        self.primary, self.error = None, reason
        self._set_role(STANDBY)                    # the hook refuses from now on; a server stops answering
        with store.engine:                         # the call in progress ends first (its publish raises or not)
            acknowledged_end = publisher.end_position
            store.close()
        self.store, self._publisher = None, None
        publisher.__exit__(None, None, None)
        self._loop.run(self._end_lease(), REQUEST_TIMEOUT_S)
        dropped = recovery.drop_batches_from(self.path, acknowledged_end)   # logs each one too
        if dropped:
            log.warning("node %s of shard %s: dropped %d local journal batches from position %d, which the stream "
                        "never acknowledged (no caller was answered): %s", self.name, self.shard, len(dropped),
                        acknowledged_end, ", ".join(f"[{start}, {end})" for start, end in dropped[:DROPS_LOGGED]))
        self._trouble.clear()
        self._become_standby(self._open_store(False))

    # -- rejoin and snapshots (docs/CLUSTER.md "Rejoin and retention") --

    def _when_ready(self, what: str, step: Callable[[], Any]) -> Any:
        """step() at start, tried again while `what` (a stream or bucket just created, a cluster just started and
        still placing them) does not answer (a NATS request timing out, no responders), for at most
        STREAM_READY_TIMEOUT_S: a node started a moment after its cluster must not fail on what the next look
        finds ready. Every step retried here is idempotent (create if missing; a rebuild is all or nothing)."""
        deadline = time.monotonic() + STREAM_READY_TIMEOUT_S
        while True:
            try:
                return step()
            except (TimeoutError, LedgerTimeoutError, nats.errors.NoRespondersError) as error:
                if time.monotonic() >= deadline:
                    raise
                log.info("node %s of shard %s: %s does not answer yet (%s); trying again", self.name, self.shard,
                         what, error)
                time.sleep(STREAM_READY_RETRY_S)

    def _rejoin_if_behind(self) -> bool:
        """At start: a directory missing, empty, or behind what the trimmed stream still holds is rebuilt from the
        newest good snapshot in the bucket (archive.rejoin_async; an old one moved aside). Whether it was built.
        A directory the stream goes on from, or one ahead of it (reconciled after), is left as it is."""
        position = archive.journal_position(self.path)
        if position is not None and not self._loop.run(archive.behind_async(self._loop.js, self.shard, position),
                                                       REQUEST_TIMEOUT_S):
            return False
        result = self._loop.run(archive.rejoin_async(self._loop.js, self.path, self.shard),
                                archive.TRANSFER_TIMEOUT_S)
        if result.built:
            log.info("node %s of shard %s: %s rebuilt from the snapshot at journal position %d%s", self.name,
                     self.shard, self.path, result.position,
                     f" (the old directory moved to {result.replaced})" if result.replaced else "")
        return result.built

    def _rejoin_trimmed(self) -> None:
        """A standby whose follower stopped because the stream was trimmed past its write position (it holds no
        message starting there): close the store, rejoin (the old directory moved aside), reopen and follow. A
        follower that stopped for any other reason is left stopped (its error says why)."""
        assert self.store is not None
        position = self.store.engine.write_position
        if not self._loop.run(archive.behind_async(self._loop.js, self.shard, position), REQUEST_TIMEOUT_S):
            return
        log.warning("node %s of shard %s: stream %s was trimmed past this standby's journal position %d: "
                    "rejoining from the snapshot bucket", self.name, self.shard, stream_name(self.shard), position)
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
        store, self.store = self.store, None
        with store.engine:
            store.close()
        built = self._rejoin_if_behind()   # raises: the control thread says so and opens the old one again
        self.error = None if built else self.error
        self._become_standby(self._open_store(False))

    def snapshot_written(self, job: Any) -> None:
        """The Ledger's snapshot() calls this with each SnapshotJob it started (ledger/api.py). A primary's
        snapshot is uploaded to the shard's bucket and the bucket pruned (archive.upload_snapshot, archive.prune:
        SNAPSHOTS_KEPT kept, the stream trimmed below the oldest) on the archive thread, off the write path: it
        waits for the file, never holds the engine lock, and a failure is logged (and in `error`), never raised
        to the writer; the next snapshot is uploaded as usual. A standby's snapshots stay local."""
        if self.role == PRIMARY and not self._stopping.is_set():
            self._archive_jobs.put(job)

    def wait_archived(self, position: int, timeout_s: float) -> bool:
        """Wait until this node uploaded a snapshot at journal `position` or later (and pruned); whether it did."""
        with self._archived:
            return self._archived.wait_for(
                lambda: self.archived_position is not None and self.archived_position >= position, timeout_s)

    def _archive_forever(self) -> None:
        """The archive thread: upload and prune each queued snapshot, on connections of its own (a slow upload
        never delays the lease renewals on the node's loop)."""
        while (job := self._archive_jobs.get()) is not None:
            try:
                info = job.wait()
                archive.upload_snapshot(self.url, self.shard, info.path, self.options, self.replicas or 1)
                deleted = archive.prune(self.url, self.shard, SNAPSHOTS_KEPT, self.options)
            except Exception as error:   # the next snapshot is uploaded as usual: a missed one is not needed
                self.error = f"uploading a snapshot failed: {type(error).__name__}: {error}"
                log.warning("node %s of shard %s: %s", self.name, self.shard, self.error)
                continue
            log.info("node %s of shard %s: snapshot %s uploaded; %d older deleted from the bucket", self.name,
                     self.shard, info.path, len(deleted))
            with self._archived:
                self.archived_position = max(self.archived_position or 0, int(info.position))
                self._archived.notify_all()

    # -- the store, the follower, roles --

    def _reconciled(self, store: Store) -> Store:
        """The store, rid of the local batches its stream does not hold (a primary that crashed after journaling
        batches it never had acknowledged): those after the last stream batch that the journal holds byte for
        byte are dropped (logged), and the store reopened. Nothing is dropped when the journal and the stream
        share no batch at all (another shard's or another ledger's journal: the follower then says so)."""
        position = store.engine.write_position
        shared = self._loop.run(self._shared_end(store), TAKEOVER_CATCH_UP_TIMEOUT_S)
        if shared is None or shared >= position:
            return store
        with store.engine:
            store.close()
        dropped = recovery.drop_batches_from(self.path, shared)
        log.warning("node %s of shard %s: dropped %d local journal batches from position %d, which the stream "
                    "does not hold (journaled by a primary that stopped before their ack; never answered): %s",
                    self.name, self.shard, len(dropped), shared,
                    ", ".join(f"[{start}, {end})" for start, end in dropped[:DROPS_LOGGED]))
        return self._open_store(False)

    async def _shared_end(self, store: Store) -> int | None:
        """The end journal position of the last stream batch that `store`'s journal holds byte for byte (None if
        none): a binary search, as the batches the journal holds are a prefix of the stream's; markers (and
        any message without a journal range) are passed over towards the lower sequences."""
        js, name, position = self._loop.js, stream_name(self.shard), store.engine.write_position
        info = await js.stream_info(name)
        if info.state.messages == 0:
            return None
        low, high, shared = max(1, info.state.first_seq), info.state.last_seq, None
        while low <= high:
            middle = (low + high) // 2
            sequence = middle
            while sequence >= low:
                message = await js.get_msg(name, sequence)
                start = header_int(message.headers, HEADER_MESSAGE_ID)
                end = header_int(message.headers, HEADER_END_POSITION)
                if marker_epoch(message.headers) is None and start is not None and end is not None:
                    break
                sequence -= 1
            if sequence < low:
                low = middle + 1           # only markers in [low, middle]
            elif end <= position and self._holds(store, start, end, bytes(message.data or b"")):
                shared, low = end, middle + 1
            else:
                high = sequence - 1
        return shared

    @staticmethod
    def _holds(store: Store, start: int, end: int, data: bytes) -> bool:
        try:
            return store.batch_bytes(start, end) == data
        except ValueError:                 # not a batch range of this journal: it diverged before
            return False

    def _open_store(self, create: bool) -> Store:
        return open_store(self.path, create, "fsync", publish=PublishHook(self), **self._open_options)

    def _become_standby(self, store: Store) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
        store.follow(self._refusal)
        self.store = store
        for callback in self._store_callbacks:
            callback(store)
        self._start_follower()
        self._set_role(STANDBY)

    def _start_follower(self) -> None:
        assert self.store is not None
        follower = StreamFollower(self.url, self.shard, self.store, self.options)
        follower.start()
        self._follower = follower

    def _refusal(self) -> LedgerNotPrimaryError:
        """The error of a command on this standby (the engine's write refusal), naming the primary it knows."""
        primary = (f"the primary is node {self.primary} (epoch {self.epoch})" if self.primary is not None
                   else "no node holds the lease now (a failover is under way: retry)")
        return LedgerNotPrimaryError(f"node {self.name} of shard {self.shard} is a standby: {primary}")

    def _set_role(self, role: str, epoch: int | None = None) -> None:
        with self._role_changed:
            self.role = role
            if epoch is not None:
                self.epoch = epoch
            self._role_changed.notify_all()
        for callback in list(self._role_callbacks):
            self._call(callback, role, self.epoch)

    def _call(self, callback: Callable[[str, int], None], role: str, epoch: int) -> None:
        try:
            callback(role, epoch)
        except Exception:
            log.exception("node %s of shard %s: role callback %r failed", self.name, self.shard, callback)

    # -- the publish hook (the commit pipeline calls it under the engine's lock) --

    def publish_range(self, start: int, end: int) -> None:
        """Publish [start, end) and let the call answer only if this node still certainly holds the lease,
        before and after the stream's ack. Any failure raises (the pipeline poisons the handle: the caller is
        not answered) and makes the node step down."""
        publisher = self._publisher
        if publisher is None or self.role != PRIMARY:
            self._raise_trouble(f"journal [{start}, {end}) committed while not the primary")
            raise self._refusal()
        self._check_fresh(start, end)
        try:
            publisher(start, end)
        except BaseException as error:
            self._raise_trouble(f"publishing journal [{start}, {end}) failed: {error}")
            raise
        self._check_fresh(start, end)

    def send_range(self, start: int, end: int) -> concurrent.futures.Future:
        """The pipelined form of publish_range (a commit pipeline whose hook has send(): ledger/commit.py): the same
        checks, the publisher's send, and a Future that fails unless the lease is still fresh when the ack
        arrives. A publisher without send() is called and waited for here."""
        publisher = self._publisher
        if publisher is None or self.role != PRIMARY:
            self._raise_trouble(f"journal [{start}, {end}) committed while not the primary")
            raise self._refusal()
        self._check_fresh(start, end)
        checked: concurrent.futures.Future = FreshFuture(self, start, end)
        send = getattr(publisher, "send", None)
        if send is None:
            self.publish_range(start, end)
            checked.set_result(None)
            return checked

        def acknowledged(sent: concurrent.futures.Future) -> None:
            error = sent.exception()
            if error is None:
                try:
                    self._check_fresh(start, end)
                except LedgerNotPrimaryError as stale:
                    error = stale
            else:
                self._raise_trouble(f"publishing journal [{start}, {end}) failed: {error}")
            checked.set_result(sent.result()) if error is None else checked.set_exception(error)
        try:
            send(start, end).add_done_callback(acknowledged)
        except BaseException as error:
            self._raise_trouble(f"publishing journal [{start}, {end}) failed: {error}")
            raise
        return checked

    def _check_fresh(self, start: int, end: int) -> None:
        """LedgerNotPrimaryError unless the lease is certainly held: renewed within the bound, and nothing asked
        for a step-down (sticky: once one batch was refused, no later one is acknowledged)."""
        lease = self._lease
        assert lease is not None
        if self._trouble.is_set():
            raise LedgerNotPrimaryError(f"node {self.name} of shard {self.shard} is stepping down "
                                        f"({self._trouble_reason}): journal [{start}, {end}) is not acknowledged")
        if not lease.fresh():
            reason = (f"node {self.name} of shard {self.shard}: its lease (epoch {self.epoch}) was last renewed "
                      f"{lease.age_s():.2f} s ago, past the {LEASE_TTL_S - LEASE_SAFETY_MARGIN_S} s bound: it may "
                      f"have lapsed, so journal [{start}, {end}) is not acknowledged")
            self._raise_trouble(reason)
            raise LedgerNotPrimaryError(reason)

    def _raise_trouble(self, reason: str) -> None:
        if not self._trouble.is_set():
            self._trouble_reason = reason
            self._trouble.set()

    # -- on the node's loop --

    async def _start_renewing(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        """Renew every LEASE_RENEW_INTERVAL_S until the lease is lost or lapsed, then ask for a step-down."""
        lease = self._lease
        assert lease is not None
        while True:
            await asyncio.sleep(LEASE_RENEW_INTERVAL_S)
            try:
                await asyncio.wait_for(lease.renew(), LEASE_TTL_S)
            except LedgerNotPrimaryError as error:
                self._raise_trouble(str(error))
                return
            except (Exception, asyncio.TimeoutError) as error:   # no servers, a timeout: the bound decides
                if lease.age_s() >= LEASE_TTL_S:
                    self._raise_trouble(f"node {self.name} of shard {self.shard}: no renewal of the lease for "
                                        f"{lease.age_s():.2f} s ({type(error).__name__}): it lapsed")
                    return

    async def _end_lease(self) -> None:
        """Stop renewing and release the lease if this node still holds it."""
        task, self._renewal = self._renewal, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._lease is not None and self._lease.held:
            await asyncio.wait_for(self._lease.release(), REQUEST_TIMEOUT_S)

    async def _last_sequence(self) -> int:
        """The stream's last sequence, within TAKEOVER_REQUEST_TIMEOUT_S (a leaderless stream answers nothing)."""
        info = await asyncio.wait_for(self._loop.js.stream_info(stream_name(self.shard)), TAKEOVER_REQUEST_TIMEOUT_S)
        return int(info.state.last_seq)

    async def _report_once(self) -> None:
        assert self._lease is not None
        await asyncio.wait_for(self._lease.kv.put(node_key(self.shard, self.name),
                                                  json.dumps(self.report()).encode()), REQUEST_TIMEOUT_S)

    async def _report_forever(self) -> None:
        while True:
            try:
                await self._report_once()
            except (Exception, asyncio.TimeoutError) as error:   # status is best effort: the next one may pass
                log.debug("node %s of shard %s: report not put: %s", self.name, self.shard, error)
            await asyncio.sleep(NODE_REPORT_INTERVAL_S)

