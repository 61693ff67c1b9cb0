# cython: language_level=3
# The single-writer state machine. It validates commands, applies them to the account arrays, and writes one
# 64-byte event per applied command into journal memory handed to it by the caller. No I/O policy lives here:
# where the memory comes from (anonymous or a mapped file) and when it is synced is the caller's business.
# No Python object is created per command on the batch paths.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memset, memcpy
from libc.stdlib cimport free, realloc
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.memoryview cimport PyMemoryView_FromMemory
from posix.mman cimport madvise
from libc.errno cimport errno

cdef extern from "Python.h":
    int PyBUF_WRITE
    bint PyLong_Check(object value)
    unsigned long long PyLong_AsUnsignedLongLong(object value) except? <unsigned long long>-1
    long long PyLong_AsLongLong(object value) except? -1
    int PyErr_CheckSignals() except -1

cdef extern from "pythread.h":
    ctypedef void *PyThread_type_lock
    ctypedef enum PyLockStatus:
        PY_LOCK_FAILURE
        PY_LOCK_ACQUIRED
        PY_LOCK_INTR
    PyThread_type_lock PyThread_allocate_lock()
    void PyThread_free_lock(PyThread_type_lock lock)
    int PyThread_acquire_lock(PyThread_type_lock lock, int wait) nogil
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds, int intr_flag) nogil
    void PyThread_release_lock(PyThread_type_lock lock) nogil
    unsigned long PyThread_get_thread_ident()

cimport cython
import mmap as mmap_module
import operator
import os
import numpy as np
from ledger.memory import anonymous_array
cimport numpy as cnp

from ledger.enums import (
    ACCOUNT_DTYPE, TRANSFER_DTYPE, TRANSFER_RECORD_DTYPE, AccountResult, TransferResult, BATCH_SIZE_MAX,
    EXPIRE_BATCH_MAX as _EXPIRE_BATCH_MAX, TIMESTAMP_MAX as _TIMESTAMP_MAX,
)
from ledger.errors import LedgerClockError, LedgerClosedError, LedgerCorruptError, LedgerError, LedgerPoisonedError

cnp.import_array()

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

ledger_crc32c_init()

# ---- Constants (the numbers are part of the on-disk format: docs/FORMAT.md) ---------------------------------
DEF KIND_ACCOUNT = 1
DEF KIND_TRANSFER = 2
DEF KIND_PENDING = 3
DEF KIND_POST = 4
DEF KIND_VOID = 5
DEF KIND_EXPIRE = 6
DEF KIND_HEADER = 15
DEF KIND_MASK = 0x0F
DEF KIND_LINKED = 0x10

DEF FLAG_LINKED = 1
DEF FLAG_PENDING = 2
DEF FLAG_POST = 4
DEF FLAG_VOID = 8
DEF TRANSFER_FLAGS_ALL = 15
DEF ACCOUNT_FLAGS_ALL = 1

DEF STATE_POSTED = 1
DEF STATE_PENDING = 2
DEF STATE_PENDING_POSTED = 3
DEF STATE_PENDING_VOIDED = 4
DEF STATE_PENDING_EXPIRED = 5

# 64-bit constants as C macros: Cython's DEF would turn them into Python integers.
cdef extern from *:
    """
    #define POSITION_BITS 40
    #define POSITION_MASK 0xFFFFFFFFFFULL
    #define OFFSET_MAX 0xFFFFFFULL
    #define ID_MAX 0xFFFFFFFFFFFFFFFFULL
    #define AMOUNT_MAX 0x7FFFFFFFFFFFFFFFLL
    #define MAGIC 0x5247444CULL            /* "LDGR" little-endian */
    #define COMMIT_MAGIC 0xC0111117ULL
    #define NANOSECONDS_PER_SECOND 1000000000ULL
    #define TIMESTAMP_MAX 0x7FFFFFFFFFFFFFFFULL  /* ledger.enums.TIMESTAMP_MAX */
    """
    const int POSITION_BITS
    const uint64_t POSITION_MASK
    const uint64_t OFFSET_MAX
    const uint64_t ID_MAX
    const int64_t AMOUNT_MAX
    const uint64_t MAGIC
    const uint64_t COMMIT_MAGIC
    const uint64_t NANOSECONDS_PER_SECOND
    const uint64_t TIMESTAMP_MAX

DEF TABLE_CAPACITY_LOG2_MIN = 10
DEF TABLE_CAPACITY_LOG2_MAX = 40
DEF ACCOUNT_CAPACITY_MIN = 1024
# Replay looks for Ctrl-C (PyErr_CheckSignals) at the first batch boundary after this many records: often enough
# that an interrupted open stops within milliseconds, rarely enough to cost nothing.
DEF REPLAY_SIGNAL_CHECK_RECORDS = 1 << 16
# A Ctrl-C while a batch is being made durable is held back and the durable write tried again; one still being
# interrupted after this many tries (Ctrl-C held down) poisons the handle instead of looping for ever.
DEF COMMIT_INTERRUPTED_ATTEMPTS_MAX = 100
# A thread waiting for the engine lock re-checks it this often even without a wake-up (a safety net, not a poll:
# every release with waiters wakes one).
DEF LOCK_WAIT_SLICE_US = 50000
# Below this a CRC is done before a GIL hand-off would pay for itself.
DEF CRC_NOGIL_BYTES_MIN = 1 << 16

FORMAT_VERSION = 1
SEGMENTS_MAPPED_MAX = LEDGER_SEGMENTS_MAPPED_MAX   # old segments mapped from their files at once (_segment_cache.h)
DEF FORMAT_VERSION_C = 1
RECORD_SIZE = 64
EXPIRE_BATCH_MAX = _EXPIRE_BATCH_MAX
DEF EXPIRE_BATCH_MAX_C = 65536
assert EXPIRE_BATCH_MAX == EXPIRE_BATCH_MAX_C
assert _TIMESTAMP_MAX == TIMESTAMP_MAX
POSITION_MAX = POSITION_MASK

# Replay stop reasons.
DEF REPLAY_END = 0          # a zero record where a header would be: the clean end of the journal
DEF REPLAY_TORN = 1         # a header without its commit word, or a batch running past the mapped journal
DEF REPLAY_CHECKSUM = 2     # the batch checksum does not match its bytes
DEF REPLAY_HEADER = 4       # a record where a header should be is not a well-formed header
DEF REPLAY_CHAIN = 3        # previous_checksum does not match the previous batch
DEF REPLAY_INTEGRITY = 5    # checksums hold but the events contradict the state (unknown account, wrong back-pointer)
DEF REPLAY_DAMAGED = 6      # an event replayed refers to an earlier record (before verified_from) that is damaged
REPLAY_REASONS = {REPLAY_END: "end", REPLAY_TORN: "torn", REPLAY_CHECKSUM: "checksum", REPLAY_CHAIN: "chain",
                  REPLAY_HEADER: "header", REPLAY_INTEGRITY: "integrity", REPLAY_DAMAGED: "damaged"}
# The format's numbers as this core compiled them: ledger.format states them once for Python and refuses to
# import if any differs from these.
FORMAT = {"record_size": RECORD_SIZE, "format_version": FORMAT_VERSION_C, "position_bits": POSITION_BITS,
          "kind_account": KIND_ACCOUNT, "kind_transfer": KIND_TRANSFER, "kind_pending": KIND_PENDING,
          "kind_post": KIND_POST, "kind_void": KIND_VOID, "kind_expire": KIND_EXPIRE, "kind_header": KIND_HEADER,
          "kind_mask": KIND_MASK, "kind_linked": KIND_LINKED, "commit_magic": COMMIT_MAGIC, "header_magic": MAGIC,
          "batch_events_max": OFFSET_MAX}

# Why a record read from before verified_from was refused (State.damage_reason; ledger.scrub reports them too).
DEF DAMAGE_NONE = 0
DEF DAMAGE_OFFSET = 1       # the record's offset in its batch does not lead to a batch header that covers it
DEF DAMAGE_HEADER = 2       # its batch header is not a well-formed committed header
DEF DAMAGE_CHECKSUM = 3     # its batch's checksum does not match the batch's bytes
DEF DAMAGE_POINTER = 4      # a back-pointer does not go strictly backwards to an earlier event of the account
DEF DAMAGE_CHAIN = 5        # (scrub) the batch's previous_checksum is not the checksum of the batch before
DEF DAMAGE_TORN = 6         # (scrub) a committed batch runs past the end of the journal
DAMAGE_REASONS = {
    DAMAGE_OFFSET: "the record's offset in its batch leads to no batch header covering it",
    DAMAGE_HEADER: "its batch header is not a well-formed committed header",
    DAMAGE_CHECKSUM: "its batch's checksum does not match the batch's bytes",
    DAMAGE_POINTER: "an account back-pointer does not go strictly backwards to an earlier event of the account",
    DAMAGE_CHAIN: "the batch's previous_checksum is not the checksum of the batch before it (hash chain broken)",
    DAMAGE_TORN: "a committed batch runs past the end of the journal",
}

DEF R_OK = 0
DEF R_LINKED_EVENT_FAILED = 1
DEF R_LINKED_CHAIN_OPEN = 2
DEF R_FLAGS_INVALID = 3
DEF R_ID_INVALID = 4
DEF RT_PENDING_ID_MUST_BE_ZERO = 5
DEF RT_PENDING_ID_REQUIRED = 6
DEF RT_PENDING_ID_INVALID = 7
DEF RT_PENDING_ID_MUST_BE_DIFFERENT = 8
DEF RT_TIMEOUT_RESERVED_FOR_PENDING = 9
DEF RT_EXISTS_WITH_DIFFERENT_FIELDS = 10
DEF RT_EXISTS = 11
DEF RT_DEBIT_ACCOUNT_ID_INVALID = 12
DEF RT_CREDIT_ACCOUNT_ID_INVALID = 13
DEF RT_ACCOUNTS_MUST_BE_DIFFERENT = 14
DEF RT_AMOUNT_MUST_BE_POSITIVE = 15
DEF RT_LEDGER_INVALID = 16
DEF RT_DEBIT_ACCOUNT_NOT_FOUND = 17
DEF RT_CREDIT_ACCOUNT_NOT_FOUND = 18
DEF RT_LEDGER_MISMATCH = 19
DEF RT_OVERFLOW = 20
DEF RT_INSUFFICIENT_FUNDS = 21
DEF RT_EXCEEDS_MAX_BALANCE = 22
DEF RT_PENDING_NOT_FOUND = 23
DEF RT_PENDING_TRANSFER_NOT_PENDING = 24
DEF RT_PENDING_ALREADY_POSTED = 25
DEF RT_PENDING_ALREADY_VOIDED = 26
DEF RT_PENDING_EXPIRED = 27
DEF RT_PENDING_DIFFERENT_DEBIT_ACCOUNT = 28
DEF RT_PENDING_DIFFERENT_CREDIT_ACCOUNT = 29
DEF RT_EXCEEDS_PENDING_AMOUNT = 30
DEF RT_PENDING_DIFFERENT_AMOUNT = 31
DEF RA_LEDGER_INVALID = 5
DEF RA_BALANCE_LIMITS_INVALID = 6
DEF RA_EXISTS_WITH_DIFFERENT_FIELDS = 7
DEF RA_EXISTS = 8
# Never leaves the engine: the row read a damaged record from before verified_from. The whole call is undone and
# raises LedgerCorruptError (Engine._raise_damage), so no TransferResult needs it.
DEF R_DAMAGED = 255

# Result members by code, so the single-call path returns an IntEnum without constructing one.
cdef tuple TRANSFER_RESULTS = tuple(TransferResult(code) for code in range(len(TransferResult)))
cdef tuple ACCOUNT_RESULTS = tuple(AccountResult(code) for code in range(len(AccountResult)))

ACCOUNT_HOT_DTYPE = np.dtype([
    ("debits_posted", "<i8"), ("credits_posted", "<i8"), ("debits_pending", "<i8"), ("credits_pending", "<i8"),
    ("min_balance", "<i8"), ("max_balance", "<i8"), ("last_position", "<u8"),
    ("ledger", "<u4"), ("flags", "<u2"), ("reserved", "<u2"),
])
ACCOUNT_COLD_DTYPE = np.dtype([("id", "<u8"), ("user_data", "<u8"), ("timestamp", "<u8"), ("position", "<u8")])
TABLE_SLOT_DTYPE = np.dtype([("key", "<u8"), ("value", "<u8")])
HEAP_ENTRY_DTYPE = np.dtype([("deadline", "<u8"), ("position", "<u8")])
assert ACCOUNT_HOT_DTYPE.itemsize == sizeof(AccountHot) == 64
assert ACCOUNT_COLD_DTYPE.itemsize == sizeof(AccountCold)
assert ACCOUNT_DTYPE.itemsize == sizeof(AccountRow)
assert TRANSFER_DTYPE.itemsize == sizeof(TransferRow)
assert sizeof(Event) == 64 and sizeof(BatchHeader) == 64

ctypedef struct TransferRecord:
    uint64_t id
    uint64_t debit_account
    uint64_t credit_account
    int64_t amount
    uint64_t pending_id
    uint64_t user_data
    uint64_t timestamp
    uint64_t sequence
    uint32_t ledger
    uint32_t timeout
    uint16_t code
    uint16_t flags
    uint8_t state

assert TRANSFER_RECORD_DTYPE.itemsize == sizeof(TransferRecord)

# A decoded journal event (what history, explain and the read side consume).
ctypedef struct DecodedEvent:
    uint64_t position
    uint64_t timestamp
    uint64_t id
    uint64_t debit_account
    uint64_t credit_account
    int64_t amount
    uint64_t user_data
    uint64_t aux
    uint64_t previous_debit_position
    uint64_t previous_credit_position
    uint16_t code
    uint8_t kind
    uint8_t linked

EVENT_DTYPE = np.dtype([
    ("position", "<u8"), ("timestamp", "<u8"), ("id", "<u8"), ("debit_account", "<u8"), ("credit_account", "<u8"),
    ("amount", "<i8"), ("user_data", "<u8"), ("aux", "<u8"), ("previous_debit_position", "<u8"),
    ("previous_credit_position", "<u8"), ("code", "<u2"), ("kind", "u1"), ("linked", "u1"),
], align=True)
assert EVENT_DTYPE.itemsize == sizeof(DecodedEvent)
EVENT_KINDS = {KIND_ACCOUNT: "account", KIND_TRANSFER: "transfer", KIND_PENDING: "pending", KIND_POST: "post",
               KIND_VOID: "void", KIND_EXPIRE: "expire"}

# ---- Scalars from Python: integers only, in range, or an exception naming the argument ------------------------
# Cython's own conversion to a C integer accepts anything with __int__ (1.5 -> 1, Decimal("3.99") -> 3): for money
# that is a silent change of amount. These accept int (and its subclasses: IntFlag, bool) on a fast path and
# anything with __index__ (numpy integers), and nothing else.

cdef object _ONE = 1    # the defaults of transfer()'s keywords, compared by identity
cdef object _ZERO = 0

cdef object _integer(object value, str name):
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None

cdef uint64_t to_unsigned(object value, str name, uint64_t maximum) except? 0xFFFFFFFFFFFFFFFF:
    if not PyLong_Check(value):
        value = _integer(value, name)
    cdef uint64_t result
    try:
        result = PyLong_AsUnsignedLongLong(value)
    except OverflowError:
        raise ValueError(f"{name} {value} is outside [0, {maximum}]") from None
    if result > maximum:
        raise ValueError(f"{name} {value} is outside [0, {maximum}]")
    return result

cdef int64_t to_signed(object value, str name) except? -1:
    if not PyLong_Check(value):
        value = _integer(value, name)
    try:
        return PyLong_AsLongLong(value)
    except OverflowError:
        raise ValueError(f"{name} {value} is outside the int64 range [{-AMOUNT_MAX - 1}, {AMOUNT_MAX}]") from None

# ---- Record access ----------------------------------------------------------------------------------------

cdef inline Event *event_at(State *s, uint64_t position) noexcept nogil:
    """The record at `position`. An old segment that is not mapped now is mapped here (the slow path, out of
    line); the pointer stays valid until the next such mapping (the rule in _segment_cache.h)."""
    LEDGER_DEBUG_ASSERT(position < s.mapped_end)
    cdef uint64_t mask = (<uint64_t>1 << s.segment_records_log2) - 1
    cdef uint64_t index = position >> s.segment_records_log2
    cdef char *segment = s.segments[index]
    if ledger_unlikely(segment == NULL):
        segment = ledger_segment_cache_map(&s.segment_cache, s.segments, index)
    return <Event *>(segment + ((position & mask) << 6))

