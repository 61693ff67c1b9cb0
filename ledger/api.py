"""The public face: `ledger.open()` and the `Ledger` handle. Thin on purpose: it checks what callers hand in,
then passes arrays straight to the Cython core (ledger._core), which does all per-transfer work."""
from __future__ import annotations

import operator
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

import numpy as np

from ledger import _core
from ledger.enums import (
    ACCOUNT_DTYPE,
    BALANCE_MAX,
    BATCH_SIZE_MAX,
    TRANSFER_DTYPE,
    TRANSFER_RECORD_DTYPE,
    AccountResult,
    TransferResult,
)
from ledger.errors import LedgerClosedError, LedgerCorruptError, LedgerError, LedgerPoisonedError
from ledger.format import REPLAY_DAMAGED, REPLAY_END
from ledger.progress import Progress
from ledger.snapshot import (
    KEEP_DEFAULT,
    SnapshotInfo,
    SnapshotJob,
    check_room,
    list_snapshots,
    load_into,
    remove_unfinished,
    snapshot_bytes,
)
from ledger.journal import (
    FLUSH_INTERVAL_MS_DEFAULT,
    FLUSH_INTERVAL_MS_MAX,
    SEGMENT_RECORDS_LOG2_DEFAULT,
    SEGMENT_RECORDS_LOG2_MAX,
    SEGMENT_RECORDS_LOG2_MIN,
    FaultInjector,
    FileJournal,
    MemoryJournal,
)

if TYPE_CHECKING:
    from ledger.audit import VerifyReport
    from ledger.scrub import ScrubReport

__all__ = [
    "ACCOUNT_STATE_DTYPE",
    "Account",
    "Ledger",
    "accounts_batch",
    "open",
    "transfers_batch",
]

DURABILITY_MODES = ("fsync", "os")
# Opening replays the journal after the snapshot in slices of this many records, with a progress bar, when stderr
# is a terminal and at least this much may be left (about 0.4 s of replay): less is not worth a bar.
REPLAY_SLICE_RECORDS = 1 << 22
REPLAY_PROGRESS_RECORDS_MIN = 1 << 22

# What Ledger.accounts() returns: every account with its counters.
ACCOUNT_STATE_DTYPE = np.dtype(
    [
        ("id", "<u8"),
        ("ledger", "<u4"),
        ("flags", "<u2"),
        ("min_balance", "<i8"),
        ("max_balance", "<i8"),
        ("user_data", "<u8"),
        ("debits_posted", "<i8"),
        ("credits_posted", "<i8"),
        ("debits_pending", "<i8"),
        ("credits_pending", "<i8"),
        ("timestamp", "<u8"),
    ],
    align=True,
)


class Account(NamedTuple):
    """One account as of the moment it was read (a copy: it does not change afterwards)."""

    id: int
    ledger: int
    flags: int
    min_balance: int
    max_balance: int
    user_data: int
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    timestamp: int

    @property
    def balance(self) -> int:
        """credits_posted - debits_posted."""
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        """balance - debits_pending: what the account may still spend above its min_balance."""
        return self.credits_posted - self.debits_posted - self.debits_pending


def accounts_batch(count: int) -> np.ndarray:
    """`count` account rows with the defaults filled in: ledger 1, min_balance 0, max_balance int64 max.
    (A zero-filled array would mean "ledger 0, cap 0"; start from this instead.)"""
    batch = np.zeros(_count(count), ACCOUNT_DTYPE)
    batch["ledger"] = 1
    batch["max_balance"] = BALANCE_MAX
    return batch


def transfers_batch(count: int) -> np.ndarray:
    """`count` transfer rows with the defaults filled in: ledger 1, everything else 0."""
    batch = np.zeros(_count(count), TRANSFER_DTYPE)
    batch["ledger"] = 1
    return batch


def _count(count: int) -> int:
    count = operator.index(count)
    if not 0 <= count <= BATCH_SIZE_MAX:
        raise ValueError(f"batch size {count} is outside [0, BATCH_SIZE_MAX={BATCH_SIZE_MAX}]")
    return count


