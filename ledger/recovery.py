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

import fcntl
import os
from collections.abc import Callable

import numpy as np

from ledger import _core
from ledger.errors import LedgerCorruptError
from ledger.format import (
    DURABLE_NAME,
    DURABLE_RECORD,
    DURABLE_STRICT,
    FORMAT_VERSION,
    RECORD_SIZE,
    REPLAY_CHAIN,
    REPLAY_END,
    REPLAY_INTEGRITY,
    REPLAY_REASONS,
    committed_batch_in,
)
from ledger.segments import SegmentFiles, fsync_directory, write_zeros

__all__ = ["DurableMark", "Recovery"]


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
