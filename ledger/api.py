"""The public face: `ledger.open()` and the `Ledger` handle. Thin on purpose: it checks what callers hand in,
then passes arrays straight to the Cython core (ledger._core), which does all per-transfer work. What a handle
holds (engine, journal, commit pipeline) and how it is opened and recovered is the internal tier's
(ledger/store.py): a Ledger wraps one Store, `Ledger.store`."""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import numpy as np

from ledger import _core
from ledger.audit import VerifyReport, verify_live
from ledger.batches import ACCOUNT_STATE_DTYPE, Account, accounts_batch, as_batch, transfer_ids, transfers_batch
from ledger.commit import Publish
from ledger.enums import (ACCOUNT_DTYPE, BALANCE_MAX, TRANSFER_DTYPE, TRANSFER_RECORD_DTYPE, AccountResult,
                          TransferResult)
from ledger.errors import LedgerClosedError, LedgerError, LedgerPoisonedError
from ledger.history import balance_at
from ledger.history import explain as explain_account
from ledger.history import history as account_history
from ledger.journal import FLUSH_INTERVAL_MS_DEFAULT, SEGMENT_RECORDS_LOG2_DEFAULT, FaultInjector
from ledger.scrub import ScrubReport
from ledger.scrub import scrub as scrub_journal
from ledger.snapshot import KEEP_DEFAULT, SnapshotInfo, SnapshotJob, check_room, snapshot_bytes
from ledger.store import Store, open_store

__all__ = [
    "ACCOUNT_STATE_DTYPE",
    "Account",
    "Ledger",
    "accounts_batch",
    "open",
    "open_with_hooks",
    "transfers_batch",
]


