"""A journal's segment files and their mappings (docs/FORMAT.md, "Segment file" and "Segments in memory").

SegmentFiles is the set of `<dir>/journal/NNNNNNNN.segment` files of one open journal: it checks them at open,
creates new ones (temporary file, fallocate, header, fsync, rename, directory fsync), maps the ones the core
writes or syncs ("held"), hands the core the rest to read from their files on demand, keeps the segment after the
one being written ready from a background thread, and maps old segments read-only for recovery's reads (at most
READ_MAPS_MAX at once). It knows nothing of batches, durability or the durable mark: ledger.journal's FileJournal
decides when a held segment may be let go of, and ledger.recovery reads records through it."""
from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ledger import _core
from ledger.errors import LedgerCorruptError, LedgerFullError, LedgerPoisonedError
from ledger.format import (
    FORMAT_VERSION,
    RECORD_SIZE,
    SEGMENT_HEADER,
    SEGMENT_HEADER_BYTES,
    SEGMENT_HEADER_CHECKSUM,
    SEGMENT_MAGIC,
    SegmentHeader,
    check_segment_header,
    check_segment_size,
    segment_bytes,
    segment_name,
)
from ledger.memory import MADV_POPULATE_READ, anonymous_buffer, populate_pages

__all__ = ["Segment", "SegmentFiles", "fsync_directory", "make_directories", "segment_name", "write_zeros"]

ZERO_FILL_CHUNK_BYTES = 4 << 20    # zeros written per pwrite when a segment is filled ahead of use
# Segments not held for writing that recovery reads from Python at once (the core has its own bound,
# _core.SEGMENTS_MAPPED_MAX): each is mapped read-only without keeping a descriptor, the oldest unmapped first.
READ_MAPS_MAX = 4


def fsync_directory(path: str) -> None:
    """fsync a directory, so that the entries made in it (a new file, a rename) survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories(path: str) -> None:
    """Create `path` and any missing parents (0700), fsyncing each new entry's parent: a directory made for a new
    ledger must survive a power loss as surely as the batches acknowledged inside it."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.mkdir(directory, 0o700)
        fsync_directory(os.path.dirname(directory))


def write_zeros(fd: int, start: int, end: int) -> None:
    """Write real zeros to bytes [start, end) of the file `fd` (not synced)."""
    zeros = bytes(ZERO_FILL_CHUNK_BYTES)
    offset = start
    while offset < end:
        offset += os.pwrite(fd, memoryview(zeros)[:min(ZERO_FILL_CHUNK_BYTES, end - offset)], offset)


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