cdef inline Event *event_written(State *s, uint64_t position) noexcept nogil:
    """event_at for a record of the batch being applied (at or after the write position): always in a segment
    handed over by the journal, never unmapped, so without even the test for the slow path."""
    LEDGER_DEBUG_ASSERT(position < s.mapped_end and s.segments[position >> s.segment_records_log2] != NULL)
    cdef uint64_t mask = (<uint64_t>1 << s.segment_records_log2) - 1
    return <Event *>(s.segments[position >> s.segment_records_log2] + ((position & mask) << 6))

cdef inline uint32_t event_kind(const Event *e) noexcept nogil:
    return <uint32_t>((e.word_a >> 56) & KIND_MASK)

cdef inline uint64_t event_offset(const Event *e) noexcept nogil:
    return e.word_b >> POSITION_BITS

cdef inline uint16_t event_code(const Event *e) noexcept nogil:
    return <uint16_t>((e.word_a >> POSITION_BITS) & 0xFFFF)

cdef inline uint64_t event_timestamp(State *s, const Event *e, uint64_t position) noexcept nogil:
    cdef uint64_t offset = event_offset(e)
    cdef BatchHeader *header = <BatchHeader *>event_at(s, position - offset)
    return header.timestamp + offset - 1

cdef inline uint64_t word_a(uint64_t previous_position, uint16_t code, uint32_t kind_byte) noexcept nogil:
    return previous_position | (<uint64_t>code << POSITION_BITS) | (<uint64_t>kind_byte << 56)

cdef inline uint64_t word_b(uint64_t previous_position, uint64_t offset) noexcept nogil:
    return previous_position | (offset << POSITION_BITS)

# ---- Records from before the snapshot: checked once per batch before any field is used ------------------------
# Replay checks every batch it applies, and this process writes the rest; but the records below verified_from
# (the snapshot position the engine was opened at) were only checksummed by the process that wrote them. A read
# of one (a lookup, a history walk, a POST of an old pending transfer, an EXISTS retry) checks its batch first:
# bounds, header and the whole batch's checksum, once, remembered as a bit per header position.

cdef inline bint record_damaged(State *s, uint64_t position, uint64_t header_position, uint32_t reason) noexcept nogil:
    """Note the first damage found (the caller undoes what it did and raises once it holds the GIL)."""
    if s.damage_reason == DAMAGE_NONE:
        s.damage_position = position
        s.damage_header_position = header_position
        s.damage_reason = reason
    return False

cdef inline bint header_verified(const State *s, uint64_t header_position) noexcept nogil:
    return header_position < s.verified_headers_bytes * 8 and \
        (s.verified_headers[header_position >> 3] >> (header_position & 7)) & 1

cdef bint verify_old_header(State *s, uint64_t header_position) noexcept nogil:
    """The record at header_position (1 <= it < verified_from) is the header of a good committed batch that
    ends at or before verified_from: well-formed, and its checksum matches (computed once, then remembered)."""
    LEDGER_ASSERT(header_position < s.verified_from)
    if header_verified(s, header_position):
        return True
    if header_position == 0:
        return record_damaged(s, header_position, header_position, DAMAGE_HEADER)
    # A copy: the checksum below reads the whole batch, which may map other old segments and unmap this one.
    cdef BatchHeader header_copy = (<BatchHeader *>event_at(s, header_position))[0]
    cdef BatchHeader *header = &header_copy
    cdef uint64_t commit = header.commit
    if (header.word_a != (<uint64_t>KIND_HEADER << 56) or (commit >> 32) != COMMIT_MAGIC
            or header.magic_version != (<uint64_t>MAGIC | (<uint64_t>FORMAT_VERSION_C << 32))
            or header.position != header_position or header.event_count == 0 or header.event_count > OFFSET_MAX
            or header_position + 1 + header.event_count > s.verified_from):
        return record_damaged(s, header_position, header_position, DAMAGE_HEADER)
    cdef uint32_t crc = header_checksum(s, header_position, header_position + 1 + header.event_count)
    if crc != header.checksum or crc != <uint32_t>commit:
        return record_damaged(s, header_position, header_position, DAMAGE_CHECKSUM)
    s.verified_headers[header_position >> 3] |= <uint8_t>(1 << (header_position & 7))
    return True

cdef bint verify_old_record(State *s, uint64_t position) noexcept nogil:
    """The event record at `position` (< verified_from) lies in a good committed batch: its offset in the batch
    leads to a header (>= 1, before it) whose batch covers it, and that batch passes verify_old_header. Only then
    may a field of the record (or its timestamp, read through the header) be used."""
    LEDGER_ASSERT(position < s.verified_from)
    cdef Event *e = event_at(s, position)
    cdef uint64_t offset = event_offset(e)
    if offset == 0 or offset >= position:
        return record_damaged(s, position, 0, DAMAGE_OFFSET)
    cdef uint64_t header_position = position - offset
    # A copy: verify_old_header may map other old segments and unmap this one.
    cdef BatchHeader header_copy = (<BatchHeader *>event_at(s, header_position))[0]
    cdef BatchHeader *header = &header_copy
    if not header_verified(s, header_position):
        if (header.word_a != (<uint64_t>KIND_HEADER << 56) or header.position != header_position
                or header.event_count < offset):
            return record_damaged(s, position, header_position, DAMAGE_OFFSET)   # no header there: the offset
        if not verify_old_header(s, header_position):
            s.damage_position = position   # report the record read, and its batch's header beside it
            return False
    # A verified batch covers exactly its records: a wrong offset cannot lead to one that covers this record.
    if header.event_count < offset:
        return record_damaged(s, position, header_position, DAMAGE_OFFSET)
    return True

cdef inline bint record_trusted(State *s, uint64_t position) noexcept nogil:
    """The record at `position` may be used: replayed or written by this process, or its batch checks out."""
    return ledger_likely(position >= s.verified_from) or verify_old_record(s, position)

cdef bint verify_position(State *s, uint64_t position) noexcept nogil:
    """record_trusted for any committed record, header or event (decided by the kind byte, itself checked: a
    record whose kind reads as a header must be a good header)."""
    if position >= s.verified_from:
        return True
    if event_kind(event_at(s, position)) == KIND_HEADER:
        return verify_old_header(s, position)
    return verify_old_record(s, position)

# ---- Id tables: open addressing over groups of four slots (one cache line) -----------------------------
# The home group keeps consecutive ids together (see ledger_home_slot); a full group hands over to a probe
# walk with a per-key odd step. Entries are never deleted except to undo the newest inserts of a failed
# linked chain, in reverse order, which restores the table exactly; so no tombstones are needed.

cdef inline uint64_t table_home_group(const Table *t, uint64_t key) noexcept nogil:
    """The group (of four slots, one cache line) where `key`'s probe walk starts. Computed once per key and row by
    the apply loop's prefetch stage and handed on, so no key is hashed twice."""
    return ledger_home_slot(key, t.capacity_log2) >> 2

cdef inline TableSlot *table_walk(const Table *t, uint64_t key, uint64_t group, TableSlot **empty) noexcept nogil:
    """Find `key`, starting at its home `group`. Returns its slot, or NULL with `empty` set to the free slot where
    it would be inserted (valid until the next insert). The home group is scanned here, inline; a full home group
    without the key (rare below the load limit) continues in table_walk_on."""
    cdef TableSlot *slots = t.slots + (group << 2)
    cdef int k
    for k in range(4):
        if slots[k].key == key:
            empty[0] = NULL
            return &slots[k]
        if slots[k].key == 0:
            empty[0] = &slots[k]
            return NULL
    return table_walk_on(t, key, group, empty)

cdef TableSlot *table_walk_on(const Table *t, uint64_t key, uint64_t group, TableSlot **empty) noexcept nogil:
    """The probe walk past a full home group, with a per-key odd step (not inlined: the step's hash stays out of
    the hot path)."""
    cdef uint64_t group_mask = ((<uint64_t>1 << t.capacity_log2) >> 2) - 1
    cdef uint64_t step = ledger_probe_step(key)
    cdef TableSlot *slots
    cdef int k
    while True:
        group = (group + step) & group_mask
        slots = t.slots + (group << 2)
        for k in range(4):
            if slots[k].key == key:
                empty[0] = NULL
                return &slots[k]
            if slots[k].key == 0:
                empty[0] = &slots[k]
                return NULL

cdef inline TableSlot *table_find_at(const Table *t, uint64_t key, uint64_t group) noexcept nogil:
    """table_find with the home group already known. `key` must not be 0."""
    LEDGER_DEBUG_ASSERT(key != 0 and group == table_home_group(t, key))
    cdef TableSlot *empty
    return table_walk(t, key, group, &empty)

cdef inline TableSlot *table_find(const Table *t, uint64_t key) noexcept nogil:
    if key == 0:
        return NULL   # 0 marks an empty slot: it is never a key (a search for it would "find" an empty slot)
    return table_find_at(t, key, table_home_group(t, key))

cdef inline TableSlot *table_find_for_insert(const Table *t, uint64_t key, uint64_t group,
                                             TableSlot **empty) noexcept nogil:
    """table_find that also hands back the empty slot where `key` would go, so a later insert of the same key
    (with no other insert in between) needs no second probe walk. `group`: the key's home group."""
    LEDGER_DEBUG_ASSERT(key != 0 and group == table_home_group(t, key))
    return table_walk(t, key, group, empty)

cdef inline void table_insert_at(Table *t, TableSlot *empty, uint64_t key, uint64_t value) noexcept nogil:
    LEDGER_ASSERT(empty != NULL and empty.key == 0 and key != 0)
    LEDGER_ASSERT(t.count < t.count_max)
    empty.key = key
    empty.value = value
    t.count += 1

cdef inline void table_prefetch_group(const Table *t, uint64_t group) noexcept nogil:
    ledger_prefetch(t.slots + (group << 2))

cdef inline TableSlot *table_insert(Table *t, uint64_t key, uint64_t value) noexcept nogil:
    """Insert a key that is not in the table."""
    LEDGER_ASSERT(key != 0)
    cdef TableSlot *empty
    cdef TableSlot *found = table_walk(t, key, table_home_group(t, key), &empty)
    LEDGER_ASSERT(found == NULL)
    table_insert_at(t, empty, key, value)
    return empty

cdef inline TableSlot *table_insert_unique(Table *t, uint64_t key, uint64_t value) noexcept nogil:
    """Insert a key that must be new; NULL (and no change) if it is already there. One probe walk for both."""
    LEDGER_ASSERT(key != 0)
    cdef TableSlot *empty
    if table_walk(t, key, table_home_group(t, key), &empty) != NULL:
        return NULL
    table_insert_at(t, empty, key, value)
    return empty

cdef inline void table_remove_newest(Table *t, uint64_t key) noexcept nogil:
    cdef TableSlot *slot = table_find(t, key)
    LEDGER_ASSERT(slot != NULL)
    slot.key = 0
    slot.value = 0
    t.count -= 1

cdef int table_allocate(Table *t, uint32_t capacity_log2, bint populate=True) except -1:
    """populate=False leaves the pages to be faulted in by whoever fills the table first (a snapshot load, whose
    reads then zero and fill each page in one go, on several threads)."""
    if capacity_log2 > TABLE_CAPACITY_LOG2_MAX:
        raise MemoryError(f"id table limit reached (2**{TABLE_CAPACITY_LOG2_MAX} slots)")
    cdef size_t size = (<size_t>1 << capacity_log2) * sizeof(TableSlot)
    cdef void *memory = ledger_map_anonymous(size, populate)   # page-aligned, zero-filled, huge pages
    if memory == NULL:
        raise MemoryError(f"cannot allocate an id table of {size} bytes")
    t.slots = <TableSlot *>memory
    t.count = 0
    t.capacity_log2 = capacity_log2
    # Load factor limit 0.7: probe walks stay short for random ids; dense ids fill groups exactly anyway.
    t.count_max = ((<uint64_t>1 << capacity_log2) * 7) // 10
    return 0

cdef void table_free(Table *t) noexcept:
    if t.slots != NULL:
        ledger_unmap(t.slots, (<size_t>1 << t.capacity_log2) * sizeof(TableSlot))
        t.slots = NULL

cdef int table_reserve(Table *t, uint64_t extra) except -1:
    """Grow (rehash) so that `extra` more keys fit under the load limit. Never called inside a batch."""
    if t.count + extra <= t.count_max:
        return 0
    cdef uint32_t capacity_log2 = t.capacity_log2
    while ((<uint64_t>1 << capacity_log2) * 7) // 10 < t.count + extra:
        capacity_log2 += 1
    cdef Table grown
    table_allocate(&grown, capacity_log2)
    cdef uint64_t i, old_capacity = <uint64_t>1 << t.capacity_log2
    with nogil:
        for i in range(old_capacity):
            if t.slots[i].key != 0:
                table_insert(&grown, t.slots[i].key, t.slots[i].value)
    LEDGER_ASSERT(grown.count == t.count)
    table_free(t)
    t[0] = grown
    return 0

# ---- Expiry heap: (deadline, position) min-heap with lazy deletion --------------------------------------

cdef inline bint heap_less(const HeapEntry *a, const HeapEntry *b) noexcept nogil:
    return a.deadline < b.deadline or (a.deadline == b.deadline and a.position < b.position)

cdef inline void heap_push(Heap *h, uint64_t deadline, uint64_t position) noexcept nogil:
    LEDGER_ASSERT(h.size < h.capacity)
    cdef uint64_t i = h.size, parent
    cdef HeapEntry entry
    entry.deadline = deadline
    entry.position = position
    h.size += 1
    while i > 0:
        parent = (i - 1) >> 1
        if not heap_less(&entry, &h.entries[parent]):
            break
        h.entries[i] = h.entries[parent]
        i = parent
    h.entries[i] = entry

cdef inline HeapEntry heap_pop(Heap *h) noexcept nogil:
    LEDGER_ASSERT(h.size > 0)
    cdef HeapEntry top = h.entries[0]
    h.size -= 1
    cdef HeapEntry last = h.entries[h.size]
    cdef uint64_t i = 0, child
    while True:
        child = 2 * i + 1
        if child >= h.size:
            break
        if child + 1 < h.size and heap_less(&h.entries[child + 1], &h.entries[child]):
            child += 1
        if not heap_less(&h.entries[child], &last):
            break
        h.entries[i] = h.entries[child]
        i = child
    if h.size > 0:
        h.entries[i] = last
    return top

cdef int heap_reserve(Heap *h, uint64_t extra) except -1:
    if h.size + extra <= h.capacity:
        return 0
    cdef uint64_t capacity = max(h.capacity * 2, h.size + extra, <uint64_t>1024)
    cdef void *memory = realloc(h.entries, capacity * sizeof(HeapEntry))
    if memory == NULL:
        raise MemoryError("cannot grow the expiry heap")
    h.entries = <HeapEntry *>memory
    h.capacity = capacity
    return 0

# ---- Applying events (shared by the live path, linked-chain undo and replay) ------------------------------

cdef inline void apply_account(State *s, const Event *e, uint64_t position, uint64_t timestamp) noexcept nogil:
    LEDGER_ASSERT(s.account_count < s.account_capacity)
    cdef uint64_t index = s.account_count
    cdef AccountHot *hot = &s.accounts[index]
    cdef AccountCold *cold = &s.accounts_cold[index]
    memset(hot, 0, sizeof(AccountHot))
    hot.min_balance = e.amount
    hot.max_balance = <int64_t>e.aux
    hot.last_position = position
    hot.ledger = <uint32_t>e.debit_account   # low 32 bits
    hot.flags = <uint16_t>((e.debit_account >> 32) & 0xFFFF)
    cold.id = e.id
    cold.user_data = e.user_data
    cold.timestamp = timestamp
    cold.position = position
    table_insert(&s.account_table, e.id, index)
    s.account_count += 1

cdef inline void apply_transfer(AccountHot *debit, AccountHot *credit, const Event *e, uint64_t position,
                                uint32_t kind) noexcept nogil:
    if kind == KIND_TRANSFER:
        debit.debits_posted += e.amount
        credit.credits_posted += e.amount
    else:
        debit.debits_pending += e.amount
        credit.credits_pending += e.amount
    debit.last_position = position
    credit.last_position = position

