"""Many processes, one writer, no broker: `ledger serve DIR` owns the ledger and drains a shared command ring;
`ledger.connect(DIR)` gives other processes a `Client` with the same calls as `Ledger`.

The ring (`<dir>/commands.ring`, see docs/RING.md) is created afresh by each `serve`: clients of a writer that
died see `LedgerUnavailableError` (never a hang) and reconnect. Retrying is always safe with the same transfer
ids: a transfer that was applied answers EXISTS."""
from __future__ import annotations

import concurrent.futures
import mmap
import operator
import os
import signal
import stat
import threading
import time
import warnings
from typing import Any

import numpy as np

from ledger import _ring
from ledger.api import Ledger
from ledger.batches import Account, accounts_batch, as_batch, transfers_batch
from ledger.enums import (
    ACCOUNT_DTYPE,
    AMOUNT_MAX,
    BALANCE_MAX,
    TRANSFER_DTYPE,
    AccountResult,
    TransferResult,
)
from ledger.errors import (
    LedgerBusyError,
    LedgerClosedError,
    LedgerCorruptError,
    LedgerError,
    LedgerRejectedError,
    LedgerTimeoutError,
    LedgerUnavailableError,
)
from ledger.scrub import BackgroundScrub
from ledger.store import open_store

__all__ = ["Client", "Server", "account_id", "account_row", "connect", "transfer_row", "RING_FILE", "SLOT_COUNT_DEFAULT"]

RING_FILE = "commands.ring"
SLOT_COUNT_DEFAULT = 1 << 16
SLOT_COUNT_MAX = 1 << 22
GROUP_ROWS_MAX = 1 << 15          # rows applied (and group-committed) per drain
# A drained group this large is synced in the background while the next group is gathered and applied (see
# Server.drain_once): its sync then overlaps useful work. Smaller groups are synced at once, as a hop to the sync
# thread would cost a small group's latency more than the overlap saves.
OVERLAP_ROWS_MIN_DEFAULT = 1024
ABANDON_AFTER_MS_DEFAULT = 2_000  # a claimed slot unpublished this long: its producer is dead or stuck
ABANDON_AFTER_MS_MAX = 600_000
# The wait strategy (docs/RING.md, "Wait strategy"): spin, then sleep on a futex.
SPIN_COUNT_DEFAULT = _ring.SPIN_COUNT_DEFAULT_VALUE  # pause instructions before sleeping (writer and clients)
SPIN_COUNT_MAX = _ring.SPIN_COUNT_LIMIT
IDLE_WAIT_MS_DEFAULT = 50         # the idle writer's futex sleep: bounds how late it notices a stop or a dead
IDLE_WAIT_MS_MAX = 1_000          # producer's claim (nobody wakes it for those)
WAIT_SLICE_MS_DEFAULT = _ring.WAIT_SLICE_MS_DEFAULT_VALUE  # a client's futex sleep between re-checks of its
WAIT_SLICE_MS_MAX = _ring.WAIT_SLICE_MS_LIMIT              # deadline, the writer's heartbeat and Ctrl-C
# The writer's heartbeat comes from its own thread, so a long drain (a slow fsync, creating a segment) does not
# look like a dead writer; a writer that died or hangs outside Python's reach stops beating.
HEARTBEAT_INTERVAL_MS = 50
WRITER_TIMEOUT_MS_DEFAULT = 3_000
WRITER_TIMEOUT_MS_MIN = 4 * HEARTBEAT_INTERVAL_MS  # less would take a late beat for a dead writer
TIMEOUT_MS_MAX = 3_600_000
TIMEOUT_MS_DEFAULT = 30_000
BUSY_TIMEOUT_MS_DEFAULT = 5_000
# A call that finds no live writer before it sends anything (`serve` restarting: the old ring is still in place
# while the new writer replays) looks for the new ring this often until its timeout, instead of failing.
WRITER_POLL_MS = 20
# `ledger serve` snapshots every 5 minutes by default: a restart then replays at most ~5 minutes of journal
# instead of everything since genesis, while the writer stalls only for the fork of each snapshot (the child
# writes it) and old snapshots are pruned (the newest 3 kept). Skipped when nothing was written since the last one.
SNAPSHOT_EVERY_S_DEFAULT = 300.0
SNAPSHOT_EVERY_S_MIN = 0.1
SNAPSHOT_EVERY_S_MAX = 7 * 24 * 3600.0
# A snapshot that keeps failing (a full disk) is retried after the interval doubled per failure in a row, up to an
# hour (or the interval, if longer): each attempt costs a fork and a report, and a disk short of room stays so.
SNAPSHOT_BACKOFF_S_MAX = 3600.0
SNAPSHOT_BACKOFF_DOUBLINGS_MAX = 32
PAYLOAD = _ring.PAYLOAD_SIZE
ROWS_NAMED_MAX = 10  # rows an error message names at most