class Ledger:
    """A handle on one ledger. Safe to share between threads: the engine's lock serialises every call (a batch
    runs without the GIL, and other threads' calls wait for it without the GIL), and a read that looks at several
    things (accounts, stats, history, explain, verify) holds it throughout, so it sees whole batches only.

    Methods bound in __init__ for speed: `transfer` is the core's own method (no Python frame per call; it takes
    the engine's lock itself).

    A clustered handle (ledger.open(..., cluster=URL, shard=NAME)) has `cluster_node`, the ClusterNode behind it
    (ledger/cluster/node.py), and `role` / `primary` say what it is now; its store changes when the node steps
    down (closed, reopened as a standby), and the handle follows it."""

    def __init__(self, store: Store, cluster_node: Any = None) -> None:
        """A handle on an open Store (ledger.open() makes both); cluster_node: the ClusterNode owning the store."""
        self.cluster_node = cluster_node  # None for a ledger of this machine alone
        self._bind(store)
        self.recovered_from: SnapshotInfo | None = store.recovered_from  # the snapshot opened from, if any
        self._snapshot_job: SnapshotJob | None = None  # the last snapshot started: the next one waits for it
        if cluster_node is not None:
            cluster_node.on_store(self._bind)   # the store it has now, and each one it reopens

    def _bind(self, store: Store) -> None:
        self.store = store  # the internal tier (engine, journal, commit pipeline): for ledger's own modules
        # Shortcuts to store.engine and store.journal for the methods below (one attribute lookup per call).
        self._engine = store.engine
        self._journal = store.journal
        self.path = store.path
        self.durability = "replicated" if self.cluster_node is not None else store.durability
        # The single-call path goes straight to the core: argument parsing and the result lookup are C.
        self.transfer = store.engine.transfer
        # A pipelined publish hook (ledger/commit.py): each command waits for its batch's ack after the core call,
        # outside the engine's lock, so that several threads' round trips overlap.
        self._call: Callable[..., Any] | None = store.commits.call if store.commits.pipelined else None
        if self._call is not None:
            self.transfer = functools.partial(self._call, store.engine.transfer)

    @property
    def role(self) -> str | None:
        """"primary" or "standby" (or "stopped" once closed) for a clustered handle; None otherwise."""
        return None if self.cluster_node is None else self.cluster_node.role

    @property
    def primary(self) -> str | None:
        """A clustered handle: the name of its shard's primary node as this node knows it (itself when primary;
        None during a failover, or for a ledger that is not clustered)."""
        return None if self.cluster_node is None else self.cluster_node.primary

    # -- commands --

    def create_accounts(self, batch: Any) -> np.ndarray:
        """Create accounts from an ACCOUNT_DTYPE array (or dict of columns); one AccountResult code per row."""
        rows = as_batch(batch, ACCOUNT_DTYPE, accounts_batch, "accounts")
        results = np.empty(rows.shape[0], np.uint8)
        if self._call is None:
            self._engine.create_accounts(rows, results)
        else:
            self._call(self._engine.create_accounts, rows, results)
        return results

    def create_account(self, id: int, ledger: int = 1, *, min_balance: int = 0, max_balance: int = BALANCE_MAX,
                       flags: int = 0, user_data: int = 0) -> AccountResult:
        """Create one account; returns its AccountResult (OK = 0; EXISTS for a retry with the same fields).
        id: uint64, not 0 nor 2**64 - 1. ledger: its ledger (asset), uint32, not 0. min_balance <= 0 <= max_balance
        bound its balance, pending debits and credits counted (min_balance=BALANCE_MIN: a settlement account that
        may go negative, through which money enters). flags: AccountFlags. user_data: the caller's uint64."""
        if self._call is not None:
            return self._call(self._engine.create_account, id, ledger, min_balance=min_balance,
                              max_balance=max_balance, flags=int(flags), user_data=user_data)
        return self._engine.create_account(id, ledger, min_balance=min_balance, max_balance=max_balance,
                                           flags=int(flags), user_data=user_data)

    def transfers(self, batch: Any) -> np.ndarray:
        """Apply a TRANSFER_DTYPE array (or dict of columns) as one atomic batch; one TransferResult code per row.
        When it returns, every applied transfer is as durable as the ledger's durability mode says."""
        rows = as_batch(batch, TRANSFER_DTYPE, transfers_batch, "transfers")
        results = np.empty(rows.shape[0], np.uint8)
        if self._call is None:
            self._engine.transfers(rows, results)
        else:
            self._call(self._engine.transfers, rows, results)
        return results

    def transfer(self, id: int, debit_account: int, credit_account: int, amount: int, *, ledger: int = 1,
                 code: int = 0, flags: int = 0, pending_id: int = 0, timeout: int = 0,
                 user_data: int = 0) -> TransferResult:  # pragma: no cover - replaced per instance in __init__
        return self._engine.transfer(id, debit_account, credit_account, amount, ledger=ledger, code=code,
                                     flags=flags, pending_id=pending_id, timeout=timeout, user_data=user_data)

    transfer.__doc__ = _core.Engine.transfer.__doc__   # one text: each handle's `transfer` is the core's method

    # -- reads --

    def account(self, id: int) -> Account | None:
        """The account `id` as of now (an Account copy, with its counters and creation timestamp), or None."""
        row = self._engine.account(id)
        return None if row is None else Account(*row)

    def balance(self, id: int, at: Any = None) -> int:
        """credits_posted - debits_posted, now or `at` a past journal position (int) or moment (datetime, or
        int nanoseconds via `at=ledger.At(ns=...)`). KeyError if there is no such account."""
        if at is None:
            return self._engine.balance(id)
        return balance_at(self, id, at)

    def history(self, id: int, since: Any = None, until: Any = None, limit: int | None = None) -> np.ndarray:
        """The events that moved account `id`, oldest first, found through its back-pointers (cost proportional
        to the account's events, not the journal)."""
        return account_history(self, id, since=since, until=until, limit=limit)

    def explain(self, id: int, since: Any = None, until: Any = None) -> Any:
        """Opening balance, every movement with a running balance, closing balance, checked to add up."""
        return explain_account(self, id, since=since, until=until)

    def available(self, id: int) -> int:
        """balance - debits_pending: what the account may still spend above its min_balance floor."""
        return self._engine.available(id)

    def accounts(self) -> np.ndarray:
        """Every account (a copy) as an ACCOUNT_STATE_DTYPE array, in creation order."""
        with self._engine:  # the views are live: no batch may move them while they are copied
            hot, cold = self._engine.account_arrays()
            out = np.empty(hot.shape[0], ACCOUNT_STATE_DTYPE)
            for name in ("ledger", "flags", "min_balance", "max_balance", "debits_posted", "credits_posted",
                         "debits_pending", "credits_pending"):
                out[name] = hot[name]
            for name in ("id", "user_data", "timestamp"):
                out[name] = cold[name]
        return out

    def lookup_transfers(self, ids: Any) -> np.ndarray:
        """One TRANSFER_RECORD_DTYPE row per id; `state` is TransferState.NOT_FOUND for unknown ids."""
        keys = transfer_ids(ids)
        out = np.empty(keys.shape[0], TRANSFER_RECORD_DTYPE)
        return self._engine.lookup_transfers(keys, out)

    def stats(self) -> dict[str, int]:
        """Counts and sizes: accounts, transfers, journal_position, last_timestamp, pending expiries scheduled,
        torn records zeroed at open, memory_*_bytes of the state and disk_*_bytes of the files."""
        with self._engine:
            return self._stats()

    def _stats(self) -> dict[str, int]:
        self._check_open()
        engine = self._engine
        return {
            "accounts": engine.account_count,
            "transfers": engine.transfer_count,
            "recovered_torn_records": getattr(self._journal, "torn_records_zeroed", 0),
            "journal_position": engine.write_position,
            "last_timestamp": engine.last_timestamp,
            "pending_expiries_scheduled": engine.pending_expiry_count,
            **{f"memory_{name}_bytes": size for name, size in engine.memory_bytes().items()},
            **_disk_bytes(self.path),
        }

    # -- durability and audit --

    def flush(self) -> None:
        """Make everything applied so far durable now (a no-op beyond what "fsync" mode already did)."""
        with self._engine:
            self._flush()

    def _flush(self) -> None:
        if self._engine.poisoned:
            raise LedgerPoisonedError("the ledger handle is poisoned by a failed journal sync; reopen it")
        if self._engine.closed:
            raise LedgerClosedError("the ledger is closed")
        try:
            self._journal.flush()
        except KeyboardInterrupt:
            raise  # Ctrl-C, not a failed sync: nothing is lost, what it had not synced the next flush syncs
        except BaseException:
            self.store.poison()
            raise

    def scrub(self) -> ScrubReport:
        """Re-check every committed batch of the journal (header, checksum, hash chain), as replay does, without
        building any state: a damaged batch is reported (file, byte offset, journal position, why) before a read
        meets it. Reads only; safe on a read-only handle beside a live writer. Cost: one CRC32C pass over the
        journal's bytes; `ledger serve` runs the same check slowly in the background. A batch before the snapshot
        found good is remembered, so later reads of it are not checked again."""
        self._check_open()
        return scrub_journal(self.store)

    def verify(self) -> VerifyReport:
        """Replay the whole journal into a fresh engine (re-checking every checksum, the hash chain and the
        back-pointers) and compare it with the live state; also check conservation and limits."""
        with self._engine:  # writers wait: the live state is compared as of one journal position
            self._check_open()
            return verify_live(self.store)

    def snapshot(self, wait: bool = True, keep: int = KEEP_DEFAULT) -> "SnapshotInfo | SnapshotJob":
        """Write the whole state at the current journal position to <dir>/snapshots/, keeping the newest `keep`.
        The writer is held for a fork() (`stall_seconds`); the forked child writes and fsyncs the file from its
        copy-on-write image of the state, and renames it into place once the journal is durable through its
        position (in "os" mode: once the flusher has synced that far), so a snapshot never runs ahead of the
        journal. wait=True returns the SnapshotInfo once the file is in place, so the caller also waits for the
        write (1.5 GB for 10M accounts: the disk's time); wait=False returns the SnapshotJob at once and the
        writer may go on while the child writes (`.wait()` gives the info).

        One snapshot at a time: a call while an earlier snapshot of this handle is still being written first waits
        for that one to end (whatever its outcome, which stays its own job's to report), then takes its own; so
        with wait=False such a call blocks for the rest of the earlier write. Two children writing and pruning
        the same folder at once used to delete each other's files.

        A snapshot that would not leave room for the journal's next segment on the filesystem is refused before
        anything is written (LedgerFullError); one that fails anyway (the space went meanwhile, its child was
        killed) deletes what it wrote.

        A clustered handle's primary then uploads the snapshot to its shard's object store bucket and prunes the
        bucket and the stream, on a background thread (ClusterNode.snapshot_written; a standby's stay local)."""
        earlier = self._snapshot_job
        if earlier is not None:
            earlier.join()  # before the handle is held: the earlier child may take long, other calls go on
        with self._engine:  # held for the fork only: other threads' calls go on while the child writes
            job = self._start_snapshot(keep)
        if self.cluster_node is not None:   # a primary uploads it to the shard's bucket, in the background
            self.cluster_node.snapshot_written(job)
        return job.wait() if wait else job

    def _start_snapshot(self, keep: int) -> SnapshotJob:
        self._check_open()
        if self.path is None:
            raise ValueError("an in-memory ledger has no directory to snapshot into")
        if not 1 <= keep <= 1000:
            raise ValueError(f"keep must be in [1, 1000], got {keep}")
        if self._engine.readonly:  # a reader changes nothing on disk; and its view may run ahead of what is synced
            raise LedgerError("the ledger was opened read-only: snapshots are written by the directory's writer")
        if self._engine.poisoned:
            raise LedgerPoisonedError("the ledger handle is poisoned by a failed journal sync; reopen it")
        if self._snapshot_job is not None:
            self._snapshot_job.join()  # another thread's snapshot started since the join above: rare, wait for it
            self._snapshot_job = None
        held_since = time.perf_counter()
        scalars, views = self._engine.state_views()
        check_room(self.path, views, self.store.segment_bytes)
        job = SnapshotJob(self.path, scalars, views, keep, held_since=held_since, lock_fd=self.store.lock_fd,
                          # "fsync": every committed batch is durable already; "os": the flusher's to make so
                          durable=self._journal.wait_durable if self.durability == "os" else None)
        self._snapshot_job = job
        return job

    def _check_open(self) -> None:
        if self._engine.closed:
            raise LedgerClosedError("the ledger is closed")

    # -- lifecycle --

    @property
    def closed(self) -> bool:
        """True once close() was called (or the handle was poisoned and closed)."""
        return self._engine.closed

    def close(self) -> None:
        """Flush (in "os" mode), release the journal and the writer lock. Idempotent. From another thread: waits for
        the call in progress; later calls raise LedgerClosedError. A clustered handle stops its node (a primary
        releases the lease, so that a standby takes over at once)."""
        if self.cluster_node is not None:
            self.cluster_node.close()
            return
        with self._engine:
            self._close()

    def _close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Ledger":
        if self._engine.closed:
            raise LedgerClosedError("the ledger is closed")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._engine.closed else f"{self._engine.account_count} accounts"
        return f"<ledger.Ledger path={self.path!r} durability={self.durability!r} {state}>"