cdef inline void apply_resolve(AccountHot *debit, AccountHot *credit, const Event *e, uint64_t position,
                               uint32_t kind, TableSlot *pending_slot, int64_t pending_amount) noexcept nogil:
    """POST, VOID or EXPIRE of a pending transfer: release the reservation, post the amount if POST."""
    debit.debits_pending -= pending_amount
    credit.credits_pending -= pending_amount
    cdef uint64_t state = STATE_PENDING_EXPIRED
    if kind == KIND_POST:
        debit.debits_posted += e.amount
        credit.credits_posted += e.amount
        state = STATE_PENDING_POSTED
    elif kind == KIND_VOID:
        state = STATE_PENDING_VOIDED
    LEDGER_ASSERT(debit.debits_pending >= 0 and credit.credits_pending >= 0)
    pending_slot.value = (pending_slot.value & POSITION_MASK) | (state << POSITION_BITS)
    debit.last_position = position
    credit.last_position = position

cdef inline AccountHot *account_of(State *s, uint64_t id) noexcept nogil:
    cdef TableSlot *slot = table_find(&s.account_table, id)
    if slot == NULL:
        return NULL
    return &s.accounts[slot.value]

cdef inline AccountHot *account_at(State *s, uint64_t id, uint64_t group) noexcept nogil:
    """account_of with the id's home group already known (the apply loop's pipeline)."""
    if id == 0:
        return NULL
    cdef TableSlot *slot = table_find_at(&s.account_table, id, group)
    if slot == NULL:
        return NULL
    return &s.accounts[slot.value]

cdef void undo_event(State *s, uint64_t position) noexcept nogil:
    """Reverse the event at `position`, which must be the newest applied one (linked-chain rollback, and the
    whole-batch undo of a call that met a damaged record, which also undoes its EXPIRE events)."""
    cdef Event *e = event_written(s, position)   # the batch being applied: never unmapped
    cdef uint32_t kind = event_kind(e)
    cdef AccountHot *debit
    cdef AccountHot *credit
    cdef TableSlot *pending_slot
    cdef Event pending_event
    cdef Event *pending
    if kind == KIND_ACCOUNT:
        LEDGER_ASSERT(s.account_count > 0 and s.accounts_cold[s.account_count - 1].id == e.id)
        table_remove_newest(&s.account_table, e.id)
        s.account_count -= 1
        memset(&s.accounts[s.account_count], 0, sizeof(AccountHot))
        memset(&s.accounts_cold[s.account_count], 0, sizeof(AccountCold))
        return
    debit = account_of(s, e.debit_account)
    credit = account_of(s, e.credit_account)
    LEDGER_ASSERT(debit != NULL and credit != NULL)
    LEDGER_ASSERT(debit.last_position == position and credit.last_position == position)
    if kind == KIND_TRANSFER:
        debit.debits_posted -= e.amount
        credit.credits_posted -= e.amount
    elif kind == KIND_PENDING:
        debit.debits_pending -= e.amount
        credit.credits_pending -= e.amount
    else:
        LEDGER_ASSERT(kind == KIND_POST or kind == KIND_VOID or kind == KIND_EXPIRE)
        pending_slot = table_find(&s.transfer_table, e.aux)
        LEDGER_ASSERT(pending_slot != NULL)
        # Applying this event read (and so checked) the pending record: its batch is remembered as good.
        LEDGER_ASSERT(record_trusted(s, pending_slot.value & POSITION_MASK))
        # A copy: event_timestamp below may map another old segment and unmap this one.
        pending_event = event_at(s, pending_slot.value & POSITION_MASK)[0]
        pending = &pending_event
        debit.debits_pending += pending.amount
        credit.credits_pending += pending.amount
        if kind == KIND_POST:
            debit.debits_posted -= e.amount
            credit.credits_posted -= e.amount
        pending_slot.value = (pending_slot.value & POSITION_MASK) | (<uint64_t>STATE_PENDING << POSITION_BITS)
        if kind == KIND_EXPIRE:
            # expire_due popped its deadline (there is room: this batch popped it): put it back. EXPIRE adds
            # no id to the transfer table.
            heap_push(&s.expiry_heap, event_timestamp(s, pending, pending_slot.value & POSITION_MASK)
                      + pending.aux * NANOSECONDS_PER_SECOND, pending_slot.value & POSITION_MASK)
            debit.last_position = e.word_a & POSITION_MASK
            credit.last_position = e.word_b & POSITION_MASK
            return
    debit.last_position = e.word_a & POSITION_MASK
    credit.last_position = e.word_b & POSITION_MASK
    table_remove_newest(&s.transfer_table, e.id)

# ---- Validation: one row in, one result code out (and one event written when OK) --------------------------

cdef inline uint8_t account_row(State *s, const AccountRow *a, uint64_t position, uint64_t offset,
                                uint64_t timestamp) noexcept nogil:
    if (a.flags & ~ACCOUNT_FLAGS_ALL) != 0:
        return R_FLAGS_INVALID
    if a.id == 0 or a.id == ID_MAX:
        return R_ID_INVALID
    if a.ledger == 0:
        return RA_LEDGER_INVALID
    if a.min_balance > 0 or a.max_balance < 0:
        return RA_BALANCE_LIMITS_INVALID
    cdef uint16_t flags = a.flags & ~FLAG_LINKED
    cdef TableSlot *existing = table_find(&s.account_table, a.id)
    cdef AccountHot *hot
    if existing != NULL:
        hot = &s.accounts[existing.value]
        if (hot.ledger == a.ledger and hot.flags == flags and hot.min_balance == a.min_balance
                and hot.max_balance == a.max_balance and s.accounts_cold[existing.value].user_data == a.user_data):
            return RA_EXISTS
        return RA_EXISTS_WITH_DIFFERENT_FIELDS
    cdef Event *e = event_written(s, position)
    e.id = a.id
    e.debit_account = <uint64_t>a.ledger | (<uint64_t>flags << 32)
    e.credit_account = 0
    e.amount = a.min_balance
    e.user_data = a.user_data
    e.aux = <uint64_t>a.max_balance
    e.word_a = word_a(0, 0, KIND_ACCOUNT | (KIND_LINKED if (a.flags & FLAG_LINKED) else 0))
    e.word_b = word_b(0, offset)
    apply_account(s, e, position, timestamp)
    return R_OK

cdef inline uint8_t compare_existing(State *s, const TableSlot *slot, const TransferRow *t) noexcept nogil:
    if not record_trusted(s, slot.value & POSITION_MASK):
        return R_DAMAGED   # the original event is damaged: no answer from it (the call is undone and raises)
    cdef Event *e = event_at(s, slot.value & POSITION_MASK)
    cdef uint32_t kind = event_kind(e)
    cdef uint16_t recorded_flags = 0
    if kind == KIND_PENDING:
        recorded_flags = FLAG_PENDING
    elif kind == KIND_POST:
        recorded_flags = FLAG_POST
    elif kind == KIND_VOID:
        recorded_flags = FLAG_VOID
    if (t.flags & ~FLAG_LINKED) != recorded_flags or t.code != event_code(e) or t.user_data != e.user_data:
        return RT_EXISTS_WITH_DIFFERENT_FIELDS
    cdef AccountHot *debit = account_of(s, e.debit_account)
    LEDGER_ASSERT(debit != NULL)
    if kind == KIND_POST or kind == KIND_VOID:
        # Zeros in a resolving row mean "as the pending transfer", so they match what was recorded.
        if (t.pending_id != e.aux
                or (t.debit_account != 0 and t.debit_account != e.debit_account)
                or (t.credit_account != 0 and t.credit_account != e.credit_account)
                or (t.amount != 0 and t.amount != e.amount)
                or (t.ledger != 0 and t.ledger != debit.ledger)):
            return RT_EXISTS_WITH_DIFFERENT_FIELDS
        return RT_EXISTS
    if (t.debit_account != e.debit_account or t.credit_account != e.credit_account or t.amount != e.amount
            or t.ledger != debit.ledger or t.timeout != (e.aux if kind == KIND_PENDING else 0)):
        return RT_EXISTS_WITH_DIFFERENT_FIELDS
    return RT_EXISTS

cdef inline uint8_t resolve_row(State *s, const TransferRow *t, uint64_t position, uint64_t offset,
                                uint64_t timestamp, uint32_t kind) noexcept nogil:
    """POST_PENDING or VOID_PENDING (kind is KIND_POST or KIND_VOID)."""
    if t.pending_id == 0:
        return RT_PENDING_ID_REQUIRED
    if t.pending_id == ID_MAX:
        return RT_PENDING_ID_INVALID
    if t.pending_id == t.id:
        return RT_PENDING_ID_MUST_BE_DIFFERENT
    if t.timeout != 0:
        return RT_TIMEOUT_RESERVED_FOR_PENDING
    cdef TableSlot *existing = table_find(&s.transfer_table, t.id)
    if existing != NULL:
        return compare_existing(s, existing, t)
    cdef TableSlot *pending_slot = table_find(&s.transfer_table, t.pending_id)
    if pending_slot == NULL:
        return RT_PENDING_NOT_FOUND
    cdef uint64_t state = (pending_slot.value >> POSITION_BITS) & 0xFF
    if state == STATE_POSTED:
        return RT_PENDING_TRANSFER_NOT_PENDING
    if state == STATE_PENDING_POSTED:
        return RT_PENDING_ALREADY_POSTED
    if state == STATE_PENDING_VOIDED:
        return RT_PENDING_ALREADY_VOIDED
    if state == STATE_PENDING_EXPIRED:
        return RT_PENDING_EXPIRED
    LEDGER_ASSERT(state == STATE_PENDING)
    cdef uint64_t pending_position = pending_slot.value & POSITION_MASK
    if not record_trusted(s, pending_position):
        return R_DAMAGED   # never apply amounts or accounts read from a damaged record
    # A copy: reading the pending event's batch header may map another old segment and unmap this one.
    cdef Event pending_event = event_at(s, pending_position)[0]
    cdef Event *pending = &pending_event
    if pending.aux != 0 and (event_timestamp(s, pending, pending_position)
                             + pending.aux * NANOSECONDS_PER_SECOND) <= timestamp:
        return RT_PENDING_EXPIRED
    if t.debit_account != 0 and t.debit_account != pending.debit_account:
        return RT_PENDING_DIFFERENT_DEBIT_ACCOUNT
    if t.credit_account != 0 and t.credit_account != pending.credit_account:
        return RT_PENDING_DIFFERENT_CREDIT_ACCOUNT
    cdef AccountHot *debit = account_of(s, pending.debit_account)
    cdef AccountHot *credit = account_of(s, pending.credit_account)
    LEDGER_ASSERT(debit != NULL and credit != NULL)
    if t.ledger != 0 and t.ledger != debit.ledger:
        return RT_LEDGER_MISMATCH
    if t.amount < 0:
        return RT_AMOUNT_MUST_BE_POSITIVE
    cdef int64_t amount = pending.amount
    if kind == KIND_POST:
        if t.amount != 0:
            amount = t.amount
        if amount > pending.amount:
            return RT_EXCEEDS_PENDING_AMOUNT
    elif t.amount != 0 and t.amount != pending.amount:
        return RT_PENDING_DIFFERENT_AMOUNT
    cdef Event *e = event_written(s, position)
    e.id = t.id
    e.debit_account = pending.debit_account
    e.credit_account = pending.credit_account
    e.amount = amount
    e.user_data = t.user_data
    e.aux = t.pending_id
    e.word_a = word_a(debit.last_position, t.code, kind | (KIND_LINKED if (t.flags & FLAG_LINKED) else 0))
    e.word_b = word_b(credit.last_position, offset)
    apply_resolve(debit, credit, e, position, kind, pending_slot, pending.amount)
    table_insert(&s.transfer_table, t.id, position | (<uint64_t>STATE_POSTED << POSITION_BITS))
    return R_OK

cdef inline uint8_t transfer_row(State *s, const TransferRow *t, uint64_t position, uint64_t offset,
                                 uint64_t timestamp, AccountHot *debit, AccountHot *credit,
                                 uint64_t id_group) noexcept nogil:
    """debit, credit: the accounts of t.debit_account and t.credit_account, already looked up (NULL: none);
    id_group: the home group of t.id in the transfer table."""
    cdef uint16_t flags = t.flags
    cdef uint16_t phase = flags & (FLAG_PENDING | FLAG_POST | FLAG_VOID)
    if (flags & ~TRANSFER_FLAGS_ALL) != 0 or (phase & (phase - 1)) != 0:
        return R_FLAGS_INVALID
    if t.id == 0 or t.id == ID_MAX:
        return R_ID_INVALID
    if phase == FLAG_POST:
        return resolve_row(s, t, position, offset, timestamp, KIND_POST)
    if phase == FLAG_VOID:
        return resolve_row(s, t, position, offset, timestamp, KIND_VOID)
    if t.pending_id != 0:
        return RT_PENDING_ID_MUST_BE_ZERO
    if t.timeout != 0 and phase != FLAG_PENDING:
        return RT_TIMEOUT_RESERVED_FOR_PENDING
    cdef TableSlot *empty = NULL
    cdef TableSlot *existing = table_find_for_insert(&s.transfer_table, t.id, id_group, &empty)
    if existing != NULL:
        return compare_existing(s, existing, t)
    if t.debit_account == 0 or t.debit_account == ID_MAX:
        return RT_DEBIT_ACCOUNT_ID_INVALID
    if t.credit_account == 0 or t.credit_account == ID_MAX:
        return RT_CREDIT_ACCOUNT_ID_INVALID
    if t.debit_account == t.credit_account:
        return RT_ACCOUNTS_MUST_BE_DIFFERENT
    cdef int64_t amount = t.amount
    if amount <= 0:
        return RT_AMOUNT_MUST_BE_POSITIVE
    if t.ledger == 0:
        return RT_LEDGER_INVALID
    if debit == NULL:
        return RT_DEBIT_ACCOUNT_NOT_FOUND
    if credit == NULL:
        return RT_CREDIT_ACCOUNT_NOT_FOUND
    if debit.ledger != credit.ledger or t.ledger != debit.ledger:
        return RT_LEDGER_MISMATCH
    # Invariant: posted + pending <= AMOUNT_MAX on each side, so these sums cannot wrap.
    if debit.debits_posted + debit.debits_pending > AMOUNT_MAX - amount:
        return RT_OVERFLOW
    if credit.credits_posted + credit.credits_pending > AMOUNT_MAX - amount:
        return RT_OVERFLOW
    # min_balance <= 0 <= max_balance (checked at creation), so neither side of these compares can wrap.
    if debit.credits_posted - (debit.debits_posted + debit.debits_pending) < debit.min_balance + amount:
        return RT_INSUFFICIENT_FUNDS
    if (credit.credits_posted + credit.credits_pending) - credit.debits_posted > credit.max_balance - amount:
        return RT_EXCEEDS_MAX_BALANCE
    cdef uint32_t kind = KIND_PENDING if phase == FLAG_PENDING else KIND_TRANSFER
    cdef Event *e = event_written(s, position)
    e.id = t.id
    e.debit_account = t.debit_account
    e.credit_account = t.credit_account
    e.amount = amount
    e.user_data = t.user_data
    e.aux = t.timeout
    e.word_a = word_a(debit.last_position, t.code, kind | (KIND_LINKED if (flags & FLAG_LINKED) else 0))
    e.word_b = word_b(credit.last_position, offset)
    apply_transfer(debit, credit, e, position, kind)
    table_insert_at(&s.transfer_table, empty, t.id,
                    position | (<uint64_t>(STATE_PENDING if kind == KIND_PENDING else STATE_POSTED) << POSITION_BITS))
    if kind == KIND_PENDING and t.timeout != 0:
        s.batch_pending_deadlines += 1
    return R_OK

# ---- Batch drivers ------------------------------------------------------------------------------------------

ctypedef fused Row:
    AccountRow
    TransferRow

cdef inline bint row_id_exists(State *s, const Row *row) noexcept nogil:
    if Row is AccountRow:
        return table_find(&s.account_table, row.id) != NULL
    else:
        return table_find(&s.transfer_table, row.id) != NULL

DEF PREFETCH_TABLES_AHEAD = 16
DEF PREFETCH_ACCOUNTS_AHEAD = 8
DEF PREFETCH_RING = 32   # power of two > PREFETCH_TABLES_AHEAD

