"""The read side: follow the committed events of a ledger that another process writes, straight from its journal.

    tailer = ledger.tail("data", from_position=stored_position)        # an iterator of numpy batches
    for events in tailer:                                               # EVENT_DTYPE arrays, whole batches only
        handle(events)
        store(tailer.position, tailer.checksum)                         # where to resume, and the chain anchor

    ledger.tail("data", stored_position, callback=handle, stop=stop_event)   # the same, calling back

How it reads (docs/FORMAT.md): the segment files are mapped read-only (`mmap.ACCESS_READ`), a view of the page
cache the writer's batches reach the moment it commits them. How they get there depends on the writer: with
`durability="os"` it writes into a shared mapping of the files and stores the header's commit word last, with a
release store; with `durability="fsync"` (and `ledger serve`, by default) it writes into a private mapping and
copies each committed batch into the files with pwrite, the events first and the header (with its commit word)
last, then fdatasyncs. Either way the commit word reaches the page cache after the events it seals. A batch is
yielded only when all of these hold, in this order:
- its header's commit word is present (whatever it seals is complete when it can be seen; the tailer reads it
  before anything else of the batch);
- the header is well formed (magic, version, its own position, a count in range);
- the CRC32C over its event records and header bytes 0..39 equals both the header checksum and the commit word;
- its `previous_checksum` equals the checksum of the batch before (the hash chain);
- every event has a known kind and its offset in the batch (integrity checks that cost nothing).

A header slot without the commit word is a batch being written (or the torn tail of a writer that died): the
tailer waits and polls again, it never yields it. A committed-looking header whose checksum or shape fails is
judged the way recovery judges it: if a batch with a valid checksum follows it (within the largest possible
batch), it is corruption and `LedgerCorruptError` names the file, byte offset and position; otherwise it is a
torn tail (a crash of the machine can persist the commit word without all the events), which the writer's next
open zeroes: the tailer waits there as at any other uncommitted header. A hash-chain or integrity failure has a
valid checksum, so it is always corruption.

Positions. A tailer starts at `from_position`: 0 or 1 (the first batch header), or the position of a batch
header, which is what `Tailer.position` reports after each yield (the position after the last event yielded).
Anything else is refused with ValueError: a position inside a batch (batches are atomic, so a reader never starts
half-way through one; the message names both boundaries) or past the committed end. Resuming checks the batch
that ends at `from_position` (its commit word and checksum), and with `previous_checksum=` also that it is the
batch the caller stored (`Tailer.checksum`): a restored or different journal is refused instead of being
silently appended to a read model built from another one.

What is yielded: `ledger._core.EVENT_DTYPE` arrays (position, timestamp, id, debit_account, credit_account,
amount, user_data, aux, previous_debit_position, previous_credit_position, code, kind, linked), decoded with numpy
from the 64-byte records; timestamp = the batch's base timestamp + offset - 1. Each array holds one or more whole
batches and at most `max_events` events, except that a single batch larger than `max_events` is yielded whole
(batches are never split, so a consumer that stores `Tailer.position` with what it derived from an array never
stores a position inside a batch). ACCOUNT events carry the account fields as the journal does (ledger in the
low 32 bits of debit_account, flags in bits 32..47, min_balance in amount, max_balance in aux).

Durability: the tailer sees what the writer committed to the page cache. With `durability="fsync"` a batch is
yielded at most one fdatasync before the writer's call returns; a crash of the *machine* in that window can lose a
batch the tailer already yielded (a crash of the writer process cannot). A read model that must never run ahead of
durable data should resume with `previous_checksum=`: after such a loss the stored position is past the end or its
checksum differs, and the tailer refuses to continue rather than miscount.
"""
from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ledger import _core
from ledger.errors import LedgerCorruptError
from ledger.format import (
    BATCH_EVENTS_MAX,
    COMMIT_MAGIC,
    COMMIT_WORD,
    COMMIT_WORD_OFFSET,
    HEADER_MAGIC_VERSION,
    HEADER_WORD_A,
    HEADER_WORDS,
    KIND_ACCOUNT,
    KIND_EXPIRE,
    KIND_HEADER,
    KIND_LINKED,
    KIND_MASK,
    POSITION_BITS,
    POSITION_MASK,
    RECORD_SIZE,
    SEGMENT_HEADER_BYTES,
    WORD_A,
    WORD_CHECKSUM,
    WORD_COMMIT,
    WORD_COUNT,
    WORD_MAGIC_VERSION,
    WORD_POSITION,
    WORD_PREVIOUS_CHECKSUM,
    WORD_TIMESTAMP,
    batch_checksum,
    check_segment_header,
    check_segment_size,
    committed_batch_in,
    header_problem,
    segment_name,
)