# A query's answer in the slot payload: the account record.
ANSWER_DTYPE = np.dtype([
    ("id", "<u8"), ("user_data", "<u8"), ("min_balance", "<i8"), ("max_balance", "<i8"),
    ("debits_posted", "<i8"), ("credits_posted", "<i8"), ("debits_pending", "<i8"), ("credits_pending", "<i8"),
    ("timestamp", "<u8"), ("ledger", "<u4"), ("flags", "<u2"), ("reserved", "<u2"),
])
assert ANSWER_DTYPE.itemsize == PAYLOAD


def _ring_size(slot_count: int) -> int:
    return _ring.HEADER_SIZE + slot_count * _ring.SLOT_SIZE


def _check_range(name: str, value: int, minimum: int, maximum: int) -> int:
    """An integer option within its limits, or ValueError naming it (bool and float are refused: 1.5 ms is a typo)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return value


PERMISSION_CHECK_ENTRIES_MAX = 1_000_000  # a data directory holds a few files per 64 MiB segment


ID_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
U16_MAX = 2**16 - 1


# Scalars of the single calls, checked as Ledger's core checks them (same exceptions, same messages): numpy's
# tuple assignment would truncate a float (1.5 -> 1: a silent change of amount) and wrap or reject others vaguely.
def _unsigned(value: Any, name: str, maximum: int) -> int:
    if not isinstance(value, int):
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} {value} is outside [0, {maximum}]")
    return int(value)


def _signed(value: Any, name: str) -> int:
    if not isinstance(value, int):
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if not -AMOUNT_MAX - 1 <= value <= AMOUNT_MAX:
        raise ValueError(f"{name} {value} is outside the int64 range [{-AMOUNT_MAX - 1}, {AMOUNT_MAX}]")
    return int(value)


def transfer_row(id: Any, debit_account: Any, credit_account: Any, amount: Any, ledger: Any = 1, code: Any = 0,
                 flags: Any = 0, pending_id: Any = 0, timeout: Any = 0, user_data: Any = 0) -> np.ndarray:
    """The one-row TRANSFER_DTYPE batch of a single transfer's arguments, each checked as Ledger.transfer checks
    it (same exceptions, same messages): what every client's `transfer` sends."""
    rows = transfers_batch(1)
    rows[0] = (_unsigned(id, "id", ID_MAX), _unsigned(debit_account, "debit_account", ID_MAX),
               _unsigned(credit_account, "credit_account", ID_MAX), _signed(amount, "amount"),
               _unsigned(pending_id, "pending_id", ID_MAX), _unsigned(user_data, "user_data", ID_MAX),
               _unsigned(ledger, "ledger", U32_MAX), _unsigned(timeout, "timeout", U32_MAX),
               _unsigned(code, "code", U16_MAX), _unsigned(flags, "flags", U16_MAX))
    return rows


def account_row(id: Any, ledger: Any = 1, min_balance: Any = 0, max_balance: Any = BALANCE_MAX, flags: Any = 0,
                user_data: Any = 0) -> np.ndarray:
    """The one-row ACCOUNT_DTYPE batch of a single account's arguments, checked as Ledger.create_account does."""
    rows = accounts_batch(1)
    rows[0] = (_unsigned(id, "id", ID_MAX), _unsigned(user_data, "user_data", ID_MAX),
               _signed(min_balance, "min_balance"), _signed(max_balance, "max_balance"),
               _unsigned(ledger, "ledger", U32_MAX), _unsigned(flags, "flags", U16_MAX))
    return rows


def account_id(id: Any) -> int:
    """An account id argument of a read (account, balance, available), checked: an int in [0, 2**64 - 1]."""
    return _unsigned(id, "id", ID_MAX)


def check_permissions(directory: str, group: int | None = None) -> None:
    """Anyone who can write the ring, the journal or a snapshot can move money: refuse to serve a data directory
    where anything (the directory, journal/, snapshots/, LOCK, every file, recursively) is writable by others, by
    its group unless `group` is given and it belongs to that group, or owned by anyone but this user or root
    (an owner can change the mode at will). The ring file itself is skipped: serve replaces it."""
    user = os.geteuid()
    checked = 0
    for root, directories, files in os.walk(directory, onerror=_raise):
        names = [""] if root == directory else []
        names += directories + files
        for name in names:
            if root == directory and (name == RING_FILE or (name.startswith(RING_FILE + ".")
                                                            and name.endswith(".tmp"))):
                continue
            path = os.path.join(root, name) if name else root
            status = os.stat(path)
            checked += 1
            if checked > PERMISSION_CHECK_ENTRIES_MAX:
                raise PermissionError(f"{directory} holds more than {PERMISSION_CHECK_ENTRIES_MAX} entries; "
                                      f"refusing to serve a directory that is not a ledger's")
            mode = stat.filemode(status.st_mode)
            if status.st_uid not in (user, 0):
                raise PermissionError(f"{path} is owned by uid {status.st_uid}, not by this user (uid {user}) or "
                                      f"root; refusing to serve: chown it")
            if status.st_mode & stat.S_IWOTH:
                raise PermissionError(f"{path} is writable by others (mode {mode}); refusing to serve: chmod o-w it")
            if status.st_mode & stat.S_IWGRP and (group is None or status.st_gid != group):
                raise PermissionError(f"{path} is writable by its group {status.st_gid} (mode {mode}); refusing to "
                                      f"serve: chmod g-w it (ledger serve --group GID shares the ring with a group)")