ctypedef struct Pipeline:
    # Per row, indexed by row & (PREFETCH_RING - 1): the home groups of its debit account, credit account and
    # transfer id (hashed once, PREFETCH_TABLES_AHEAD rows ahead, when their cache lines are prefetched), and its
    # account records (resolved PREFETCH_ACCOUNTS_AHEAD rows ahead, when they are prefetched). Transfers never
    # create or move accounts, so the pointers stay valid for the whole batch.
    uint64_t debit_group[PREFETCH_RING]
    uint64_t credit_group[PREFETCH_RING]
    uint64_t id_group[PREFETCH_RING]
    AccountHot *debit[PREFETCH_RING]
    AccountHot *credit[PREFETCH_RING]

cdef inline void pipeline_hash(State *s, Pipeline *p, uint64_t debit_account, uint64_t credit_account,
                               uint64_t id, uint64_t i) noexcept nogil:
    """Stage 1 for row (or event) i: hash its three keys and prefetch their id-table groups."""
    cdef uint64_t slot = i & (PREFETCH_RING - 1)
    p.debit_group[slot] = table_home_group(&s.account_table, debit_account)
    p.credit_group[slot] = table_home_group(&s.account_table, credit_account)
    p.id_group[slot] = table_home_group(&s.transfer_table, id)
    table_prefetch_group(&s.account_table, p.debit_group[slot])
    table_prefetch_group(&s.account_table, p.credit_group[slot])
    table_prefetch_group(&s.transfer_table, p.id_group[slot])

cdef inline void pipeline_resolve(State *s, Pipeline *p, uint64_t debit_account, uint64_t credit_account,
                                  uint64_t i) noexcept nogil:
    """Stage 2 for row (or event) i: find its accounts in the (now cached) groups and prefetch their records."""
    cdef uint64_t slot = i & (PREFETCH_RING - 1)
    cdef AccountHot *debit = account_at(s, debit_account, p.debit_group[slot])
    cdef AccountHot *credit = account_at(s, credit_account, p.credit_group[slot])
    if debit != NULL:
        ledger_prefetch(debit)
    if credit != NULL:
        ledger_prefetch(credit)
    p.debit[slot] = debit
    p.credit[slot] = credit

cdef inline void pipeline_fill(State *s, Pipeline *p, const TransferRow *rows, uint64_t i, uint64_t end) noexcept nogil:
    """Start (or restart, after rows were skipped) the pipeline at row i: rows i .. i + 15 hashed, rows
    i .. i + 7 resolved, as if the loop had run the stages for them."""
    cdef uint64_t k
    for k in range(i, min(i + PREFETCH_TABLES_AHEAD, end)):
        pipeline_hash(s, p, rows[k].debit_account, rows[k].credit_account, rows[k].id, k)
    for k in range(i, min(i + PREFETCH_ACCOUNTS_AHEAD, end)):
        pipeline_resolve(s, p, rows[k].debit_account, rows[k].credit_account, k)

cdef inline void pipeline_advance(State *s, Pipeline *p, const TransferRow *rows, uint64_t i,
                                  uint64_t end) noexcept nogil:
    """Software pipeline for random account access, run once per row i: 16 rows ahead, hash and prefetch the
    id-table groups; 8 rows ahead, resolve the account slots and prefetch the account records. The row at hand
    then finds everything in cache, so the loop is bound by bandwidth rather than by one memory latency after
    another."""
    cdef const TransferRow *ahead
    if i + PREFETCH_TABLES_AHEAD < end:
        ahead = &rows[i + PREFETCH_TABLES_AHEAD]
        pipeline_hash(s, p, ahead.debit_account, ahead.credit_account, ahead.id, i + PREFETCH_TABLES_AHEAD)
    if i + PREFETCH_ACCOUNTS_AHEAD < end:
        ahead = &rows[i + PREFETCH_ACCOUNTS_AHEAD]
        pipeline_resolve(s, p, ahead.debit_account, ahead.credit_account, i + PREFETCH_ACCOUNTS_AHEAD)

cdef inline void pipeline_advance_events(State *s, Pipeline *p, uint64_t position, uint64_t end) noexcept nogil:
    """The same pipeline for replay, over the journal records of a transfers batch instead of rows."""
    cdef Event *ahead
    if position + PREFETCH_TABLES_AHEAD < end:
        ahead = event_at(s, position + PREFETCH_TABLES_AHEAD)
        pipeline_hash(s, p, ahead.debit_account, ahead.credit_account, ahead.id, position + PREFETCH_TABLES_AHEAD)
    if position + PREFETCH_ACCOUNTS_AHEAD < end:
        ahead = event_at(s, position + PREFETCH_ACCOUNTS_AHEAD)
        pipeline_resolve(s, p, ahead.debit_account, ahead.credit_account, position + PREFETCH_ACCOUNTS_AHEAD)


cdef uint64_t apply_rows(State *s, const Row *rows, uint64_t count, uint8_t *results, uint64_t header_position,
                         uint64_t position, uint64_t timestamp_base, uint64_t *written_end) noexcept nogil:
    """Apply rows in order with linked-chain semantics; return the next free position. `written_end` gets the
    end of every record written, rolled-back ones included, so the caller can zero what was undone."""
    cdef uint8_t exists_code = RA_EXISTS if Row is AccountRow else RT_EXISTS
    cdef uint64_t evaluated_end = count, i, k, p, offset
    cdef uint64_t chain_start = count, chain_position = 0
    cdef bint linked
    cdef uint8_t code
    cdef Pipeline pipeline
    # A chain still open at the end of the batch is not evaluated.
    if count > 0 and (rows[count - 1].flags & FLAG_LINKED):
        evaluated_end = count - 1
        while evaluated_end > 0 and (rows[evaluated_end - 1].flags & FLAG_LINKED):
            evaluated_end -= 1
        for k in range(evaluated_end, count - 1):
            results[k] = R_LINKED_EVENT_FAILED
        results[count - 1] = R_LINKED_CHAIN_OPEN
    i = 0
    if Row is TransferRow:
        pipeline_fill(s, &pipeline, rows, 0, evaluated_end)
    while i < evaluated_end:
        if Row is TransferRow:
            pipeline_advance(s, &pipeline, rows, i, evaluated_end)
        linked = (rows[i].flags & FLAG_LINKED) != 0
        if linked and chain_start == count:
            chain_start = i
            chain_position = position
        offset = position - header_position
        if Row is AccountRow:
            code = account_row(s, &rows[i], position, offset, timestamp_base + offset - 1)
        else:
            k = i & (PREFETCH_RING - 1)
            code = transfer_row(s, &rows[i], position, offset, timestamp_base + offset - 1,
                                pipeline.debit[k], pipeline.credit[k], pipeline.id_group[k])
        results[i] = code
        if code == R_OK:
            position += 1
        elif ledger_unlikely(code == R_DAMAGED):
            break   # the caller undoes the whole batch (undo_batch) and raises
        elif code != exists_code and chain_start != count:
            if position > written_end[0]:
                written_end[0] = position
            p = position
            while p > chain_position:
                p -= 1
                undo_event(s, p)
            position = chain_position
            for k in range(chain_start, i):
                # EXISTS stays EXISTS only if what it matched survives the undo (it was not made by this chain).
                if results[k] != exists_code or not row_id_exists(s, &rows[k]):
                    results[k] = R_LINKED_EVENT_FAILED
            k = i
            while rows[k].flags & FLAG_LINKED:
                k += 1
                results[k] = R_LINKED_EVENT_FAILED
            i = k + 1
            chain_start = count
            if Row is TransferRow:
                # The skipped rows' iterations did not run the pipeline's stages: restart it at the next row.
                pipeline_fill(s, &pipeline, rows, i, evaluated_end)
            continue
        if not linked:
            chain_start = count
        i += 1
    return position

cdef uint64_t expire_due(State *s, uint64_t header_position, uint64_t position, uint64_t timestamp_base) noexcept nogil:
    """Write an EXPIRE event for each pending transfer whose deadline has passed (bounded per call)."""
    cdef uint64_t expired = 0, offset
    cdef HeapEntry top
    cdef Event *pending
    cdef Event *e
    cdef TableSlot *slot
    cdef AccountHot *debit
    cdef AccountHot *credit
    while s.expiry_heap.size > 0 and s.expiry_heap.entries[0].deadline <= timestamp_base \
            and expired < EXPIRE_BATCH_MAX_C:
        top = heap_pop(&s.expiry_heap)
        if not record_trusted(s, top.position):
            heap_push(&s.expiry_heap, top.deadline, top.position)   # as it was; the caller undoes the batch
            break
        pending = event_at(s, top.position)
        slot = table_find(&s.transfer_table, pending.id)
        if slot == NULL or (slot.value & POSITION_MASK) != top.position \
                or ((slot.value >> POSITION_BITS) & 0xFF) != STATE_PENDING:
            continue  # posted or voided before its deadline: a stale entry
        debit = account_of(s, pending.debit_account)
        credit = account_of(s, pending.credit_account)
        LEDGER_ASSERT(debit != NULL and credit != NULL)
        offset = position - header_position
        e = event_written(s, position)
        e.id = pending.id
        e.debit_account = pending.debit_account
        e.credit_account = pending.credit_account
        e.amount = pending.amount
        e.user_data = 0
        e.aux = pending.id
        e.word_a = word_a(debit.last_position, 0, KIND_EXPIRE)
        e.word_b = word_b(credit.last_position, offset)
        apply_resolve(debit, credit, e, position, KIND_EXPIRE, slot, pending.amount)
        position += 1
        expired += 1
    return position

cdef void schedule_expiries(State *s, uint64_t start, uint64_t end) noexcept nogil:
    """Push the deadlines of the PENDING events in [start, end) once their batch is final (after rollbacks)."""
    cdef uint64_t position
    cdef Event *e
    cdef uint64_t timeout_seconds
    for position in range(start, end):
        e = event_at(s, position)
        if event_kind(e) == KIND_PENDING and e.aux != 0:
            timeout_seconds = e.aux   # read before the header: in replay that may map another old segment
            heap_push(&s.expiry_heap, event_timestamp(s, e, position) + timeout_seconds * NANOSECONDS_PER_SECOND,
                      position)

cdef uint32_t checksum_range(State *s, uint32_t crc, uint64_t start, uint64_t end) noexcept nogil:
    """CRC32C over the records [start, end), which may span segments."""
    cdef uint64_t records_per_segment = <uint64_t>1 << s.segment_records_log2
    cdef uint64_t chunk_end
    while start < end:
        chunk_end = min(end, (start | (records_per_segment - 1)) + 1)
        crc = ledger_crc32c(crc, event_at(s, start), (chunk_end - start) * 64)
        start = chunk_end
    return crc

cdef void zero_range(State *s, uint64_t start, uint64_t end) noexcept nogil:
    cdef uint64_t records_per_segment = <uint64_t>1 << s.segment_records_log2
    cdef uint64_t chunk_end
    while start < end:
        chunk_end = min(end, (start | (records_per_segment - 1)) + 1)
        memset(event_at(s, start), 0, (chunk_end - start) * 64)
        start = chunk_end

cdef uint32_t header_checksum(State *s, uint64_t header_position, uint64_t end) noexcept nogil:
    cdef uint32_t crc = checksum_range(s, 0, header_position + 1, end)
    # After the events: reading them may have mapped another old segment and unmapped the header's.
    cdef BatchHeader *header = <BatchHeader *>event_at(s, header_position)
    # The header fields up to and including previous_checksum: this is what chains batch to batch.
    return ledger_crc32c(crc, header, 40)

cdef void commit_batch(State *s, uint64_t header_position, uint64_t end, uint64_t timestamp_base,
                       uint64_t dirty_end) noexcept nogil:
    """Seal the batch [header_position, end): header fields, checksum, and last the commit word."""
    cdef uint64_t count = end - header_position - 1
    if dirty_end > end:
        zero_range(s, end, dirty_end)   # records of rolled-back chains past the end: keep the tail zero
    if count == 0:
        zero_range(s, header_position, header_position + 1)   # the timestamp stamped by begin_batch
        return
    LEDGER_ASSERT(count <= OFFSET_MAX)
    cdef BatchHeader *header = <BatchHeader *>event_written(s, header_position)
    header.magic_version = <uint64_t>MAGIC | (<uint64_t>FORMAT_VERSION_C << 32)
    header.timestamp = timestamp_base
    header.position = header_position
    header.event_count = count
    header.previous_checksum = s.last_checksum
    header.word_a = <uint64_t>KIND_HEADER << 56
    cdef uint32_t crc = header_checksum(s, header_position, end)
    header.checksum = crc
    ledger_store_release_u64(&header.commit, (<uint64_t>COMMIT_MAGIC << 32) | crc)
    if s.batch_pending_deadlines != 0:   # an upper bound (rolled-back ones count): skip the pass when zero
        schedule_expiries(s, header_position + 1, end)
    s.last_checksum = crc
    s.last_timestamp = timestamp_base + count - 1
    s.last_header_position = header_position
    s.write_position = end

cdef inline uint64_t clock_now_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_REALTIME, &now)
    return <uint64_t>now.tv_sec * NANOSECONDS_PER_SECOND + <uint64_t>now.tv_nsec

cdef inline uint64_t begin_batch(State *s, uint64_t now) noexcept nogil:
    """Stamp the batch's base timestamp into its header slot first: events of this batch that are read back
    before the commit (a POST of a PENDING made earlier in the same batch) find their time there. A crash before
    the commit leaves a header without its commit word, which recovery treats as a torn tail."""
    cdef uint64_t timestamp_base = now if now > s.last_timestamp else s.last_timestamp + 1
    (<BatchHeader *>event_written(s, s.write_position)).timestamp = timestamp_base
    s.batch_pending_deadlines = 0
    return timestamp_base

cdef uint64_t run_transfers(State *s, const TransferRow *rows, uint64_t count, uint8_t *results,
                           uint64_t now) noexcept nogil:
    """One transfers call: expiries, rows, commit. Returns the number of events written (0 and nothing applied
    when a damaged record was met: s.damage_reason says so)."""
    cdef uint64_t header_position = s.write_position
    cdef uint64_t timestamp_base = begin_batch(s, now)
    cdef uint64_t position = expire_due(s, header_position, header_position + 1, timestamp_base)
    cdef uint64_t written_end = position
    cdef uint64_t end = position
    if ledger_likely(s.damage_reason == DAMAGE_NONE):
        end = apply_rows(s, rows, count, results, header_position, position, timestamp_base, &written_end)
    if ledger_unlikely(s.damage_reason != DAMAGE_NONE):
        end = undo_batch(s, header_position, end, &written_end)
    commit_batch(s, header_position, end, timestamp_base, written_end)
    return end - header_position - 1

cdef uint64_t undo_batch(State *s, uint64_t header_position, uint64_t end, uint64_t *written_end) noexcept nogil:
    """A row (or an expiry) of the batch being applied met a damaged record: undo every event of the batch, newest
    first, so that the call changes nothing (commit_batch then seals an empty batch: it zeroes what was written).
    Returns the batch's new end (the position after its header)."""
    if end > written_end[0]:
        written_end[0] = end
    while end > header_position + 1:
        end -= 1
        undo_event(s, end)
    return end

DEF WRITE_AHEAD_ROWS = 4096       # 256 KiB of events per chunk
# Each background sync is a device cache flush as well as data: below about four chunks the extra flush costs
# what the overlap saves (measured: 8k batches no faster, 64k batches 4.3 -> 4.9-6.0M transfers/s).
DEF WRITE_AHEAD_BATCH_MIN_ROWS = 16384

cdef inline uint64_t chunk_end(const TransferRow *rows, uint64_t first, uint64_t count) noexcept nogil:
    """The end of the chunk that starts at row `first`: about WRITE_AHEAD_ROWS rows, moved past the end of a
    LINKED chain it would cut (a chain is applied or undone as a whole inside one apply_rows call)."""
    cdef uint64_t last = min(first + WRITE_AHEAD_ROWS, count)
    while last < count and (rows[last - 1].flags & FLAG_LINKED):
        last += 1
    return last

