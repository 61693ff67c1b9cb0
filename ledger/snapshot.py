"""Snapshots: the whole engine state at a journal position, so that opening replays only the journal tail.

File `<dir>/snapshots/snapshot-<position:016d>.snapshot` (docs/FORMAT.md, "Snapshot file"): a 4096-byte header
page, then each state array at a 4096-aligned offset. Written atomically (temporary file, fsync, rename,
directory fsync). The header carries a CRC32C of the body and a state hash (CRC32C of the account arrays), checked
whenever the file is read; `verify` also compares every snapshot with a replay of the journal to its position.

Stall: `Ledger.snapshot()` holds the writer for a fork(); the child writes the snapshot from its copy-on-write
image of the state while the writer goes on (pages the writer modifies meanwhile are copied once by the kernel).
That is what `stall_seconds` measures. The child renames its file into place only once the journal is durable
through the snapshot's position (SnapshotJob): in "os" mode the flusher's work, which the writer no longer waits
for (it used to flush first: 1.2 s of stall after writing 1.3 GB faster than this disk takes it). With
`wait=True` (the default) the caller then waits for the child, so the call as a whole takes the write time as
well; `wait=False` returns the job at once. The alternative, copying the arrays first, measured ~1 GB/s here
because the copy's pages must be faulted in; fork copies only page tables.

Fork safety: the writer's journal threads (flusher, segment preparation) may run during the fork. The child uses
none of their locks: it runs only write_snapshot (numpy views, CRC32C in C, os-level file calls) and leaves with
os._exit, so a lock held by another thread at the moment of the fork is never waited for in the child."""
from __future__ import annotations

import dataclasses
import errno
import os
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ledger import _core
from ledger.errors import LedgerCorruptError, LedgerFullError

__all__ = ["SnapshotInfo", "SnapshotJob", "write_snapshot", "read_snapshot", "list_snapshots", "remove_unfinished",
           "snapshot_bytes", "SNAPSHOT_FORMAT_VERSION", "JOURNAL_BASE_FILE", "journal_base", "write_journal_base",
           "snapshot_path"]

SNAPSHOT_MAGIC = b"LDGRSNP\x00"
SNAPSHOT_FORMAT_VERSION = 1
PAGE_BYTES = 4096
SECTIONS = ("accounts_hot", "accounts_cold", "account_slots", "transfer_slots", "expiry_heap")
ACCOUNT_SECTIONS = ("accounts_hot", "accounts_cold")  # what the state hash covers, and the body checksum's start
TABLE_SECTIONS = ("account_slots", "transfer_slots")
assert SECTIONS[:len(ACCOUNT_SECTIONS)] == ACCOUNT_SECTIONS
# Loading reads sections in pieces of this size on up to LOAD_THREADS_MAX threads: large enough that handing a
# piece to a thread is noise, small enough that two threads share even one large section evenly.
LOAD_PIECE_BYTES = 32 << 20
LOAD_STEP_BYTES = 1 << 20  # within a piece: what stays in the caches between its read and its checksum
LOAD_THREADS_MAX = 4
SECTION_DTYPES = {
    "accounts_hot": _core.ACCOUNT_HOT_DTYPE,
    "accounts_cold": _core.ACCOUNT_COLD_DTYPE,
    "account_slots": _core.TABLE_SLOT_DTYPE,
    "transfer_slots": _core.TABLE_SLOT_DTYPE,
    "expiry_heap": _core.HEAP_ENTRY_DTYPE,
}
# magic, version, segment_records_log2, write_position, last_timestamp, last_checksum, last_header_position,
# account_count, transfer_count, created_ns, state_hash, body_checksum, then (offset, count) per section.
HEADER = struct.Struct("<8sII7QII" + "QQ" * len(SECTIONS))
SCALARS = ("write_position", "last_timestamp", "last_checksum", "last_header_position", "account_count",
           "transfer_count")
