"""The on-disk format of docs/FORMAT.md, stated once for Python: its numbers, and the two checks of it that more
than one reader makes (a segment file's header, and the search for a committed batch past a failing one).

Every Python module takes these from here. The core (ledger._core) compiles its own copy of the numbers into its
hot loops; it exports them as `_core.FORMAT`, and importing this module fails (ImportError naming the value) if
any of them differs from what is stated here, so the two statements cannot drift apart unnoticed."""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

from ledger import _core
from ledger.errors import LedgerCorruptError

__all__ = [
    "BATCH_EVENTS_MAX",
    "COMMIT_MAGIC",
    "COMMIT_WORD",
    "COMMIT_WORD_OFFSET",
    "DURABLE_NAME",
    "DURABLE_RECORD",
    "DURABLE_STRICT",
    "EVENT_KIND_NAMES",
    "FORMAT_VERSION",
    "HEADER_CHECKSUMMED_WORDS",
    "HEADER_MAGIC",
    "HEADER_MAGIC_VERSION",
    "HEADER_WORDS",
    "HEADER_WORD_A",
    "KIND_ACCOUNT",
    "KIND_EXPIRE",
    "KIND_HEADER",
    "KIND_LINKED",
    "KIND_MASK",
    "KIND_PENDING",
    "KIND_POST",
    "KIND_TRANSFER",
    "KIND_VOID",
    "POSITION_BITS",
    "POSITION_LIMIT",
    "POSITION_MASK",
    "POSITION_MAX",
    "RECORD_SIZE",
    "REPLAY_CHAIN",
    "REPLAY_CHECKSUM",
    "REPLAY_DAMAGED",
    "REPLAY_END",
    "REPLAY_HEADER",
    "REPLAY_INTEGRITY",
    "REPLAY_REASONS",
    "REPLAY_TORN",
    "SEGMENT_HEADER",
    "SEGMENT_HEADER_BYTES",
    "SEGMENT_MAGIC",
    "SEGMENT_RECORDS_LOG2_DEFAULT",
    "SEGMENT_RECORDS_LOG2_MAX",
    "SEGMENT_RECORDS_LOG2_MIN",
    "SegmentHeader",
    "batch_checksum",
    "check_against_core",
    "check_segment_header",
    "check_segment_size",
    "committed_batch_in",
    "header_problem",
    "segment_bytes",
    "segment_name",
]

# -- records and positions --

FORMAT_VERSION = 1
RECORD_SIZE = 64
POSITION_BITS = 40                     # back-pointers, offsets in a batch and transfer-table values use 40 bits
POSITION_MASK = (1 << POSITION_BITS) - 1
POSITION_MAX = POSITION_MASK           # the largest journal position
POSITION_LIMIT = 1 << POSITION_BITS    # one past it

# -- event kinds (the low 4 bits of an event's kind byte, bits 56..63 of word A) --

KIND_ACCOUNT = 1
KIND_TRANSFER = 2
KIND_PENDING = 3
KIND_POST = 4
KIND_VOID = 5
KIND_EXPIRE = 6
KIND_HEADER = 15
KIND_MASK = 0x0F
KIND_LINKED = 0x10                     # bit 4 of the kind byte: the row that produced the event was LINKED
EVENT_KIND_NAMES = {KIND_ACCOUNT: "account", KIND_TRANSFER: "transfer", KIND_PENDING: "pending", KIND_POST: "post",
                    KIND_VOID: "void", KIND_EXPIRE: "expire"}

# -- batch headers ("Batch header": eight little-endian 64-bit words) --

WORD_MAGIC_VERSION, WORD_TIMESTAMP, WORD_POSITION, WORD_COUNT, WORD_PREVIOUS_CHECKSUM, WORD_CHECKSUM, WORD_A, \
    WORD_COMMIT = range(8)
HEADER_MAGIC = 0x5247444C              # "LDGR"
HEADER_MAGIC_VERSION = HEADER_MAGIC | (FORMAT_VERSION << 32)
HEADER_WORD_A = KIND_HEADER << 56      # exactly this: the kind byte, nothing else (not under the checksum)
COMMIT_MAGIC = 0xC0111117              # the high half of the commit word, written last
HEADER_CHECKSUMMED_WORDS = 5           # header bytes 0..39 close the batch checksum
HEADER_WORDS = struct.Struct("<8Q")
COMMIT_WORD = struct.Struct("<Q")
COMMIT_WORD_OFFSET = WORD_COMMIT * 8
BATCH_EVENTS_MAX = (1 << 24) - 1       # an event's offset in its batch has 24 bits

# -- replay stop reasons (Engine.replay) --