cdef uint64_t run_accounts(State *s, const AccountRow *rows, uint64_t count, uint8_t *results,
                          uint64_t now) noexcept nogil:
    cdef uint64_t header_position = s.write_position
    cdef uint64_t timestamp_base = begin_batch(s, now)
    cdef uint64_t written_end = header_position + 1
    cdef uint64_t end = apply_rows(s, rows, count, results, header_position, header_position + 1, timestamp_base,
                                   &written_end)
    commit_batch(s, header_position, end, timestamp_base, written_end)
    return end - header_position - 1

# ---- Replay: the state as a fold over committed batches ------------------------------------------------------

cdef int replay_batch(State *s, uint64_t header_position, uint64_t count) noexcept nogil:
    """Apply the events of a verified batch. Returns REPLAY_END (0) or REPLAY_INTEGRITY. A batch is either all
    ACCOUNT events (a create_accounts call) or has none (transfers and expiries), as the writer makes them."""
    s.batch_pending_deadlines = 0   # counted by replay_transfers: the expiry pass is skipped when none
    if event_kind(event_at(s, header_position + 1)) == KIND_ACCOUNT:
        return replay_accounts(s, header_position, count)
    return replay_transfers(s, header_position, count)

cdef int replay_accounts(State *s, uint64_t header_position, uint64_t count) noexcept nogil:
    cdef uint64_t position
    cdef Event *e
    # A copy: the batch's events may lie in the next segment, whose mapping may unmap the header's.
    cdef uint64_t timestamp_base = (<BatchHeader *>event_at(s, header_position)).timestamp
    for position in range(header_position + 1, header_position + 1 + count):
        e = event_at(s, position)
        if event_kind(e) != KIND_ACCOUNT or event_offset(e) != position - header_position:
            return REPLAY_INTEGRITY
        if e.id == 0 or e.id == ID_MAX or table_find(&s.account_table, e.id) != NULL:
            return REPLAY_INTEGRITY
        apply_account(s, e, position, timestamp_base + (position - header_position) - 1)
    return REPLAY_END

cdef int replay_transfers(State *s, uint64_t header_position, uint64_t count) noexcept nogil:
    cdef uint64_t position, slot_index
    cdef Event *e
    cdef uint32_t kind
    cdef AccountHot *debit
    cdef AccountHot *credit
    cdef TableSlot *slot
    cdef TableSlot *empty
    cdef Event pending_event
    cdef Event *pending
    cdef Pipeline pipeline
    cdef uint64_t first = header_position + 1, end = header_position + 1 + count
    for position in range(first, min(first + PREFETCH_TABLES_AHEAD, end)):
        e = event_at(s, position)
        pipeline_hash(s, &pipeline, e.debit_account, e.credit_account, e.id, position)
    for position in range(first, min(first + PREFETCH_ACCOUNTS_AHEAD, end)):
        e = event_at(s, position)
        pipeline_resolve(s, &pipeline, e.debit_account, e.credit_account, position)
    for position in range(first, end):
        pipeline_advance_events(s, &pipeline, position, end)
        e = event_at(s, position)
        kind = event_kind(e)
        if event_offset(e) != position - header_position:
            return REPLAY_INTEGRITY
        if kind < KIND_TRANSFER or kind > KIND_EXPIRE or e.amount <= 0:
            return REPLAY_INTEGRITY
        slot_index = position & (PREFETCH_RING - 1)
        debit = pipeline.debit[slot_index]
        credit = pipeline.credit[slot_index]
        if debit == NULL or credit == NULL or debit == credit:
            return REPLAY_INTEGRITY
        if debit.last_position != (e.word_a & POSITION_MASK) or credit.last_position != (e.word_b & POSITION_MASK):
            return REPLAY_INTEGRITY
        if kind == KIND_TRANSFER or kind == KIND_PENDING:
            if e.id == 0 or table_walk(&s.transfer_table, e.id, pipeline.id_group[slot_index], &empty) != NULL:
                return REPLAY_INTEGRITY   # a transfer id applied twice
            table_insert_at(&s.transfer_table, empty, e.id, position | (<uint64_t>(
                STATE_PENDING if kind == KIND_PENDING else STATE_POSTED) << POSITION_BITS))
            apply_transfer(debit, credit, e, position, kind)
            s.batch_pending_deadlines += kind == KIND_PENDING and e.aux != 0
            continue
        slot = table_find(&s.transfer_table, e.aux)
        if slot == NULL or ((slot.value >> POSITION_BITS) & 0xFF) != STATE_PENDING:
            return REPLAY_INTEGRITY
        if not record_trusted(s, slot.value & POSITION_MASK):
            return REPLAY_DAMAGED   # the pending transfer's record (before the snapshot) is damaged
        # A copy: mapping this event's segment again (below) may unmap the pending event's.
        pending_event = event_at(s, slot.value & POSITION_MASK)[0]
        pending = &pending_event
        e = event_at(s, position)   # mapping the pending event's segment may have unmapped this one
        if pending.debit_account != e.debit_account or pending.credit_account != e.credit_account \
                or e.amount > pending.amount:
            return REPLAY_INTEGRITY
        if kind != KIND_EXPIRE and table_find(&s.transfer_table, e.id) != NULL:
            return REPLAY_INTEGRITY
        apply_resolve(debit, credit, e, position, kind, slot, pending.amount)
        if kind != KIND_EXPIRE:
            table_insert(&s.transfer_table, e.id, position | (<uint64_t>STATE_POSTED << POSITION_BITS))
    return REPLAY_END

cdef uint64_t count_accounts(State *s, uint64_t header_position, uint64_t count) noexcept nogil:
    """Accounts a batch can create: all of its events if it is an accounts batch (replay_batch checks that every
    one is), none otherwise. One record read instead of a pass over the batch."""
    return count if event_kind(event_at(s, header_position + 1)) == KIND_ACCOUNT else 0

cdef int check_header(State *s, uint64_t position, uint64_t *count_out, uint32_t *crc_out) noexcept nogil:
    """Classify the record where the next batch header should be."""
    return check_batch(s, position, s.last_checksum, s.mapped_end, count_out, crc_out)

cdef int check_batch(State *s, uint64_t position, uint64_t previous_checksum, uint64_t end, uint64_t *count_out,
                     uint32_t *crc_out) noexcept nogil:
    """Classify the record at `position` as the header of a batch that follows one with checksum
    previous_checksum, within the records below `end`: -1 a good batch (its count and checksum out), else a
    REPLAY_* reason. Replay (check_header) and scrub share it. count_out is also set when the header is
    well-formed but its checksum or chain fails (scrub goes on after such a batch)."""
    if position >= end:
        return REPLAY_END
    cdef BatchHeader *header = <BatchHeader *>event_at(s, position)
    cdef uint32_t kind = <uint32_t>((header.word_a >> 56) & KIND_MASK)
    cdef uint64_t commit = ledger_load_acquire_u64(&header.commit)
    if kind == 0 and header.magic_version == 0 and commit == 0:
        return REPLAY_END if header.word_a == 0 and header.event_count == 0 else REPLAY_TORN
    if kind != KIND_HEADER:
        return REPLAY_HEADER
    if header.word_a != (<uint64_t>KIND_HEADER << 56):
        return REPLAY_HEADER   # the rest of this word is not under the checksum: it must be exactly this
    if (commit >> 32) != COMMIT_MAGIC:
        return REPLAY_TORN
    if header.magic_version != (<uint64_t>MAGIC | (<uint64_t>FORMAT_VERSION_C << 32)) \
            or header.position != position or header.event_count == 0 or header.event_count > OFFSET_MAX:
        return REPLAY_HEADER
    if position + 1 + header.event_count > end:
        return REPLAY_TORN
    count_out[0] = header.event_count
    cdef uint32_t crc = header_checksum(s, position, position + 1 + header.event_count)
    header = <BatchHeader *>event_at(s, position)   # the checksum's reads may have unmapped it (old segments)
    if crc != header.checksum or crc != <uint32_t>commit:
        return REPLAY_CHECKSUM
    if header.previous_checksum != previous_checksum:
        return REPLAY_CHAIN
    crc_out[0] = crc
    return -1   # a good batch


cdef uint64_t scrub_resync(State *s, uint64_t start, uint64_t search_end, uint64_t end,
                           uint64_t *previous_checksum) noexcept nogil:
    """The first position in [start, search_end) holding a good batch header of a batch within the records
    below `end` (its checksum matching; the chain is not asked), with previous_checksum set to what that batch
    chains to; 0 if none."""
    cdef uint64_t position, count
    cdef uint32_t crc
    cdef int reason
    cdef BatchHeader *header
    for position in range(start, search_end):
        header = <BatchHeader *>event_at(s, position)
        if header.word_a != (<uint64_t>KIND_HEADER << 56):
            continue
        reason = check_batch(s, position, header.previous_checksum, end, &count, &crc)
        if reason == -1:
            previous_checksum[0] = header.previous_checksum
            return position
    return 0


cdef object memory_view(void *memory, uint64_t count, object dtype):
    """A writable numpy view (no copy) of `count` items of `dtype` at `memory`; the owner keeps it alive."""
    if count == 0:
        return np.empty(0, dtype)
    return np.frombuffer(PyMemoryView_FromMemory(<char *>memory, count * dtype.itemsize, PyBUF_WRITE), dtype)


