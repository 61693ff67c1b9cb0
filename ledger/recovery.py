"""What opening a journal decides about where replay stopped, and the durable mark it decides it with
(docs/FORMAT.md, "The durable mark" and "Recovery").

The core replays the journal and says why it stopped (a REPLAY_* reason). Recovery.recover_tail judges that stop:
the clean end, a torn tail (the last writes cut short: zeroed and synced, reported by torn_tail_report), or
corruption (LedgerCorruptError naming the file, byte offset and position; nothing on disk changed). DurableMark is
`<dir>/journal/DURABLE`: where batches may stop being durable. An "os" writer keeps it at the end of what its
flusher has synced, so after a machine crash anything failing at or past it is a torn tail, even with intact
batches after it (writeback order is arbitrary). STRICT: every batch was synced before the next was written
("fsync" mode), so only the last batch can be torn and a failure with a committed batch after it is corruption.
No file (journals written before it existed), or a damaged one: STRICT."""
from __future__ import annotations

import datetime
import fcntl
import logging
import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from ledger import _core
from ledger.errors import LedgerCorruptError, LedgerLockedError
from ledger.format import (
    COMMIT_MAGIC,
    COMMIT_WORD_OFFSET,
    DURABLE_NAME,
    DURABLE_RECORD,
    DURABLE_STRICT,
    FORMAT_VERSION,
    KIND_HEADER,
    RECORD_SIZE,
    REPLAY_CHAIN,
    REPLAY_END,
    REPLAY_INTEGRITY,
    REPLAY_REASONS,
    SEGMENT_HEADER_BYTES,
    SEGMENT_RECORDS_LOG2_MIN,
    WORD_A,
    WORD_CHECKSUM,
    WORD_COMMIT,
    WORD_COUNT,
    WORD_PREVIOUS_CHECKSUM,
    WORD_TIMESTAMP,
    batch_checksum,
    check_segment_header,
    committed_batch_in,
    header_problem,
    segment_name,
)
from ledger.segments import SegmentFiles, fsync_directory, write_zeros
from ledger.snapshot import list_snapshots, snapshot_directory

__all__ = ["DurableMark", "Recovery", "drop_batches_from"]