def open(path: str | os.PathLike[str] | None = None, create: bool = False, durability: str = "fsync", *,
         readonly: bool = False, clock: Callable[[], int] | None = None,
         segment_records_log2: int = SEGMENT_RECORDS_LOG2_DEFAULT, flush_interval_ms: int = FLUSH_INTERVAL_MS_DEFAULT,
         accounts_capacity: int = 0, transfers_capacity: int = 0, journal_records_reserved: int = 0,
         cluster: str | None = None, shard: str | None = None, node: str | None = None,
         cluster_options: Any = None) -> Ledger:
    """Open (or with create=True, create) the ledger in directory `path`; `path=None` keeps everything in memory.

    durability: "fsync" (default) makes every batch durable before the call returns (one fdatasync per call:
    group commit); "os" returns once the events are in the OS page cache (they survive a crash of the process,
    not of the machine) and a flusher syncs at least every `flush_interval_ms`, and on flush()/close().
    readonly: open without the writer lock; commands raise, reads work; several readers may open at once.
    clock: zero-argument callable returning the engine's notion of "now" in integer nanoseconds since the Unix
    epoch (default: the real-time clock read in C). Tests inject one to drive pending-transfer timeouts.
    accounts_capacity, transfers_capacity: how many accounts and remembered transfers to allocate room for up
    front. Everything grows on demand anyway, but growth rehashes and copies inside the call that crosses the
    limit; a service that knows its size avoids that pause (as TigerBeetle allocates everything at start).
    journal_records_reserved: journal records to map (and, on disk, preallocate) up front, for the same reason:
    fresh memory costs a page fault per page on first touch (~1 GB/s on this virtual machine class).

    cluster: the NATS servers (nats://host:port, several comma-separated; cluster_options: a
    ledger.cluster.connection.ConnectionOptions for authentication and TLS) of shard `shard` (docs/CLUSTER.md):
    the handle is one node of the shard, named `node` (default: the host name and a digest of the directory).
    It is the primary (the first node opened takes the lease) or a standby that follows the primary's stream
    and takes over when its lease lapses. durability is "replicated" (give "fsync", the default, or
    "replicated"): a call returns only once the stream acknowledged its batch and the local journal has it,
    fsynced. A command on a standby raises LedgerNotPrimaryError naming the primary; reads answer from the
    standby's state. `role` and `primary` say what the handle is; close() stops the node."""
    if cluster is not None or shard is not None or node is not None or cluster_options is not None:
        options = {"clock": clock, "segment_records_log2": segment_records_log2,
                   "flush_interval_ms": flush_interval_ms, "accounts_capacity": accounts_capacity,
                   "transfers_capacity": transfers_capacity, "journal_records_reserved": journal_records_reserved}
        return _open_cluster(path, create, durability, readonly, cluster, shard, node, cluster_options, options)
    return Ledger(open_store(path, create, durability, readonly=readonly, clock=clock,
                             segment_records_log2=segment_records_log2, flush_interval_ms=flush_interval_ms,
                             accounts_capacity=accounts_capacity, transfers_capacity=transfers_capacity,
                             journal_records_reserved=journal_records_reserved))