@cython.final
cdef class Engine:
    """The state machine. One lock serialises every call on it: the batch paths run without the GIL, so without
    it two threads could be inside the state at once (growing a table under another's batch). The commands, the
    single-row reads, lookup_transfers, replay, state_views, account_arrays and close take it themselves; the
    journal reads (account_history, decode_events, batch_headers, ...) and import_* expect the caller to hold it
    across what it reads (`with engine:`, re-entrant), as the Ledger does for history, explain and verify."""

    cdef State state
    cdef object _accounts_hot
    cdef object _accounts_cold
    cdef list _segment_objects           # per segment: the buffer handed over (held), or None (file-backed)
    cdef object _segment_provider
    cdef object _segment_release
    cdef uint64_t _release_next          # segments below this were offered to _segment_release already
    cdef object _after_commit
    cdef object _write_ahead
    cdef object _clock
    cdef public bint closed
    cdef public bint poisoned
    cdef public bint readonly
    cdef uint64_t _batch_size_max
    cdef PyThread_type_lock _wake     # a semaphore: posted to wake a waiter for the engine lock (see _enter)
    cdef unsigned long _lock_owner    # thread ident of the holder; meaningful while _lock_depth > 0
    cdef uint32_t _lock_depth         # how many times the holder has taken it (the lock is re-entrant)
    cdef uint32_t _lock_waiters       # threads waiting in _enter_contended
    cdef bint _lock_handoff           # released to the waiters: the first to look takes it
    cdef object _interrupted          # a Ctrl-C held back during write_ahead, raised once the batch is durable
    cdef public object timestamp_problem   # set by replay: the first batch whose time breaks the clock rule
    # damage_error(position, header_position, reason) -> the LedgerCorruptError to raise for a damaged record
    # (the journal names its file and byte offset); None: a message with the journal position only.
    cdef public object damage_error

    def __cinit__(self):
        memset(&self.state, 0, sizeof(State))
        self._wake = PyThread_allocate_lock()
        if self._wake == NULL:
            raise MemoryError("cannot allocate the engine lock")
        PyThread_acquire_lock(self._wake, 1)  # taken: a waiter sleeps on it until a release posts it
        ledger_segment_cache_init(&self.state.segment_cache)

    def __init__(self, segment_records_log2, segment_provider, *, after_commit=None, write_ahead=None, clock=None,
                 account_capacity=ACCOUNT_CAPACITY_MIN, transfer_capacity=1024, segment_files=None,
                 segment_release=None):
        """segment_provider(index) returns a writable buffer of 64 << segment_records_log2 bytes (zero-filled
        or holding earlier journal data), or None for a segment to be read from its file when needed (only
        with segment_files); after_commit(start, end) makes positions [start, end) durable;
        write_ahead(header_position, end), if given, is called inside a large batch with the events
        [header_position + 1, end) that are final so far (the journal may start writing them out).
        segment_files: (directory descriptor, header bytes): where segment files NNNNNNNN.segment are and where
        their records start; the engine keeps its own duplicate of the descriptor and maps old segments from
        there on demand, at most SEGMENTS_MAPPED_MAX at a time (_segment_cache.h).
        segment_release(index), if given, is offered each handed-over segment once the engine writes past it:
        it returns a callable that closes the journal's mapping (called once the engine has let go of the
        buffer; the segment is read from its file from then on), or None to keep it handed over for now."""
        if not 4 <= segment_records_log2 <= 30:
            raise ValueError("segment_records_log2 must be in [4, 30]")
        self.state.segment_records_log2 = segment_records_log2
        self.state.segment_cache.segment_bytes = <uint64_t>64 << segment_records_log2
        if segment_files is not None:
            directory_fd, header_bytes = segment_files
            if header_bytes <= 0 or header_bytes % mmap_module.PAGESIZE:
                raise ValueError(f"segment header bytes must be a positive multiple of the page size, "
                                 f"got {header_bytes}")
            self.state.segment_cache.header_bytes = header_bytes
            self.state.segment_cache.directory_fd = os.dup(directory_fd)
            self.state.segment_cache.reserve_fd = os.dup(directory_fd)   # the spare (_segment_cache.h)
        self._segment_provider = segment_provider
        self._segment_release = segment_release
        self._after_commit = after_commit
        self._write_ahead = write_ahead
        self._clock = clock
        self._segment_objects = []
        self._batch_size_max = BATCH_SIZE_MAX
        table_allocate(&self.state.account_table, TABLE_CAPACITY_LOG2_MIN)
        table_allocate(&self.state.transfer_table, TABLE_CAPACITY_LOG2_MIN)
        heap_reserve(&self.state.expiry_heap, 1024)
        self._grow_accounts(max(int(account_capacity), ACCOUNT_CAPACITY_MIN))
        table_reserve(&self.state.account_table, int(account_capacity))
        table_reserve(&self.state.transfer_table, int(transfer_capacity))
        # Position 0 is never written: a back-pointer of 0 means "no earlier event".
        self.state.write_position = 1
        self._map_through(2)

    def __dealloc__(self):
        if self._wake != NULL:
            PyThread_release_lock(self._wake)  # (freeing a taken lock is not allowed)
            PyThread_free_lock(self._wake)
        ledger_segment_cache_release(&self.state.segment_cache, self.state.segments)
        if self.state.verified_headers != NULL:
            ledger_unmap(self.state.verified_headers, self.state.verified_headers_bytes)
        table_free(&self.state.account_table)
        table_free(&self.state.transfer_table)
        free(self.state.expiry_heap.entries)
        free(self.state.segments)

    # -- the lock --
    # Every field of it is read and written with the GIL held (Cython modules keep the GIL even on free-threaded
    # builds unless they declare otherwise), so taking a free lock is a few plain stores: no atomic, no system
    # call on the single-call path. Only a thread that finds it held waits, without the GIL, on the _wake
    # semaphore; a release with waiters hands the lock straight to one of them (the depth stays 1, _lock_handoff
    # set), so a thread that calls in a loop cannot take it back before the waiter has had its turn.

    cdef int _enter(self) except -1:
        """Take the engine lock for this thread (re-entrant)."""
        cdef unsigned long thread = PyThread_get_thread_ident()
        if self._lock_depth == 0:
            self._lock_depth = 1
            self._lock_owner = thread
            return 0
        if self._lock_owner == thread and not self._lock_handoff:
            self._lock_depth += 1
            return 0
        return self._enter_contended(thread)

    cdef int _enter_contended(self, unsigned long thread) except -1:
        """Wait for the lock without the GIL, so the holder (which may be running a batch without it too) goes
        on. Ctrl-C in the main thread interrupts the wait (KeyboardInterrupt, the lock not taken)."""
        cdef PyLockStatus status
        self._lock_waiters += 1
        try:
            while True:
                if self._lock_handoff:
                    self._lock_handoff = False   # handed over by the last holder: the depth is 1 already
                    break
                if self._lock_depth == 0:
                    self._lock_depth = 1
                    break
                with nogil:
                    status = PyThread_acquire_lock_timed(self._wake, LOCK_WAIT_SLICE_US, 1)
                if status == PY_LOCK_INTR:
                    PyErr_CheckSignals()
        except BaseException:
            self._lock_waiters -= 1
            if self._lock_waiters == 0 and self._lock_handoff:  # handed to nobody now: free it
                self._lock_handoff = False
                self._lock_depth = 0
            raise
        self._lock_waiters -= 1
        self._lock_owner = thread
        return 0

    cdef inline void _exit(self) noexcept:
        LEDGER_ASSERT(self._lock_depth > 0 and not self._lock_handoff)
        LEDGER_DEBUG_ASSERT(self._lock_owner == PyThread_get_thread_ident())
        self._lock_depth -= 1
        if self._lock_depth == 0 and self._lock_waiters != 0:
            self._lock_depth = 1
            self._lock_handoff = True
            self._lock_owner = 0
            PyThread_release_lock(self._wake)

    def __enter__(self):
        """`with engine:` holds the engine lock across several calls (a consistent view for composite reads)."""
        self._enter()
        return self

    def __exit__(self, *exc_info):
        self._exit()
        return False

    # -- capacity (all growth happens here, between batches, never inside the hot loop) --

    cdef int _grow_accounts(self, uint64_t capacity, bint populate=True) except -1:
        hot = anonymous_array(capacity, ACCOUNT_HOT_DTYPE, populate)
        cold = anonymous_array(capacity, ACCOUNT_COLD_DTYPE, populate)
        cdef uint64_t count = self.state.account_count
        if count:
            hot[:count] = self._accounts_hot[:count]
            cold[:count] = self._accounts_cold[:count]
        self._accounts_hot = hot
        self._accounts_cold = cold
        self.state.accounts = <AccountHot *>cnp.PyArray_DATA(hot)
        self.state.accounts_cold = <AccountCold *>cnp.PyArray_DATA(cold)
        self.state.account_capacity = capacity
        return 0

    cdef int _map_through(self, uint64_t end) except -1:
        """Ensure memory behind every position below `end`."""
        cdef Py_buffer view
        cdef uint64_t segment_bytes = <uint64_t>64 << self.state.segment_records_log2
        cdef void *grown
        if end > POSITION_MASK + 1:
            raise OverflowError(f"journal position limit (2**40 records) reached")
        while self.state.mapped_end < end:
            index = self.state.segment_count
            provided = self._segment_provider(index)   # first: if it raises (disk full), nothing has changed
            grown = realloc(self.state.segments, (index + 1) * sizeof(char *))
            if grown == NULL:
                raise MemoryError("cannot grow the segment table")
            self.state.segments = <char **>grown
            self.state.segments[index] = NULL
            self._segment_objects.append(None)
            try:
                self._attach(index, provided)
            except BaseException:
                self._segment_objects.pop()
                raise
            self.state.segment_count = index + 1
            self.state.mapped_end = (index + 1) << self.state.segment_records_log2
        self._release_behind()
        return 0

    cdef int _attach(self, uint64_t index, object provided) except -1:
        """Make `provided` (a buffer, or None: read the segment from its file on demand) segment `index`."""
        cdef Py_buffer view
        cdef uint64_t segment_bytes = <uint64_t>64 << self.state.segment_records_log2
        if provided is None:
            if self.state.segment_cache.directory_fd < 0:
                raise ValueError(f"segment {index}: the provider gave no buffer and there are no segment files")
            return 0
        # A memoryview holds an export on the buffer for as long as we keep it: an mmap cannot be closed
        # (BufferError) while the core still writes through its address.
        buffer = memoryview(provided)
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_SIMPLE)
        try:
            if <uint64_t>view.len < segment_bytes:
                raise ValueError(f"segment {index} buffer has {view.len} bytes, need {segment_bytes}")
            ledger_segment_cache_forget(&self.state.segment_cache, self.state.segments, index)
            self.state.segments[index] = <char *>view.buf
        finally:
            PyBuffer_Release(&view)
        self._segment_objects[index] = buffer   # keeps the memory alive while we hold its address
        return 0

    cdef int _release_behind(self) except -1:
        """Offer the journal the handed-over segments below the one being written (between commands: no record
        pointer is alive): those it lets go of are read from their files from now on."""
        cdef uint64_t write_index = self.state.write_position >> self.state.segment_records_log2
        if self._segment_release is None or self.readonly:
            return 0
        while self._release_next < write_index:
            index = self._release_next
            buffer = self._segment_objects[index]
            if buffer is not None:
                close_segment = self._segment_release(index)
                if close_segment is None:
                    return 0   # not durable yet: offered again after a later command
                self.state.segments[index] = NULL
                self._segment_objects[index] = None
                buffer.release()
                close_segment()
            self._release_next = index + 1
        return 0

    def provide_segments(self, uint64_t first_index):
        """Ask the provider again for segments [first_index, segment_count) that are read from their files: the
        journal hands over the ones it is about to write (a writer continuing inside segments that already
        exist). Call between commands."""
        self._check_open()
        for index in range(first_index, self.state.segment_count):
            if self._segment_objects[index] is None:
                self._attach(index, self._segment_provider(index))
        self._release_next = min(self._release_next, first_index)

    @property
    def segments_mapped(self):
        """(old segments mapped from their files now, mappings made so far, segments handed over now)."""
        return (ledger_segment_cache_count(&self.state.segment_cache), self.state.segment_cache.maps,
                sum(buffer is not None for buffer in self._segment_objects))

    cdef int _reserve(self, uint64_t accounts, uint64_t transfers, uint64_t records) except -1:
        if self.state.account_count + accounts > self.state.account_capacity:
            self._grow_accounts(max(self.state.account_capacity * 2, self.state.account_count + accounts))
        table_reserve(&self.state.account_table, accounts)
        table_reserve(&self.state.transfer_table, transfers)
        heap_reserve(&self.state.expiry_heap, transfers)
        self._map_through(self.state.write_position + records)   # and offers the segments written past
        return 0

    cdef int _raise_damage(self) except -1:
        """Raise LedgerCorruptError for the damage a read (or a call, now undone) found, and forget it."""
        cdef State *s = &self.state
        LEDGER_ASSERT(s.damage_reason != DAMAGE_NONE)
        position, header_position, reason = s.damage_position, s.damage_header_position, s.damage_reason
        s.damage_position = s.damage_header_position = 0
        s.damage_reason = DAMAGE_NONE
        text = DAMAGE_REASONS[reason]
        if header_position != 0 and header_position != position:
            text = f"{text}; its batch header is at journal position {header_position}"
        if self.damage_error is not None:
            raise self.damage_error(position, header_position, text)
        raise LedgerCorruptError(f"journal corrupt ({text}) at journal position {position}")

    cdef int _check_open(self) except -1:
        if self.poisoned:
            raise LedgerPoisonedError("the ledger handle is poisoned by a failed journal sync; reopen it")
        if self.closed:
            raise LedgerClosedError("the ledger is closed")
        return 0

    cdef int _check_writable(self) except -1:
        self._check_open()
        if self.readonly:
            raise LedgerError("the ledger was opened read-only")
        return 0

    cdef inline uint64_t _now(self, uint64_t events_max) except? 0:
        """The clock reading for a call that writes at most `events_max` events. The call's events get
        T, T + 1, ... with T = max(now, last timestamp + 1) (a clock that goes backwards is overtaken, not
        refused); LedgerClockError, before anything is applied, if the last of them would pass TIMESTAMP_MAX."""
        cdef uint64_t now = clock_now_ns() if self._clock is None else self._clock_reading()
        cdef uint64_t timestamp_base = now if now > self.state.last_timestamp else self.state.last_timestamp + 1
        if timestamp_base > TIMESTAMP_MAX or events_max > TIMESTAMP_MAX - timestamp_base + 1:
            self._refuse_clock(now, timestamp_base, events_max)
        return now

    cdef uint64_t _clock_reading(self) except? 0:
        """The injected clock's reading, checked: an integer in [0, TIMESTAMP_MAX]."""
        value = self._clock()
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"the ledger's clock returned {type(value).__name__} {value!r}; it must return integer "
                            f"nanoseconds since the Unix epoch") from None
        if not 0 <= value <= TIMESTAMP_MAX:
            raise LedgerClockError(f"the ledger's clock reads {value} ns, outside [0, TIMESTAMP_MAX={TIMESTAMP_MAX}]; "
                                   f"nothing was applied")
        return <uint64_t>value

    cdef int _refuse_clock(self, uint64_t now, uint64_t timestamp_base, uint64_t events_max) except -1:
        raise LedgerClockError(
            f"the ledger's clock reads {now} ns (last event at {self.state.last_timestamp} ns): a call of up to "
            f"{events_max} events from {timestamp_base} ns would pass TIMESTAMP_MAX={TIMESTAMP_MAX} ns; "
            f"nothing was applied")

    cdef int _committed(self, uint64_t start, uint64_t events) except -1:
        """Have after_commit write and sync the batch just applied. It is applied in memory already, so a failure
        of that poisons the handle: nothing may build on a batch that may not be durable. Except Ctrl-C: a
        KeyboardInterrupt (raised at the first Python line after a long batch, or inside a write or sync) is held
        back, after_commit is called again (it writes the whole batch again and syncs: doing it twice is harmless),
        and once the batch is durable the KeyboardInterrupt is raised saying so. The handle stays usable."""
        interrupted, self._interrupted = self._interrupted, None
        if events == 0 or self._after_commit is None:
            if interrupted is not None:
                raise interrupted
            return 0
        cdef int attempt
        for attempt in range(COMMIT_INTERRUPTED_ATTEMPTS_MAX):
            try:
                self._after_commit(start, start + 1 + events)
                break
            except KeyboardInterrupt as error:
                if interrupted is None:
                    interrupted = error
                if attempt == COMMIT_INTERRUPTED_ATTEMPTS_MAX - 1:
                    self.poisoned = True
                    raise
            except BaseException:
                self.poisoned = True
                raise
        if interrupted is not None:
            raise KeyboardInterrupt(
                f"interrupted while journal positions [{start}, {start + 1 + events}) were being made durable: "
                f"the batch was applied and is durable; only its result codes are lost (lookup_transfers() on "
                f"its ids gives each one's state); the handle is still usable") from interrupted
        return 0

    # -- commands --

    def create_accounts(self, cnp.ndarray batch not None, cnp.ndarray results not None):
        """Apply a C-contiguous ACCOUNT_DTYPE array; write codes into `results` (uint8, same length)."""
        self._enter()
        try:
            return self._create_accounts(batch, results)
        finally:
            self._exit()

    cdef object _create_accounts(self, cnp.ndarray batch, cnp.ndarray results):
        self._check_writable()
        cdef uint64_t count = batch.shape[0]
        LEDGER_ASSERT(batch.dtype.itemsize == sizeof(AccountRow) and results.shape[0] == batch.shape[0])
        LEDGER_ASSERT(cnp.PyArray_IS_C_CONTIGUOUS(batch) and cnp.PyArray_IS_C_CONTIGUOUS(results))
        LEDGER_ASSERT(count <= self._batch_size_max)
        self._reserve(count, 0, count + 1)
        cdef uint64_t now = self._now(count)
        cdef uint64_t start = self.state.write_position, events
        cdef const AccountRow *rows = <const AccountRow *>cnp.PyArray_DATA(batch)
        cdef uint8_t *codes = <uint8_t *>cnp.PyArray_DATA(results)
        with nogil:
            events = run_accounts(&self.state, rows, count, codes, now)
        self._committed(start, events)
        return events

    def transfers(self, cnp.ndarray batch not None, cnp.ndarray results not None):
        """Apply a C-contiguous TRANSFER_DTYPE array; write codes into `results` (uint8, same length)."""
        self._enter()
        try:
            return self._transfers(batch, results)
        finally:
            self._exit()

    cdef object _transfers(self, cnp.ndarray batch, cnp.ndarray results):
        self._check_writable()
        cdef uint64_t count = batch.shape[0]
        LEDGER_ASSERT(batch.dtype.itemsize == sizeof(TransferRow) and results.shape[0] == batch.shape[0])
        LEDGER_ASSERT(cnp.PyArray_IS_C_CONTIGUOUS(batch) and cnp.PyArray_IS_C_CONTIGUOUS(results))
        LEDGER_ASSERT(count <= self._batch_size_max)
        # Room for the rows, the header and the expiries that can be due (at most one per scheduled deadline).
        self._reserve(0, count, count + min(self.state.expiry_heap.size, EXPIRE_BATCH_MAX_C) + 1)
        cdef uint64_t now = self._now(count + min(self.state.expiry_heap.size, EXPIRE_BATCH_MAX_C))
        cdef uint64_t start = self.state.write_position, events
        cdef const TransferRow *rows = <const TransferRow *>cnp.PyArray_DATA(batch)
        cdef uint8_t *codes = <uint8_t *>cnp.PyArray_DATA(results)
        if self._write_ahead is not None and count >= WRITE_AHEAD_BATCH_MIN_ROWS:
            events = self._transfers_in_chunks(rows, count, codes, now)
        else:
            with nogil:
                events = run_transfers(&self.state, rows, count, codes, now)
        if self.state.damage_reason != DAMAGE_NONE:
            self._raise_damage()   # the batch was undone: nothing of it is applied
        self._committed(start, events)
        return events

    cdef uint64_t _transfers_in_chunks(self, const TransferRow *rows, uint64_t count, uint8_t *codes,
                                       uint64_t now) except? 0xFFFFFFFFFFFFFFFF:
        """run_transfers for a large batch, in chunks of about WRITE_AHEAD_ROWS rows: after each chunk the events
        written so far (final: no linked chain crosses a chunk boundary, and a rollback undoes only its chain)
        are handed to write_ahead(header_position, end), which writes them to the files and starts their sync
        in the background while the next chunk is applied. The batch is still one atomic batch: nothing of it
        counts until commit_batch writes its header, and after_commit syncs before the call returns."""
        cdef State *s = &self.state
        cdef uint64_t header_position = s.write_position, timestamp_base, position, written_end
        cdef uint64_t first = 0, last
        cdef bint written_ahead = False
        with nogil:
            timestamp_base = begin_batch(s, now)
            position = expire_due(s, header_position, header_position + 1, timestamp_base)
        written_end = position
        while first < count and s.damage_reason == DAMAGE_NONE:
            last = chunk_end(rows, first, count)
            with nogil:
                position = apply_rows(s, rows + first, last - first, codes + first, header_position, position,
                                      timestamp_base, &written_end)
            if s.damage_reason != DAMAGE_NONE:
                break
            if last < count and position > header_position + 1:
                try:
                    # True: events reached the files (the journal may hold them back: hold_writes).
                    written_ahead = bool(self._write_ahead(header_position, position)) or written_ahead
                except KeyboardInterrupt as error:
                    # Ctrl-C (it lands at the first Python line after a chunk): finish the batch, which
                    # after_commit then makes durable in full, and raise it after that (_committed). Some of its
                    # events may have reached the files: count them written ahead.
                    written_ahead = True
                    if self._interrupted is None:
                        self._interrupted = error
                except BaseException:
                    self.poisoned = True   # half a batch is applied in memory: nothing more may use this state
                    raise
            first = last
        if s.damage_reason != DAMAGE_NONE:
            with nogil:
                position = undo_batch(s, header_position, position, &written_end)
                commit_batch(s, header_position, position, timestamp_base, written_end)
            if written_ahead:
                # Events of the undone batch reached the files ahead of a header that will never be written, and
                # the journal believes them written: only a reopen (which drops them as a torn tail) is safe.
                self.poisoned = True
            return 0
        with nogil:
            commit_batch(s, header_position, position, timestamp_base, written_end)
        return position - header_position - 1

    @cython.embedsignature(False)   # the generated one would name the shared default objects (_ONE, _ZERO)
    def transfer(self, id, debit_account, credit_account, amount, *, ledger=_ONE, code=_ZERO, flags=_ZERO,
                 pending_id=_ZERO, timeout=_ZERO, user_data=_ZERO):
        """Apply one transfer as a batch of its own and return its TransferResult (OK = 0; every outcome of a
        valid call is a code, not an exception). When it returns, the transfer is as durable as the ledger's
        durability mode says.

        id: the transfer's id and idempotency key (uint64, not 0 nor 2**64 - 1): a retry with the same id and
          fields answers EXISTS and changes nothing.
        debit_account: the account the money leaves; credit_account: the account it arrives at (for
          POST_PENDING / VOID_PENDING: 0, or those of the pending transfer).
        amount: int64 > 0 (POST_PENDING: 0 posts the whole pending amount, less posts part of it;
          VOID_PENDING: 0 or the pending amount).
        ledger: the ledger (asset) of both accounts, uint32, default 1 (POST/VOID: 0 means the pending's).
        code: the caller's reason code (uint16); user_data: the caller's uint64, stored with the transfer.
        flags: TransferFlags. PENDING reserves the amount; POST_PENDING / VOID_PENDING resolve transfer
          `pending_id`.
        pending_id: the PENDING transfer that a POST_PENDING / VOID_PENDING resolves (0 otherwise).
        timeout: seconds (uint32) after which a PENDING transfer expires; 0: never.

        TypeError / ValueError naming the argument if one is not an integer in its field's range;
        LedgerClockError if the clock is past TIMESTAMP_MAX; LedgerClosedError on a closed handle.
        The single-call fast path: no array, no allocation."""
        cdef TransferRow row
        row.id = to_unsigned(id, "id", ID_MAX)
        row.debit_account = to_unsigned(debit_account, "debit_account", ID_MAX)
        row.credit_account = to_unsigned(credit_account, "credit_account", ID_MAX)
        row.amount = to_signed(amount, "amount")
        # Keywords left at their defaults (the same int objects: small ints are shared) skip the conversion.
        row.ledger = 1 if ledger is _ONE else <uint32_t>to_unsigned(ledger, "ledger", 0xFFFFFFFF)
        if code is _ZERO and flags is _ZERO and pending_id is _ZERO and timeout is _ZERO and user_data is _ZERO:
            row.code = row.flags = row.timeout = 0
            row.pending_id = row.user_data = 0
        else:
            row.pending_id = to_unsigned(pending_id, "pending_id", ID_MAX)
            row.user_data = to_unsigned(user_data, "user_data", ID_MAX)
            row.timeout = <uint32_t>to_unsigned(timeout, "timeout", 0xFFFFFFFF)
            row.code = <uint16_t>to_unsigned(code, "code", 0xFFFF)
            row.flags = <uint16_t>to_unsigned(flags, "flags", 0xFFFF)
        self._enter()
        try:
            return self._transfer_row(&row)
        finally:
            self._exit()

    cdef object _transfer_row(self, const TransferRow *row):
        if self.closed or self.poisoned or self.readonly:
            self._check_writable()
        cdef State *s = &self.state
        cdef uint64_t records = min(s.expiry_heap.size, EXPIRE_BATCH_MAX_C) + 2
        if (s.write_position + records > s.mapped_end
                or s.transfer_table.count + 1 > s.transfer_table.count_max
                or s.expiry_heap.size + 1 > s.expiry_heap.capacity):
            self._reserve(0, 1, records)
        cdef uint64_t start = s.write_position
        cdef uint8_t result = 0
        cdef uint64_t events = run_transfers(s, row, 1, &result, self._now(records - 1))
        if ledger_unlikely(s.damage_reason != DAMAGE_NONE):
            self._raise_damage()   # undone: nothing applied
        if events != 0 and self._after_commit is not None:
            self._committed(start, events)
        return TRANSFER_RESULTS[result]

    def create_account(self, id, ledger=1, *, min_balance=0, max_balance=AMOUNT_MAX, flags=0, user_data=0):
        """One account as a batch of its own; returns its AccountResult (see Ledger.create_account)."""
        cdef AccountRow row
        row.id = to_unsigned(id, "id", ID_MAX)
        row.user_data = to_unsigned(user_data, "user_data", ID_MAX)
        row.min_balance = to_signed(min_balance, "min_balance")
        row.max_balance = to_signed(max_balance, "max_balance")
        row.ledger = <uint32_t>to_unsigned(ledger, "ledger", 0xFFFFFFFF)
        row.flags = <uint16_t>to_unsigned(flags, "flags", 0xFFFF)
        self._enter()
        try:
            return self._account_row(&row)
        finally:
            self._exit()

    cdef object _account_row(self, const AccountRow *row):
        self._check_writable()
        self._reserve(1, 0, 2)
        cdef uint64_t start = self.state.write_position
        cdef uint8_t result = 0
        cdef uint64_t events = run_accounts(&self.state, row, 1, &result, self._now(1))
        self._committed(start, events)
        return ACCOUNT_RESULTS[result]

    # -- reads --

    def account(self, id_object):
        """(id, ledger, flags, min_balance, max_balance, user_data, debits_posted, credits_posted,
        debits_pending, credits_pending, timestamp) or None."""
        self._enter()
        try:
            return self._account(id_object)
        finally:
            self._exit()

    cdef object _account(self, object id_object):
        self._check_open()
        cdef uint64_t id = to_unsigned(id_object, "id", ID_MAX)
        cdef TableSlot *slot = table_find(&self.state.account_table, id)
        if slot == NULL:
            return None
        cdef AccountHot *hot = &self.state.accounts[slot.value]
        cdef AccountCold *cold = &self.state.accounts_cold[slot.value]
        return (cold.id, hot.ledger, hot.flags, hot.min_balance, hot.max_balance, cold.user_data,
                hot.debits_posted, hot.credits_posted, hot.debits_pending, hot.credits_pending, cold.timestamp)

    def balance(self, id_object):
        self._enter()
        try:
            return self._balance(id_object)
        finally:
            self._exit()

    cdef object _balance(self, object id_object):
        self._check_open()
        cdef uint64_t id = to_unsigned(id_object, "id", ID_MAX)
        cdef TableSlot *slot = table_find(&self.state.account_table, id)
        if slot == NULL:
            raise KeyError(f"account {id} not found")
        cdef AccountHot *hot = &self.state.accounts[slot.value]
        return hot.credits_posted - hot.debits_posted

    def available(self, id_object):
        self._enter()
        try:
            return self._available(id_object)
        finally:
            self._exit()

    cdef object _available(self, object id_object):
        self._check_open()
        cdef uint64_t id = to_unsigned(id_object, "id", ID_MAX)
        cdef TableSlot *slot = table_find(&self.state.account_table, id)
        if slot == NULL:
            raise KeyError(f"account {id} not found")
        cdef AccountHot *hot = &self.state.accounts[slot.value]
        return <object>hot.credits_posted - hot.debits_posted - hot.debits_pending

    def account_arrays(self):
        """Views (not copies) of the live hot and cold account arrays, trimmed to the account count."""
        self._enter()
        try:
            return self._account_arrays()
        finally:
            self._exit()

    cdef object _account_arrays(self):
        self._check_open()
        cdef uint64_t count = self.state.account_count
        return self._accounts_hot[:count], self._accounts_cold[:count]

    def lookup_transfers(self, cnp.ndarray ids not None, cnp.ndarray out not None):
        self._enter()
        try:
            return self._lookup_transfers(ids, out)
        finally:
            self._exit()

    cdef object _lookup_transfers(self, cnp.ndarray ids, cnp.ndarray out):
        self._check_open()
        LEDGER_ASSERT(ids.dtype.itemsize == 8 and cnp.PyArray_IS_C_CONTIGUOUS(ids))
        LEDGER_ASSERT(out.dtype.itemsize == sizeof(TransferRecord) and cnp.PyArray_IS_C_CONTIGUOUS(out))
        LEDGER_ASSERT(out.shape[0] == ids.shape[0])
        cdef uint64_t *keys = <uint64_t *>cnp.PyArray_DATA(ids)
        cdef TransferRecord *records = <TransferRecord *>cnp.PyArray_DATA(out)
        cdef uint64_t i, count = ids.shape[0], position
        cdef TableSlot *slot
        cdef Event *e
        cdef uint32_t kind
        cdef AccountHot *debit
        with nogil:
            for i in range(count):
                memset(&records[i], 0, sizeof(TransferRecord))
                slot = table_find(&self.state.transfer_table, keys[i]) if keys[i] != 0 else NULL
                if slot == NULL:
                    continue
                position = slot.value & POSITION_MASK
                if not record_trusted(&self.state, position):
                    break   # raised below: no field of a damaged record is returned
                e = event_at(&self.state, position)
                kind = event_kind(e)
                debit = account_of(&self.state, e.debit_account)
                LEDGER_ASSERT(debit != NULL)
                records[i].id = e.id
                records[i].debit_account = e.debit_account
                records[i].credit_account = e.credit_account
                records[i].amount = e.amount
                records[i].user_data = e.user_data
                records[i].sequence = position
                records[i].ledger = debit.ledger
                records[i].code = event_code(e)
                records[i].state = <uint8_t>((slot.value >> POSITION_BITS) & 0xFF)
                records[i].flags = FLAG_LINKED if (e.word_a >> 56) & KIND_LINKED else 0
                if kind == KIND_PENDING:
                    records[i].timeout = <uint32_t>e.aux
                    records[i].flags |= FLAG_PENDING
                elif kind == KIND_POST or kind == KIND_VOID:
                    records[i].pending_id = e.aux
                    records[i].flags |= FLAG_POST if kind == KIND_POST else FLAG_VOID
                # Last: the batch header may lie in another old segment, whose mapping may unmap e's.
                records[i].timestamp = event_timestamp(&self.state, e, position)
        if self.state.damage_reason != DAMAGE_NONE:
            self._raise_damage()
        return out

    # -- replay --

    def replay(self, uint64_t end_position=POSITION_MASK):
        """Apply every committed batch from the current write position on, stopping at the first record that
        is not a good batch header or at `end_position`. Returns (reason, position, batches, events)."""
        self._enter()
        try:
            return self._replay_populating(end_position)
        finally:
            self._exit()

    cdef object _replay_populating(self, uint64_t end_position):
        self._check_open()
        self.state.segment_cache.populate = 1   # whole segments, in order (_segment_cache.h)
        try:
            return self._replay(end_position)
        finally:
            self.state.segment_cache.populate = 0

    cdef tuple _replay(self, uint64_t end_position):
        cdef uint64_t position = self.state.write_position, count = 0, batches = 0, events = 0
        cdef uint64_t unchecked_records = 0
        cdef uint32_t crc = 0
        cdef int reason
        cdef BatchHeader *header
        while True:
            if position >= end_position:
                reason = REPLAY_END
                break
            reason = check_header(&self.state, position, &count, &crc)
            if reason >= 0:
                break
            if position + 1 + count > end_position:
                reason = REPLAY_END
                break
            self._reserve(count_accounts(&self.state, position, count), count, 0)
            with nogil:
                reason = replay_batch(&self.state, position, count)
            if reason != REPLAY_END:
                break
            header = <BatchHeader *>event_at(&self.state, position)
            # The clock rule (docs/SEMANTICS.md): a writer never makes such a batch; verify reports the first.
            if (header.timestamp <= self.state.last_timestamp or header.timestamp > TIMESTAMP_MAX
                    or count - 1 > TIMESTAMP_MAX - header.timestamp) and self.timestamp_problem is None:
                self.timestamp_problem = (position, header.timestamp, count, self.state.last_timestamp)
            self.state.last_timestamp = header.timestamp + count - 1   # before the pass below unmaps it
            if self.state.batch_pending_deadlines != 0:   # a pass over the batch only if it made deadlines
                with nogil:
                    schedule_expiries(&self.state, position + 1, position + 1 + count)
            self.state.last_checksum = crc
            self.state.last_header_position = position
            position += 1 + count
            self.state.write_position = position
            batches += 1
            events += count
            # Ctrl-C stops a long replay (an open) here, between batches: the state is whole, and the caller
            # releases the partly opened handle.
            unchecked_records += 1 + count
            if unchecked_records >= REPLAY_SIGNAL_CHECK_RECORDS:
                unchecked_records = 0
                PyErr_CheckSignals()
        return reason, position, batches, events

    def map_through(self, uint64_t end):
        self._enter()
        try:
            self._map_through(end)
        finally:
            self._exit()

    # -- journal reads for history, explain and the read side --

    def account_positions(self, id_object):
        """(creation position, newest event position) of an account, or None."""
        self._check_open()
        cdef uint64_t id = to_unsigned(id_object, "id", ID_MAX)
        cdef TableSlot *slot = table_find(&self.state.account_table, id)
        if slot == NULL:
            return None
        return self.state.accounts_cold[slot.value].position, self.state.accounts[slot.value].last_position

    def account_history(self, uint64_t id, uint64_t before_position=POSITION_MASK + 1,
                        uint64_t after_position=0, uint64_t limit=POSITION_MASK):
        """Positions of the account's events with after_position < position < before_position, newest first,
        at most `limit`, found by walking the per-account back-pointers (cost: the events returned plus those
        skipped at or after before_position, never the journal size)."""
        self._check_open()
        cdef TableSlot *slot = table_find(&self.state.account_table, id)
        if slot == NULL:
            raise KeyError(f"account {id} not found")
        cdef State *s = &self.state
        cdef uint64_t position = s.accounts[slot.value].last_position, count = 0, newer = s.write_position
        cdef uint64_t creation = s.accounts_cold[slot.value].position
        cdef Event *e
        cdef uint32_t kind
        out = []
        # Each step must go strictly backwards (so a damaged pointer can neither loop nor leave the journal) to an
        # event of this account, checked before its fields are used, and end at the account's creation.
        while count < limit:
            if position <= after_position and position >= creation:
                break
            if position >= newer or position < creation:   # (a pointer to 0 ends the chain before the creation)
                record_damaged(s, newer, 0, DAMAGE_POINTER)   # the record holding the bad pointer
                self._raise_damage()
            if not record_trusted(s, position):
                self._raise_damage()
            e = event_at(s, position)
            kind = event_kind(e)
            if (kind < KIND_ACCOUNT or kind > KIND_EXPIRE or (kind == KIND_ACCOUNT) != (position == creation)
                    or (kind == KIND_ACCOUNT and e.id != id)
                    or (kind != KIND_ACCOUNT and e.debit_account != id and e.credit_account != id)):
                record_damaged(s, newer if newer < s.write_position else position, 0, DAMAGE_POINTER)
                self._raise_damage()
            if position < before_position:
                out.append(position)
                count += 1
            if kind == KIND_ACCOUNT:
                break
            newer = position
            position = (e.word_a if e.debit_account == id else e.word_b) & POSITION_MASK
        return np.array(out, dtype=np.uint64)

    def decode_events(self, cnp.ndarray positions not None):
        """Decode the events at the given journal positions (uint64, each a committed event) into EVENT_DTYPE."""
        self._check_open()
        LEDGER_ASSERT(positions.dtype.itemsize == 8)
        positions = np.ascontiguousarray(positions, dtype=np.uint64)
        cdef uint64_t count = positions.shape[0], i, position
        out = np.zeros(count, EVENT_DTYPE)
        cdef uint64_t *keys = <uint64_t *>cnp.PyArray_DATA(positions)
        cdef DecodedEvent *decoded = <DecodedEvent *>cnp.PyArray_DATA(out)
        cdef Event *e
        for i in range(count):
            position = keys[i]
            if position == 0 or position >= self.state.write_position:
                raise IndexError(f"journal position {position} is not a committed record")
            if not verify_position(&self.state, position):
                self._raise_damage()
            e = event_at(&self.state, position)
            if event_kind(e) == KIND_HEADER or event_kind(e) == 0:
                raise IndexError(f"journal position {position} is a batch header, not an event")
        with nogil:
            for i in range(count):
                position = keys[i]
                e = event_at(&self.state, position)
                decoded[i].position = position
                decoded[i].id = e.id
                decoded[i].debit_account = e.debit_account
                decoded[i].credit_account = e.credit_account
                decoded[i].amount = e.amount
                decoded[i].user_data = e.user_data
                decoded[i].aux = e.aux
                decoded[i].previous_debit_position = e.word_a & POSITION_MASK
                decoded[i].previous_credit_position = e.word_b & POSITION_MASK
                decoded[i].code = event_code(e)
                decoded[i].kind = <uint8_t>event_kind(e)
                decoded[i].linked = 1 if (e.word_a >> 56) & KIND_LINKED else 0
                # Last: the batch header may lie in another old segment, whose mapping may unmap e's.
                decoded[i].timestamp = event_timestamp(&self.state, e, position)
        return out

    def batch_headers(self, uint64_t start=1, uint64_t end=POSITION_MASK, uint64_t limit=1 << 20):
        """(header position, timestamp, event count) of committed batches with start <= header position < end.
        `start` must be a batch header position (1 is the first)."""
        self._check_open()
        cdef uint64_t position = start, count = 0
        cdef BatchHeader *header
        out = []
        end = min(end, self.state.write_position)
        while position < end and count < limit:
            header = <BatchHeader *>event_at(&self.state, position)
            if (header.word_a >> 56) != KIND_HEADER:
                if position < self.state.verified_from and position > start:
                    # Reached from the previous header's count: a good header must be here.
                    record_damaged(&self.state, position, position, DAMAGE_HEADER)
                    self._raise_damage()
                raise IndexError(f"journal position {position} is not a batch header")
            timestamp, event_count = header.timestamp, header.event_count   # verify_old_header may unmap it
            if position < self.state.verified_from and not verify_old_header(&self.state, position):
                self._raise_damage()
            out.append((position, timestamp, event_count))
            position += 1 + event_count
            count += 1
        return out

    # -- introspection --

    @property
    def write_position(self):
        return self.state.write_position

    @property
    def last_timestamp(self):
        return self.state.last_timestamp

    @property
    def last_checksum(self):
        return self.state.last_checksum

    @property
    def account_count(self):
        return self.state.account_count

    @property
    def transfer_count(self):
        return self.state.transfer_table.count

    @property
    def pending_expiry_count(self):
        return self.state.expiry_heap.size

    @property
    def mapped_end(self):
        return self.state.mapped_end

    @property
    def segment_count(self):
        return self.state.segment_count

    # -- snapshots: the whole state as arrays, and back --

    def state_views(self):
        """The scalars and numpy views (no copies) of every piece of state: accounts, both id tables, the expiry
        heap. Valid until the next command; a forked child uses them as a frozen copy-on-write image."""
        self._enter()
        try:
            return self._state_views()
        finally:
            self._exit()

    cdef object _state_views(self):
        self._check_open()
        cdef State *s = &self.state
        cdef uint64_t count = s.account_count
        scalars = {
            "write_position": s.write_position, "last_timestamp": s.last_timestamp,
            "last_checksum": s.last_checksum, "last_header_position": s.last_header_position,
            "account_count": count, "transfer_count": s.transfer_table.count,
            "segment_records_log2": s.segment_records_log2,
        }
        return scalars, {
            "accounts_hot": self._accounts_hot[:count], "accounts_cold": self._accounts_cold[:count],
            "account_slots": memory_view(s.account_table.slots, (<uint64_t>1 << s.account_table.capacity_log2),
                                         TABLE_SLOT_DTYPE),
            "transfer_slots": memory_view(s.transfer_table.slots, (<uint64_t>1 << s.transfer_table.capacity_log2),
                                          TABLE_SLOT_DTYPE),
            "expiry_heap": memory_view(s.expiry_heap.entries, s.expiry_heap.size, HEAP_ENTRY_DTYPE),
        }

    def import_begin(self, dict scalars, uint64_t account_slots, uint64_t transfer_slots, uint64_t heap_size):
        """Make room for a snapshot in this fresh engine and return writable views to read it into; then call
        import_end. If reading fails, discard this engine."""
        self._check_open()
        cdef State *s = &self.state
        LEDGER_ASSERT(s.account_count == 0 and s.transfer_table.count == 0 and s.write_position == 1)
        if scalars["segment_records_log2"] != s.segment_records_log2:
            raise ValueError("snapshot segment size differs from the journal's")
        for slots in (account_slots, transfer_slots):
            if slots < 1024 or slots & (slots - 1) or slots > (<uint64_t>1 << TABLE_CAPACITY_LOG2_MAX):
                raise ValueError("snapshot id table size is not a power of two in range")
        cdef uint64_t count = scalars["account_count"]
        # Not pre-faulted: the snapshot's reads fault each page in as they fill it (a page is zeroed once either
        # way, and faulting it separately first would cost a second pass over the memory).
        if count > s.account_capacity:
            self._grow_accounts(count, False)
        cdef Table table
        table_allocate(&table, (<uint64_t>account_slots).bit_length() - 1, False)
        table_free(&s.account_table)
        s.account_table = table
        table_allocate(&table, (<uint64_t>transfer_slots).bit_length() - 1, False)
        table_free(&s.transfer_table)
        s.transfer_table = table
        heap_reserve(&s.expiry_heap, heap_size)
        return {
            "accounts_hot": self._accounts_hot[:count], "accounts_cold": self._accounts_cold[:count],
            "account_slots": memory_view(s.account_table.slots, account_slots, TABLE_SLOT_DTYPE),
            "transfer_slots": memory_view(s.transfer_table.slots, transfer_slots, TABLE_SLOT_DTYPE),
            "expiry_heap": memory_view(s.expiry_heap.entries, heap_size, HEAP_ENTRY_DTYPE),
        }

    def import_end(self, dict scalars, uint64_t heap_size, uint64_t account_capacity=0,
                   uint64_t transfer_capacity=0):
        """Adopt what import_begin's views were filled with. Replay continues from scalars["write_position"].
        account_capacity, transfer_capacity: room to make for that many accounts and transfers in all, as the
        constructor does from genesis (so an engine to load into is best constructed small: its tables are
        replaced by the snapshot's)."""
        cdef State *s = &self.state
        s.account_count = scalars["account_count"]
        s.account_table.count = s.account_count
        s.transfer_table.count = scalars["transfer_count"]
        s.expiry_heap.size = heap_size
        if s.account_table.count > s.account_table.count_max or s.transfer_table.count > s.transfer_table.count_max:
            raise ValueError("snapshot id table is over its load limit")
        self._map_through(scalars["write_position"] + 1)
        s.write_position = scalars["write_position"]
        self._trust_from(s.write_position)
        s.last_timestamp = scalars["last_timestamp"]
        s.last_checksum = scalars["last_checksum"]
        s.last_header_position = scalars["last_header_position"]
        if account_capacity > s.account_capacity:
            self._grow_accounts(account_capacity)
        if account_capacity > s.account_count:
            table_reserve(&s.account_table, account_capacity - s.account_count)
        if transfer_capacity > s.transfer_table.count:
            table_reserve(&s.transfer_table, transfer_capacity - s.transfer_table.count)

    cdef int _trust_from(self, uint64_t position) except -1:
        """Records from `position` on are replayed (checked) or written by this engine; the ones before are
        checked on first read (verify_old_record). The bitmap of checked batch headers is one bit per record
        before `position` (2 MiB per GiB of journal), in anonymous memory that is faulted in only where a batch
        is checked (a page, or a 2 MiB huge page, at a time)."""
        cdef State *s = &self.state
        LEDGER_ASSERT(s.verified_headers == NULL)
        cdef size_t size = (position + 7) // 8
        if size == 0:
            return 0
        cdef void *memory = ledger_map_anonymous(size, 0)
        if memory == NULL:
            raise MemoryError(f"cannot allocate {size} bytes to remember the checked journal batches")
        s.verified_headers = <uint8_t *>memory
        s.verified_headers_bytes = size
        s.verified_from = position
        return 0

    @property
    def verified_from(self):
        """Records before this position were not checked by this engine when it opened (the snapshot's position);
        each is checked, with its batch, the first time it is read."""
        return self.state.verified_from

    def raise_damage(self):
        """Raise the LedgerCorruptError for what replay() stopped at with reason "damaged"."""
        self._raise_damage()

    def scrub(self, uint64_t position, uint64_t previous_checksum, uint64_t end, uint64_t records_max):
        """Re-check committed batches from the header at `position` (1: the first), which follows a batch with
        checksum previous_checksum (0 for the first), up to `end` (at most write_position), stopping after the
        batch that reaches records_max records (at least one batch is checked). Every check of replay is made
        (header, checksum, hash chain); a damaged batch whose header is still well-formed is stepped over (its
        recorded checksum continues the chain), otherwise the next good batch is searched for. Batches before
        verified_from found good are remembered, so later reads of them are not checked again.
        Returns (next position, its previous checksum, batches, records, [(position, DAMAGE_* reason), ...])."""
        self._enter()   # one step at a time (records_max): other threads' calls go on between steps
        try:
            return self._scrub(position, previous_checksum, end, records_max)
        finally:
            self._exit()

    cdef object _scrub(self, uint64_t position, uint64_t previous_checksum, uint64_t end, uint64_t records_max):
        self._check_open()
        cdef State *s = &self.state
        end = min(end, s.write_position)
        cdef uint64_t records = 0, batches = 0, count = 0, found
        cdef uint32_t crc = 0
        cdef int reason
        cdef BatchHeader *header
        damaged = []
        while position < end and (records < records_max or batches == 0):
            count = 0
            with nogil:
                reason = check_batch(s, position, previous_checksum, end, &count, &crc)
            if reason == -1:
                if position + 1 + count <= s.verified_from and s.verified_headers != NULL:
                    s.verified_headers[position >> 3] |= <uint8_t>(1 << (position & 7))
                previous_checksum = crc
                position += 1 + count
                records += 1 + count
                batches += 1
                continue
            header = <BatchHeader *>event_at(s, position)
            damaged.append((position, DAMAGE_CHECKSUM if reason == REPLAY_CHECKSUM else DAMAGE_CHAIN
                            if reason == REPLAY_CHAIN else DAMAGE_TORN if reason == REPLAY_TORN else DAMAGE_HEADER))
            batches += 1
            if reason == REPLAY_CHECKSUM or reason == REPLAY_CHAIN:
                previous_checksum = header.checksum   # go on with the chain as the batch recorded it
                position += 1 + count
                records += 1 + count
                continue
            # No count to trust: the next good batch (any chain) is within the largest batch after this one.
            found = 0
            with nogil:
                found = scrub_resync(s, position + 1, min(end, position + 2 + OFFSET_MAX), end, &previous_checksum)
            if found == 0:
                records += end - position
                position = end
                break
            records += found - position
            position = found
        return position, previous_checksum, batches, records, damaged

    def check_batch_end(self, uint64_t header_position, uint64_t end, uint64_t checksum):
        """True if the journal holds a committed batch at header_position ending at `end` with this checksum:
        a snapshot taken at `end` belongs to this journal."""
        if header_position == 0:
            return end == 1 and checksum == 0
        if end > self.state.mapped_end or header_position >= end:
            return False
        cdef BatchHeader *header = <BatchHeader *>event_at(&self.state, header_position)
        return ((header.word_a >> 56) == KIND_HEADER and header.position == header_position
                and header_position + 1 + header.event_count == end and header.checksum == checksum
                and (ledger_load_acquire_u64(&header.commit) >> 32) == COMMIT_MAGIC)

    def memory_bytes(self):
        """Bytes held by the in-memory state (accounts, id tables, expiry heap), not the journal."""
        return {
            "accounts": int(self.state.account_capacity) * (sizeof(AccountHot) + sizeof(AccountCold)),
            "account_table": (1 << self.state.account_table.capacity_log2) * sizeof(TableSlot),
            "transfer_table": (1 << self.state.transfer_table.capacity_log2) * sizeof(TableSlot),
            "expiry_heap": int(self.state.expiry_heap.capacity) * sizeof(HeapEntry),
        }

    def close(self):
        self._enter()
        try:
            return self._close()
        finally:
            self._exit()

    cdef object _close(self):
        self.closed = True
        ledger_segment_cache_release(&self.state.segment_cache, self.state.segments)
        for buffer in self._segment_objects:
            if buffer is not None:
                buffer.release()
        self._segment_objects = []
        self._segment_release = None
        self._segment_provider = None
        self._after_commit = None
        self._write_ahead = None