REPLAY_END = 0          # a zero record where a header would be: the clean end of the journal
REPLAY_TORN = 1         # a header without its commit word, or a batch running past the mapped journal
REPLAY_CHECKSUM = 2     # the batch checksum does not match its bytes
REPLAY_CHAIN = 3        # previous_checksum does not match the previous batch
REPLAY_HEADER = 4       # a record where a header should be is not a well-formed header
REPLAY_INTEGRITY = 5    # checksums hold but the events contradict the state
REPLAY_DAMAGED = 6      # an event replayed refers to an earlier record that is damaged
REPLAY_REASONS = {REPLAY_END: "end", REPLAY_TORN: "torn", REPLAY_CHECKSUM: "checksum", REPLAY_CHAIN: "chain",
                  REPLAY_HEADER: "header", REPLAY_INTEGRITY: "integrity", REPLAY_DAMAGED: "damaged"}

# -- segment files ("Segment file") --

SEGMENT_RECORDS_LOG2_DEFAULT = 20      # 2**20 records of 64 bytes = 64 MiB per segment
SEGMENT_RECORDS_LOG2_MIN = 10
SEGMENT_RECORDS_LOG2_MAX = 24          # 1 GiB segments at most
SEGMENT_HEADER_BYTES = 4096
SEGMENT_MAGIC = b"LDGRSEG\x00"
SEGMENT_HEADER = struct.Struct("<8sIIIIQQQ")  # magic, version, record size, records log2, 0, index, first, created
SEGMENT_HEADER_CHECKSUM = struct.Struct("<I")  # CRC32C of the fields, right after them

# -- the durable mark ("The durable mark": <dir>/journal/DURABLE) --

DURABLE_NAME = "DURABLE"
DURABLE_RECORD = struct.Struct("<QII")   # position, format version, CRC32C of the 12 bytes before it
DURABLE_STRICT = (1 << 64) - 1           # every batch but the last was synced before the next was written


def check_against_core(core_format: dict[str, int], core_replay_reasons: dict[int, str],
                       core_event_kinds: dict[int, str]) -> None:
    """Raise ImportError naming the first value this module states differently from the core's."""
    stated = {"record_size": RECORD_SIZE, "format_version": FORMAT_VERSION, "position_bits": POSITION_BITS,
              "kind_account": KIND_ACCOUNT, "kind_transfer": KIND_TRANSFER, "kind_pending": KIND_PENDING,
              "kind_post": KIND_POST, "kind_void": KIND_VOID, "kind_expire": KIND_EXPIRE, "kind_header": KIND_HEADER,
              "kind_mask": KIND_MASK, "kind_linked": KIND_LINKED, "commit_magic": COMMIT_MAGIC,
              "header_magic": HEADER_MAGIC, "batch_events_max": BATCH_EVENTS_MAX}
    for name in sorted(set(stated) | set(core_format)):
        if stated.get(name) != core_format.get(name):
            raise ImportError(f"ledger.format states {name} = {stated.get(name)!r} but the compiled core has "
                              f"{core_format.get(name)!r}: rebuild the core or correct ledger/format.py")
    if core_replay_reasons != REPLAY_REASONS:
        raise ImportError(f"ledger.format states the replay reasons {REPLAY_REASONS} but the compiled core has "
                          f"{core_replay_reasons}")
    if core_event_kinds != EVENT_KIND_NAMES:
        raise ImportError(f"ledger.format states the event kinds {EVENT_KIND_NAMES} but the compiled core has "
                          f"{core_event_kinds}")


check_against_core(_core.FORMAT, _core.REPLAY_REASONS, _core.EVENT_KINDS)


def segment_name(index: int) -> str:
    """The file name of segment `index` in <dir>/journal."""
    return f"{index:08d}.segment"


def segment_bytes(records_log2: int) -> int:
    """The size of a whole segment file of 2**records_log2 records."""
    return SEGMENT_HEADER_BYTES + (RECORD_SIZE << records_log2)


class SegmentHeader(NamedTuple):
    """The fields of a segment file's header, in file order."""

    magic: bytes
    version: int
    record_size: int
    records_log2: int
    reserved: int
    index: int
    first_position: int
    created_ns: int