def _as_batch(batch: Any, dtype: np.dtype, make: Callable[[int], np.ndarray], what: str) -> np.ndarray:
    """Check a caller's batch and return a C-contiguous array of `dtype` without copying when it already is one."""
    if isinstance(batch, Mapping):
        return _from_columns(batch, dtype, make, what)
    if not isinstance(batch, np.ndarray):
        raise TypeError(f"{what} must be a numpy array of ledger.{_dtype_name(dtype)} or a dict of columns, "
                        f"not {type(batch).__name__}")
    if batch.dtype != dtype:
        raise TypeError(f"{what} has dtype {batch.dtype}; expected ledger.{_dtype_name(dtype)} "
                        f"(build it with ledger.{what}_batch(n))")
    if batch.ndim != 1:
        raise ValueError(f"{what} must be 1-dimensional, got shape {batch.shape}")
    if not batch.flags.c_contiguous:
        raise ValueError(f"{what} is not C-contiguous (a strided view?); pass np.ascontiguousarray(batch)")
    if batch.shape[0] > BATCH_SIZE_MAX:
        raise ValueError(f"{what} has {batch.shape[0]} rows; the limit is BATCH_SIZE_MAX={BATCH_SIZE_MAX} "
                         f"(a batch is one atomic journal write)")
    return batch


def _dtype_name(dtype: np.dtype) -> str:
    return "ACCOUNT_DTYPE" if dtype == ACCOUNT_DTYPE else "TRANSFER_DTYPE"


def _from_columns(columns: Mapping[str, Any], dtype: np.dtype, make: Callable[[int], np.ndarray],
                  what: str) -> np.ndarray:
    unknown = sorted(set(columns) - set(dtype.names))
    if unknown:
        raise ValueError(f"{what} columns {unknown} are not fields of ledger.{_dtype_name(dtype)} "
                         f"(fields: {', '.join(dtype.names)})")
    arrays = {name: np.asarray(value) for name, value in columns.items()}
    lengths = {name: array.shape for name, array in arrays.items()}
    shapes = set(lengths.values())
    if len(shapes) > 1:
        raise ValueError(f"{what} columns have different lengths: {lengths}")
    shape = shapes.pop() if shapes else (0,)
    if len(shape) != 1:
        raise ValueError(f"{what} columns must be 1-dimensional, got shape {shape}")
    batch = make(shape[0])
    for name, array in arrays.items():
        field = dtype.fields[name][0]
        if array.dtype.kind not in "iub":
            raise TypeError(f"{what} column {name!r} has dtype {array.dtype}; integers are required")
        if array.size:
            info = np.iinfo(field)
            low, high = int(array.min()), int(array.max())
            if low < info.min or high > info.max:
                raise ValueError(f"{what} column {name!r} has values outside {field} range "
                                 f"[{info.min}, {info.max}]: min {low}, max {high}")
        batch[name] = array
    return batch