cdef uint32_t _crc32c_of(object data, uint32_t crc, bint reference) except? 0:
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if reference:
            return ledger_crc32c_reference(crc, view.buf, view.len)
        if view.len < CRC_NOGIL_BYTES_MIN:
            return ledger_crc32c(crc, view.buf, view.len)
        with nogil:  # snapshot sections are checksummed on several threads at once
            crc = ledger_crc32c(crc, view.buf, view.len)
        return crc
    finally:
        PyBuffer_Release(&view)


def crc32c(data, uint32_t crc=0):
    """CRC32C of a bytes-like object (hardware-accelerated where the CPU has SSE4.2)."""
    return _crc32c_of(data, crc, False)


def crc32c_reference(data, uint32_t crc=0):
    """CRC32C computed a byte at a time from a table, whatever the CPU: what tests check crc32c against."""
    return _crc32c_of(data, crc, True)


def crc32c_hardware():
    return ledger_crc32c_hardware == 1


def crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b):
    """CRC32C of A followed by B, given crc32c(A), crc32c(B) and len(B)."""
    return ledger_crc32c_combine(crc_a, crc_b, length_b)


def table_values_in(cnp.ndarray slots not None, cnp.ndarray keys not None, cnp.ndarray values not None,
                    cnp.ndarray found not None):
    """Look keys up in an id table held in an array laid out as the engine's (a snapshot's section, or an engine's
    state_views() table): each key's value into `values`, and into `found` whether it is there (0 is a valid
    value: the first account's index). verify compares two tables this way, both ways, a chunk at a time, instead
    of sorting copies of both. The caller checks that the table is a power of two of at least 1,024 slots and at
    most 70% full, so that every probe walk ends at an empty slot."""
    LEDGER_ASSERT(slots.dtype.itemsize == sizeof(TableSlot) and cnp.PyArray_IS_C_CONTIGUOUS(slots))
    cdef uint64_t slot_count = slots.shape[0]
    LEDGER_ASSERT(slot_count >= (<uint64_t>1 << TABLE_CAPACITY_LOG2_MIN) and (slot_count & (slot_count - 1)) == 0)
    LEDGER_ASSERT(keys.dtype.itemsize == 8 and cnp.PyArray_IS_C_CONTIGUOUS(keys))
    LEDGER_ASSERT(values.dtype.itemsize == 8 and cnp.PyArray_IS_C_CONTIGUOUS(values))
    LEDGER_ASSERT(found.dtype.itemsize == 1 and cnp.PyArray_IS_C_CONTIGUOUS(found))
    LEDGER_ASSERT(values.shape[0] == keys.shape[0] and found.shape[0] == keys.shape[0])
    cdef Table table
    memset(&table, 0, sizeof(Table))
    table.slots = <TableSlot *>cnp.PyArray_DATA(slots)
    table.capacity_log2 = <uint32_t>(slot_count.bit_length() - 1)
    cdef const uint64_t *key = <const uint64_t *>cnp.PyArray_DATA(keys)
    cdef uint64_t *value = <uint64_t *>cnp.PyArray_DATA(values)
    cdef uint8_t *present = <uint8_t *>cnp.PyArray_DATA(found)
    cdef uint64_t i, count = keys.shape[0]
    cdef TableSlot *slot
    with nogil:
        for i in range(count):
            slot = table_find(&table, key[i])
            present[i] = slot != NULL
            value[i] = slot.value if slot != NULL else 0


