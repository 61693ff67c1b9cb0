"""Where the core's journal memory comes from, and when it reaches the disk. This module holds the I/O policy;
the core (ledger._core) only writes 64-byte records into the memory it is handed.

On disk (docs/FORMAT.md): `<dir>/journal/NNNNNNNN.segment` files, each a 4096-byte segment header followed by
2**segment_records_log2 records of 64 bytes, preallocated and memory-mapped. `<dir>/LOCK` is held with an
exclusive flock by the one writer.

Two ways the records reach the files, chosen by the durability mode:
- write-through (`fsync`, and the ring server): the writer maps its segments privately; the core writes events
  into that mapping, and each committed batch is copied into the file with pwrite (its events first, its header
  with the commit word last), then fdatasync'ed. Measured on this machine class (ext4 on a virtual disk): a file
  written through a shared mapping and fdatasync'ed every 512 KiB reaches 3.3-3.6M records/s, the same bytes
  written with pwrite 8.3-10M/s: every write fault on a shared file page joins the filesystem journal, so each
  fdatasync becomes a journal commit as well as a data write. A full, durable segment is dropped from the private
  mapping (MADV_DONTNEED) and read back from the page cache, so the journal costs no anonymous memory.
- shared (`os`): the core writes straight into a shared mapping of the files (the page cache), so a committed batch
  survives a crash of the process the moment it is written; the flusher fdatasyncs in the background.
Room reserved at open with `journal_records_reserved` is filled with real zeros before use: fdatasync then writes
data only, instead of also converting preallocated ("unwritten") extents in the filesystem journal (measured: up to
2x at 8k-record syncs). Segments created in the background as the journal grows are only preallocated: zeroing
them costs as much disk bandwidth as it saves in a disk-bound run. A writer keeps the segment after the one it
writes ready (faulted in, created if new) from a background thread; one that reopens a journal whose files reach
past its write position faults in the rest of its segment at open."""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import threading
import time
from typing import Any, Callable

import numpy as np

from ledger import _core
from ledger.errors import LedgerCorruptError, LedgerFullError, LedgerLockedError, LedgerPoisonedError
from ledger.memory import MADV_POPULATE_READ, anonymous_buffer, populate_pages

__all__ = [
    "FileJournal",
    "MemoryJournal",
    "RECORD_SIZE",
    "SEGMENT_HEADER_BYTES",
    "SEGMENT_RECORDS_LOG2_DEFAULT",
    "FaultInjector",
]

RECORD_SIZE = 64
SEGMENT_RECORDS_LOG2_DEFAULT = 20  # 2**20 records of 64 bytes = 64 MiB per segment
SEGMENT_RECORDS_LOG2_MIN = 10
SEGMENT_RECORDS_LOG2_MAX = 24      # 1 GiB segments at most
SEGMENT_HEADER_BYTES = 4096
SEGMENT_MAGIC = b"LDGRSEG\x00"
SEGMENT_HEADER = struct.Struct("<8sIIIIQQQ")  # magic, version, record size, records log2, 0, index, first, created
FLUSH_INTERVAL_MS_DEFAULT = 10
HEADER_WORD_A = 15 << 56           # kind byte of a batch header (docs/FORMAT.md)
COMMIT_MAGIC = 0xC0111117
REPLAY_END = 0         # the replay stop reasons of _core.REPLAY_REASONS used here
REPLAY_CHAIN = 3
REPLAY_INTEGRITY = 5
FLUSH_INTERVAL_MS_MAX = 60_000
# <dir>/journal/DURABLE (docs/FORMAT.md): where batches may stop being durable. An "os" writer keeps it at the end
# of what its flusher has synced, so after a machine crash anything failing at or past it is a torn tail, even
# with intact batches after it (writeback order is arbitrary). STRICT: every batch was synced before the next was
# written ("fsync" mode), so only the last batch can be torn and a failure with a committed batch after it is
# corruption. No file (journals written before it existed): STRICT.
DURABLE_NAME = "DURABLE"
DURABLE_RECORD = struct.Struct("<QII")   # position, format version, CRC32C of the 12 bytes before it
DURABLE_STRICT = (1 << 64) - 1
ZERO_FILL_CHUNK_BYTES = 4 << 20    # zeros written per pwrite when a segment is filled ahead of use
# Segments not held for writing that recovery reads from Python at once (the core has its own bound,
# _core.SEGMENTS_MAPPED_MAX): each is mapped read-only without keeping a descriptor, the oldest unmapped first.
READ_MAPS_MAX = 4

# Called with an operation name before the journal does it: "allocate" (a new segment), "write" (a batch's events
# reach the files), "write-header" (then its header), "sync" (fdatasync), and "synced" after a sync returned.
# Raising OSError there simulates the failure (ENOSPC, EIO) at exactly that point; killing the process there
# lands a crash exactly between two steps; copying the files there records what a machine crash could leave.
# Tests only.
FaultInjector = Callable[[str], None]