def open_with_hooks(path: str | os.PathLike[str] | None, create: bool = False, durability: str = "fsync", *,
                    fault_injector: FaultInjector | None = None, publish: Publish | None = None,
                    **options: Any) -> Ledger:
    """open() with the internal tier's hooks, which are not part of the public signature (ledger.store.open_store
    documents them): fault_injector (tests) and publish (each committed batch's durable range [start, end),
    before its call returns). options: those of open()."""
    return Ledger(open_store(path, create, durability, fault_injector=fault_injector, publish=publish, **options))


def _open_cluster(path: str | os.PathLike[str] | None, create: bool, durability: str, readonly: bool,
                  cluster: str | None, shard: str | None, node: str | None, cluster_options: Any,
                  open_options: dict[str, Any]) -> Ledger:
    """ledger.open(..., cluster=...): a ClusterNode started on `path`, its store wrapped in a Ledger."""
    if cluster is None or shard is None:
        raise ValueError("a clustered ledger needs both cluster=URL and shard=NAME")
    if path is None:
        raise ValueError("a clustered ledger needs a directory: a standby journals the primary's batches")
    if readonly:
        raise ValueError("a clustered ledger cannot be read-only: a standby writes the batches it follows")
    if durability not in ("fsync", "replicated"):
        raise ValueError(f"a clustered ledger's durability is \"replicated\" (its local journal fsynced), "
                         f"got {durability!r}")
    try:
        from ledger.cluster.node import ClusterNode   # here: nats-py is needed only by clustered ledgers
    except ImportError as error:
        raise LedgerError(f'cluster= needs the cluster extra (pip install -e ".[cluster]"): {error}') from None
    cluster_node = ClusterNode(path, cluster, shard, node, options=cluster_options, create=create,
                               open_options=open_options)
    cluster_node.start()
    return Ledger(cluster_node.store, cluster_node)


def _disk_bytes(path: str | None) -> dict[str, int]:
    """Bytes of the journal segment files and of the snapshot files on disk (0 for an in-memory ledger)."""
    if path is None:
        return {"disk_journal_bytes": 0, "disk_snapshot_bytes": 0}
    with os.scandir(os.path.join(path, "journal")) as entries:
        journal_bytes = sum(entry.stat().st_size for entry in entries if entry.name.endswith(".segment"))
    return {"disk_journal_bytes": journal_bytes, "disk_snapshot_bytes": snapshot_bytes(path)}