class Ledger:
    """A handle on one ledger. Safe to share between threads: the engine's lock serialises every call (a batch
    runs without the GIL, and other threads' calls wait for it without the GIL), and a read that looks at several
    things (accounts, stats, history, explain, verify) holds it throughout, so it sees whole batches only.

    Methods bound in __init__ for speed: `transfer` is the core's own method (no Python frame per call; it takes
    the engine's lock itself)."""

    def __init__(self, engine: _core.Engine, journal: Any, path: str | None, durability: str) -> None:
        self._engine = engine
        self._journal = journal
        self.path = path
        self.durability = durability
        # The single-call path goes straight to the core: argument parsing and the result lookup are C.
        self.transfer = engine.transfer
        self.recovered_from: SnapshotInfo | None = None  # the snapshot this handle was opened from, if any
        self._snapshot_job: SnapshotJob | None = None  # the last snapshot started: the next one waits for it

    # -- commands --

    def create_accounts(self, batch: Any) -> np.ndarray:
        """Create accounts from an ACCOUNT_DTYPE array (or dict of columns); one AccountResult code per row."""
        rows = _as_batch(batch, ACCOUNT_DTYPE, accounts_batch, "accounts")
        results = np.empty(rows.shape[0], np.uint8)
        self._engine.create_accounts(rows, results)
        return results

    def create_account(self, id: int, ledger: int = 1, *, min_balance: int = 0, max_balance: int = BALANCE_MAX,
                       flags: int = 0, user_data: int = 0) -> AccountResult:
        """Create one account; returns its AccountResult (OK = 0; EXISTS for a retry with the same fields).
        id: uint64, not 0 nor 2**64 - 1. ledger: its ledger (asset), uint32, not 0. min_balance <= 0 <= max_balance
        bound its balance, pending debits and credits counted (min_balance=BALANCE_MIN: a settlement account that
        may go negative, through which money enters). flags: AccountFlags. user_data: the caller's uint64."""
        return self._engine.create_account(id, ledger, min_balance=min_balance, max_balance=max_balance,
                                           flags=int(flags), user_data=user_data)

    def transfers(self, batch: Any) -> np.ndarray:
        """Apply a TRANSFER_DTYPE array (or dict of columns) as one atomic batch; one TransferResult code per row.
        When it returns, every applied transfer is as durable as the ledger's durability mode says."""
        rows = _as_batch(batch, TRANSFER_DTYPE, transfers_batch, "transfers")
        results = np.empty(rows.shape[0], np.uint8)
        self._engine.transfers(rows, results)
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
        from ledger.history import balance_at
        return balance_at(self, id, at)

    def history(self, id: int, since: Any = None, until: Any = None, limit: int | None = None) -> np.ndarray:
        """The events that moved account `id`, oldest first, found through its back-pointers (cost proportional
        to the account's events, not the journal)."""
        from ledger.history import history
        return history(self, id, since=since, until=until, limit=limit)

    def explain(self, id: int, since: Any = None, until: Any = None) -> Any:
        """Opening balance, every movement with a running balance, closing balance, checked to add up."""
        from ledger.history import explain
        return explain(self, id, since=since, until=until)

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
        keys = np.asarray(ids)
        if keys.ndim == 0:
            keys = keys.reshape(1)
        if keys.ndim != 1:
            raise ValueError(f"ids must be 1-dimensional, got shape {keys.shape}")
        if keys.size and keys.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {keys.dtype}")
        if keys.size and keys.dtype.kind == "i" and int(keys.min()) < 0:
            raise ValueError("ids must be >= 0")
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
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
            self._poison()
            raise

    def scrub(self) -> "ScrubReport":
        """Re-check every committed batch of the journal (header, checksum, hash chain), as replay does, without
        building any state: a damaged batch is reported (file, byte offset, journal position, why) before a read
        meets it. Reads only; safe on a read-only handle beside a live writer. Cost: one CRC32C pass over the
        journal's bytes; `ledger serve` runs the same check slowly in the background. A batch before the snapshot
        found good is remembered, so later reads of it are not checked again."""
        self._check_open()
        from ledger.scrub import scrub
        return scrub(self)

    def verify(self) -> "VerifyReport":
        """Replay the whole journal into a fresh engine (re-checking every checksum, the hash chain and the
        back-pointers) and compare it with the live state; also check conservation and limits."""
        with self._engine:  # writers wait: the live state is compared as of one journal position
            self._check_open()
            from ledger.audit import verify_live
            return verify_live(self)

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
        killed) deletes what it wrote."""
        earlier = self._snapshot_job
        if earlier is not None:
            earlier.join()  # before the handle is held: the earlier child may take long, other calls go on
        with self._engine:  # held for the fork only: other threads' calls go on while the child writes
            job = self._start_snapshot(keep)
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
        check_room(self.path, views, getattr(self._journal, "segment_bytes", 0))
        job = SnapshotJob(self.path, scalars, views, keep, held_since=held_since,
                          lock_fd=getattr(self._journal, "_lock_fd", None),
                          # "fsync": every committed batch is durable already; "os": the flusher's to make so
                          durable=self._journal.wait_durable if self.durability == "os" else None)
        self._snapshot_job = job
        return job

    def _poison(self) -> None:
        self._engine.poisoned = True

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
        the call in progress; later calls raise LedgerClosedError."""
        with self._engine:
            self._close()

    def _close(self) -> None:
        if self._engine.closed:
            return
        poisoned = self._engine.poisoned
        self._engine.close()
        if isinstance(self._journal, FileJournal):
            self._journal.close(final_sync=not poisoned)
        else:
            self._journal.close()

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
         accounts_capacity: int = 0, transfers_capacity: int = 0, journal_records_reserved: int = 0) -> Ledger:
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
    fresh memory costs a page fault per page on first touch (~1 GB/s on this virtual machine class)."""
    return _open(path, create, durability, readonly=readonly, clock=clock, segment_records_log2=segment_records_log2,
                 flush_interval_ms=flush_interval_ms, accounts_capacity=accounts_capacity,
                 transfers_capacity=transfers_capacity, journal_records_reserved=journal_records_reserved)


def _open(path: str | os.PathLike[str] | None, create: bool = False, durability: str = "fsync", *,
          readonly: bool = False,
          clock: Callable[[], int] | None = None, segment_records_log2: int = SEGMENT_RECORDS_LOG2_DEFAULT,
          flush_interval_ms: int = FLUSH_INTERVAL_MS_DEFAULT, accounts_capacity: int = 0,
          transfers_capacity: int = 0, journal_records_reserved: int = 0,
          fault_injector: FaultInjector | None = None, sync_each_commit: bool = True) -> Ledger:
    """open() with the hooks that are not public. fault_injector (tests): called as fault_injector("allocate" |
    "write" | "sync") before those journal operations. sync_each_commit=False (durability "fsync" only) leaves
    the sync to the caller: every committed batch is written to the files, and the caller calls the journal's
    sync() once for a group of calls (the ring server's group commit across clients)."""
    if durability not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
    assert sync_each_commit or durability == "fsync"
    if clock is not None and not callable(clock):
        raise TypeError("clock must be a zero-argument callable returning integer nanoseconds")
    for name, value in (("accounts_capacity", accounts_capacity), ("transfers_capacity", transfers_capacity),
                        ("journal_records_reserved", journal_records_reserved)):
        if not 0 <= operator.index(value) <= 2**36:
            raise ValueError(f"{name} must be in [0, 2**36], got {value}")
    # Checked here for every kind of ledger (the journal checks them again): an in-memory one took any segment size
    # the core allowed (4 to 30) and ignored a flush interval out of range.
    for name, value, low, high in (
            ("segment_records_log2", segment_records_log2, SEGMENT_RECORDS_LOG2_MIN, SEGMENT_RECORDS_LOG2_MAX),
            ("flush_interval_ms", flush_interval_ms, 1, FLUSH_INTERVAL_MS_MAX)):
        if not low <= operator.index(value) <= high:
            raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    if path is None:
        memory = MemoryJournal(segment_records_log2)
        engine = _core.Engine(segment_records_log2, memory.segment, clock=clock,
                              account_capacity=accounts_capacity, transfer_capacity=transfers_capacity)
        engine.map_through(engine.write_position + journal_records_reserved)
        return Ledger(engine, memory, None, "memory")
    journal = FileJournal(os.fspath(path), create=create, durability=durability, readonly=readonly,
                          segment_records_log2=segment_records_log2, flush_interval_ms=flush_interval_ms,
                          fault_injector=fault_injector, sync_each_commit=sync_each_commit)
    engines: list[_core.Engine] = []   # every engine made here: a failed open closes them all
    try:
        if not readonly:
            remove_unfinished(os.fspath(path))  # we hold the writer lock: no snapshot of ours is being written
        def new_engine(capacity: bool) -> _core.Engine:
            """capacity False: the smallest engine, to load a snapshot into (which replaces its tables)."""
            fresh = _core.Engine(journal.segment_records_log2, journal.segment,
                                 after_commit=journal.after_commit if durability == "fsync" else None,
                                 write_ahead=journal.write_ahead if durability == "fsync" else None, clock=clock,
                                 segment_files=journal.segment_files(), segment_release=journal.segment_release,
                                 **({"account_capacity": accounts_capacity, "transfer_capacity": transfers_capacity}
                                    if capacity else {}))
            engines.append(fresh)
            fresh.map_through(journal.existing_end_position)
            fresh.damage_error = journal.damaged
            return fresh

        engine, recovered_from = _engine_from_snapshot(os.fspath(path), new_engine, accounts_capacity,
                                                       transfers_capacity)
        _replay_and_recover(engine, journal, readonly)
        report = journal.torn_tail_report()
        if report is not None:
            warnings.warn(report, RuntimeWarning, stacklevel=3)
        journal.begin_writing(engine.write_position)
        engine.provide_segments(journal.held_from)   # the existing segments it writes into next, if any
        if not readonly and journal_records_reserved:
            engine.map_through(engine.write_position + journal_records_reserved)
            journal.reserve(engine.write_position, engine.write_position + journal_records_reserved)
        engine.readonly = readonly
        handle = Ledger(engine, journal, os.fspath(path), durability)
        handle.recovered_from = recovered_from
        journal.poison_with(handle._poison)   # a segment that cannot be created is fatal for the handle
        if durability == "os" and not readonly:
            journal.start_flusher(lambda: engine.write_position, handle._poison)
        return handle
    except BaseException as error:
        _release_after_failed_open(engines, journal, error)
        raise


def _release_after_failed_open(engines: list[_core.Engine], journal: FileJournal, error: BaseException) -> None:
    """Let go of everything a failed open took (the engines' hold on the segments first, then the journal's
    mappings, descriptors and writer lock), so the same process can open the directory again. A failure here is
    attached to the real error as a note and never replaces it."""
    for engine in engines:
        try:
            engine.close()
        except Exception as cleanup_error:  # noqa: BLE001 - reported on the real error
            error.add_note(f"ledger: also failed to close an engine after the failed open: {cleanup_error!r}")
    try:
        journal.close(final_sync=False)
    except Exception as cleanup_error:  # noqa: BLE001 - reported on the real error
        error.add_note(f"ledger: also failed to close the journal after the failed open: {cleanup_error!r}")


# Judgements of a moving stop a reader makes before it takes the journal as it has replayed it (see below).
READONLY_RECOVERY_ATTEMPTS = 5


def _replay_and_recover(engine: _core.Engine, journal: FileJournal, readonly: bool) -> None:
    """Replay the journal, then have the journal judge where replay stopped (torn tail or corruption).
    A reader beside a live writer can stop at a batch that is being written, which the writer then commits, with
    more batches after it, before the judgement looks: that is not corruption. Batches are committed in order, so
    the batch at the stop is complete by then: the reader replays on from it. A stop that does not move is judged.
    A writer that commits faster than a judgement takes (tmpfs, where syncs cost nothing) moves every stop on: a
    reader that has seen its stop move READONLY_RECOVERY_ATTEMPTS times takes what it replayed (whole batches,
    every check passed) as the journal's end, as it takes any stop beside a live writer. Damage never moves."""
    reason, position = _replay(engine, journal)
    if reason == REPLAY_DAMAGED:
        engine.raise_damage()  # a batch replayed refers to a record from before the snapshot that is damaged
    for _ in range(READONLY_RECOVERY_ATTEMPTS):
        try:
            journal.recover_tail(reason, position, engine.mapped_end)
            return
        except LedgerCorruptError:
            if not readonly:
                raise
            stopped_at = position
            reason, position, _, _ = engine.replay()
            if reason == REPLAY_DAMAGED:
                engine.raise_damage()
            if position == stopped_at:
                raise
    assert readonly and position > stopped_at


def _engine_from_snapshot(directory: str, new_engine: Callable[[bool], _core.Engine], accounts_capacity: int,
                          transfers_capacity: int) -> tuple[_core.Engine, SnapshotInfo | None]:
    """A fresh engine loaded from the newest snapshot that passes its checks and belongs to this journal, with
    room for the capacities asked for. A damaged one is skipped with a warning and an older one (or genesis) is
    used. An engine to load into starts small: allocating the capacities first would fault in memory (4 GB for a
    100M-transfer table) that the snapshot's own tables then replace."""
    for position, snapshot_path in list_snapshots(directory):
        engine = new_engine(False)
        try:
            return engine, load_into(snapshot_path, position, engine, accounts_capacity, transfers_capacity)
        except (LedgerCorruptError, ValueError, OSError) as error:
            warnings.warn(f"ledger: snapshot skipped, using an older one or the journal from genesis: {error}",
                          RuntimeWarning, stacklevel=3)
            engine.close()
    return new_engine(True), None


def _replay(engine: _core.Engine, journal: FileJournal) -> tuple[int, int]:
    """engine.replay() to the end of the journal: (stop reason, position). Recovery's longest step (about 10 s per
    100M events), so on a terminal, when much is left, it runs in slices that stop at batch boundaries and draws a
    progress bar; the outcome is the same."""
    start = engine.write_position
    if journal.existing_end_position - start < REPLAY_PROGRESS_RECORDS_MIN or not sys.stderr.isatty():
        reason, position, _, _ = engine.replay()
        return reason, position
    end = journal.records_end(start)
    if end - start < REPLAY_PROGRESS_RECORDS_MIN:
        reason, position, _, _ = engine.replay()
        return reason, position
    with Progress(end - start, "replay", "records") as progress:
        position = start
        while True:
            reason, position, batches, _ = engine.replay(position + REPLAY_SLICE_RECORDS)
            progress.update(position - start)
            if reason != REPLAY_END:
                return reason, position  # torn tail or corruption: the caller decides which
            if batches == 0:
                # The clean end, or a batch longer than a slice: replay() without a bound says which, and
                # replays the rest in one go.
                reason, position, _, _ = engine.replay()
                return reason, position


def _disk_bytes(path: str | None) -> dict[str, int]:
    """Bytes of the journal segment files and of the snapshot files on disk (0 for an in-memory ledger)."""
    if path is None:
        return {"disk_journal_bytes": 0, "disk_snapshot_bytes": 0}
    with os.scandir(os.path.join(path, "journal")) as entries:
        journal_bytes = sum(entry.stat().st_size for entry in entries if entry.name.endswith(".segment"))
    return {"disk_journal_bytes": journal_bytes, "disk_snapshot_bytes": snapshot_bytes(path)}