class DurableMark:
    """The file `<dir>/journal/DURABLE`: 16 bytes, the position from which batches may not be on disk yet."""

    def __init__(self, journal_directory: str) -> None:
        self.path = os.path.join(journal_directory, DURABLE_NAME)
        self._fd: int | None = None

    def read(self) -> int:
        """The position from which batches may not have been synced (DURABLE_STRICT: none may be missing but the
        last). A damaged mark file counts as STRICT: the safe reading, which never drops a synced batch."""
        try:
            with open(self.path, "rb") as file:
                raw = file.read(DURABLE_RECORD.size)
        except FileNotFoundError:
            return DURABLE_STRICT
        if len(raw) != DURABLE_RECORD.size:
            return DURABLE_STRICT
        position, version, checksum = DURABLE_RECORD.unpack(raw)
        if version != FORMAT_VERSION or checksum != _core.crc32c(raw[:12]):
            return DURABLE_STRICT
        return position

    def set(self, position: int) -> None:
        """Persist the mark (pwrite + fdatasync; the file and its directory entry are synced when created)."""
        assert 0 <= position <= DURABLE_STRICT
        if self._fd is None:
            created = not os.path.exists(self.path)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            if created:
                os.fsync(self._fd)
                fsync_directory(os.path.dirname(self.path))
        position &= DURABLE_STRICT
        checksum = _core.crc32c(DURABLE_RECORD.pack(position, FORMAT_VERSION, 0)[:12])
        os.pwrite(self._fd, DURABLE_RECORD.pack(position, FORMAT_VERSION, checksum), 0)
        os.fdatasync(self._fd)

    def close(self) -> None:
        """Close the file's descriptor, if it was opened."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _cut_short(path: str, offset: int, position: int, mark: int) -> LedgerCorruptError:
    """The journal ends before the durable mark: batches known to be durable are gone."""
    return LedgerCorruptError(f"journal cut short in {path} at byte offset {offset}, journal position {position}: "
                              f"it ends there, but batches up to position {mark} were durable (journal/DURABLE); "
                              f"nothing was changed on disk")


class Recovery:
    """Judges where replay stopped, zeroes a torn tail (a writer only), and says what it did.

    write_range(start, end) copies records [start, end) of the held mappings into the files (write-through), and
    sync(start, end) makes them durable: the journal's own, so that zeroing a torn tail reaches the disk the way
    a batch does."""

    def __init__(self, files: SegmentFiles, mark: DurableMark, directory: str, *, readonly: bool,
                 write_through: bool, write_range: Callable[[int, int], None],
                 sync: Callable[[int, int], None]) -> None:
        self.files = files
        self.mark = mark
        self.directory = directory
        self.readonly = readonly
        self.write_through = write_through
        self._write_range = write_range
        self._sync = sync
        self.torn_records_zeroed = 0
        self.torn_at: int | None = None        # where recovery found the torn tail it zeroed
        self.torn_mark = DURABLE_STRICT        # the durable mark it was judged against (what is known of it)

    def records_end(self, start: int) -> int:
        """Where the journal's records end (at or after `start`), for a progress bar's total: the segment files are
        preallocated, so their end overstates it by up to two segments (the last one and the one prepared next).
        Every record is non-zero (an event or a batch header) and the preallocated rest is zero, so a binary search
        finds the end in about 25 record reads. A torn or damaged tail can mislead it: only for display."""
        low, high = max(start, 1), self.files.existing_end_position  # position 0 is never written
        while low < high:
            middle = (low + high) // 2
            if self.files.record_view(middle).any():
                low = middle + 1
            else:
                high = middle
        return low

    def recover_tail(self, reason: int, position: int, mapped_end: int) -> int:
        """Classify what stopped replay at `position`. If it is at or past the durable mark (an "os" writer's
        unsynced batches), or no committed batch follows, it is the torn tail of the last writes: zero it (returns
        the records zeroed). Otherwise it is corruption: raise without changing the disk. A hash-chain or integrity
        failure has valid checksums, so it is never a torn write."""
        window_end = min(mapped_end, position + 2 + _core.EXPIRE_BATCH_MAX + (1 << 23))
        reason_name = REPLAY_REASONS[reason]
        if reason in (REPLAY_CHAIN, REPLAY_INTEGRITY):
            raise self.corrupt(position, reason_name)
        mark = self.mark.read()
        if mark != DURABLE_STRICT and position < mark and self._mark_is_settled(mark, mapped_end):
            # Everything before the mark was synced before the mark was written: what fails there is damage to
            # acknowledged batches (bit rot, a cut file), never a torn write, even with nothing after it.
            if reason == REPLAY_END:
                raise _cut_short(*self.files.location(position), position, mark)
            raise self.corrupt(position, f"{reason_name}, before the durable mark {mark}")
        unsynced = position >= mark
        if not unsynced and committed_batch_in(self.files.chunks(position + 1, window_end), self.files.words,
                                               mapped_end) is not None:
            raise self.corrupt(position, reason_name)
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
            self.torn_mark = mark
        self.torn_records_zeroed = torn_end - position
        return self.torn_records_zeroed

    def torn_tail_report(self) -> str | None:
        """One line on the torn tail recovery zeroed, or None if there was none."""
        if not self.torn_records_zeroed or self.torn_at is None:
            return None
        path, offset = self.files.location(self.torn_at)
        if self.torn_mark == DURABLE_STRICT:
            # Only the last batch can be torn, and each call returned only after its batch was synced.
            known = ('the last batch, which was being committed when the writer stopped: in "fsync" mode a call '
                     'returns only once its batch is synced, so it was not acknowledged (unless the file was '
                     'damaged after that sync, which recovery cannot tell from a torn write)')
        else:
            known = (f'at or past the durable mark (journal position {self.torn_mark}), which an "os" mode '
                     f'writer had not synced yet: that mode acknowledges a batch once it is in the page cache, so '
                     f'these may be acknowledged batches lost by a machine crash, or the batch the writer was '
                     f'applying when it stopped; every batch before the mark is kept')
        return (f"ledger: recovery zeroed a torn tail of {self.torn_records_zeroed} records from journal position "
                f"{self.torn_at} ({path}, byte offset {offset}): {known}")

    def corrupt(self, position: int, reason: str) -> LedgerCorruptError:
        """The error for a committed batch before the tail that fails its check at `position`."""
        path, offset = self.files.location(position)
        return LedgerCorruptError(f"journal corrupt ({reason}) in {path} at byte offset {offset}, journal position "
                                  f"{position}: a committed batch before the tail fails its check; nothing was "
                                  f"changed on disk")

    def damaged(self, position: int, header_position: int, reason: str) -> LedgerCorruptError:
        """The error for a damaged record found when read (Engine.damage_error): a record from before the position
        the ledger was opened from, which replay did not check, fails its batch's check."""
        path, offset = self.files.location(position)
        return LedgerCorruptError(f"journal corrupt ({reason}) in {path} at byte offset {offset}, journal position "
                                  f"{position}: a committed record read from before the snapshot this ledger was "
                                  f"opened from fails its check; nothing was changed (`ledger scrub` lists every "
                                  f"damaged batch)")

    # -- the torn tail --

    def _last_nonzero(self, start: int, end: int) -> int:
        """The position after the last non-zero record in [start, end), or `start` if all are zero."""
        last = start
        for first, words in self.files.chunks(start, end):
            nonzero = np.flatnonzero(words.any(axis=1))
            if nonzero.size:
                last = first + int(nonzero[-1]) + 1
        return last

    def _zero(self, start: int, end: int) -> None:
        self._zero_unheld(start, end)
        for first, words in self.files.chunks(start, end):
            if self.files.view(first >> self.files.records_log2) is None:
                continue
            words[:] = 0
            if self.write_through:  # the mapping is private: the zeros must reach the file too
                self._write_range(first, first + words.shape[0])
        self._sync(start, end)

    def _zero_unheld(self, start: int, end: int) -> None:
        """_zero for the segments in [start, end) that are not held (read from their files): zeros written to
        the files directly and synced."""
        files = self.files
        position = start
        while position < end:
            index = position >> files.records_log2
            segment_end = min(end, (index + 1) << files.records_log2)
            if index >= len(files.segments) or files.segments[index] is None:
                _, offset = files.location(position)
                fd = os.open(files.path(index), os.O_RDWR)
                try:
                    write_zeros(fd, offset, offset + (segment_end - position) * RECORD_SIZE)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            position = segment_end

    # -- the durable mark --

    def _mark_is_settled(self, mark: int, mapped_end: int) -> bool:
        """Whether the durable mark can be held against what this handle read: always for the writer (it holds the
        lock). For a reader only if no writer holds the lock now and the reader's mapping reaches the mark: beside
        a live "os" writer the mark moves past batches the reader saw half-written a moment earlier, and a writer
        that finished meanwhile may have written past the segment files the reader found at open. (A stop that
        moves when the reader replays again is not judged at all: store.replay_and_recover.)"""
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