def count_table_keys(data):
    """How many slots of an id table section (16-byte slots: key, value) hold a key (non-zero), without the GIL."""
    cdef Py_buffer view
    cdef uint64_t count = 0, i, slots
    cdef const TableSlot *slot
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if view.len % sizeof(TableSlot) != 0:
            raise ValueError(f"id table section of {view.len} bytes is not whole 16-byte slots")
        slots = view.len // sizeof(TableSlot)
        slot = <const TableSlot *>view.buf
        with nogil:
            for i in range(slots):
                count += slot[i].key != 0
        return count
    finally:
        PyBuffer_Release(&view)


def advise(buffer, int advice, size_t offset=0, size_t length=0):
    """madvise(2) over bytes [offset, offset + length) of a mapped buffer (length 0: to its end), widened to whole
    pages, without holding the GIL: populating a 64 MiB segment takes tens of milliseconds that a writer thread
    must not spend waiting for a background one (Python's mmap.madvise keeps the GIL)."""
    cdef Py_buffer view
    cdef int result, error = 0
    cdef size_t page = 4096, start, end
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        if offset > <size_t>view.len:
            raise ValueError(f"offset {offset} is past the end of a {view.len}-byte buffer")
        if length == 0 or offset + length > <size_t>view.len:
            length = <size_t>view.len - offset
        if length == 0:
            return
        start = (<size_t>view.buf + offset) & ~(page - 1)
        end = (<size_t>view.buf + offset + length + page - 1) & ~(page - 1)
        with nogil:
            result = madvise(<void *>start, end - start, advice)
            if result != 0:
                error = errno
        if result != 0:
            raise OSError(error, f"madvise({advice}) failed")
    finally:
        PyBuffer_Release(&view)


def segment_file_name(uint64_t index):
    """The name the core opens segment `index` by (the journal checks that it names its files the same way)."""
    cdef char name[32]
    ledger_segment_file_name(name, index)
    return name.decode()