__all__ = [
    "EVENT_DTYPE",
    "Tailer",
    "decode_records",
    "tail",
]

EVENT_DTYPE = _core.EVENT_DTYPE

INTERVAL_MS_DEFAULT = 5
INTERVAL_MS_MIN = 1
INTERVAL_MS_MAX = 60_000
IDLE_TIMEOUT_MS_MAX = 7 * 24 * 3600 * 1000      # a week: beyond that, pass None (wait for ever)
MAX_EVENTS_DEFAULT = 1 << 16
MAX_EVENTS_LIMIT = 1 << 24                      # ~1.6 GB of decoded events per array at most

# How far recovery looks for a committed batch past a failing header (journal.recover_tail): the largest batch.
SEGMENTS_MAPPED_MAX = _core.SEGMENTS_MAPPED_MAX   # segment files mapped at once by a reader
TORN_WINDOW_RECORDS = 2 + _core.EXPIRE_BATCH_MAX + (1 << 23)


class _SegmentFiles:
    """The journal's segment files, mapped read-only on demand and unmapped once the reader has passed them."""

    def __init__(self, journal_directory: str) -> None:
        self.journal_directory = journal_directory
        self.records_log2: int | None = None     # known once segment 0 exists
        # index -> (mapping, its records as uint64 (records, 8), its records as bytes)
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray, memoryview]] = {}

    def _path(self, index: int) -> str:
        return os.path.join(self.journal_directory, segment_name(index))

    def words(self, index: int) -> np.ndarray | None:
        """Segment `index`'s records as a read-only uint64 (records, 8) array, or None if the file does not exist
        yet (the writer publishes a segment by renaming it into place, complete and stamped)."""
        mapped = self._maps.get(index)
        if mapped is not None:
            return mapped[1]
        path = self._path(index)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            page = os.pread(fd, SEGMENT_HEADER_BYTES, 0)
            # The same checks the writer makes when it opens the journal.
            records_log2 = check_segment_header(page, path, index, self.records_log2).records_log2
            check_segment_size(path, size, records_log2, index)
            memory = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        if self.records_log2 is None:
            self.records_log2 = records_log2
        words = np.frombuffer(memory, np.uint64, offset=SEGMENT_HEADER_BYTES).reshape(-1, 8)
        while len(self._maps) >= SEGMENTS_MAPPED_MAX:
            # The oldest first, dropped rather than closed: a view still held (the poll loop's bytes) keeps its
            # mapping alive until it goes, then the mapping goes with it.
            del self._maps[next(iter(self._maps))]
        self._maps[index] = (memory, words, memoryview(memory)[SEGMENT_HEADER_BYTES:])
        return words

    def bytes(self, index: int) -> memoryview | None:
        """Segment `index`'s records as bytes (slicing a memoryview is the cheapest way to hand a range to
        crc32c and struct), or None if the file does not exist yet."""
        mapped = self._maps.get(index)
        if mapped is None:
            if self.words(index) is None:
                return None
            mapped = self._maps[index]
        return mapped[2]

    def known(self) -> bool:
        """Whether the segment size is known (segment 0 exists), mapping segment 0 to learn it."""
        if self.records_log2 is None:
            self.words(0)
        return self.records_log2 is not None

    def record(self, position: int) -> np.ndarray | None:
        """The 8 words of the record at `position` (a view), or None if its segment does not exist yet."""
        if self.records_log2 is None and not self.known():
            return None
        words = self.words(position >> self.records_log2)
        if words is None:
            return None
        return words[position & ((1 << self.records_log2) - 1)]

    def each_records(self, start: int, end: int):
        """records(), one segment's view at a time (so a long range never holds more than the mapping bound);
        stops early at a segment that does not exist."""
        assert self.records_log2 is not None and start <= end
        position = start
        while position < end:
            index = position >> self.records_log2
            segment_end = min(end, (index + 1) << self.records_log2)
            words = self.words(index)
            if words is None:
                return
            first = position - (index << self.records_log2)
            yield words[first:first + segment_end - position]
            position = segment_end

    def each_chunk(self, start: int, end: int):
        """each_records() with the position of each view's first record: (position, view)."""
        position = start
        for words in self.each_records(start, end):
            yield position, words
            position += words.shape[0]

    def records(self, start: int, end: int) -> list[np.ndarray] | None:
        """Views of the records [start, end), one per segment touched; None if a segment does not exist."""
        chunks = list(self.each_records(start, end))
        return chunks if sum(chunk.shape[0] for chunk in chunks) == end - start else None

    def last_existing(self, from_index: int) -> int:
        """The index of the last segment file that exists, counting up from `from_index` (which must exist)."""
        index = from_index
        while index + 1 in self._maps or os.path.exists(self._path(index + 1)):
            index += 1
        return index

    def location(self, position: int) -> tuple[str, int]:
        """(file, byte offset) of a journal position, for error messages."""
        records_log2 = self.records_log2 or 0
        offset = SEGMENT_HEADER_BYTES + (position & ((1 << records_log2) - 1)) * RECORD_SIZE
        return self._path(position >> records_log2), offset

    def release_before(self, index: int) -> None:
        """Unmap the segments before `index`: a reader never goes back."""
        for old in [old for old in self._maps if old < index]:
            self._close(old)

    def _close(self, index: int) -> None:
        memory, words, records = self._maps.pop(index)
        del words
        records.release()
        try:
            memory.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes when the last view does
            pass

    def close(self) -> None:
        for index in list(self._maps):
            self._close(index)