KEEP_DEFAULT = 3
WRITE_PIECE_BYTES = 64 << 20  # one pwrite of a section at most


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot file in place: its path, the journal position and timestamp it holds the state at, the counts,
    its size, how long the writer was held (stall_seconds) and how long the child wrote (write_seconds)."""

    path: str
    position: int
    timestamp: int
    accounts: int
    transfers: int
    bytes: int
    stall_seconds: float
    write_seconds: float


def snapshot_directory(directory: str) -> str:
    return os.path.join(directory, "snapshots")


def snapshot_path(directory: str, position: int) -> str:
    """Where the snapshot at `position` of data directory `directory` is (or would be) kept."""
    return os.path.join(snapshot_directory(directory), f"snapshot-{position:016d}.snapshot")


# A data directory rebuilt from a snapshot (a node that rejoined, docs/FORMAT.md "Journal base"): its journal
# begins at the snapshot's position P, the records before P are zero, and this file says so. Absent: the journal
# begins at genesis.
JOURNAL_BASE_FILE = "journal-base"
JOURNAL_BASE_MAGIC = "ledger journal base v1"


def journal_base(directory: str) -> int | None:
    """P if `directory`'s journal begins at the snapshot at position P (a rejoined node), None if it begins at
    genesis. A base file that cannot be read is corruption: guessing genesis would read zeros as the journal."""
    path = os.path.join(directory, JOURNAL_BASE_FILE)
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise LedgerCorruptError(f"{path}: unreadable journal base file: {error}") from error
    lines = text.split("\n")
    if len(lines) != 3 or lines[0] != JOURNAL_BASE_MAGIC or not lines[1].isdigit() or lines[2] != "":
        raise LedgerCorruptError(f"{path}: not a journal base file (expected '{JOURNAL_BASE_MAGIC}' and a position)")
    position = int(lines[1])
    if position < 1:
        raise LedgerCorruptError(f"{path}: journal base position {position} is below 1")
    return position


def write_journal_base(directory: str, position: int) -> None:
    """Record, atomically and durably (temporary file, fsync, rename, directory fsync), that `directory`'s journal
    begins at the snapshot at `position`."""
    assert position >= 1, position
    final = os.path.join(directory, JOURNAL_BASE_FILE)
    temporary = final + ".tmp"
    with open(temporary, "w", encoding="ascii") as file:
        file.write(f"{JOURNAL_BASE_MAGIC}\n{position}\n")
        file.flush()
        os.fsync(file.fileno())
    os.rename(temporary, final)
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def list_snapshots(directory: str) -> list[tuple[int, str]]:
    """(position, path) of the snapshot files, newest first."""
    folder = snapshot_directory(directory)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        if name.startswith("snapshot-") and name.endswith(".snapshot"):
            try:
                found.append((int(name[len("snapshot-"):-len(".snapshot")]), os.path.join(folder, name)))
            except ValueError:
                continue
    return sorted(found, reverse=True)


def snapshot_bytes(directory: str) -> int:
    """Bytes of the snapshot files on disk."""
    return sum(os.path.getsize(path) for _, path in list_snapshots(directory))


def remove_unfinished(directory: str) -> int:
    """Delete temporary files of snapshot writes that never finished (a writer or its child killed mid-write);
    returns how many. Call only with the writer lock held: then no snapshot of this directory is being written,
    except by the orphaned child of a killed writer, whose rename then fails and whose snapshot is simply lost."""
    folder = snapshot_directory(directory)
    if not os.path.isdir(folder):
        return 0
    removed = 0
    for name in os.listdir(folder):
        if name.startswith(".snapshot-") and name.endswith(".tmp"):
            os.unlink(os.path.join(folder, name))
            removed += 1
    return removed


def _layout(arrays: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    offset = PAGE_BYTES
    layout = []
    for name in SECTIONS:
        size = arrays[name].nbytes
        layout.append((offset, arrays[name].shape[0]))
        offset += (size + PAGE_BYTES - 1) // PAGE_BYTES * PAGE_BYTES
    return layout


def file_bytes(arrays: dict[str, np.ndarray]) -> int:
    """The size of the snapshot file these arrays make: the end of its last section."""
    (offset, _), = _layout(arrays)[-1:]
    return offset + arrays[SECTIONS[-1]].nbytes


def check_room(directory: str, arrays: dict[str, np.ndarray], reserve_bytes: int) -> None:
    """Refuse, before anything is written, a snapshot that would not leave `reserve_bytes` free on the data
    directory's filesystem (the journal's next segment): a snapshot written into the last free space makes the
    journal fail with LedgerFullError meanwhile, even when it is deleted again after its own ENOSPC."""
    assert reserve_bytes >= 0
    needed = file_bytes(arrays)
    status = os.statvfs(directory)
    free = status.f_bavail * status.f_frsize
    if needed + reserve_bytes > free:
        raise LedgerFullError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: a snapshot needs {needed} bytes and the "
                              f"journal's next segment {reserve_bytes}, but {free} bytes are free; nothing was "
                              f"written", directory)


def write_snapshot(directory: str, scalars: dict[str, int], arrays: dict[str, np.ndarray], keep: int,
                   stall_seconds: float, before_rename: Callable[[], None] | None = None) -> SnapshotInfo:
    """before_rename: called once the temporary file is durable, before it is renamed into place; if it raises,
    the temporary file is deleted and nothing is renamed (a snapshot's journal must be durable first)."""
    started = time.perf_counter()
    folder = snapshot_directory(directory)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    position = scalars["write_position"]
    final = os.path.join(folder, f"snapshot-{position:016d}.snapshot")
    temporary = unfinished_path(directory, position)
    layout = _layout(arrays)
    sections = [np.ascontiguousarray(arrays[name]).view(np.uint8) for name in SECTIONS]
    state_checksum = 0  # the state hash: the body checksum's value after the account sections, which come first
    for data in sections[:len(ACCOUNT_SECTIONS)]:
        state_checksum = _core.crc32c(data, state_checksum)
    body_checksum = state_checksum
    for data in sections[len(ACCOUNT_SECTIONS):]:
        body_checksum = _core.crc32c(data, body_checksum)
    header = HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_FORMAT_VERSION, scalars["segment_records_log2"],
                         *(scalars[name] for name in SCALARS), time.time_ns(), state_checksum, body_checksum,
                         *(value for pair in layout for value in pair))
    header += struct.pack("<I", _core.crc32c(header))
    # A failed write deletes what it wrote: a partial file on a full disk holds the very space the journal needs
    # for its next segment, and every retry would leave one more.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.pwrite(fd, header.ljust(PAGE_BYTES, b"\0"), 0)
            for section, (offset, _) in zip(sections, layout):
                data = memoryview(section)
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:written + WRITE_PIECE_BYTES], offset + written)
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_rename is not None:
            before_rename()
        os.rename(temporary, final)
    except BaseException:
        _unlink_if_present(temporary)
        raise
    try:
        directory_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    except BaseException:
        _unlink_if_present(final)  # reported as failed: not kept either (its rename may not be durable)
        raise
    base = journal_base(directory)   # the base snapshot of a rejoined journal is never deleted: it IS its start
    for old_position, old in list_snapshots(directory)[max(1, keep):]:
        if old_position != base:
            _unlink_if_present(old)
    return SnapshotInfo(final, position, scalars["last_timestamp"], scalars["account_count"],
                        scalars["transfer_count"], os.path.getsize(final), stall_seconds,
                        time.perf_counter() - started)