class MemoryJournal:
    """Journal segments in anonymous memory. Nothing survives the process: this is `ledger.open(None)`.

    The next segment is prepared (mapped and faulted in) by a background thread while the current one fills, so
    the writer does not pay first-touch page faults in its loop."""

    durability = "memory"
    after_commit = None

    def __init__(self, segment_records_log2: int = SEGMENT_RECORDS_LOG2_DEFAULT) -> None:
        self.segment_records_log2 = segment_records_log2
        self.segment_bytes = RECORD_SIZE << segment_records_log2
        self.segments: list[mmap.mmap] = []
        self._spare: mmap.mmap | None = None
        self._preparing: threading.Thread | None = None

    def _prepare(self) -> None:
        self._spare = anonymous_buffer(self.segment_bytes)

    def segment(self, index: int) -> mmap.mmap:
        assert index == len(self.segments), "segments are handed out in order"
        if index == 0:
            # Faulted in lazily: a small ledger (most tests, most services' first minutes) never pays for
            # 64 MiB up front. Preparing spares starts once a ledger proves big enough to need a second segment.
            buffer = anonymous_buffer(self.segment_bytes, populate=False)
            self.segments.append(buffer)
            return buffer
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None
        buffer = self._spare if self._spare is not None else anonymous_buffer(self.segment_bytes)
        self._spare = None
        self.segments.append(buffer)
        self._preparing = threading.Thread(target=self._prepare, name="ledger-segment-prepare", daemon=True)
        self._preparing.start()
        return buffer

    def flush(self) -> None:
        pass

    def view(self, index: int) -> mmap.mmap:
        """Segment `index` as already handed to the core (for a second, read-only engine: verify)."""
        return self.segments[index]

    def close(self) -> None:
        if self._preparing is not None:
            self._preparing.join()
        for segment in self.segments:
            segment.close()
        self.segments = []
        if self._spare is not None:
            self._spare.close()
            self._spare = None


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _BackgroundSync:
    """A thread that fdatasyncs a range of the journal when asked (write_ahead), so that most of a large batch is
    on disk by the time the core has applied all of it. At most one sync runs; requests made meanwhile merge into
    one more. An error is kept and raised by finish()."""

    def __init__(self, journal: FileJournal) -> None:
        self._journal = journal
        self._condition = threading.Condition()
        self._wanted: tuple[int, int] | None = None
        self._busy = False
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ledger-write-ahead-sync", daemon=True)
        self._thread.start()

    def request(self, start: int, end: int) -> None:
        with self._condition:
            if self._wanted is not None:
                start = min(start, self._wanted[0])
            self._wanted = (start, end)
            self._condition.notify_all()

    def finish(self) -> None:
        """Drop a sync not started yet (the caller's own sync, next, covers its range) and wait for the one running:
        each sync is a device cache flush, so two in a row would cost one flush too many. Raises what a sync
        raised since the last finish()."""
        with self._condition:
            self._wanted = None
            while self._busy:
                self._condition.wait()
            error, self._error = self._error, None
        if error is not None:
            raise error

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._condition:
                while self._wanted is None and not self._stopping:
                    self._condition.wait()
                if self._wanted is None:
                    return
                (start, end), self._wanted, self._busy = self._wanted, None, True
            try:
                if self._error is None:
                    self._journal.sync_files(start, end)
            except BaseException as error:  # noqa: BLE001 - handed to the writer by finish()
                self._error = error
            with self._condition:
                self._busy = False
                self._condition.notify_all()