def _raise(error: OSError) -> None:
    raise error


def _check_server_options(slot_count: int, durability: str, abandon_after_ms: int, spin_count: int,
                          idle_wait_ms: int, overlap_rows_min: int, snapshot_every_s: float | None,
                          group: int | None) -> None:
    """Server's options within their limits, or TypeError/ValueError naming the one that is not."""
    if slot_count < 16 or slot_count > SLOT_COUNT_MAX or slot_count & (slot_count - 1):
        raise ValueError(f"slot_count must be a power of two in [16, {SLOT_COUNT_MAX}], got {slot_count}")
    if durability not in ("fsync", "os"):
        raise ValueError(f"durability must be 'fsync' or 'os', got {durability!r}")
    _check_range("abandon_after_ms", abandon_after_ms, 1, ABANDON_AFTER_MS_MAX)
    _check_range("spin_count", spin_count, 0, SPIN_COUNT_MAX)
    _check_range("idle_wait_ms", idle_wait_ms, 1, IDLE_WAIT_MS_MAX)
    _check_range("overlap_rows_min", overlap_rows_min, 1, GROUP_ROWS_MAX + 1)  # the maximum: never overlap
    if snapshot_every_s is not None:
        if isinstance(snapshot_every_s, bool) or not isinstance(snapshot_every_s, (int, float)):
            raise TypeError(f"snapshot_every_s must be a number of seconds, not {type(snapshot_every_s).__name__}")
        if not SNAPSHOT_EVERY_S_MIN <= snapshot_every_s <= SNAPSHOT_EVERY_S_MAX:
            raise ValueError(f"snapshot_every_s must be in [{SNAPSHOT_EVERY_S_MIN}, {SNAPSHOT_EVERY_S_MAX}] "
                             f"(or None: never), got {snapshot_every_s}")
    if group is not None:
        _check_range("group", group, 0, 2**32 - 2)