def _unlink_if_present(path: str) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):  # (the latter: a snapshots "folder" that is a file)
        pass


def unfinished_path(directory: str, position: int) -> str:
    """The temporary file a snapshot at `position` is written to before its rename."""
    return os.path.join(snapshot_directory(directory), f".snapshot-{position:016d}.tmp")


def _read_header(path: str, fd: int) -> tuple[dict[str, int], int, int, list[tuple[int, int]]]:
    page = os.pread(fd, PAGE_BYTES, 0)
    if len(page) < HEADER.size + 4:
        raise LedgerCorruptError(f"{path}: snapshot header truncated")
    (checksum,) = struct.unpack_from("<I", page, HEADER.size)
    if _core.crc32c(page[:HEADER.size]) != checksum:
        raise LedgerCorruptError(f"{path}: snapshot header checksum mismatch")
    fields = HEADER.unpack_from(page)
    magic, version, segment_records_log2 = fields[:3]
    if magic != SNAPSHOT_MAGIC or version != SNAPSHOT_FORMAT_VERSION:
        raise LedgerCorruptError(f"{path}: not a version {SNAPSHOT_FORMAT_VERSION} ledger snapshot")
    scalars = dict(zip(SCALARS, fields[3:9]))
    scalars["segment_records_log2"] = segment_records_log2
    pairs = fields[12:]
    layout = [(pairs[2 * index], pairs[2 * index + 1]) for index in range(len(SECTIONS))]
    return scalars, fields[10], fields[11], layout