def _make_directories(path: str) -> None:
    """Create `path` and any missing parents (0700), fsyncing each new entry's parent: a directory made for a new
    ledger must survive a power loss as surely as the batches acknowledged inside it."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.mkdir(directory, 0o700)
        _fsync_directory(os.path.dirname(directory))


def _write_zeros(fd: int, start: int, end: int) -> None:
    zeros = bytes(ZERO_FILL_CHUNK_BYTES)
    offset = start
    while offset < end:
        offset += os.pwrite(fd, memoryview(zeros)[:min(ZERO_FILL_CHUNK_BYTES, end - offset)], offset)


def _cut_short(path: str, offset: int, position: int, mark: int) -> LedgerCorruptError:
    """The journal ends before the durable mark: batches known to be durable are gone."""
    return LedgerCorruptError(f"journal cut short in {path} at byte offset {offset}, journal position {position}: "
                              f"it ends there, but batches up to position {mark} were durable (journal/DURABLE); "
                              f"nothing was changed on disk")


def _segment_cut_short(path: str, size: int, segment_bytes: int, first_position: int) -> LedgerCorruptError:
    """A segment file shorter than a segment. The writer never leaves one (it creates each at full size, then
    renames it into place), so its end was lost after it was written (a file system, a copy or a backup): the
    batches there may have been acknowledged. Never extended: that would drop them without a word."""
    position = first_position + (size - SEGMENT_HEADER_BYTES) // RECORD_SIZE
    return LedgerCorruptError(f"{path}: segment file cut short: {size} bytes of {segment_bytes} (segments are "
                              f"created at full size, so its end was lost after it was written); the journal "
                              f"ends there, at journal position {position}, and any batch written after it, "
                              f"acknowledged or not, is missing; nothing was changed on disk (restore the file "
                              f"from a copy that has its end)")


def segment_name(index: int) -> str:
    return f"{index:08d}.segment"


class Segment:
    """One mapped segment file."""

    def __init__(self, path: str, fd: int, memory: mmap.mmap, index: int) -> None:
        self.path = path
        self.fd = fd
        self.memory = memory
        self.index = index
        self.records = memoryview(memory)[SEGMENT_HEADER_BYTES:]

    def close(self) -> None:
        """Unmap and close. The descriptor is closed whatever happens to the mapping: if a view of it is still
        held somewhere (BufferError), the mapping goes when that view does, and the error is raised after."""
        try:
            self.records.release()
            self.memory.close()
        finally:
            os.close(self.fd)


class FileJournal:
    """Segment files mapped shared; group commit by fdatasync per batch ("fsync") or by a flusher ("os")."""

    def __init__(self, directory: str, *, create: bool, durability: str, readonly: bool = False,
                 segment_records_log2: int = SEGMENT_RECORDS_LOG2_DEFAULT,
                 flush_interval_ms: int = FLUSH_INTERVAL_MS_DEFAULT,
                 fault_injector: FaultInjector | None = None) -> None:
        """durability "fsync": write-through: the handle's commit pipeline (ledger/commit.py) writes each
        committed batch (write_ahead, write_events, write) and syncs it (sync). durability "os": shared mapping
        and a flusher (start_flusher)."""
        if not SEGMENT_RECORDS_LOG2_MIN <= segment_records_log2 <= SEGMENT_RECORDS_LOG2_MAX:
            raise ValueError(f"segment_records_log2 must be in [{SEGMENT_RECORDS_LOG2_MIN}, "
                             f"{SEGMENT_RECORDS_LOG2_MAX}], got {segment_records_log2}")
        if not 1 <= flush_interval_ms <= FLUSH_INTERVAL_MS_MAX:
            raise ValueError(f"flush_interval_ms must be in [1, {FLUSH_INTERVAL_MS_MAX}], got {flush_interval_ms}")
        self.directory = os.fspath(directory)
        self.journal_directory = os.path.join(self.directory, "journal")
        self.durability = durability
        self.readonly = readonly
        self.write_through = durability == "fsync" and not readonly
        self._sealed_segments = 0          # write-through: segments dropped from the private mapping so far
        # write_ahead: the batch being written ahead (its header position), how far, and a write error to report.
        self._ahead_header: int | None = None
        self._ahead_written = 0
        self._ahead_error: OSError | None = None
        self._background_sync: _BackgroundSync | None = None
        self.flush_interval_ms = flush_interval_ms
        self.fault_injector = fault_injector
        # Per segment handed to the core: the Segment held (mapped, with its descriptor) or None: read from its
        # file on demand (the core maps it; recovery uses _read_maps). Held: the last existing segment at open,
        # and from begin_writing on the segments being written and the room after them; a writer lets go of
        # those it has written past once they are durable (segment_release), so descriptors and mappings stay
        # O(1) however many segments the journal has.
        self.segments: list[Segment | mmap.mmap | None] = []
        self._held_from = 0                 # segments from this index on are held when handed out
        self._read_maps: dict[int, mmap.mmap] = {}
        self.directory_fd: int | None = None  # the journal directory, for the core's segment_files
        self.torn_records_zeroed = 0
        self._lock_fd: int | None = None
        self._write_position: Callable[[], int] | None = None
        self._synced_position = 0
        self._synced_changed = threading.Condition()  # _synced_position moved, the flusher failed, or closed
        self._durable_waits_over = False               # closed: nothing more becomes durable through this handle
        self._flusher: threading.Thread | None = None
        self._flusher_stop = threading.Event()
        self._flush_error: BaseException | None = None
        self._on_poison: Callable[[], None] | None = None
        self._sync_lock = threading.Lock()
        self._written_end = 0   # write-through: the end of the last batch whose header write() put in the files
        self._preparing: threading.Thread | None = None
        self._prepared: tuple[int, Any] | None = None
        self._ready_through = 0  # segments up to this index are (being) made ready for writing
        self._ready_lock = threading.Lock()

        self.torn_at: int | None = None        # where recovery found the torn tail it zeroed
        self._torn_mark = DURABLE_STRICT        # the durable mark it was judged against (what is known of it)
        self._durable_fd: int | None = None
        exists = os.path.isdir(self.journal_directory)
        if not exists:
            if not create or readonly:
                raise FileNotFoundError(errno.ENOENT, "no ledger here (pass create=True to make one)", self.directory)
            _make_directories(self.journal_directory)
        if not readonly:
            self._lock()
        try:
            self.existing = self._existing_segments()
            self.segment_records_log2 = segment_records_log2
            if self.existing:
                self.segment_records_log2 = self._read_header(0)[3]
            self.segment_records = 1 << self.segment_records_log2
            self.segment_bytes = SEGMENT_HEADER_BYTES + (RECORD_SIZE << self.segment_records_log2)
            for index in range(self.existing - 1):  # the last one is checked (and mapped) as it is handed out
                self._check_segment_file(index)
            self._held_from = max(self.existing - 1, 0)
            assert _core.segment_file_name(12345) == segment_name(12345), "the core opens segments by this name"
            self.directory_fd = os.open(self.journal_directory, os.O_RDONLY | os.O_DIRECTORY)
        except BaseException:
            self.close(final_sync=False)
            raise

    # -- opening --

    def _lock(self) -> None:
        path = os.path.join(self.directory, "LOCK")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerLockedError(f"{self.directory} is open for writing by another process "
                                    f"(lock held on {path}); open it with readonly=True to read") from None
        self._lock_fd = fd

    def _existing_segments(self) -> int:
        names = sorted(name for name in os.listdir(self.journal_directory) if name.endswith(".segment"))
        for index, name in enumerate(names):
            if name != segment_name(index):
                raise LedgerCorruptError(f"journal segments are not contiguous in {self.journal_directory}: "
                                         f"expected {segment_name(index)}, found {name}")
        if not self.readonly:
            for name in os.listdir(self.journal_directory):
                if name.endswith(".tmp"):  # a segment whose creation did not finish: never referenced
                    os.unlink(os.path.join(self.journal_directory, name))
        return len(names)

    def _read_header(self, index: int) -> tuple:
        path = os.path.join(self.journal_directory, segment_name(index))
        with open(path, "rb") as file:
            page = file.read(SEGMENT_HEADER_BYTES)
        raw = page[:SEGMENT_HEADER.size + 4]
        if len(page) < SEGMENT_HEADER_BYTES:
            raise LedgerCorruptError(f"{path}: segment header is truncated ({len(page)} bytes)")
        if page[SEGMENT_HEADER.size + 4:].count(0) != SEGMENT_HEADER_BYTES - SEGMENT_HEADER.size - 4:
            raise LedgerCorruptError(f"{path}: non-zero bytes in the reserved part of the segment header")
        fields = SEGMENT_HEADER.unpack_from(raw)
        (checksum,) = struct.unpack_from("<I", raw, SEGMENT_HEADER.size)
        if _core.crc32c(raw[:SEGMENT_HEADER.size]) != checksum:
            raise LedgerCorruptError(f"{path}: segment header checksum mismatch at byte 0")
        magic, version, record_size, records_log2, _, stored_index, first_position, _ = fields
        if magic != SEGMENT_MAGIC:
            raise LedgerCorruptError(f"{path}: not a ledger segment (magic {magic!r})")
        if version != _core.FORMAT_VERSION:
            raise LedgerCorruptError(f"{path}: format version {version}, this build reads {_core.FORMAT_VERSION}")
        if record_size != RECORD_SIZE or stored_index != index or first_position != index << records_log2 \
                or not SEGMENT_RECORDS_LOG2_MIN <= records_log2 <= SEGMENT_RECORDS_LOG2_MAX:
            raise LedgerCorruptError(f"{path}: segment header fields are inconsistent "
                                     f"(index {stored_index}, records 2**{records_log2}, first {first_position})")
        if index > 0 and records_log2 != self.segment_records_log2:
            raise LedgerCorruptError(f"{path}: segment size differs from segment 0")
        return fields

    def _check_segment_file(self, index: int) -> None:
        """A segment before the last one, left to be read from its file on demand: its header must pass and its
        size must be whole (only the last one may have been cut short, see _map)."""
        path = os.path.join(self.journal_directory, segment_name(index))
        self._read_header(index)
        size = os.stat(path).st_size
        if size != self.segment_bytes:
            raise LedgerCorruptError(f"{path}: size {size} bytes, expected {self.segment_bytes}")

    def segment_files(self) -> tuple[int, int]:
        """The core's segment_files: (journal directory descriptor, byte offset of the records in a file)."""
        assert self.directory_fd is not None
        return self.directory_fd, SEGMENT_HEADER_BYTES

    def segment_release(self, index: int) -> Callable[[], None] | None:
        """The core's segment_release: it has written past segment `index`. If every record of it is in the
        file and durable, stop holding it (reads come from the file from now on) and return what closes its
        mapping and descriptor, for the core to call once it has let go of the buffer; otherwise None."""
        segment = self.segments[index]
        if self.readonly or not isinstance(segment, Segment):
            return None
        segment_end = (index + 1) << self.segment_records_log2
        durable = index < self._sealed_segments if self.write_through else segment_end <= self._synced_position
        if not durable:
            return None
        self.segments[index] = None
        self._held_from = max(self._held_from, index + 1)
        return segment.close

    def _map(self, index: int, populate: bool = True) -> Segment:
        path = os.path.join(self.journal_directory, segment_name(index))
        self._read_header(index)
        fd = os.open(path, os.O_RDONLY if self.readonly else os.O_RDWR)
        size = os.fstat(fd).st_size
        if size != self.segment_bytes:
            os.close(fd)
            if size < self.segment_bytes:
                raise _segment_cut_short(path, size, self.segment_bytes, index << self.segment_records_log2)
            raise LedgerCorruptError(f"{path}: size {size} bytes, expected {self.segment_bytes}")
        # Read-only opens map copy-on-write: the core may build state in place, nothing reaches the file. So does a
        # write-through writer: its records reach the file by pwrite at commit (write()).
        access = mmap.ACCESS_COPY if self.readonly or self.write_through else mmap.ACCESS_WRITE
        memory = mmap.mmap(fd, self.segment_bytes, access=access)
        if populate:
            try:
                # Map the whole segment's page-cache pages in one call: replay then reads without a minor fault
                # per 4 KiB page.
                memory.madvise(MADV_POPULATE_READ)
            except OSError:
                pass
        return Segment(path, fd, memory, index)

    def _create(self, index: int) -> Segment:
        """Preallocate, stamp and publish a new segment: temp file, fallocate, header, fsync, rename, dir fsync.
        No room for it (ENOSPC, EDQUOT while allocating): LedgerFullError, and the handle may go on (the batch
        that needed it was not applied). Any other failure: LedgerPoisonedError, which segment() turns into a
        poisoned handle: a failed sync is fatal, and what a failed fsync left behind cannot be known."""
        final = os.path.join(self.journal_directory, segment_name(index))
        temporary = os.path.join(self.journal_directory, f".{segment_name(index)}.tmp")
        step = "creating"
        fd = None
        try:
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            step = "allocating"
            self._inject("allocate")
            os.posix_fallocate(fd, 0, self.segment_bytes)
            step = "writing the header of"
            header = SEGMENT_HEADER.pack(SEGMENT_MAGIC, _core.FORMAT_VERSION, RECORD_SIZE,
                                         self.segment_records_log2, 0, index, index << self.segment_records_log2,
                                         time.time_ns())
            os.pwrite(fd, header + struct.pack("<I", _core.crc32c(header)), 0)
            step = "fsyncing"
            os.fsync(fd)
            step = "renaming into place"
            os.rename(temporary, final)
            step = "fsyncing the journal directory for"
            _fsync_directory(self.journal_directory)
        except OSError as error:
            if fd is not None:
                os.close(fd)
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass   # renamed into place: a complete empty segment, valid on reopen
            if step in ("creating", "allocating") and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LedgerFullError(error.errno, f"cannot allocate journal segment {index} "
                                      f"({self.segment_bytes} bytes): {os.strerror(error.errno)}", final) from error
            raise LedgerPoisonedError(f"journal segment {index} ({final}) could not be created: {step} it failed "
                                      f"with {error}; the handle is poisoned (nothing of the batch that needed "
                                      f"it was applied): reopen the ledger to recover") from error
        os.close(fd)
        return self._map(index, populate=False)

    def _prepare(self, index: int) -> None:
        """Background: create segment `index` ahead of need, so the writer never waits for fallocate, zeros,
        fsyncs and page population at a segment boundary. An error is kept and raised when the segment is needed."""
        try:
            # No zero fill here: writing 64 MiB of zeros competes with the journal's own syncs for the disk and
            # can outlast the segment before it (measured: 250-340 ms stalls of the ring writer on a slow disk).
            segment = self._create(index)
            populate_pages(segment.memory)  # page-cache pages (or private copies) now, not a fault per 4 KiB later
            self._prepared = (index, segment)
        except BaseException as error:  # noqa: BLE001 - handed to the writer thread in _take_prepared
            self._prepared = (index, error)

    def _take_prepared(self, index: int) -> Segment | None:
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None
        prepared, self._prepared = self._prepared, None
        if prepared is None or prepared[0] != index:
            return None
        if isinstance(prepared[1], BaseException):
            raise prepared[1]
        return prepared[1]

    def segment(self, index: int) -> memoryview | None:
        """The core's segment provider: existing segments in order, then new ones; None for a segment the core
        reads from its file on demand. An engine that replaces a discarded one (a snapshot that failed to load)
        gets the segments already handed out, and provide_segments gets those held since (begin_writing)."""
        if index < len(self.segments):
            return self.view(index)
        assert index == len(self.segments), "segments are handed out in order"
        if index < self.existing:
            if index < self._held_from:
                self.segments.append(None)
                return None
            segment = self._map(index)
            self.segments.append(segment)
            return segment.records
        if self.readonly:
            # A read-only handle never writes; give it private zero memory past the end of the files.
            buffer = anonymous_buffer(RECORD_SIZE << self.segment_records_log2, populate=False)
            self.segments.append(buffer)  # type: ignore[arg-type]
            return memoryview(buffer)
        # Under the lock that _ready_after takes: the flusher (durability "os") must not start preparing the
        # segment this thread is creating (two creations of one file: writes into an unlinked one).
        with self._ready_lock:
            try:
                segment = self._take_prepared(index)
                if segment is None:
                    segment = self._create(index)
                    if index > 0:  # a first segment stays lazy: small ledgers (and tests) do not pay 64 MiB up front
                        populate_pages(segment.memory)
            except LedgerPoisonedError:
                if self._on_poison is not None:   # the handle's, once open: every later call refuses
                    self._on_poison()
                raise
            self.segments.append(segment)
            self._ready_through = max(self._ready_through, index)
        if index > 0:
            self._ready_after(index)  # the ledger has outgrown one segment: from now on, keep the next one ready
        return segment.records

    def view(self, index: int) -> memoryview | None:
        """Segment `index` as handed to the core (for a second, read-only engine: verify); None if it is read
        from its file."""
        segment = self.segments[index]
        if segment is None:
            return None
        return segment.records if isinstance(segment, Segment) else memoryview(segment)

    def _segment_records(self, index: int) -> memoryview:
        """Segment `index`'s records for recovery's reads: the held mapping, or a read-only one of the file kept
        among at most READ_MAPS_MAX (views of an unmapped one keep it alive until they go)."""
        held = self.view(index) if index < len(self.segments) else None
        if held is not None:
            return held
        memory = self._read_maps.pop(index, None)
        if memory is None:
            fd = os.open(os.path.join(self.journal_directory, segment_name(index)), os.O_RDONLY)
            try:
                memory = mmap.mmap(fd, self.segment_bytes, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            while len(self._read_maps) >= READ_MAPS_MAX:
                self._close_read_map(next(iter(self._read_maps)))
        self._read_maps[index] = memory   # newest last
        return memoryview(memory)[SEGMENT_HEADER_BYTES:]

    def _close_read_map(self, index: int) -> None:
        memory = self._read_maps.pop(index)
        try:
            memory.close()
        except BufferError:  # a view is still alive: the mapping goes when the last view does
            pass

    @property
    def existing_end_position(self) -> int:
        return self.existing << self.segment_records_log2

    # -- recovery --

    def _record_view(self, position: int) -> np.ndarray:
        records = self._segment_records(position >> self.segment_records_log2)
        offset = (position & (self.segment_records - 1)) * RECORD_SIZE
        return np.frombuffer(records, np.uint8, count=RECORD_SIZE, offset=offset)

    def records_end(self, start: int) -> int:
        """Where the journal's records end (at or after `start`), for a progress bar's total: the segment files are
        preallocated, so their end overstates it by up to two segments (the last one and the one prepared next).
        Every record is non-zero (an event or a batch header) and the preallocated rest is zero, so a binary search
        finds the end in about 25 record reads. A torn or damaged tail can mislead it: only for display."""
        low, high = max(start, 1), self.existing_end_position  # position 0 is never written
        while low < high:
            middle = (low + high) // 2
            if self._record_view(middle).any():
                low = middle + 1
            else:
                high = middle
        return low

    def _last_nonzero(self, start: int, end: int) -> int:
        """The position after the last non-zero record in [start, end), or `start` if all are zero."""
        last = start
        for first, words in self._records(start, end):
            nonzero = np.flatnonzero(words.any(axis=1))
            if nonzero.size:
                last = first + int(nonzero[-1]) + 1
        return last

    def _zero(self, start: int, end: int) -> None:
        self._zero_unheld(start, end)
        for first, words in self._records(start, end):
            if self.view(first >> self.segment_records_log2) is None:
                continue
            words[:] = 0
            if self.write_through:  # the mapping is private: the zeros must reach the file too
                self._write_range(first, first + words.shape[0])
        self.sync(start, end)

    def _zero_unheld(self, start: int, end: int) -> None:
        """_zero for the segments in [start, end) that are not held (read from their files): zeros written to
        the files directly and synced."""
        position = start
        while position < end:
            index = position >> self.segment_records_log2
            segment_end = min(end, (index + 1) << self.segment_records_log2)
            if index >= len(self.segments) or self.segments[index] is None:
                offset = SEGMENT_HEADER_BYTES + (position & (self.segment_records - 1)) * RECORD_SIZE
                fd = os.open(os.path.join(self.journal_directory, segment_name(index)), os.O_RDWR)
                try:
                    _write_zeros(fd, offset, offset + (segment_end - position) * RECORD_SIZE)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            position = segment_end

    def _records(self, start: int, end: int):
        """Yield (first position, uint64 view of shape (n, 8)) for [start, end), one chunk per segment."""
        position = start
        while position < end:
            segment_end = min(end, ((position >> self.segment_records_log2) + 1) << self.segment_records_log2)
            records = self._segment_records(position >> self.segment_records_log2)
            first = (position & (self.segment_records - 1)) * RECORD_SIZE
            yield position, np.frombuffer(records, np.uint64, count=(segment_end - position) * 8,
                                          offset=first).reshape(-1, 8)
            position = segment_end

    def _bytes(self, start: int, end: int) -> bytes:
        return b"".join(chunk.tobytes() for _, chunk in self._records(start, end))

    def _committed_batch_in(self, start: int, end: int, mapped_end: int) -> int | None:
        """The position of a batch header in [start, end) whose checksum holds, if any: proof that committed data
        follows, so whatever failed before it cannot be a torn tail."""
        for first, words in self._records(start, end):
            candidates = np.flatnonzero((words[:, 6] == np.uint64(HEADER_WORD_A))
                                        & ((words[:, 7] >> np.uint64(32)) == np.uint64(COMMIT_MAGIC)))
            for index in candidates.tolist():
                position = first + index
                header = words[index]
                count = int(header[3])
                if int(header[2]) != position or not 0 < count < (1 << 24) or position + 1 + count > mapped_end:
                    continue
                checksum = _core.crc32c(header[:5].tobytes(), _core.crc32c(self._bytes(position + 1, position + 1 + count)))
                if checksum == int(header[5]) and checksum == int(header[7]) & 0xFFFFFFFF:
                    return position
        return None

    def recover_tail(self, reason: int, position: int, mapped_end: int) -> int:
        """Classify what stopped replay at `position`. If it is at or past the durable mark (an "os" writer's
        unsynced batches), or no committed batch follows, it is the torn tail of the last writes: zero it (returns
        the records zeroed). Otherwise it is corruption: raise without changing the disk. A hash-chain or integrity
        failure has valid checksums, so it is never a torn write."""
        window_end = min(mapped_end, position + 2 + _core.EXPIRE_BATCH_MAX + (1 << 23))
        reason_name = _core.REPLAY_REASONS[reason]
        if reason in (REPLAY_CHAIN, REPLAY_INTEGRITY):
            raise self._corrupt(position, reason_name)
        mark = self.durable_mark()
        if mark != DURABLE_STRICT and position < mark and self._mark_is_settled(mark, mapped_end):
            # Everything before the mark was synced before the mark was written: what fails there is damage to
            # acknowledged batches (bit rot, a cut file), never a torn write, even with nothing after it.
            if reason == REPLAY_END:
                raise _cut_short(*self._location(position), position, mark)
            raise self._corrupt(position, f"{reason_name}, before the durable mark {mark}")
        unsynced = position >= mark
        if not unsynced and self._committed_batch_in(position + 1, window_end, mapped_end) is not None:
            raise self._corrupt(position, reason_name)
        if self.readonly:
            # Beside a live writer the tail is usually a batch being written right now: for a reader it is
            # simply the end. Only the writer ever truncates.
            self.torn_records_zeroed = 0
            return 0
        # Unsynced batches of an "os" writer can reach past the largest batch: zero to the end of what is mapped.
        torn_end = self._last_nonzero(position, mapped_end if unsynced else window_end)
        if torn_end > position:
            self._zero(position, torn_end)
            self.torn_at = position
            self._torn_mark = mark
        self.torn_records_zeroed = torn_end - position
        return self.torn_records_zeroed

    def torn_tail_report(self) -> str | None:
        """One line on the torn tail recovery zeroed, or None if there was none."""
        if not self.torn_records_zeroed or self.torn_at is None:
            return None
        index = self.torn_at >> self.segment_records_log2
        offset = SEGMENT_HEADER_BYTES + (self.torn_at & (self.segment_records - 1)) * RECORD_SIZE
        if self._torn_mark == DURABLE_STRICT:
            # Only the last batch can be torn, and each call returned only after its batch was synced.
            known = ('the last batch, which was being committed when the writer stopped: in "fsync" mode a call '
                     'returns only once its batch is synced, so it was not acknowledged (unless the file was '
                     'damaged after that sync, which recovery cannot tell from a torn write)')
        else:
            known = (f'at or past the durable mark (journal position {self._torn_mark}), which an "os" mode '
                     f'writer had not synced yet: that mode acknowledges a batch once it is in the page cache, so '
                     f'these may be acknowledged batches lost by a machine crash, or the batch the writer was '
                     f'applying when it stopped; every batch before the mark is kept')
        return (f"ledger: recovery zeroed a torn tail of {self.torn_records_zeroed} records from journal position "
                f"{self.torn_at} ({os.path.join(self.journal_directory, segment_name(index))}, byte offset "
                f"{offset}): {known}")

    # -- the durable mark --

    def _mark_is_settled(self, mark: int, mapped_end: int) -> bool:
        """Whether the durable mark can be held against what this handle read: always for the writer (it holds the
        lock). For a reader only if no writer holds the lock now and the reader's mapping reaches the mark: beside
        a live "os" writer the mark moves past batches the reader saw half-written a moment earlier, and a writer
        that finished meanwhile may have written past the segment files the reader found at open. (A stop that
        moves when the reader replays again is not judged at all: _replay_and_recover.)"""
        if not self.readonly:
            return True
        if mark > mapped_end:
            return False
        try:
            fd = os.open(os.path.join(self.directory, "LOCK"), os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)   # drops the shared lock: a writer may start right after, and only writes past the mark

    def durable_mark(self) -> int:
        """The position from which batches may not have been synced (DURABLE_STRICT: none may be missing but the
        last). A damaged mark file counts as STRICT: the safe reading, which never drops a synced batch."""
        path = os.path.join(self.journal_directory, DURABLE_NAME)
        try:
            with open(path, "rb") as file:
                raw = file.read(DURABLE_RECORD.size)
        except FileNotFoundError:
            return DURABLE_STRICT
        if len(raw) != DURABLE_RECORD.size:
            return DURABLE_STRICT
        position, version, checksum = DURABLE_RECORD.unpack(raw)
        if version != _core.FORMAT_VERSION or checksum != _core.crc32c(raw[:12]):
            return DURABLE_STRICT
        return position

    def set_durable_mark(self, position: int) -> None:
        """Persist the mark (pwrite + fdatasync; the file and its directory entry are synced when created)."""
        assert not self.readonly and 0 <= position <= DURABLE_STRICT
        if self._durable_fd is None:
            path = os.path.join(self.journal_directory, DURABLE_NAME)
            created = not os.path.exists(path)
            self._durable_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if created:
                os.fsync(self._durable_fd)
                _fsync_directory(self.journal_directory)
        raw = DURABLE_RECORD.pack(position & DURABLE_STRICT, _core.FORMAT_VERSION, 0)[:12]
        os.pwrite(self._durable_fd, raw + struct.pack("<I", _core.crc32c(raw)), 0)
        os.fdatasync(self._durable_fd)

    def begin_writing(self, write_position: int) -> None:
        """After recovery, before the first write: make what recovery kept durable (an earlier "os" writer may
        have left it in the page cache only), then set the mark for this writer's mode."""
        if self.readonly:
            return
        mark = self.durable_mark()
        first = min(mark, write_position) >> self.segment_records_log2
        self._hold_from(write_position >> self.segment_records_log2)
        for index in range(min(first, len(self.segments) - 1), len(self.segments)):
            segment = self.segments[index]
            if isinstance(segment, Segment):
                os.fdatasync(segment.fd)
            elif segment is None and index < self.existing:
                fd = os.open(os.path.join(self.journal_directory, segment_name(index)), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        self.set_durable_mark(write_position if self.durability == "os" else DURABLE_STRICT)
        self._written_end = write_position
        self._populate_room(write_position)

    def _hold_from(self, index: int) -> None:
        """Hold (map for writing) the existing segments from `index` on: the writer continues inside them. The
        core takes them with provide_segments(held_from)."""
        for held in range(index, min(self._held_from, len(self.segments))):
            if self.segments[held] is None:
                self.segments[held] = self._map(held)
        self._held_from = min(self._held_from, index)

    @property
    def held_from(self) -> int:
        return self._held_from

    def _populate_room(self, write_position: int) -> None:
        """The mapped files reach past the write position (segments an earlier writer prepared ahead, or room
        reserved at creation): fault in the rest of the segment being written now, and have the next one ready in
        the background; write() keeps one segment ahead ready from then on. Recovery mapped that room for reading,
        and each first write to a page would take a fault (a copy-on-write one with write-through) inside the
        core's loop: measured 2.1 ms instead of 0.9 ms for a batch of 16k transfers. A lone first segment stays
        lazy, as at creation: small ledgers (and tests) do not pay 64 MiB up front."""
        if len(self.segments) <= 1:
            return
        index = write_position >> self.segment_records_log2
        if index < len(self.segments) and isinstance(self.segments[index], Segment):
            first = SEGMENT_HEADER_BYTES + (write_position & (self.segment_records - 1)) * RECORD_SIZE
            populate_pages(self.segments[index].memory, first, self.segment_bytes - first)
        self._ready_after(min(index, len(self.segments) - 1))  # at the very end of the files: the next new one

    def _ready_after_writing(self, end: int) -> None:
        """The journal is written up to `end`: entered a segment that existed at open (new ones are readied by
        segment())? Ready the one after it."""
        index = (end - 1) >> self.segment_records_log2
        if 1 <= index < len(self.segments) and index + 1 > self._ready_through:
            self._ready_after(index)

    def _ready_after(self, index: int) -> None:
        """Have segment index + 1 ready for writing before the writer reaches it, in the background: an existing
        one faulted in, a new one created (and faulted in). At most one segment ahead: a large reserve left by an
        earlier writer costs memory only as the writer reaches it."""
        with self._ready_lock:  # the writer's thread, and the flusher's in durability "os"
            self._ready_after_locked(index)

    def _ready_after_locked(self, index: int) -> None:
        if index + 1 <= self._ready_through or self.readonly:
            return
        self._ready_through = index + 1
        if self._preparing is not None:
            self._preparing.join()  # the one before: done long ago (a segment's worth of writes)
            self._preparing = None
        if index + 1 < len(self.segments):
            segment = self.segments[index + 1]
            if not isinstance(segment, Segment):
                return
            target, arguments = populate_pages, (segment.memory,)
        else:
            target, arguments = self._prepare, (index + 1,)
        self._preparing = threading.Thread(target=target, args=arguments, name="ledger-segment-prepare", daemon=True)
        self._preparing.start()

    def _location(self, position: int) -> tuple[str, int]:
        """The segment file and byte offset of a journal position."""
        index = position >> self.segment_records_log2
        offset = SEGMENT_HEADER_BYTES + (position & (self.segment_records - 1)) * RECORD_SIZE
        return os.path.join(self.journal_directory, segment_name(index)), offset

    def _corrupt(self, position: int, reason: str) -> LedgerCorruptError:
        path, offset = self._location(position)
        return LedgerCorruptError(f"journal corrupt ({reason}) in {path} at byte offset {offset}, journal position "
                                  f"{position}: a committed batch before the tail fails its check; nothing was "
                                  f"changed on disk")

    def damaged(self, position: int, header_position: int, reason: str) -> LedgerCorruptError:
        """The error for a damaged record found when read (Engine.damage_error): a record from before the position
        the ledger was opened from, which replay did not check, fails its batch's check."""
        path, offset = self._location(position)
        return LedgerCorruptError(f"journal corrupt ({reason}) in {path} at byte offset {offset}, journal position "
                                  f"{position}: a committed record read from before the snapshot this ledger was "
                                  f"opened from fails its check; nothing was changed (`ledger scrub` lists every "
                                  f"damaged batch)")

    # -- durability --

    def _inject(self, operation: str) -> None:
        if self.fault_injector is not None:
            self.fault_injector(operation)

    def sync(self, start: int, end: int) -> None:
        """Make positions [start, end) durable: fdatasync each segment file they touch. With write-through they
        must have been written (write()) first."""
        if self.readonly or end <= start:
            return
        with self._sync_lock:
            self._inject("sync")
            first = start >> self.segment_records_log2
            last = (end - 1) >> self.segment_records_log2
            for index in range(first, last + 1):
                segment = self.segments[index]
                if segment is not None:   # not held: synced before it was let go of, or never written here
                    os.fdatasync(segment.fd)
            self._inject("synced")
            if self.write_through:
                self._seal_below(end >> self.segment_records_log2)

    def _seal_below(self, index_end: int) -> None:
        """Drop the private pages of segments [.., index_end), all of whose records are written and durable: later
        reads of them come from the page cache (the same bytes), and the memory goes back to the system."""
        while self._sealed_segments < index_end:
            segment = self.segments[self._sealed_segments]
            if isinstance(segment, Segment):
                _core.advise(segment.memory, mmap.MADV_DONTNEED)
            self._sealed_segments += 1

    def write(self, header_position: int, end: int) -> None:
        """Write-through: copy the committed batch [header_position, end) from the private mapping into the files,
        its events first and its header (with the commit word) last, so a reader of the files never sees a commit
        word before the events it seals. Events already written ahead (write_ahead) are not written again."""
        if not self.write_through or end <= header_position:
            return
        events_from = header_position + 1
        if self._ahead_header == header_position:
            if self._ahead_error is not None:
                error, self._ahead_error = self._ahead_error, None
                raise error
            events_from = self._ahead_written
        self._ahead_header = None
        self._inject("write")
        self._write_range(events_from, end)
        self._inject("write-header")
        self._write_range(header_position, header_position + 1)
        self._written_end = max(self._written_end, end)
        self._ready_after_writing(end)

    def write_ahead(self, header_position: int, end: int) -> None:
        """Inside a large batch (the core calls this between chunks of rows): write the batch's events that are
        final so far, [header_position + 1, end), and start syncing them in the background while the core
        applies the next chunk. The batch still counts only once the commit pipeline's after_commit has written
        its header and synced. Never raises: an error is kept and raised by write(), which fails the call and
        poisons the handle.
        Returns True if it wrote events to the files (the core poisons the handle if it then undoes the batch)."""
        if not self.write_through:
            return
        if self._ahead_header != header_position:
            self._ahead_header, self._ahead_written, self._ahead_error = header_position, header_position + 1, None
        if self._ahead_error is not None or end <= self._ahead_written:
            return
        try:
            self._inject("write")
            self._write_range(self._ahead_written, end)
        except OSError as error:
            self._ahead_error = error
            return
        self._ahead_written = end
        if self._background_sync is None:
            self._background_sync = _BackgroundSync(self)
        self._background_sync.request(header_position + 1, end)
        return True

    def write_events(self, header_position: int, end: int) -> None:
        """Write a committed batch's events [header_position + 1, end) ahead of its header; write() then writes only
        the header. Safe before earlier batches are durable: records past the last commit word are a torn tail to
        recovery, whatever reached the disk of them. Only headers must reach the files in order."""
        assert self.write_through and self._ahead_header is None
        self._inject("write")
        self._write_range(header_position + 1, end)
        self._ahead_header, self._ahead_written, self._ahead_error = header_position, end, None

    def _write_range(self, start: int, end: int) -> None:
        position = start
        while position < end:
            index = position >> self.segment_records_log2
            segment_end = min(end, (index + 1) << self.segment_records_log2)
            segment = self.segments[index]
            first = (position & (self.segment_records - 1)) * RECORD_SIZE
            data = segment.records[first:first + (segment_end - position) * RECORD_SIZE]
            offset = SEGMENT_HEADER_BYTES + first
            while data:  # pwrite may write less than asked (a signal): go on from where it stopped
                written = os.pwrite(segment.fd, data, offset)
                data = data[written:]
                offset += written
            position = segment_end

    def finish_write_ahead(self) -> None:
        """After write() of a batch that was written ahead: drop a background sync not started yet and wait for
        the one running (see _BackgroundSync.finish); raises what a background sync raised."""
        if self._background_sync is not None:
            self._background_sync.finish()

    def reserve(self, start: int, end: int) -> None:
        """Make positions [start, end) (beyond the committed journal, already mapped) cheap to commit: real zeros
        on disk (so fdatasync writes data only) and the pages present in the mapping. For journal_records_reserved."""
        if self.readonly or end <= start:
            return
        position = start
        while position < end:
            index = position >> self.segment_records_log2
            segment_end = min(end, (index + 1) << self.segment_records_log2)
            segment = self.segments[index]
            first = SEGMENT_HEADER_BYTES + (position & (self.segment_records - 1)) * RECORD_SIZE
            last = SEGMENT_HEADER_BYTES + (segment_end - (index << self.segment_records_log2)) * RECORD_SIZE
            # Whole pages only: the page holding `start` may hold committed records below it.
            zero_from = (first + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            if zero_from < last:
                _write_zeros(segment.fd, zero_from, last)
                os.fdatasync(segment.fd)
            populate_pages(segment.memory, first, last - first)
            position = segment_end

    def poison_with(self, on_poison: Callable[[], None]) -> None:
        """What to call when this journal fails in a way that makes the handle unusable (a segment that could not
        be created): the handle's poison, set once the handle exists."""
        self._on_poison = on_poison

    def start_flusher(self, write_position: Callable[[], int], on_poison: Callable[[], None]) -> None:
        """durability="os": a thread syncs what was written at least every flush_interval_ms."""
        self._write_position = write_position
        self._on_poison = on_poison
        self._synced_position = write_position()
        self._flusher = threading.Thread(target=self._flush_loop, name="ledger-flusher", daemon=True)
        self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._flusher_stop.wait(self.flush_interval_ms / 1000):
            try:
                self.flush()
                self._ready_after_writing(self._synced_position)  # what write() does with write-through
            except BaseException as error:  # a failed sync poisons the handle: no retry could prove success
                self._flush_error = error
                if self._on_poison is not None:
                    self._on_poison()
                with self._synced_changed:
                    self._synced_changed.notify_all()
                return

    def flush(self) -> None:
        if self._write_position is None:
            return
        if self._flush_error is not None:
            raise self._flush_error
        end = self._write_position()
        if end > self._synced_position:
            self.sync(self._synced_position, end)
            self._synced_position = end
            with self._sync_lock:
                self.set_durable_mark(end)
            with self._synced_changed:
                self._synced_changed.notify_all()

    def wait_durable(self, position: int) -> bool:
        """Block until every position below `position` is durable: True; False if that will not happen through
        this handle (its flusher failed, or it was closed without a final sync). Any thread may call it: it only
        waits for the flusher. In "fsync" mode each committed batch was synced before its call returned: True at
        once."""
        if self.durability != "os" or self.readonly:
            return True
        with self._synced_changed:
            while self._synced_position < position:
                if self._flush_error is not None or self._durable_waits_over:
                    return False
                self._synced_changed.wait(0.1)  # a bound, not a poll: every change notifies
        return True

    def sync_files(self, start: int, end: int) -> None:
        """fdatasync the segment files holding positions [start, end); nothing else (no mark, no sealing): what
        the background sync of write_ahead runs."""
        self._inject("sync")
        for index in range(start >> self.segment_records_log2, ((end - 1) >> self.segment_records_log2) + 1):
            segment = self.segments[index]
            if segment is not None:
                os.fdatasync(segment.fd)

    def close(self, final_sync: bool = True) -> None:
        """Release the journal. final_sync (a healthy writer): make everything written durable first, and set the
        durable mark to the end of it ("os": the flusher's last flush; "fsync": one more sync of what write()
        put in the files, which a ring server may not have synced yet), so that the next open takes any failure
        before it, even in the last batch, for damage rather than a torn tail: a clean close tears nothing. A
        failed final sync is raised once everything is released (the mark is then left as it was)."""
        final_error: BaseException | None = None
        try:
            if self._flusher is not None:  # first: it may start readying a segment (_ready_after)
                self._flusher_stop.set()
                self._flusher.join()
                self._flusher = None
                if final_sync and self._flush_error is None:
                    self.flush()
            elif final_sync and self.write_through and not self.readonly and self._written_end > 1:
                # Only what reached the files: a batch applied in memory whose write never happened (an
                # interrupted owner) stays past the mark, where it is the clean end.
                self.sync(1, self._written_end)
                self.set_durable_mark(self._written_end)
        except BaseException as error:
            final_error = error
        finally:
            with self._synced_changed:  # a snapshot waiting for durability learns the answer now
                self._durable_waits_over = True
                self._synced_changed.notify_all()
        # Every step runs whatever an earlier one raised (the lock above all: a directory left locked until the
        # process exits is unusable); the first error is raised at the end.
        try:
            self._release_files()
        except BaseException as error:
            final_error = final_error or error
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
        if final_error is not None:
            raise final_error

    def _release_files(self) -> None:
        """close(): stop the helper threads, unmap and close every segment and the durable mark's file."""
        first_error: BaseException | None = None
        steps: list[Callable[[], None]] = []
        if self._background_sync is not None:
            steps.append(self._background_sync.stop)
        if self._preparing is not None:
            steps.append(self._preparing.join)
        steps.append(self._close_prepared)
        steps += [segment.close for segment in self.segments if segment is not None]
        steps += [lambda index=index: self._close_read_map(index) for index in list(self._read_maps)]
        if self._durable_fd is not None:
            steps.append(lambda: os.close(self._durable_fd))
        if self.directory_fd is not None:
            steps.append(lambda: os.close(self.directory_fd))
        for step in steps:
            try:
                step()
            except BaseException as error:
                first_error = first_error or error
        self._background_sync = None
        self._preparing = None
        self.segments = []
        self._durable_fd = None
        self.directory_fd = None
        if first_error is not None:
            raise first_error

    def _close_prepared(self) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None and isinstance(prepared[1], Segment):
            prepared[1].close()  # created ahead and never used: an empty segment file, valid on reopen