def check_segment_header(page: bytes, path: str, index: int, records_log2: int | None = None) -> SegmentHeader:
    """The header of segment file `path` (number `index`) from its first SEGMENT_HEADER_BYTES bytes `page`, after
    every check of docs/FORMAT.md; with `records_log2` (segment 0's), also that this segment has the same size.
    Any failure raises LedgerCorruptError naming the file (and the byte offset where it matters)."""
    fields_end = SEGMENT_HEADER.size + SEGMENT_HEADER_CHECKSUM.size
    if len(page) < SEGMENT_HEADER_BYTES:
        raise LedgerCorruptError(f"{path}: segment header is truncated ({len(page)} bytes)")
    reserved = page[fields_end:SEGMENT_HEADER_BYTES]
    if reserved.count(0) != len(reserved):
        offset = fields_end + next(at for at, byte in enumerate(reserved) if byte)
        raise LedgerCorruptError(f"{path}: non-zero bytes in the reserved part of the segment header "
                                 f"(byte offset {offset})")
    (checksum,) = SEGMENT_HEADER_CHECKSUM.unpack_from(page, SEGMENT_HEADER.size)
    if _core.crc32c(bytes(page[:SEGMENT_HEADER.size])) != checksum:
        raise LedgerCorruptError(f"{path}: segment header checksum mismatch at byte 0")
    header = SegmentHeader(*SEGMENT_HEADER.unpack_from(page))
    if header.magic != SEGMENT_MAGIC:
        raise LedgerCorruptError(f"{path}: not a ledger segment (magic {header.magic!r})")
    if header.version != FORMAT_VERSION:
        raise LedgerCorruptError(f"{path}: format version {header.version}, this build reads {FORMAT_VERSION}")
    if header.record_size != RECORD_SIZE or header.index != index \
            or not SEGMENT_RECORDS_LOG2_MIN <= header.records_log2 <= SEGMENT_RECORDS_LOG2_MAX \
            or header.first_position != index << header.records_log2:
        raise LedgerCorruptError(f"{path}: segment header fields are inconsistent (index {header.index}, records "
                                 f"2**{header.records_log2}, first {header.first_position})")
    if records_log2 is not None and header.records_log2 != records_log2:
        raise LedgerCorruptError(f"{path}: segment size differs from segment 0")
    return header


def check_segment_size(path: str, size: int, records_log2: int, index: int) -> None:
    """A segment file must be exactly a segment's size. A shorter one lost its end after it was written (the
    writer creates each at full size, then renames it into place): the batches there may have been acknowledged,
    so it is never extended. Raises LedgerCorruptError naming the file and where the journal ends in it."""
    expected = segment_bytes(records_log2)
    if size < expected:
        position = (index << records_log2) + max(size - SEGMENT_HEADER_BYTES, 0) // RECORD_SIZE
        raise LedgerCorruptError(f"{path}: segment file cut short: {size} bytes of {expected} (segments are "
                                 f"created at full size, so its end was lost after it was written); the journal "
                                 f"ends there, at journal position {position}, and any batch written after it, "
                                 f"acknowledged or not, is missing; nothing was changed on disk (restore the file "
                                 f"from a copy that has its end)")
    if size != expected:
        raise LedgerCorruptError(f"{path}: size {size} bytes, expected {expected}")


def header_problem(position: int, fields: Sequence[int]) -> str | None:
    """"header" if the eight words `fields` are not a well-formed batch header for journal position `position`
    (word A, magic and version, its own position, a count in range, a batch that fits the position space), else
    None. The commit word and the checksum are not looked at."""
    if fields[WORD_A] != HEADER_WORD_A or fields[WORD_MAGIC_VERSION] != HEADER_MAGIC_VERSION:
        return "header"
    if fields[WORD_POSITION] != position or not 0 < fields[WORD_COUNT] <= BATCH_EVENTS_MAX:
        return "header"
    if position + 1 + fields[WORD_COUNT] > POSITION_LIMIT:
        return "header"
    return None


def batch_checksum(header: np.ndarray, events: Iterable[np.ndarray | memoryview | bytes]) -> int:
    """The CRC32C of a batch: over its event records (the chunks of `events`, in order), then header bytes
    0..39 (`header`: the header record's eight uint64 words)."""
    crc = 0
    for chunk in events:
        crc = _core.crc32c(chunk, crc)
    return _core.crc32c(np.ascontiguousarray(header[:HEADER_CHECKSUMMED_WORDS]), crc)


def committed_batch_in(chunks: Iterable[tuple[int, np.ndarray]],
                       records: Callable[[int, int], Iterable[np.ndarray]], batch_end: int) -> int | None:
    """The position of the first committed batch header among `chunks` ((first position, uint64 (n, 8) records)
    covering the range searched, in order), if any: well formed, with its commit word, ending at or before
    `batch_end`, its checksum (over `records(start, end)`: its event records) matching both the header and the
    commit word. Proof that committed data follows, so what failed before it cannot be a torn tail."""
    for first, words in chunks:
        candidates = np.flatnonzero((words[:, WORD_A] == np.uint64(HEADER_WORD_A))
                                    & ((words[:, WORD_COMMIT] >> np.uint64(32)) == np.uint64(COMMIT_MAGIC)))
        for index in candidates.tolist():
            position = first + index
            fields = words[index].tolist()
            if header_problem(position, fields) is not None or position + 1 + fields[WORD_COUNT] > batch_end:
                continue
            crc = batch_checksum(words[index], records(position + 1, position + 1 + fields[WORD_COUNT]))
            if crc == fields[WORD_CHECKSUM] and crc == fields[WORD_COMMIT] & 0xFFFFFFFF:
                return position
    return None