def _usable_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read_piece(path: str, fd: int, name: str, data: memoryview, file_offset: int) -> tuple[int, int]:
    """Read one piece of a section into `data` (faulting its fresh pages in as it goes): (its CRC32C, how many id
    table keys it holds). Every call here runs without the GIL, so pieces on other threads proceed meanwhile."""
    checksum = keys = done = 0
    count_keys = name in TABLE_SECTIONS
    while done < len(data):
        # A step at a time, so that the checksum and the key count read what the read just copied from the cache,
        # not from memory.
        step = data[done:done + LOAD_STEP_BYTES]
        filled = 0
        while filled < len(step):
            got = os.preadv(fd, [step[filled:]], file_offset + done + filled)
            if got == 0:
                raise LedgerCorruptError(f"{path}: snapshot section {name} truncated")
            filled += got
        checksum = _core.crc32c(step, checksum)
        if count_keys:
            keys += _core.count_table_keys(step)
        done += len(step)
    return checksum, keys


def _read_sections(path: str, fd: int, layout: list[tuple[int, int]], targets: dict[str, np.ndarray],
                   state_hash_expected: int, body_expected: int) -> dict[str, int]:
    """Fill each target array from its section and check the body checksum and the state hash; returns the
    number of keys in each id table section. Why pieces on a few threads: a load is bound by faulting in fresh
    memory, copying and checksumming (~0.8 s for 1.5 GB on one thread here), not by the disk when the file is
    cached; the pieces' checksums are chained afterwards (crc32c_combine) into exactly the file's checksums."""
    assert LOAD_PIECE_BYTES % 16 == 0 and LOAD_STEP_BYTES % 16 == 0  # id table pieces must be whole slots
    pieces = []
    for name, (offset, count) in zip(SECTIONS, layout):
        target = targets[name]
        assert target.shape[0] == count and target.dtype == SECTION_DTYPES[name] and target.flags.c_contiguous
        data = memoryview(target.view(np.uint8))
        pieces.extend((name, data[start:start + LOAD_PIECE_BYTES], offset + start)
                      for start in range(0, len(data), LOAD_PIECE_BYTES))
    threads = max(1, min(LOAD_THREADS_MAX, _usable_cpus(), len(pieces)))
    with ThreadPoolExecutor(threads, thread_name_prefix="ledger-snapshot-load") as pool:
        outcomes = list(pool.map(lambda piece: _read_piece(path, fd, *piece), pieces))
    body_checksum = 0
    state_checksum = None
    keys = dict.fromkeys(TABLE_SECTIONS, 0)
    for (name, data, _), (checksum, piece_keys) in zip(pieces, outcomes):
        if state_checksum is None and name not in ACCOUNT_SECTIONS:
            state_checksum = body_checksum  # the state hash is the body checksum's value after the account sections
        body_checksum = _core.crc32c_combine(body_checksum, checksum, len(data))
        if name in keys:
            keys[name] += piece_keys
    if state_checksum is None:  # no piece after the account sections (empty tables: only a crafted file)
        state_checksum = body_checksum
    if body_checksum != body_expected:
        raise LedgerCorruptError(f"{path}: snapshot body checksum mismatch")
    if state_checksum != state_hash_expected:
        raise LedgerCorruptError(f"{path}: snapshot state hash mismatch")
    return keys


