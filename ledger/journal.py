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
past its write position faults in the rest of its segment at open.

The parts: ledger.segments (the segment files and their mappings), ledger.recovery (judging where replay stopped,
the torn tail, the durable mark) and ledger.format (the numbers and checks of the format). FileJournal is the
writer over them: committing, syncing, the flusher, closing; what the core and the Ledger call goes through it."""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from typing import Callable

from ledger import _core
from ledger.errors import (LedgerCorruptError, LedgerError, LedgerHistoryUnavailableError, LedgerLockedError,
                           LedgerPoisonedError)
from ledger.format import (
    COMMIT_MAGIC,
    DURABLE_STRICT,
    RECORD_SIZE,
    SEGMENT_HEADER_BYTES,
    SEGMENT_RECORDS_LOG2_DEFAULT,
    SEGMENT_RECORDS_LOG2_MAX,
    SEGMENT_RECORDS_LOG2_MIN,
)
from ledger.memory import anonymous_buffer, populate_pages
from ledger.recovery import DurableMark, Recovery
from ledger.segments import Segment, SegmentFiles, make_directories, segment_name, write_zeros
from ledger.snapshot import journal_base

__all__ = [
    "COMMIT_MAGIC",
    "FileJournal",
    "MemoryJournal",
    "RECORD_SIZE",
    "SEGMENT_HEADER_BYTES",
    "SEGMENT_RECORDS_LOG2_DEFAULT",
    "FaultInjector",
    "segment_name",
]

FLUSH_INTERVAL_MS_DEFAULT = 10
FLUSH_INTERVAL_MS_MAX = 60_000

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



class FileJournal:
    """Segment files mapped shared; group commit by fdatasync per batch ("fsync") or by a flusher ("os").

    The writer side (committing, syncing, the flusher, closing) is here; the parts it stands in front of are
    `files` (ledger.segments.SegmentFiles: the segment files and their mappings), `recovery`
    (ledger.recovery.Recovery: judging where replay stopped) and `mark` (ledger.recovery.DurableMark)."""

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
        self.base = journal_base(self.directory)   # where the journal begins: None at genesis, else a snapshot's
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
        self.files: SegmentFiles | None = None
        self.mark = DurableMark(self.journal_directory)
        if not os.path.isdir(self.journal_directory):
            if not create or readonly:
                raise FileNotFoundError(errno.ENOENT, "no ledger here (pass create=True to make one)", self.directory)
            make_directories(self.journal_directory)
        if not readonly:
            self._lock()
        try:
            self.files = SegmentFiles(self.journal_directory, readonly=readonly, write_through=self.write_through,
                                      records_log2=segment_records_log2, inject=self._inject)
        except BaseException:
            self.close(final_sync=False)
            raise
        self.recovery = Recovery(self.files, self.mark, self.directory, readonly=readonly,
                                 write_through=self.write_through, write_range=self._write_range, sync=self.sync)

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

    # -- the segment files (ledger.segments), as the core and the writer see them --

    @property
    def segments(self) -> list[Segment | mmap.mmap | None]:
        """Per segment handed to the core: the Segment held, a reader's zero buffer, or None (read from its file)."""
        return self.files.segments if self.files is not None else []

    @property
    def segment_records_log2(self) -> int:
        """log2 of the records in each segment (the journal's own, for an existing one)."""
        return self.files.records_log2

    @property
    def segment_records(self) -> int:
        """Records in each segment."""
        return self.files.records

    @property
    def segment_bytes(self) -> int:
        """The size of each segment file."""
        return self.files.segment_bytes

    @property
    def existing(self) -> int:
        """How many segment files there were at open."""
        return self.files.existing

    @property
    def existing_end_position(self) -> int:
        """The journal position where the segment files found at open end."""
        return self.files.existing_end_position

    @property
    def held_from(self) -> int:
        """Segments from this index on are held (mapped for writing); the core takes them with provide_segments."""
        return self.files.held_from

    @property
    def directory_fd(self) -> int | None:
        """The journal directory's descriptor, for the core's segment_files."""
        return self.files.directory_fd if self.files is not None else None

    def segment_files(self) -> tuple[int, int]:
        """The core's segment_files: (journal directory descriptor, byte offset of the records in a file)."""
        assert self.directory_fd is not None
        return self.directory_fd, SEGMENT_HEADER_BYTES

    def segment(self, index: int) -> memoryview | None:
        """The core's segment provider (SegmentFiles.segment). A segment that could not be created poisons the
        handle (once it exists): every later call refuses."""
        try:
            return self.files.segment(index)
        except LedgerPoisonedError:
            if self._on_poison is not None:
                self._on_poison()
            raise

    def view(self, index: int) -> memoryview | None:
        """Segment `index` as handed to the core (for a second, read-only engine: verify); None if it is read
        from its file."""
        return self.files.view(index)

    def segment_release(self, index: int) -> Callable[[], None] | None:
        """The core's segment_release: it has written past segment `index`. If every record of it is in the
        file and durable, stop holding it (reads come from the file from now on) and return what closes its
        mapping and descriptor, for the core to call once it has let go of the buffer; otherwise None."""
        if self.readonly or self.files.held(index) is None:
            return None
        segment_end = (index + 1) << self.segment_records_log2
        durable = index < self._sealed_segments if self.write_through else segment_end <= self._synced_position
        if not durable:
            return None
        return self.files.let_go(index)

    @property
    def lock_fd(self) -> int | None:
        """The descriptor holding the directory's writer lock (None when read-only or closed): a snapshot's
        forked child keeps it until it exits."""
        return self._lock_fd

    def location(self, position: int) -> tuple[str, int]:
        """The segment file and byte offset of a journal position (for error messages and scrub reports)."""
        return self.files.location(position)

    def _ready_after_writing(self, end: int) -> None:
        self.files.ready_after_writing(end)

    # -- recovery and the durable mark (ledger.recovery) --

    @property
    def torn_records_zeroed(self) -> int:
        """How many records recovery zeroed as a torn tail (0: none)."""
        return self.recovery.torn_records_zeroed

    def records_end(self, start: int) -> int:
        """Where the journal's records end, for a progress bar (Recovery.records_end)."""
        return self.recovery.records_end(start)

    def recover_tail(self, reason: int, position: int, mapped_end: int) -> int:
        """Judge where replay stopped: zero a torn tail (returns the records zeroed) or raise LedgerCorruptError
        (Recovery.recover_tail)."""
        return self.recovery.recover_tail(reason, position, mapped_end)

    def torn_tail_report(self) -> str | None:
        """One line on the torn tail recovery zeroed, or None if there was none."""
        return self.recovery.torn_tail_report()

    def damaged(self, position: int, header_position: int, reason: str) -> LedgerError:
        """The error for a damaged record found when read (Engine.damage_error). A record before the journal's
        base (a rejoined node: records before the base snapshot's position are zero) is not damage: it is not
        here, and the error says so."""
        if self.base is not None and position < self.base:
            return LedgerHistoryUnavailableError(
                f"journal position {position} is before position {self.base}, where this data directory's journal "
                f"begins: it rejoined its cluster from the snapshot at {self.base}, and the records before it are "
                f"on other nodes ({self.directory})")
        return self.recovery.damaged(position, header_position, reason)

    def durable_mark(self) -> int:
        """The position from which batches may not have been synced (DurableMark.read)."""
        return self.mark.read()

    def set_durable_mark(self, position: int) -> None:
        """Persist the durable mark (DurableMark.set)."""
        assert not self.readonly
        self.mark.set(position)

    def begin_writing(self, write_position: int) -> None:
        """After recovery, before the first write: make what recovery kept durable (an earlier "os" writer may
        have left it in the page cache only), then set the mark for this writer's mode."""
        if self.readonly:
            return
        mark = self.durable_mark()
        first = min(mark, write_position) >> self.segment_records_log2
        self.files.hold_from(write_position >> self.segment_records_log2)
        for index in range(min(first, len(self.segments) - 1), len(self.segments)):
            segment = self.segments[index]
            if isinstance(segment, Segment):
                os.fdatasync(segment.fd)
            elif segment is None and index < self.existing:
                fd = os.open(self.files.path(index), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        self.set_durable_mark(write_position if self.durability == "os" else DURABLE_STRICT)
        self._written_end = write_position
        self.files.populate_room(write_position)

    # -- durability --

    def _inject(self, operation: str) -> None:
        if self.fault_injector is not None:
            self.fault_injector(operation)

    def sync(self, start: int, end: int) -> None:
        """Make positions [start, end) durable: fdatasync each segment file they touch. With write-through they
        must have been written (write()) first."""
        if self.readonly or end <= start:
            return
        assert start >= 0
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
        assert self._written_end <= header_position < end, "batches reach the files in journal order"
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
                write_zeros(segment.fd, zero_from, last)
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
        if self.files is not None:
            steps += self.files.close_steps()
        steps.append(self.mark.close)
        for step in steps:
            try:
                step()
            except BaseException as error:
                first_error = first_error or error
        self._background_sync = None
        if self.files is not None:
            self.files.forget()
        if first_error is not None:
            raise first_error