class SegmentFiles:
    """The segment files of one open journal directory, checked at open, and what of them is mapped.

    `segments` has one entry per segment handed to the core: the Segment held (mapped, with its descriptor), an
    anonymous buffer (a reader's zero memory past the end of the files), or None: read from its file on demand
    (the core maps it; recovery uses the read maps). Held: the last existing segment at open, and from
    hold_from() on the segments being written and the room after them; the writer lets go of those it has
    written past once they are durable (let_go), so descriptors and mappings stay O(1) however many segments the
    journal has."""

    def __init__(self, journal_directory: str, *, readonly: bool, write_through: bool, records_log2: int,
                 inject: Callable[[str], None]) -> None:
        """Check the existing segment files (a writer, which holds the lock, also deletes unfinished creations);
        records_log2 is used for a new journal only: an existing one has its own."""
        self.journal_directory = journal_directory
        self.readonly = readonly
        self.write_through = write_through
        self.inject = inject
        self.segments: list[Segment | mmap.mmap | None] = []
        self.held_from = 0                    # segments from this index on are held when handed out
        self.read_maps: dict[int, mmap.mmap] = {}
        self.directory_fd: int | None = None  # the journal directory, for the core's segment_files
        self.preparing: threading.Thread | None = None
        self.prepared: tuple[int, Any] | None = None
        self.ready_through = 0                # segments up to this index are (being) made ready for writing
        self.ready_lock = threading.Lock()
        self.existing = self._existing_segments()
        self.records_log2 = records_log2
        if self.existing:
            self.records_log2 = self._read_header(0).records_log2
        self.records = 1 << self.records_log2
        self.segment_bytes = segment_bytes(self.records_log2)
        for index in range(self.existing - 1):  # the last one is checked (and mapped) as it is handed out
            self._check_segment_file(index)
        self.held_from = max(self.existing - 1, 0)
        assert _core.segment_file_name(12345) == segment_name(12345), "the core opens segments by this name"
        self.directory_fd = os.open(self.journal_directory, os.O_RDONLY | os.O_DIRECTORY)

    # -- opening --

    def path(self, index: int) -> str:
        """The file of segment `index`."""
        return os.path.join(self.journal_directory, segment_name(index))

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

    def _read_header(self, index: int) -> SegmentHeader:
        path = self.path(index)
        with open(path, "rb") as file:
            page = file.read(SEGMENT_HEADER_BYTES)
        return check_segment_header(page, path, index, self.records_log2 if index > 0 else None)

    def _check_segment_file(self, index: int) -> None:
        """A segment before the last one, left to be read from its file on demand: its header must pass and its
        size must be whole."""
        self._read_header(index)
        check_segment_size(self.path(index), os.stat(self.path(index)).st_size, self.records_log2, index)

    @property
    def existing_end_position(self) -> int:
        """The journal position where the segment files found at open end."""
        return self.existing << self.records_log2

    def location(self, position: int) -> tuple[str, int]:
        """The segment file and byte offset of a journal position."""
        offset = SEGMENT_HEADER_BYTES + (position & (self.records - 1)) * RECORD_SIZE
        return self.path(position >> self.records_log2), offset

    # -- mapping and creating --

    def map(self, index: int, populate: bool = True) -> Segment:
        """Map segment file `index` for this handle (after checking its header and size) and open its descriptor."""
        path = self.path(index)
        self._read_header(index)
        fd = os.open(path, os.O_RDONLY if self.readonly else os.O_RDWR)
        try:
            check_segment_size(path, os.fstat(fd).st_size, self.records_log2, index)
        except LedgerCorruptError:
            os.close(fd)
            raise
        # Read-only opens map copy-on-write: the core may build state in place, nothing reaches the file. So does a
        # write-through writer: its records reach the file by pwrite at commit (FileJournal.write).
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

    def create(self, index: int) -> Segment:
        """Preallocate, stamp and publish a new segment: temp file, fallocate, header, fsync, rename, dir fsync.
        No room for it (ENOSPC, EDQUOT while allocating): LedgerFullError, and the handle may go on (the batch
        that needed it was not applied). Any other failure: LedgerPoisonedError, which the journal turns into a
        poisoned handle: a failed sync is fatal, and what a failed fsync left behind cannot be known."""
        final = self.path(index)
        temporary = os.path.join(self.journal_directory, f".{segment_name(index)}.tmp")
        step = "creating"
        fd = None
        try:
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            step = "allocating"
            self.inject("allocate")
            os.posix_fallocate(fd, 0, self.segment_bytes)
            step = "writing the header of"
            header = SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, RECORD_SIZE, self.records_log2, 0, index,
                                         index << self.records_log2, time.time_ns())
            os.pwrite(fd, header + SEGMENT_HEADER_CHECKSUM.pack(_core.crc32c(header)), 0)
            step = "fsyncing"
            os.fsync(fd)
            step = "renaming into place"
            os.rename(temporary, final)
            step = "fsyncing the journal directory for"
            fsync_directory(self.journal_directory)
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
        return self.map(index, populate=False)

    def _prepare(self, index: int) -> None:
        """Background: create segment `index` ahead of need, so the writer never waits for fallocate, zeros,
        fsyncs and page population at a segment boundary. An error is kept and raised when the segment is needed."""
        try:
            # No zero fill here: writing 64 MiB of zeros competes with the journal's own syncs for the disk and
            # can outlast the segment before it (measured: 250-340 ms stalls of the ring writer on a slow disk).
            segment = self.create(index)
            populate_pages(segment.memory)  # page-cache pages (or private copies) now, not a fault per 4 KiB later
            self.prepared = (index, segment)
        except BaseException as error:  # noqa: BLE001 - handed to the writer thread in _take_prepared
            self.prepared = (index, error)

    def _take_prepared(self, index: int) -> Segment | None:
        if self.preparing is not None:
            self.preparing.join()
            self.preparing = None
        prepared, self.prepared = self.prepared, None
        if prepared is None or prepared[0] != index:
            return None
        if isinstance(prepared[1], BaseException):
            raise prepared[1]
        return prepared[1]

    def segment(self, index: int) -> memoryview | None:
        """The core's segment provider: existing segments in order, then new ones; None for a segment the core
        reads from its file on demand. An engine that replaces a discarded one (a snapshot that failed to load)
        gets the segments already handed out, and provide_segments gets those held since (hold_from). Creating a
        segment may raise LedgerFullError or LedgerPoisonedError (see create)."""
        if index < len(self.segments):
            return self.view(index)
        assert index == len(self.segments), "segments are handed out in order"
        if index < self.existing:
            if index < self.held_from:
                self.segments.append(None)
                return None
            segment = self.map(index)
            self.segments.append(segment)
            return segment.records
        if self.readonly:
            # A read-only handle never writes; give it private zero memory past the end of the files.
            buffer = anonymous_buffer(RECORD_SIZE << self.records_log2, populate=False)
            self.segments.append(buffer)
            return memoryview(buffer)
        # Under the lock that ready_after takes: the flusher (durability "os") must not start preparing the
        # segment this thread is creating (two creations of one file: writes into an unlinked one).
        with self.ready_lock:
            segment = self._take_prepared(index)
            if segment is None:
                segment = self.create(index)
                if index > 0:  # a first segment stays lazy: small ledgers (and tests) do not pay 64 MiB up front
                    populate_pages(segment.memory)
            self.segments.append(segment)
            self.ready_through = max(self.ready_through, index)
        if index > 0:
            self.ready_after(index)  # the ledger has outgrown one segment: from now on, keep the next one ready
        return segment.records

    def view(self, index: int) -> memoryview | None:
        """Segment `index` as handed to the core (for a second, read-only engine: verify); None if it is read
        from its file."""
        segment = self.segments[index]
        if segment is None:
            return None
        return segment.records if isinstance(segment, Segment) else memoryview(segment)

    def held(self, index: int) -> Segment | None:
        """The Segment held for segment `index` (mapped with its descriptor), or None."""
        segment = self.segments[index] if index < len(self.segments) else None
        return segment if isinstance(segment, Segment) else None

    def let_go(self, index: int) -> Callable[[], None]:
        """Stop holding segment `index` (reads come from its file from now on); returns what closes its mapping
        and descriptor, for the core to call once it has let go of the buffer."""
        segment = self.held(index)
        assert segment is not None, "only a held segment is let go of"
        self.segments[index] = None
        self.held_from = max(self.held_from, index + 1)
        return segment.close

    def hold_from(self, index: int) -> None:
        """Hold (map for writing) the existing segments from `index` on: the writer continues inside them. The
        core takes them with provide_segments(held_from)."""
        for held in range(index, min(self.held_from, len(self.segments))):
            if self.segments[held] is None:
                self.segments[held] = self.map(held)
        self.held_from = min(self.held_from, index)

    # -- keeping the next segment ready --

    def populate_room(self, write_position: int) -> None:
        """The mapped files reach past the write position (segments an earlier writer prepared ahead, or room
        reserved at creation): fault in the rest of the segment being written now, and have the next one ready in
        the background; the writer keeps one segment ahead ready from then on. Recovery mapped that room for
        reading, and each first write to a page would take a fault (a copy-on-write one with write-through) inside
        the core's loop: measured 2.1 ms instead of 0.9 ms for a batch of 16k transfers. A lone first segment
        stays lazy, as at creation: small ledgers (and tests) do not pay 64 MiB up front."""
        if len(self.segments) <= 1:
            return
        index = write_position >> self.records_log2
        segment = self.held(index)
        if segment is not None:
            first = SEGMENT_HEADER_BYTES + (write_position & (self.records - 1)) * RECORD_SIZE
            populate_pages(segment.memory, first, self.segment_bytes - first)
        self.ready_after(min(index, len(self.segments) - 1))  # at the very end of the files: the next new one

    def ready_after_writing(self, end: int) -> None:
        """The journal is written up to `end`: entered a segment that existed at open (new ones are readied by
        segment())? Ready the one after it."""
        index = (end - 1) >> self.records_log2
        if 1 <= index < len(self.segments) and index + 1 > self.ready_through:
            self.ready_after(index)

    def ready_after(self, index: int) -> None:
        """Have segment index + 1 ready for writing before the writer reaches it, in the background: an existing
        one faulted in, a new one created (and faulted in). At most one segment ahead: a large reserve left by an
        earlier writer costs memory only as the writer reaches it."""
        with self.ready_lock:  # the writer's thread, and the flusher's in durability "os"
            self._ready_after_locked(index)

    def _ready_after_locked(self, index: int) -> None:
        if index + 1 <= self.ready_through or self.readonly:
            return
        self.ready_through = index + 1
        if self.preparing is not None:
            self.preparing.join()  # the one before: done long ago (a segment's worth of writes)
            self.preparing = None
        if index + 1 < len(self.segments):
            segment = self.held(index + 1)
            if segment is None:
                return
            target, arguments = populate_pages, (segment.memory,)
        else:
            target, arguments = self._prepare, (index + 1,)
        self.preparing = threading.Thread(target=target, args=arguments, name="ledger-segment-prepare", daemon=True)
        self.preparing.start()

    # -- recovery's reads --

    def _segment_records(self, index: int) -> memoryview:
        """Segment `index`'s records: the held mapping, or a read-only one of the file kept among at most
        READ_MAPS_MAX (views of an unmapped one keep it alive until they go)."""
        held = self.view(index) if index < len(self.segments) else None
        if held is not None:
            return held
        memory = self.read_maps.pop(index, None)
        if memory is None:
            fd = os.open(self.path(index), os.O_RDONLY)
            try:
                memory = mmap.mmap(fd, self.segment_bytes, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            while len(self.read_maps) >= READ_MAPS_MAX:
                self._close_read_map(next(iter(self.read_maps)))
        self.read_maps[index] = memory   # newest last
        return memoryview(memory)[SEGMENT_HEADER_BYTES:]

    def _close_read_map(self, index: int) -> None:
        memory = self.read_maps.pop(index)
        try:
            memory.close()
        except BufferError:  # a view is still alive: the mapping goes when the last view does
            pass

    def record_view(self, position: int) -> np.ndarray:
        """The 64 bytes of the record at `position` (a uint8 view)."""
        records = self._segment_records(position >> self.records_log2)
        offset = (position & (self.records - 1)) * RECORD_SIZE
        return np.frombuffer(records, np.uint8, count=RECORD_SIZE, offset=offset)

    def chunks(self, start: int, end: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first position, uint64 view of shape (n, 8)) for [start, end), one chunk per segment."""
        position = start
        while position < end:
            segment_end = min(end, ((position >> self.records_log2) + 1) << self.records_log2)
            records = self._segment_records(position >> self.records_log2)
            first = (position & (self.records - 1)) * RECORD_SIZE
            yield position, np.frombuffer(records, np.uint64, count=(segment_end - position) * 8,
                                          offset=first).reshape(-1, 8)
            position = segment_end

    def words(self, start: int, end: int) -> Iterator[np.ndarray]:
        """The records [start, end) as uint64 (n, 8) views, one per segment."""
        return (words for _, words in self.chunks(start, end))

    # -- closing --

    def close_steps(self) -> list[Callable[[], None]]:
        """What close() runs, each step whatever an earlier one raised: the helper thread joined, every segment
        unmapped and closed, the read maps and the directory descriptor let go of."""
        steps: list[Callable[[], None]] = []
        if self.preparing is not None:
            steps.append(self.preparing.join)
        steps.append(self._close_prepared)
        steps += [segment.close for segment in self.segments if segment is not None]
        steps += [lambda index=index: self._close_read_map(index) for index in list(self.read_maps)]
        if self.directory_fd is not None:
            steps.append(self._close_directory)
        return steps

    def _close_directory(self) -> None:
        fd, self.directory_fd = self.directory_fd, None
        if fd is not None:
            os.close(fd)

    def _close_prepared(self) -> None:
        prepared, self.prepared = self.prepared, None
        if prepared is not None and isinstance(prepared[1], Segment):
            prepared[1].close()  # created ahead and never used: an empty segment file, valid on reopen

    def forget(self) -> None:
        """After close_steps ran: nothing is held any more."""
        self.preparing = None
        self.segments = []