def read_snapshot(path: str) -> tuple[dict[str, int], dict[str, np.ndarray], int]:
    """Read and check one snapshot file into new arrays: (scalars, arrays, state hash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        scalars, hash_expected, body_expected, layout = _read_header(path, fd)
        arrays = {name: np.empty(count, SECTION_DTYPES[name]) for name, (_, count) in zip(SECTIONS, layout)}
        _read_sections(path, fd, layout, arrays, hash_expected, body_expected)
    finally:
        os.close(fd)
    return scalars, arrays, hash_expected


def load_into(path: str, position: int, engine: Any, account_capacity: int = 0,
              transfer_capacity: int = 0, base: bool = False) -> SnapshotInfo:
    """Read a snapshot straight into a fresh engine's memory (no intermediate copy), then make room for
    account_capacity accounts and transfer_capacity transfers in all (Engine.import_end). On any error the engine
    is left half-loaded: the caller discards it. base: this is the journal's base snapshot (the journal begins at
    its position, its last batch is not in the journal): the journal after it is chained from its last checksum
    instead of its last batch being looked up."""
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        scalars, hash_expected, body_expected, layout = _read_header(path, fd)
        if scalars["write_position"] != position:
            raise LedgerCorruptError(f"{path}: position {scalars['write_position']} differs from its name")
        if not base and not engine.check_batch_end(scalars["last_header_position"], position,
                                                   scalars["last_checksum"]):
            raise LedgerCorruptError(f"{path}: does not match the journal at position {position}")
        counts = dict(zip(SECTIONS, (count for _, count in layout)))
        if counts["accounts_hot"] != scalars["account_count"] or counts["accounts_cold"] != scalars["account_count"]:
            raise LedgerCorruptError(f"{path}: account section sizes differ from the account count")
        targets = engine.import_begin(scalars, counts["account_slots"], counts["transfer_slots"],
                                      counts["expiry_heap"])
        keys = _read_sections(path, fd, layout, targets, hash_expected, body_expected)
        if keys["account_slots"] != scalars["account_count"] or keys["transfer_slots"] != scalars["transfer_count"]:
            raise LedgerCorruptError(f"{path}: id table counts do not match")
        engine.import_end(scalars, counts["expiry_heap"], account_capacity, transfer_capacity)
    finally:
        os.close(fd)
    return SnapshotInfo(path, position, scalars["last_timestamp"], scalars["account_count"],
                        scalars["transfer_count"], os.path.getsize(path), 0.0, time.perf_counter() - started)


def _drop_inherited_lock(lock_fd: int) -> None:
    """In the forked child: let go of the writer's LOCK. The child shares the writer's open file description, and an
    flock lasts until every descriptor of it is closed, so a writer killed mid-snapshot would leave the directory
    locked (LedgerLockedError on restart) until the child finished. dup2 of /dev/null over it rather than close:
    the number stays taken, so no file the child opens can reuse it while a Python object still thinks it owns
    it."""
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, lock_fd)
    finally:
        os.close(null)


def _wait_for_go(go_read: int, position: int) -> None:
    """In the child, before the rename: wait for the parent's word that the journal is durable below `position`."""
    if os.read(go_read, 1) != b"g":  # b"": the parent closed the pipe without the word, or died
        raise OSError(f"the journal did not become durable through position {position} (the writer failed, closed "
                      f"without a final sync, or died): the snapshot was not kept")


def _send_go(go_write: int) -> None:
    """Tell the child the journal is durable through its snapshot. A child that already ended (it failed before
    its rename: a full disk, no snapshot folder) has closed its end: EPIPE then, and its report says why."""
    try:
        os.write(go_write, b"g")
    except BrokenPipeError:
        pass


def _child(directory: str, scalars: dict[str, int], views: dict[str, np.ndarray], keep: int, lock_fd: int | None,
           read_end: int, write_end: int, go_read: int, go_write: int) -> None:
    """The forked child's whole life: write the snapshot, report on write_end, and leave with os._exit whatever
    happens (a signal, EPIPE from a dead parent): returning or raising would go on running the parent's code, as
    a second writer in `ledger serve`."""
    status = 1
    try:
        os.close(read_end)
        os.close(go_write)
        try:
            if lock_fd is not None:
                _drop_inherited_lock(lock_fd)
            info = write_snapshot(directory, scalars, views, keep, 0.0,
                                  before_rename=lambda: _wait_for_go(go_read, scalars["write_position"]))
            message = f"ok {info.bytes} {info.write_seconds}"
            status = 0
        except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises it
            message = f"error {type(error).__name__}: {error}"
        os.write(write_end, message.encode())
    finally:
        os._exit(status)