class Server:
    """The single writer: owns the Ledger, drains the ring, group-commits, answers."""

    def __init__(self, directory: str, durability: str = "fsync", slot_count: int = SLOT_COUNT_DEFAULT,
                 group: int | None = None, abandon_after_ms: int = ABANDON_AFTER_MS_DEFAULT,
                 spin_count: int = SPIN_COUNT_DEFAULT, idle_wait_ms: int = IDLE_WAIT_MS_DEFAULT,
                 snapshot_every_s: float | None = None, create: bool = True,
                 overlap_rows_min: int = OVERLAP_ROWS_MIN_DEFAULT, **open_options: Any) -> None:
        """abandon_after_ms: how long a claimed, unpublished head slot may block the ring before the writer gives
        its batch up (its producer died or hangs); short values risk giving up producers that were merely
        descheduled. spin_count: pause instructions the writer spins for new work before it sleeps;
        idle_wait_ms: how long it then sleeps at most (a publish wakes it at once). snapshot_every_s: serve_forever
        takes a snapshot between drains this often (None: never), so a restart does not replay from genesis.
        overlap_rows_min: a drained group of at least this many rows (durability "fsync") is synced in the
        background while the next one is applied; it is answered when its sync returns. open_options: those of
        ledger.store.open_store (capacities, journal_records_reserved; fault_injector and publish for tests)."""
        _check_server_options(slot_count, durability, abandon_after_ms, spin_count, idle_wait_ms, overlap_rows_min,
                              snapshot_every_s, group)
        self.directory = os.fspath(directory)
        self.durability = durability
        self.abandon_after_ns = abandon_after_ms * 1_000_000
        self.spin_count = spin_count
        self.idle_wait_ms = idle_wait_ms
        if create:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        check_permissions(self.directory, group)
        if group is not None:
            # Clients of the group must reach the ring: the directory becomes group-searchable (not writable);
            # the journal, snapshots and LOCK stay private to the writer.
            os.chown(self.directory, -1, group)
            os.chmod(self.directory, 0o750)
        # The commit pipeline in grouped mode (ledger/commit.py): one sync per drained group, across clients.
        self.store = open_store(self.directory, create, durability, grouped=True, **open_options)
        self.ledger = Ledger(self.store)
        self.commits = self.store.commits
        self.file_mode = 0o660 if group is not None else 0o600
        self.group = group
        self.ring, self._memory = self._create_ring(slot_count)
        self._stop = threading.Event()
        self.overlap_rows_min = overlap_rows_min
        # Two sets of gather buffers (about 3 MB each, allocated once: zeroing fresh arrays on every drain cost
        # more than a small group's work): one may belong to the group whose sync is pending.
        self._buffers = [(np.zeros(GROUP_ROWS_MAX, np.uint16), np.zeros((GROUP_ROWS_MAX, PAYLOAD), np.uint8),
                          np.zeros(GROUP_ROWS_MAX, np.uint8), np.zeros(GROUP_ROWS_MAX, np.uint8)) for _ in range(2)]
        self._buffer_index = 0
        # For each buffer set, the answer (a Future) of the group gathered into it last, if the sync thread has it.
        self._buffer_users: list[concurrent.futures.Future | None] = [None, None]
        # The ring's consumer side (gather, complete) is used by this thread and the sync thread.
        self._consumer_lock = threading.Lock()
        self._heartbeat_stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="ledger-ring-heartbeat", daemon=True)
        self._heartbeat.start()
        self.slot_count = slot_count
        self.applied_rows = 0
        self.snapshot_every_s = snapshot_every_s
        self.last_snapshot: Any = None     # the SnapshotInfo of the newest snapshot this server took
        self.snapshot_failures = 0
        self.snapshot_failures_in_a_row = 0
        self._snapshot_job: Any = None
        self._snapshot_due = time.monotonic() + (snapshot_every_s or 0.0)
        recovered = self.store.recovered_from
        self._snapshot_position = recovered.position if recovered is not None else 0
        # Re-checks the whole journal slowly, pass after pass, between drains (ledger/scrub.py).
        self.scrub = BackgroundScrub(self.store)

    def _create_ring(self, slot_count: int) -> tuple[_ring.Ring, mmap.mmap]:
        path = os.path.join(self.directory, RING_FILE)
        temporary = path + f".{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, self.file_mode)
        try:
            if self.group is not None:
                os.fchown(fd, -1, self.group)
                os.fchmod(fd, self.file_mode)
            os.ftruncate(fd, _ring_size(slot_count))
            memory = mmap.mmap(fd, _ring_size(slot_count))
        finally:
            os.close(fd)
        ring = _ring.Ring(memory, os.getpid())
        # A batch must fit one drain, or the writer never sees it complete and gives it up every time.
        ring.initialise(slot_count, min(slot_count // 2, GROUP_ROWS_MAX), os.getpid(), time.time_ns(),
                        time.time_ns())
        os.rename(temporary, path)  # clients of an earlier writer keep the old, dead ring and notice
        return ring, memory

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        while not self._heartbeat_stop.wait(HEARTBEAT_INTERVAL_MS / 1000):
            self.ring.heartbeat()

    def serve_forever(self) -> None:
        try:
            while not self._stop.is_set():
                worked = self.drain_once()
                self._snapshot_if_due()
                self.scrub.tick()
                if not worked:
                    self.ring.wait_for_work(self.idle_wait_ms, self.spin_count)
        finally:
            self.close()

    def drain_once(self) -> bool:
        """Gather what producers published, apply it (one core call per run of same-kind rows), make it durable
        and answer it, through the store's commit pipeline (grouped mode). Returns whether anything was gathered.
        With durability "fsync", a group of at least overlap_rows_min rows is synced and answered by the sync
        thread while this one gathers and applies the next group (settle() waits for it)."""
        index = self._buffer_index
        if self._buffer_users[index] is not None:
            self._buffer_users[index].result()  # the group gathered into these buffers before is answered
            self._buffer_users[index] = None
        kinds, payloads, ends, statuses = self._buffers[index]
        with self._consumer_lock:
            first, count = self.ring.gather(GROUP_ROWS_MAX, self.abandon_after_ns, kinds, payloads, ends,
                                            statuses)
        self.commits.raise_if_previous_failed()  # what the sync thread raised (not the poisoned handle's, later)
        if count == 0:
            return False
        kinds, payloads, ends, statuses = kinds[:count], payloads[:count], ends[:count], statuses[:count]
        payloads[statuses != 0] = 0   # gather copies no payload for a malformed slot: no bytes of an earlier drain
        codes = np.zeros(count, np.uint8)
        group = self.commits.begin_group()
        for begin, end in self._runs(kinds, payloads, ends, statuses):
            self.commits.apply(group, lambda begin=begin, end=end: self._apply(int(kinds[begin]), payloads, codes,
                                                                               statuses, begin, end))
        answered = self.commits.end_group(group, lambda: self._answer(first, codes, statuses, payloads),
                                          background=count >= self.overlap_rows_min)
        if answered is not None:      # the sync thread has the group, and these buffers until it answered it
            self._buffer_users[index] = answered
            self._buffer_index ^= 1
        return True

    def status(self) -> dict[str, Any]:
        """What the server has done: rows applied, snapshots, and the background scrub (passes completed, where
        it is, and every damaged batch it found, also warned about on stderr)."""
        return {"applied_rows": self.applied_rows, "snapshot_failures": self.snapshot_failures,
                "last_snapshot_position": None if self.last_snapshot is None else self.last_snapshot.position,
                **self.scrub.status()}

    def settle(self) -> bool:
        """Wait until every group handed to the sync thread is durable and answered. A failed sync poisoned the
        handle and is raised here: that group is never acknowledged. Returns whether there was one."""
        return self.commits.settle()

    def _answer(self, first: int, codes: np.ndarray, statuses: np.ndarray, payloads: np.ndarray) -> None:
        """Complete a durable group's slots (on this thread or the sync thread, one group at a time, in order)."""
        with self._consumer_lock:
            self.ring.complete(first, codes, statuses, payloads)
        self.applied_rows += codes.shape[0]

    def _snapshot_if_due(self) -> None:
        """Between drains: reap a finished snapshot, and start one (in a forked child) every snapshot_every_s when
        the journal moved since the last one. A failed snapshot is reported and retried after a back-off (see
        _snapshot_failed): the journal still holds everything, only the restart gets slower."""
        if self.snapshot_every_s is None:
            return
        if self._snapshot_job is not None:
            if not self._snapshot_job.done():
                return
            self._reap_snapshot()
        now = time.monotonic()
        if now < self._snapshot_due:
            return
        self._snapshot_due = now + self.snapshot_every_s
        position = self.store.engine.write_position
        if position == self._snapshot_position:
            return
        self.settle()  # a snapshot only of durable state, and no sync thread busy across the fork
        try:
            self._snapshot_job = self.ledger.snapshot(wait=False)
        except (OSError, LedgerError) as error:
            self._snapshot_failed(error)
            return
        self._snapshot_position = position

    def _reap_snapshot(self) -> None:
        job, self._snapshot_job = self._snapshot_job, None
        try:
            self.last_snapshot = job.wait()
        except (OSError, LedgerError) as error:
            self._snapshot_failed(error)
            return
        self.snapshot_failures_in_a_row = 0

    def _snapshot_failed(self, error: BaseException) -> None:
        """Report a failed snapshot and retry it after a back-off: the interval, doubled per failure in a row."""
        assert self.snapshot_every_s is not None
        self.snapshot_failures += 1
        self.snapshot_failures_in_a_row += 1
        doublings = min(self.snapshot_failures_in_a_row - 1, SNAPSHOT_BACKOFF_DOUBLINGS_MAX)
        delay_s = min(self.snapshot_every_s * 2 ** doublings, max(self.snapshot_every_s, SNAPSHOT_BACKOFF_S_MAX))
        self._snapshot_due = time.monotonic() + delay_s
        self._snapshot_position = -1  # try again then even if nothing new was written
        warnings.warn(f"ledger serve: snapshot failed ({self.snapshot_failures_in_a_row} in a row; the journal is "
                      f"intact; retrying in {delay_s:g} s): {error}", RuntimeWarning, stacklevel=2)

    @staticmethod
    def _runs(kinds: np.ndarray, payloads: np.ndarray, ends: np.ndarray, statuses: np.ndarray):
        """Split the drained rows into core calls: same kind, valid slots, and never across the end of a producer
        batch whose last row is LINKED (that chain is open: it must fail alone, not join the next batch)."""
        if kinds.shape[0] == 1:  # one row is one run (or none): the vector set-up below is ~40 us of a single call
            if statuses[0] == 0:
                yield 0, 1
            return
        transfer_flags_offset = TRANSFER_DTYPE.fields["flags"][1]
        account_flags_offset = ACCOUNT_DTYPE.fields["flags"][1]
        flags_transfer = payloads[:, transfer_flags_offset].astype(np.uint16) \
            | (payloads[:, transfer_flags_offset + 1].astype(np.uint16) << 8)
        flags_account = payloads[:, account_flags_offset].astype(np.uint16) \
            | (payloads[:, account_flags_offset + 1].astype(np.uint16) << 8)
        flags = np.where(kinds == _ring.SLOT_KIND_ACCOUNT, flags_account, flags_transfer)
        cut_after = (ends == 1) & ((flags & 1) == 1)
        # Vectorised: a Python loop per row cost ~1 us a row (16 ms for a 16k-row group).
        count = kinds.shape[0]
        boundary = cut_after | (statuses != 0) | (kinds == _ring.SLOT_KIND_QUERY_ACCOUNT)
        boundary[:-1] |= (kinds[1:] != kinds[:-1]) | (statuses[1:] != 0)
        boundary[-1] = True
        begin = 0
        for index in np.flatnonzero(boundary).tolist():
            if statuses[begin] == 0:
                yield begin, index + 1
            begin = index + 1
        assert begin == count

    def _apply(self, kind: int, payloads: np.ndarray, codes: np.ndarray, statuses: np.ndarray, begin: int,
               end: int) -> None:
        if kind == _ring.SLOT_KIND_TRANSFER:
            rows = np.ascontiguousarray(payloads[begin:end, :TRANSFER_DTYPE.itemsize]).view(TRANSFER_DTYPE).ravel()
            try:
                codes[begin:end] = self.ledger.transfers(rows)
            except LedgerCorruptError as error:
                if self.store.engine.poisoned:
                    raise
                # The core undid the whole batch: answer it as not applied and go on serving the others.
                statuses[begin:end] = _ring.STATUS_DAMAGED
                warnings.warn(f"ledger serve: a batch of {end - begin} transfers was not applied: {error}",
                              RuntimeWarning, stacklevel=2)
        elif kind == _ring.SLOT_KIND_ACCOUNT:
            rows = np.ascontiguousarray(payloads[begin:end, :ACCOUNT_DTYPE.itemsize]).view(ACCOUNT_DTYPE).ravel()
            codes[begin:end] = self.ledger.create_accounts(rows)
        else:
            for index in range(begin, end):
                account_id = int(payloads[index, :8].view(np.uint64)[0])
                account = self.ledger.account(account_id)
                answer = np.zeros(1, ANSWER_DTYPE)
                if account is None:
                    statuses[index] = _ring.STATUS_NOT_FOUND
                else:
                    for name in ANSWER_DTYPE.names:
                        if name != "reserved":
                            answer[name] = getattr(account, name)
                payloads[index] = answer.view(np.uint8)

    def close(self) -> None:
        try:
            if self.ring is not None:
                self.settle()  # its batches are written: answered if its sync succeeds (even when a later one failed)
        finally:
            self.commits.stop()
            self._close_ring_and_ledger()

    def _close_ring_and_ledger(self) -> None:
        if self.ring is not None:
            self._heartbeat_stop.set()
            self._heartbeat.join()  # before the mapping goes away
            self.ring.stop()
            self.ring.release()
            self._memory.close()
            self.ring = None
        if self._snapshot_job is not None:
            self._reap_snapshot()  # let a snapshot in progress finish: it holds the lock until its child exits
        self.ledger.close()


def _rows_named(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:ROWS_NAMED_MAX])) + (", ..." if len(rows) > ROWS_NAMED_MAX else "")
    return f"row {shown}" if len(rows) == 1 else f"rows {shown}"