def decode_records(words: np.ndarray, header_positions: np.ndarray, timestamps: np.ndarray,
                   counts: np.ndarray) -> np.ndarray:
    """Decode event records (uint64 (n, 8), the concatenated events of whole batches) into EVENT_DTYPE.
    header_positions, timestamps, counts: one entry per batch, in order; counts must add up to n.
    Raises ValueError if an event's kind or offset in its batch is not what the batch layout says."""
    total = words.shape[0]
    assert words.ndim == 2 and words.shape[1] == 8 and int(counts.sum()) == total
    word_a = words[:, 6]
    word_b = words[:, 7]
    offsets = word_b >> np.uint64(POSITION_BITS)
    # The expected offset of each event: 1, 2, ... restarting at every batch.
    batch_first_index = np.repeat(np.cumsum(counts) - counts, counts)
    expected = np.arange(1, total + 1, dtype=np.uint64) - batch_first_index.astype(np.uint64)
    if not np.array_equal(offsets, expected):
        bad = int(np.flatnonzero(offsets != expected)[0])
        raise ValueError(f"event {bad} of the batches read has offset {int(offsets[bad])}, expected "
                         f"{int(expected[bad])}")
    kind_byte = word_a >> np.uint64(56)
    kind = kind_byte & np.uint64(KIND_MASK)
    if total and (int(kind.min()) < KIND_ACCOUNT or int(kind.max()) > KIND_EXPIRE):
        bad = int(np.flatnonzero((kind < KIND_ACCOUNT) | (kind > KIND_EXPIRE))[0])
        raise ValueError(f"event {bad} of the batches read has kind {int(kind[bad])}")
    out = np.empty(total, EVENT_DTYPE)
    out["position"] = np.repeat(header_positions.astype(np.uint64), counts) + offsets
    out["timestamp"] = np.repeat(timestamps.astype(np.uint64), counts) + offsets - np.uint64(1)
    out["id"] = words[:, 0]
    out["debit_account"] = words[:, 1]
    out["credit_account"] = words[:, 2]
    out["amount"] = words[:, 3].view(np.int64)
    out["user_data"] = words[:, 4]
    out["aux"] = words[:, 5]
    out["previous_debit_position"] = word_a & np.uint64(POSITION_MASK)
    out["previous_credit_position"] = word_b & np.uint64(POSITION_MASK)
    out["code"] = (word_a >> np.uint64(POSITION_BITS)) & np.uint64(0xFFFF)
    out["kind"] = kind
    out["linked"] = (kind_byte & np.uint64(KIND_LINKED)) != 0
    return out