# -- dropping batches (a step-down primary: docs/FORMAT.md, "Dropping batches") --

DROP_LOGGER = logging.getLogger("ledger")
DROP_READ_RECORDS_MAX = 1 << 16   # records read per pread while checking or scanning: 4 MiB of memory at most

# Tests only: called with a step name before each write of drop_batches_from ("snapshot", "mark", "commit",
# "zero", "segment"); killing the process there lands a crash exactly between two of its steps.
drop_fault_injector: Callable[[str], None] | None = None


def _drop_step(name: str) -> None:
    if drop_fault_injector is not None:
        drop_fault_injector(name)


class _ClosedJournal:
    """The segment files of a closed journal, read and written with pread/pwrite (nothing mapped): what
    drop_batches_from needs, without the open-time checks and mappings of SegmentFiles."""

    def __init__(self, journal_directory: str) -> None:
        self.journal_directory = journal_directory
        names = sorted(name for name in os.listdir(journal_directory) if name.endswith(".segment"))
        for index, name in enumerate(names):
            if name != segment_name(index):
                raise LedgerCorruptError(f"journal segments are not contiguous in {journal_directory}: "
                                         f"expected {segment_name(index)}, found {name}")
        self.count = len(names)
        self._fds: dict[int, int] = {}
        self.records_log2 = SEGMENT_RECORDS_LOG2_MIN
        if self.count:
            page = os.pread(self.fd(0), SEGMENT_HEADER_BYTES, 0)
            self.records_log2 = check_segment_header(page, self.path(0), 0).records_log2
        self.end = self.count << self.records_log2     # where the segment files end

    def path(self, index: int) -> str:
        return os.path.join(self.journal_directory, segment_name(index))

    def fd(self, index: int) -> int:
        if index not in self._fds:
            self._fds[index] = os.open(self.path(index), os.O_RDWR)
        return self._fds[index]

    def offset(self, position: int) -> int:
        return SEGMENT_HEADER_BYTES + (position & ((1 << self.records_log2) - 1)) * RECORD_SIZE

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first position, uint64 (n, 8) records) for [start, end), read in pieces within one segment each."""
        assert 0 <= start <= end <= self.end
        position = start
        while position < end:
            segment_end = ((position >> self.records_log2) + 1) << self.records_log2
            piece_end = min(end, segment_end, position + DROP_READ_RECORDS_MAX)
            raw = os.pread(self.fd(position >> self.records_log2), (piece_end - position) * RECORD_SIZE,
                           self.offset(position))
            if len(raw) != (piece_end - position) * RECORD_SIZE:
                raise LedgerCorruptError(f"{self.path(position >> self.records_log2)}: segment file cut short at "
                                         f"journal position {position}; nothing was changed on disk")
            yield position, np.frombuffer(raw, np.uint64).reshape(-1, 8)
            position = piece_end

    def record(self, position: int) -> list[int] | None:
        """The eight words of the record at `position`, or None past the segment files."""
        if not 0 <= position < self.end:
            return None
        return next(self.pieces(position, position + 1))[1][0].tolist()

    def committed(self, position: int, previous_checksum: int | None) -> tuple[int, int] | None:
        """(end, checksum) of the committed batch whose header is at `position` (well formed, its commit word,
        its checksum over its events, chained to `previous_checksum` unless None), or None."""
        fields = self.record(position)
        if fields is None or header_problem(position, fields) is not None:
            return None
        end = position + 1 + fields[WORD_COUNT]
        if fields[WORD_COMMIT] >> 32 != COMMIT_MAGIC or end > self.end:
            return None
        if previous_checksum is not None and fields[WORD_PREVIOUS_CHECKSUM] != previous_checksum:
            return None
        crc = batch_checksum(np.array(fields, np.uint64), (words for _, words in self.pieces(position + 1, end)))
        if crc != fields[WORD_CHECKSUM] or crc != fields[WORD_COMMIT] & 0xFFFFFFFF:
            return None
        return end, crc

    def last_nonzero(self, start: int) -> int:
        """The position after the last non-zero record from `start` to the end of the files (`start` if none)."""
        last = start
        for first, words in self.pieces(min(start, self.end), self.end):
            nonzero = np.flatnonzero(words.any(axis=1))
            if nonzero.size:
                last = first + int(nonzero[-1]) + 1
        return last

    def zero_commit_word(self, position: int) -> None:
        os.pwrite(self.fd(position >> self.records_log2), bytes(8), self.offset(position) + COMMIT_WORD_OFFSET)

    def zero(self, start: int, end: int) -> None:
        """Write zeros over records [start, end), one segment at a time from the last, each synced."""
        position = end
        while position > start:
            index = (position - 1) >> self.records_log2
            first = max(start, index << self.records_log2)
            _drop_step("zero")
            write_zeros(self.fd(index), self.offset(first), self.offset(first) + (position - first) * RECORD_SIZE)
            os.fdatasync(self.fd(index))
            position = first

    def sync(self, indexes: Iterable[int]) -> None:
        for index in indexes:
            os.fdatasync(self.fd(index))

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def _take_writer_lock(directory: str) -> int:
    """The exclusive flock on `<dir>/LOCK` that FileJournal takes: a drop runs only on a closed ledger."""
    path = os.path.join(directory, "LOCK")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LedgerLockedError(f"{directory} is open for writing (lock held on {path}): close the ledger before "
                                f"dropping batches from it") from None
    return fd


def _not_a_boundary(journal: _ClosedJournal, position: int, why: str) -> ValueError:
    return ValueError(f"cannot drop batches from journal position {position} of {journal.journal_directory}: it is "
                      f"not the header position of a committed batch nor the journal's write position ({why})")


def _checksum_before(journal: _ClosedJournal, position: int) -> int:
    """The checksum of the committed batch that ends exactly at `position` (0 for position 1), found from the
    offset in its batch of the record before it; ValueError if there is none (a position inside a batch, past
    the end, or after a batch that fails its checks)."""
    if position == 1:
        return 0
    before = journal.record(position - 1)
    if before is None or not any(before):
        raise _not_a_boundary(journal, position, "the record before it is empty or past the segment files")
    if before[WORD_A] >> 56 == KIND_HEADER:
        raise _not_a_boundary(journal, position, f"it is inside the batch whose header is at {position - 1}")
    header = position - 1 - (before[WORD_COMMIT] >> 40)   # an event's word B: bits 40..63 its offset in the batch
    found = journal.committed(header, None) if header >= 1 else None
    if found is None or found[0] != position:
        raise _not_a_boundary(journal, position, f"the record before it is not the last event of a committed batch")
    return found[1]


def _batches_from(journal: _ClosedJournal, position: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """The committed batches from `position` on, chained from the one before it: (header, end, count,
    timestamp) each, and where they end (the journal's committed end)."""
    previous = _checksum_before(journal, position)
    batches = []
    at = position
    while (found := journal.committed(at, previous)) is not None:
        fields = journal.record(at)
        assert fields is not None
        batches.append((at, found[0], fields[WORD_COUNT], fields[WORD_TIMESTAMP]))
        at, previous = found
    return batches, at


def _remove_snapshots_after(directory: str, position: int) -> None:
    """Snapshots past `position` hold the effects of batches being dropped: gone before any batch is."""
    removed = False
    for snapshot_position, path in list_snapshots(directory):
        if snapshot_position > position:
            _drop_step("snapshot")
            os.unlink(path)
            removed = True
    if removed:
        fsync_directory(snapshot_directory(directory))


def _remove_segments_after(journal: _ClosedJournal, position: int) -> None:
    """Delete the segment files that hold no record before `position`, the last first (the files stay numbered
    without gaps at every step); segment 0 always stays (it says the journal's segment size)."""
    keep = max(1, ((position - 1) >> journal.records_log2) + 1)
    for index in range(journal.count - 1, keep - 1, -1):
        _drop_step("segment")
        os.unlink(journal.path(index))
        fsync_directory(journal.journal_directory)


def _lower_mark(journal: _ClosedJournal, mark: DurableMark, position: int) -> None:
    """Set the durable mark to `position` unless it is already at or before it (not strict). Everything before
    `position` is synced first, so that the mark's promise holds (every batch before it is on disk); then a
    failure anywhere at or past `position` reads as a torn tail, whatever a crash left of the drop."""
    current = mark.read()
    if current != DURABLE_STRICT and current <= position:
        return
    journal.sync(range(min(journal.count, ((position - 1) >> journal.records_log2) + 1)))
    _drop_step("mark")
    mark.set(position)


def _log_dropped(directory: str, batches: list[tuple[int, int, int, int]]) -> None:
    for header, end, count, timestamp in batches:
        when = datetime.datetime.fromtimestamp(timestamp / 1e9, datetime.timezone.utc).isoformat()
        DROP_LOGGER.warning("ledger: dropping batch [%d, %d) of %s: %d events, timestamp %d ns (%s); the stream "
                            "does not hold it, so it was never acknowledged", header, end, directory, count,
                            timestamp, when)


def drop_batches_from(directory: str, position: int) -> list[tuple[int, int]]:
    """Remove every batch of the closed ledger in `directory` whose header is at or after journal position
    `position`, and return their [(header position, end)] in journal order (each logged at WARNING on the
    "ledger" logger). What a primary that lost its lease does with the batches the stream does not hold: they
    were never acknowledged. Afterwards the ledger opens at write position `position`, chained to the batch
    before it. `position` must be the header position of a committed batch or the journal's write position
    (then nothing is dropped): anything else is ValueError, before anything is changed. Takes the writer lock
    (LedgerLockedError while the ledger is open for writing).

    The steps, in order: the snapshots after `position` are deleted (they hold the dropped batches' effects);
    the durable mark is set to `position` if it is strict or past it (after syncing the records before it);
    the commit words of the dropped batches are zeroed, the last batch first, and synced; their records (and
    any torn remains after them) are zeroed, the last segment first, each synced; segment files that then hold
    nothing are deleted, the last first (segment 0 always stays).

    Why a crash (of the process or of the machine) at any point leaves a journal that opens, with a committed
    end at or before where it was and at or after `position`, and a next call that finishes the job: nothing
    before `position` is written. A snapshot is gone before its batches are, and one that survived a crash
    only matches batches still committed (else open skips it). Once the mark is at `position`, recovery reads
    every failure at or past it as a torn tail and zeroes from there, even with a committed batch after the
    gap (the disk may write pages back in any order), so no write order of the later steps can make it
    corruption; and for a crash of the process alone the order itself keeps the invariant: commit words go
    last batch first, so at every step the committed batches are a prefix of those the journal had. Deleted
    segments hold only zeros and go from the last, so the files stay numbered without gaps. Open the ledger
    for writing only after a call returned: a writer opened after a crashed drop reopens at the end of the
    batches still committed, and a later drop from `position` must drop whatever it wrote after them."""
    directory = os.fspath(directory)
    if isinstance(position, bool) or not isinstance(position, int) or position < 1:
        raise ValueError(f"position must be a journal position (an int >= 1), got {position!r}")
    lock_fd = _take_writer_lock(directory)
    journal_directory = os.path.join(directory, "journal")
    mark = DurableMark(journal_directory)
    journal: _ClosedJournal | None = None
    try:
        journal = _ClosedJournal(journal_directory)
        batches, committed_end = _batches_from(journal, position)
        tail_end = journal.last_nonzero(committed_end)
        _log_dropped(directory, batches)
        _remove_snapshots_after(directory, position)
        if tail_end > position:
            _lower_mark(journal, mark, position)
        elif mark.read() != DURABLE_STRICT and mark.read() > position:
            _lower_mark(journal, mark, position)
        for header, _, _, _ in reversed(batches):
            _drop_step("commit")
            journal.zero_commit_word(header)
        journal.sync(sorted({header >> journal.records_log2 for header, _, _, _ in batches}))
        journal.zero(position, tail_end)
        _remove_segments_after(journal, position)
        return [(header, end) for header, end, _, _ in batches]
    finally:
        mark.close()
        if journal is not None:
            journal.close()
        os.close(lock_fd)