def _refusal(statuses: np.ndarray, refused: np.ndarray, codes: np.ndarray) -> LedgerError:
    """The error for a call some of whose slots the writer refused. The writer refuses a batch whole when one of
    its slots is malformed: LedgerRejectedError. It applies part of a call only when the call's first slot was
    rewritten to end its batch early and drained before the next slot was published (nothing it could see then
    says so): a LedgerError naming the rows applied, with `codes` and `applied` (a boolean mask) on it."""
    malformed = np.flatnonzero(statuses == _ring.STATUS_INVALID_SLOT).tolist()
    cause = (f"its ring slot of {_rows_named(malformed)} was malformed or disagreed with the slots before it"
             if malformed
             else "the batch fields of its ring slots were rewritten")
    if refused.all():
        return LedgerRejectedError(f"the writer refused this call of {statuses.shape[0]} rows whole: {cause} (a "
                                   f"process that does not follow the ring protocol wrote into it); nothing of it "
                                   f"was applied: retrying with the same ids is safe")
    applied = ~refused
    rows = _rows_named(np.flatnonzero(applied).tolist())
    error = LedgerError(f"the writer applied only part of this call: {cause}, and {rows} "
                        f"of {statuses.shape[0]} went through as a batch of their own (a process that does not follow "
                        f"the ring protocol rewrote its slots); the rest was not applied. Retrying with the same "
                        f"ids is safe (applied transfers answer EXISTS)")
    error.codes, error.applied = codes, applied  # type: ignore[attr-defined]
    return error