class SnapshotJob:
    """A snapshot written by a forked child from a copy-on-write image of the state (as Redis does): the writer
    is held only for the fork. `wait()` returns its SnapshotInfo (or raises its error).

    The child renames its file into place only after the parent says the journal is durable through the
    snapshot's position (a byte on a pipe, sent once `durable(position)` returns True): a snapshot must never
    run ahead of a journal whose tail a machine crash could still take away. Nothing is waited for in "fsync"
    mode; in "os" mode the flusher gets there, while the writer goes on. If the parent reports False, dies or
    closes without a final sync, the pipe closes without that byte and the child keeps nothing."""

    def __init__(self, directory: str, scalars: dict[str, int], views: dict[str, np.ndarray], keep: int, *,
                 held_since: float | None = None, lock_fd: int | None = None,
                 durable: Callable[[int], bool] | None = None) -> None:
        """held_since: time.perf_counter() when the writer was first held for this snapshot, so that
        stall_seconds covers the whole hold. lock_fd: the writer's LOCK descriptor, which the child must not keep
        (see _drop_inherited_lock). durable(position): blocks until the journal is durable below `position`
        (True) or never will be (False); None: it already is."""
        read_end, write_end = os.pipe()
        go_read, go_write = os.pipe()
        started = time.perf_counter() if held_since is None else held_since
        try:
            pid = os.fork()
        except BaseException:
            for fd in (read_end, write_end, go_read, go_write):
                os.close(fd)
            raise
        if pid == 0:  # the child: write, report, and leave without running any parent clean-up
            _child(directory, scalars, views, keep, lock_fd, read_end, write_end, go_read, go_write)
        self.stall_seconds = time.perf_counter() - started
        os.close(write_end)
        os.close(go_read)
        if durable is None:  # durable already: the word goes now, not from a thread that process exit could stop
            try:
                _send_go(go_write)
            finally:
                os.close(go_write)
            go_write = None
        # For a progress bar (bytes_written): the file's size once written, and where the child writes it.
        self.bytes_total = max([PAGE_BYTES] + [offset + views[name].nbytes
                                               for name, (offset, _) in zip(SECTIONS, _layout(views))])
        folder = snapshot_directory(directory)
        self._temporary = os.path.join(folder, f".snapshot-{scalars['write_position']:016d}.tmp")
        self._final = os.path.join(folder, f"snapshot-{scalars['write_position']:016d}.snapshot")
        self._pid = pid
        self._read_end = read_end
        self._go_write = go_write
        self._durable = durable
        self._directory = directory
        self._scalars = scalars
        self._result: SnapshotInfo | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._reap, name="ledger-snapshot", daemon=True)
        self._thread.start()

    def _reap(self) -> None:
        if self._go_write is not None:
            assert self._durable is not None
            try:
                if self._durable(self._scalars["write_position"]):
                    _send_go(self._go_write)
            finally:
                os.close(self._go_write)  # without the byte: the child deletes its file
        chunks = []
        while chunk := os.read(self._read_end, 4096):
            chunks.append(chunk)
        os.close(self._read_end)
        os.waitpid(self._pid, 0)
        message = b"".join(chunks).decode()
        if not message.startswith("ok "):
            # A child that failed deleted its file; one that was killed could not: it is reaped, so nobody writes
            # the file any more (one snapshot at a time per writer).
            _unlink_if_present(unfinished_path(self._directory, self._scalars["write_position"]))
            self._error = OSError(f"snapshot writer failed: {message or 'no report (killed?)'}")
            return
        _, size, seconds = message.split()
        position = self._scalars["write_position"]
        path = os.path.join(snapshot_directory(self._directory), f"snapshot-{position:016d}.snapshot")
        self._result = SnapshotInfo(path, position, self._scalars["last_timestamp"], self._scalars["account_count"],
                                    self._scalars["transfer_count"], int(size), self.stall_seconds, float(seconds))

    def done(self) -> bool:
        """True once the child has finished (written and renamed the file, or failed)."""
        return not self._thread.is_alive()

    def join(self) -> None:
        """Wait until the child has ended and been reaped, without raising its error (wait() does that)."""
        self._thread.join()
    def bytes_written(self) -> int:
        """Coarse progress of the child's write, for a progress bar: the size of its temporary file so far (it
        writes the sections in file order), `bytes_total` once the file is in place."""
        try:
            return min(os.stat(self._temporary).st_size, self.bytes_total)
        except FileNotFoundError:
            return self.bytes_total if os.path.exists(self._final) else 0

    def wait(self) -> SnapshotInfo:
        """Block until the snapshot file is in place and return its SnapshotInfo; the child's error if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