def _bounded(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


class Tailer:
    """Committed events of the ledger in `directory`, read from its journal files while another process writes.

    Iterate it (or call `poll()`, which never waits) for EVENT_DTYPE arrays of whole batches. After each array,
    `position` is where to resume (the next batch header) and `checksum` the checksum of the last batch read:
    store both with whatever was derived from the array, and pass them back as `from_position` and
    `previous_checksum`.

    follow: True waits for new batches (polling every `interval_ms` while there is nothing new; no sleep while
    batches keep coming); False stops at the first position where no committed batch is present.
    idle_timeout_ms: stop iterating after this long without a new batch (None: never). stop: a threading.Event
    that ends the iteration when set (checked between polls and while waiting).

    Threads: poll(), iteration, end_position() and close() are serialised on the Tailer, so it may be shared:
    each batch goes to exactly one caller, in order, and close() waits for a poll in progress."""

    def __init__(self, directory: str | os.PathLike[str], from_position: int = 0, *, follow: bool = True,
                 interval_ms: int = INTERVAL_MS_DEFAULT, idle_timeout_ms: int | None = None,
                 max_events: int = MAX_EVENTS_DEFAULT, previous_checksum: int | None = None,
                 stop: threading.Event | None = None) -> None:
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no ledger directory at {self.directory}")
        _bounded("from_position", from_position, 0, POSITION_MASK)
        self.interval_ms = _bounded("interval_ms", interval_ms, INTERVAL_MS_MIN, INTERVAL_MS_MAX)
        self.idle_timeout_ms = None if idle_timeout_ms is None else \
            _bounded("idle_timeout_ms", idle_timeout_ms, 0, IDLE_TIMEOUT_MS_MAX)
        self.max_events = _bounded("max_events", max_events, 1, MAX_EVENTS_LIMIT)
        if previous_checksum is not None:
            _bounded("previous_checksum", previous_checksum, 0, 0xFFFFFFFF)
        self.follow = bool(follow)
        self.stop = stop
        self.batches_read = 0
        self.events_read = 0
        self.last_timestamp = 0          # of the last event yielded (0 before the first)
        self._segments = _SegmentFiles(os.path.join(self.directory, "journal"))
        self._torn_judged: tuple[int, bytes] | None = None   # (position, header bytes) judged a torn tail
        self._lock = threading.Lock()  # one poll at a time: the position and the mapped files are shared state
        try:
            self._position, self._checksum = self._anchor(from_position, previous_checksum)
        except BaseException:
            self._segments.close()
            raise

    # -- where we are --

    @property
    def position(self) -> int:
        """The journal position of the next batch header to read: persist it to resume."""
        return self._position

    @property
    def checksum(self) -> int:
        """The checksum of the last batch read (0 at the start): the hash-chain anchor for `position`."""
        return self._checksum

    def _anchor(self, from_position: int, previous_checksum: int | None) -> tuple[int, int]:
        """(position, checksum of the batch ending there) for a resume position, after checking that a committed
        batch really ends there."""
        if from_position <= 1:
            if previous_checksum not in (None, 0):
                raise LedgerCorruptError(f"{self.directory}: previous_checksum {previous_checksum} was stored for "
                                         f"the start of the journal, where it must be 0")
            return 1, 0
        last = from_position - 1
        record = self._segments.record(last)
        if record is None or not record.any():
            raise ValueError(f"from_position {from_position} is past the end of the committed journal in "
                             f"{self.directory}")
        kind = (int(record[WORD_A]) >> 56) & KIND_MASK
        if kind == KIND_HEADER:
            raise self._inside(from_position, last, int(record[WORD_COUNT]))
        if not KIND_ACCOUNT <= kind <= KIND_EXPIRE:
            raise ValueError(f"from_position {from_position} does not follow an event record in {self.directory}")
        header_position = last - (int(record[7]) >> POSITION_BITS)
        header = self._segments.record(header_position) if header_position >= 1 else None
        if header is None or (int(header[WORD_COMMIT]) >> 32) != COMMIT_MAGIC:
            raise ValueError(f"from_position {from_position} does not end a committed batch in {self.directory}")
        count = int(header[WORD_COUNT])
        if header_position + 1 + count != from_position:
            raise self._inside(from_position, header_position, count)
        checksum = self._verified_checksum(header_position)
        if checksum is None:
            raise ValueError(f"from_position {from_position} does not end a committed batch in {self.directory}")
        if previous_checksum is not None and checksum != previous_checksum:
            raise LedgerCorruptError(
                f"{self.directory}: the batch ending at position {from_position} has checksum {checksum}, "
                f"but {previous_checksum} was stored with that position: this is not the journal the position "
                f"was read from (a different or restored ledger)")
        return from_position, checksum

    def _inside(self, position: int, header_position: int, count: int) -> ValueError:
        return ValueError(f"from_position {position} is inside the batch at {header_position} (positions "
                          f"{header_position}..{header_position + count}): resume from {header_position} to read "
                          f"that batch, or from {header_position + 1 + count} to read what follows it")

    # -- reading batches --

    def _corrupt(self, position: int, reason: str) -> LedgerCorruptError:
        path, offset = self._segments.location(position)
        return LedgerCorruptError(f"journal corrupt ({reason}) in {path} at byte offset {offset}, journal position "
                                  f"{position}: a committed batch fails its check")

    def _checksum_problem(self, position: int, fields: Sequence[int], commit: int) -> tuple[int, str | None]:
        """(checksum, problem or None) of the batch whose header at `position` has these fields: the general path,
        for a batch that spans segment files or a header that fails a check."""
        problem = header_problem(position, fields)
        if problem is not None:
            return 0, problem
        records = self._segments.records(position + 1, position + 1 + fields[WORD_COUNT])
        if records is None:
            return 0, "a committed batch runs into a segment file that does not exist"
        crc = batch_checksum(self._segments.record(position), records)
        if crc != fields[WORD_CHECKSUM] or crc != commit & 0xFFFFFFFF:
            return crc, "checksum"
        return crc, None

    def _verified_checksum(self, position: int) -> int | None:
        """The checksum of the committed batch at `position` after checking it, or None if it is not committed
        (no commit word, or a torn tail)."""
        record = self._segments.record(position)
        if record is None or int(record[WORD_COMMIT]) >> 32 != COMMIT_MAGIC:
            return None
        fields = tuple(record.tolist())
        crc, problem = self._checksum_problem(position, fields, fields[WORD_COMMIT])
        if problem is not None:
            self._judge_torn(position, problem)
            return None
        return crc

    def _judge_torn(self, position: int, problem: str) -> None:
        """A header with a commit word that fails a check: corruption if a committed batch follows it (as journal
        recovery decides), else a torn tail to wait at. Judged once per header contents."""
        header_bytes = self._segments.record(position).tobytes()
        if self._torn_judged == (position, header_bytes):
            return
        if self._committed_batch_after(position):
            raise self._corrupt(position, problem)
        self._torn_judged = (position, header_bytes)

    def _committed_batch_after(self, position: int) -> bool:
        """Whether a header with a commit word and a matching checksum lies in (position, position + window)."""
        records_log2 = self._segments.records_log2
        last_segment = self._segments.last_existing(position >> records_log2)
        end = min(position + TORN_WINDOW_RECORDS, (last_segment + 1) << records_log2)
        chunks = self._segments.each_chunk(position + 1, end)
        return committed_batch_in(chunks, self._segments.each_records, end) is not None

    def poll(self) -> np.ndarray:
        """The committed events available now from `position` on (whole batches, up to `max_events` unless one
        batch alone is larger), decoded; an empty array if there is none. Never waits (beyond another thread's
        poll of this Tailer)."""
        with self._lock:
            return self._poll()

    def _poll(self) -> np.ndarray:
        segments = self._segments
        if segments.records_log2 is None and not segments.known():
            return np.empty(0, EVENT_DTYPE)
        records_log2 = segments.records_log2
        offset_mask = (1 << records_log2) - 1
        crc32c = _core.crc32c
        start = position = self._position
        checksum = self._checksum
        header_positions: list[int] = []
        timestamps: list[int] = []
        counts: list[int] = []
        events = 0
        index = -1
        memory = None
        # The per-batch path is kept flat (struct and memoryview slices, no numpy scalars, no calls of our own):
        # with one-transfer batches it is the whole cost of reading.
        while events < self.max_events:
            if position >> records_log2 != index:
                index = position >> records_log2
                memory = segments.bytes(index)
                if memory is None:
                    break
            offset = (position & offset_mask) * RECORD_SIZE
            # The commit word first: it is stored last, so once it is seen, everything it seals is complete.
            (commit,) = COMMIT_WORD.unpack_from(memory, offset + COMMIT_WORD_OFFSET)
            if commit >> 32 != COMMIT_MAGIC:
                break
            fields = HEADER_WORDS.unpack_from(memory, offset)
            count = fields[WORD_COUNT]
            if counts and events + count > self.max_events:
                break   # it does not fit: it opens the next array
            end = offset + RECORD_SIZE * (1 + count)
            if fields[WORD_A] == HEADER_WORD_A and fields[WORD_MAGIC_VERSION] == HEADER_MAGIC_VERSION \
                    and fields[WORD_POSITION] == position and 0 < count <= BATCH_EVENTS_MAX and end <= len(memory):
                crc = crc32c(memory[offset:offset + 40], crc32c(memory[offset + RECORD_SIZE:end]))
                problem = None if crc == fields[WORD_CHECKSUM] and crc == commit & 0xFFFFFFFF else "checksum"
            else:
                crc, problem = self._checksum_problem(position, fields, commit)
            if problem is not None:
                self._judge_torn(position, problem)
                break
            if fields[WORD_PREVIOUS_CHECKSUM] != checksum:
                raise self._corrupt(position, "chain")
            header_positions.append(position)
            timestamps.append(fields[WORD_TIMESTAMP])
            counts.append(count)
            events += count
            position += 1 + count
            checksum = crc
        memory = None
        if not counts:
            return np.empty(0, EVENT_DTYPE)
        decoded = self._decode(start, position, header_positions, timestamps, counts)
        self._position, self._checksum = position, checksum
        self.batches_read += len(counts)
        self.events_read += events
        self.last_timestamp = int(decoded["timestamp"][-1])
        segments.release_before(position >> records_log2)   # a reader never goes back
        return decoded

    def _decode(self, start: int, end: int, header_positions: list[int], timestamps: list[int],
                counts: list[int]) -> np.ndarray:
        """Decode the consecutive batches in [start, end): their records minus the header rows."""
        chunks = self._segments.records(start, end)
        if chunks is None:   # poll read these batches a moment ago: a segment file went away under the reader
            raise self._corrupt(start, "a committed batch runs into a segment file that does not exist")
        words = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        if len(counts) == 1:
            words = words[1:]
        else:
            keep = np.ones(words.shape[0], bool)
            keep[np.array(header_positions, np.int64) - start] = False
            words = words[keep]
        try:
            return decode_records(words, np.array(header_positions, np.uint64), np.array(timestamps, np.uint64),
                                  np.array(counts, np.int64))
        except ValueError as error:
            raise self._corrupt(start, f"integrity: {error}") from None

    # -- waiting --

    def _stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _wait(self) -> None:
        seconds = self.interval_ms / 1000
        if self.stop is not None:
            self.stop.wait(seconds)
        else:
            time.sleep(seconds)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        idle_since = time.monotonic()
        while not self._stopped():
            events = self.poll()
            if events.size:
                return events
            if not self.follow:
                break
            if self.idle_timeout_ms is not None and (time.monotonic() - idle_since) * 1000 >= self.idle_timeout_ms:
                break
            self._wait()
        raise StopIteration

    def run(self, callback: Callable[[np.ndarray], object]) -> int:
        """Call `callback(events)` for every array until the iteration ends; returns `position`. The position
        to store after handling `events` is `int(events["position"][-1]) + 1` (equal to `position` then)."""
        for events in self:
            callback(events)
        return self._position

    # -- lag --

    def end_position(self) -> int:
        """An estimate of the journal's end: the position after the last non-zero record (the committed end plus
        any batch being written). A binary search over the mapped files: about 40 record reads."""
        with self._lock:
            return self._end_position()

    def _end_position(self) -> int:
        if not self._segments.known():
            return self._position
        records_log2 = self._segments.records_log2
        last_segment = self._segments.last_existing(self._position >> records_log2) \
            if self._segments.record(self._position) is not None else (self._position >> records_log2)
        low, high = self._position, (last_segment + 1) << records_log2   # the first zero record is in [low, high]
        while low < high:
            middle = (low + high) // 2
            record = self._segments.record(middle)
            if record is not None and record.any():
                low = middle + 1
            else:
                high = middle
        return low

    def lag_records(self) -> int:
        """Journal records (events and their batch headers) written but not read yet: end_position() - position."""
        return max(0, self.end_position() - self._position)

    # -- lifecycle --

    def close(self) -> None:
        """Unmap the journal segments this tailer holds. Idempotent."""
        with self._lock:
            self._segments.close()

    def __enter__(self) -> Tailer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ledger.Tailer {self.directory!r} position={self._position} events_read={self.events_read}>"


def tail(directory: str | os.PathLike[str], from_position: int = 0, *,
         callback: Callable[[np.ndarray], object] | None = None, stop: threading.Event | None = None,
         follow: bool = True, interval_ms: int = INTERVAL_MS_DEFAULT, idle_timeout_ms: int | None = None,
         max_events: int = MAX_EVENTS_DEFAULT, previous_checksum: int | None = None) -> Tailer | int:
    """Follow the committed events of the ledger in `directory` (written by another process) from
    `from_position` (0/1: the start; else a batch header position, as `Tailer.position` reports).

    Without `callback`: returns a `Tailer`, an iterator of EVENT_DTYPE arrays (whole batches). With `callback`:
    calls `callback(events)` for each array in this thread until `stop` is set, the idle timeout passes, or (with
    follow=False) the committed end is reached; then returns the position to resume from.
    See `Tailer` for the options and the module documentation for what is checked before anything is yielded."""
    tailer = Tailer(directory, from_position, follow=follow, interval_ms=interval_ms,
                    idle_timeout_ms=idle_timeout_ms, max_events=max_events, previous_checksum=previous_checksum,
                    stop=stop)
    if callback is None:
        return tailer
    with tailer:
        return tailer.run(callback)