class Client:
    """A connection to a running `ledger serve`. Same calls as Ledger; every call has a timeout. Safe to share
    between threads: calls on one Client are serialised (each waits its turn within its own timeout); for calls
    in parallel, give each thread a Client of its own."""

    def __init__(self, directory: str, timeout_ms: int = TIMEOUT_MS_DEFAULT,
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS_DEFAULT,
                 writer_timeout_ms: int = WRITER_TIMEOUT_MS_DEFAULT, spin_count: int = SPIN_COUNT_DEFAULT,
                 wait_slice_ms: int = WAIT_SLICE_MS_DEFAULT) -> None:
        """timeout_ms: a whole call (LedgerTimeoutError); busy_timeout_ms: waiting for ring space
        (LedgerBusyError); writer_timeout_ms: a writer silent this long is gone (LedgerUnavailableError).
        spin_count: pause instructions spun before sleeping; wait_slice_ms: each futex sleep, between re-checks of
        the deadlines, the writer's heartbeat and Ctrl-C (results and released slots wake it at once)."""
        for name, value, minimum in (("timeout_ms", timeout_ms, 1), ("busy_timeout_ms", busy_timeout_ms, 1),
                                     ("writer_timeout_ms", writer_timeout_ms, WRITER_TIMEOUT_MS_MIN)):
            _check_range(name, value, minimum, TIMEOUT_MS_MAX)
        _check_range("spin_count", spin_count, 0, SPIN_COUNT_MAX)
        _check_range("wait_slice_ms", wait_slice_ms, 1, WAIT_SLICE_MS_MAX)
        self.spin_count = spin_count
        self.wait_slice_ms = wait_slice_ms
        self.directory = os.fspath(directory)
        self.timeout_ms = timeout_ms
        self.busy_timeout_ms = busy_timeout_ms
        self.writer_timeout_ms = writer_timeout_ms
        attached = self._attach()
        if attached is None:
            raise LedgerUnavailableError(f"no ledger writer at {self.directory} (start `ledger serve`)")
        self._ring, self._memory, self._ring_identity = attached
        self.batch_rows_max = self._ring.batch_rows_max  # the writer's per-call limit: half the ring, <= 32,768
        # One call at a time per client object (results are read in order), and close() waits for the call in
        # progress: a Client may be shared by threads.
        self._lock = threading.Lock()

    def _attach(self) -> tuple[_ring.Ring, mmap.mmap, tuple[int, int]] | None:
        """Map the directory's current ring: (ring, mapping, (device, inode)), or None if there is none."""
        path = os.path.join(self.directory, RING_FILE)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            status = os.fstat(fd)
            memory = mmap.mmap(fd, status.st_size)
        finally:
            os.close(fd)
        ring = _ring.Ring(memory, os.getpid())
        try:
            ring.attach()
        except ValueError as error:
            ring.release()
            memory.close()
            raise LedgerUnavailableError(f"{path}: {error}") from None
        return ring, memory, (status.st_dev, status.st_ino)

    def _await_writer(self, deadline: float) -> None:
        """No live writer and nothing sent yet: wait (until `deadline`) for a new `serve` to put its ring in place,
        then use that one. Each serve creates its ring afresh once the ledger is open, so a call made while it
        starts waits for it rather than publishing into the old ring, which nobody drains."""
        while True:
            attached = self._attach()
            if attached is not None:
                ring, memory, identity = attached
                if identity != self._ring_identity and ring.writer_alive(self.writer_timeout_ms):
                    if ring.batch_rows_max < self.batch_rows_max:
                        ring.release()
                        memory.close()
                        raise LedgerUnavailableError(f"the ledger writer at {self.directory} restarted with a "
                                                     f"smaller ring; reconnect")
                    self._ring.release()
                    self._memory.close()
                    self._ring, self._memory, self._ring_identity = ring, memory, identity
                    return
                ring.release()
                memory.close()
            if self._ring.writer_alive(self.writer_timeout_ms):
                return  # it was only late
            if time.monotonic() + WRITER_POLL_MS / 1000 > deadline:
                raise LedgerUnavailableError(f"no ledger writer at {self.directory} answered within "
                                             f"{self.timeout_ms} ms (stopped, or still starting); nothing of this "
                                             f"call was sent")
            time.sleep(WRITER_POLL_MS / 1000)

    def _call(self, kind: int, rows: np.ndarray, with_answers: bool = False) -> tuple[np.ndarray, np.ndarray, Any]:
        if self._ring is None:
            raise LedgerClosedError("the client is closed")
        count = rows.shape[0]
        codes = np.zeros(count, np.uint8)
        statuses = np.zeros(count, np.uint8)
        answers = np.zeros((count, PAYLOAD), np.uint8) if with_answers else None
        if count == 0:
            return codes, statuses, answers
        if count > self.batch_rows_max:
            raise ValueError(f"a client batch holds at most {self.batch_rows_max} rows (the writer's per-call limit: "
                             f"half its ring, at most {GROUP_ROWS_MAX}), got {count}: split it (a LINKED chain "
                             f"must stay within one call)")
        # One call at a time per client (its results are read in order). timeout_ms bounds the whole call: the
        # wait behind another call, for ring space and for the results all come out of one deadline.
        deadline = time.monotonic() + self.timeout_ms / 1000
        if not self._lock.acquire(timeout=self.timeout_ms / 1000):
            raise LedgerTimeoutError(f"another call on this client held it for {self.timeout_ms} ms; "
                                     f"nothing of this call was sent")
        try:
            if self._ring is None:
                raise LedgerClosedError("the client is closed")
            if not self._ring.writer_alive(self.writer_timeout_ms):
                self._await_writer(deadline)
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms < 1:
                raise LedgerTimeoutError(f"another call on this client held it for {self.timeout_ms} ms; "
                                         f"nothing of this call was sent")
            try:
                first = self._ring.submit(kind, rows, min(self.busy_timeout_ms, left_ms), self.writer_timeout_ms,
                                          self.spin_count, self.wait_slice_ms)
                left_ms = max(1, int((deadline - time.monotonic()) * 1000))  # sent: wait at least a moment
                self._ring.wait_results(first, count, codes, statuses, left_ms, self.writer_timeout_ms,
                                        answers, self.spin_count, self.wait_slice_ms)
            except _ring.RingBusyError as error:
                raise LedgerBusyError(str(error)) from None
            except _ring.RingAbandonedError as error:
                raise LedgerBusyError(str(error)) from None
            except _ring.RingWriterGoneError as error:
                raise LedgerUnavailableError(str(error)) from None
            except _ring.RingTimeoutError as error:
                raise LedgerTimeoutError(str(error)) from None
            except _ring.RingProtocolError as error:
                raise LedgerError(str(error)) from None
        finally:
            self._lock.release()
        if (statuses == _ring.STATUS_ABANDONED).any():
            raise LedgerBusyError("the writer gave up on this batch (a slot was not published in time); "
                                  "nothing of it was applied")
        refused = (statuses == _ring.STATUS_INVALID_SLOT) | (statuses == _ring.STATUS_REJECTED)
        if refused.any():
            raise _refusal(statuses, refused, codes)
        if (statuses == _ring.STATUS_DAMAGED).any():
            raise LedgerCorruptError("the writer met a damaged journal record applying this batch (its stderr "
                                     "names the file, byte offset and position); nothing of it was applied")
        return codes, statuses, answers

    def transfers(self, batch: Any) -> np.ndarray:
        """Ledger.transfers through the writer process: one atomic batch, one TransferResult code per row,
        durable as the server's durability mode says when it returns."""
        rows = as_batch(batch, TRANSFER_DTYPE, transfers_batch, "transfers")
        return self._call(_ring.SLOT_KIND_TRANSFER, rows)[0]

    def create_accounts(self, batch: Any) -> np.ndarray:
        """Ledger.create_accounts through the writer process: one AccountResult code per row."""
        rows = as_batch(batch, ACCOUNT_DTYPE, accounts_batch, "accounts")
        return self._call(_ring.SLOT_KIND_ACCOUNT, rows)[0]

    def transfer(self, id: int, debit_account: int, credit_account: int, amount: int, *, ledger: int = 1,
                 code: int = 0, flags: int = 0, pending_id: int = 0, timeout: int = 0,
                 user_data: int = 0) -> TransferResult:
        """One transfer through the writer process, with the arguments and result of Ledger.transfer."""
        rows = transfer_row(id, debit_account, credit_account, amount, ledger, code, flags, pending_id, timeout,
                            user_data)
        return TransferResult(int(self._call(_ring.SLOT_KIND_TRANSFER, rows)[0][0]))

    def create_account(self, id: int, ledger: int = 1, *, min_balance: int = 0, max_balance: int = BALANCE_MAX,
                       flags: int = 0, user_data: int = 0) -> AccountResult:
        """One account through the writer process, with the arguments and result of Ledger.create_account."""
        rows = account_row(id, ledger, min_balance, max_balance, flags, user_data)
        return AccountResult(int(self._call(_ring.SLOT_KIND_ACCOUNT, rows)[0][0]))

    def account(self, id: int) -> Account | None:
        """The account `id` as the writer holds it now, or None."""
        rows = np.zeros(1, np.dtype([("id", "<u8")]))
        rows["id"] = account_id(id)
        _, statuses, answers = self._call(_ring.SLOT_KIND_QUERY_ACCOUNT, rows, with_answers=True)
        if statuses[0] == _ring.STATUS_NOT_FOUND:
            return None
        answer = answers[0].view(ANSWER_DTYPE)[0]
        return Account(int(answer["id"]), int(answer["ledger"]), int(answer["flags"]), int(answer["min_balance"]),
                       int(answer["max_balance"]), int(answer["user_data"]), int(answer["debits_posted"]),
                       int(answer["credits_posted"]), int(answer["debits_pending"]), int(answer["credits_pending"]),
                       int(answer["timestamp"]))

    def balance(self, id: int) -> int:
        """credits_posted - debits_posted of account `id`; KeyError if there is none."""
        account = self.account(id)
        if account is None:
            raise KeyError(f"account {id} not found")
        return account.balance

    def available(self, id: int) -> int:
        """balance - debits_pending of account `id`; KeyError if there is none."""
        account = self.account(id)
        if account is None:
            raise KeyError(f"account {id} not found")
        return account.available

    def close(self) -> None:
        """Let go of the ring (the writer goes on serving other clients). Idempotent. From another thread: waits for
        the call in progress (at most its timeout)."""
        with self._lock:
            if self._ring is not None:
                self._ring.release()
                self._memory.close()
                self._ring = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(directory: str, **options: Any) -> Client:
    """A Client of the writer serving `directory` (`ledger serve DIR` must be running). options: timeout_ms,
    busy_timeout_ms, writer_timeout_ms, spin_count, wait_slice_ms (see Client)."""
    return Client(directory, **options)


def serve(directory: str, durability: str = "fsync", slot_count: int = SLOT_COUNT_DEFAULT,
          group: int | None = None, ready: Any = None, abandon_after_ms: int = ABANDON_AFTER_MS_DEFAULT,
          spin_count: int = SPIN_COUNT_DEFAULT, idle_wait_ms: int = IDLE_WAIT_MS_DEFAULT,
          snapshot_every_s: float | None = SNAPSHOT_EVERY_S_DEFAULT,
          overlap_rows_min: int = OVERLAP_ROWS_MIN_DEFAULT, **open_options: Any) -> int:
    """Run a writer until SIGTERM or SIGINT. `ready` (a callable) is called once the ring accepts commands.
    snapshot_every_s: a snapshot this often when the journal moved (None: never). open_options go to ledger.open
    (capacities, journal_records_reserved)."""
    server = Server(directory, durability=durability, slot_count=slot_count, group=group,
                    abandon_after_ms=abandon_after_ms, spin_count=spin_count, idle_wait_ms=idle_wait_ms,
                    snapshot_every_s=snapshot_every_s, overlap_rows_min=overlap_rows_min, **open_options)
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: server.stop())
    if ready is not None:
        ready()
    server.serve_forever()
    return 0
