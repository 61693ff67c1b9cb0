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
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

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
from ledger.memory import advise, anonymous_array   # advise: still _core.advise for the journal
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

# The codes above by name, as ledger.enums names them: tests/test_result_codes.py checks that the two agree (the
# core writes these numbers into results arrays; the enums only give them names).
TRANSFER_RESULT_CODES = {
    "OK": R_OK, "LINKED_EVENT_FAILED": R_LINKED_EVENT_FAILED, "LINKED_CHAIN_OPEN": R_LINKED_CHAIN_OPEN,
    "FLAGS_INVALID": R_FLAGS_INVALID, "ID_INVALID": R_ID_INVALID,
    "PENDING_ID_MUST_BE_ZERO": RT_PENDING_ID_MUST_BE_ZERO, "PENDING_ID_REQUIRED": RT_PENDING_ID_REQUIRED,
    "PENDING_ID_INVALID": RT_PENDING_ID_INVALID, "PENDING_ID_MUST_BE_DIFFERENT": RT_PENDING_ID_MUST_BE_DIFFERENT,
    "TIMEOUT_RESERVED_FOR_PENDING": RT_TIMEOUT_RESERVED_FOR_PENDING,
    "EXISTS_WITH_DIFFERENT_FIELDS": RT_EXISTS_WITH_DIFFERENT_FIELDS, "EXISTS": RT_EXISTS,
    "DEBIT_ACCOUNT_ID_INVALID": RT_DEBIT_ACCOUNT_ID_INVALID, "CREDIT_ACCOUNT_ID_INVALID": RT_CREDIT_ACCOUNT_ID_INVALID,
    "ACCOUNTS_MUST_BE_DIFFERENT": RT_ACCOUNTS_MUST_BE_DIFFERENT, "AMOUNT_MUST_BE_POSITIVE": RT_AMOUNT_MUST_BE_POSITIVE,
    "LEDGER_INVALID": RT_LEDGER_INVALID, "DEBIT_ACCOUNT_NOT_FOUND": RT_DEBIT_ACCOUNT_NOT_FOUND,
    "CREDIT_ACCOUNT_NOT_FOUND": RT_CREDIT_ACCOUNT_NOT_FOUND, "LEDGER_MISMATCH": RT_LEDGER_MISMATCH,
    "OVERFLOW": RT_OVERFLOW, "INSUFFICIENT_FUNDS": RT_INSUFFICIENT_FUNDS, "EXCEEDS_MAX_BALANCE": RT_EXCEEDS_MAX_BALANCE,
    "PENDING_NOT_FOUND": RT_PENDING_NOT_FOUND, "PENDING_TRANSFER_NOT_PENDING": RT_PENDING_TRANSFER_NOT_PENDING,
    "PENDING_ALREADY_POSTED": RT_PENDING_ALREADY_POSTED, "PENDING_ALREADY_VOIDED": RT_PENDING_ALREADY_VOIDED,
    "PENDING_EXPIRED": RT_PENDING_EXPIRED, "PENDING_DIFFERENT_DEBIT_ACCOUNT": RT_PENDING_DIFFERENT_DEBIT_ACCOUNT,
    "PENDING_DIFFERENT_CREDIT_ACCOUNT": RT_PENDING_DIFFERENT_CREDIT_ACCOUNT,
    "EXCEEDS_PENDING_AMOUNT": RT_EXCEEDS_PENDING_AMOUNT, "PENDING_DIFFERENT_AMOUNT": RT_PENDING_DIFFERENT_AMOUNT,
}
ACCOUNT_RESULT_CODES = {
    "OK": R_OK, "LINKED_EVENT_FAILED": R_LINKED_EVENT_FAILED, "LINKED_CHAIN_OPEN": R_LINKED_CHAIN_OPEN,
    "FLAGS_INVALID": R_FLAGS_INVALID, "ID_INVALID": R_ID_INVALID, "LEDGER_INVALID": RA_LEDGER_INVALID,
    "BALANCE_LIMITS_INVALID": RA_BALANCE_LIMITS_INVALID,
    "EXISTS_WITH_DIFFERENT_FIELDS": RA_EXISTS_WITH_DIFFERENT_FIELDS, "EXISTS": RA_EXISTS,
}

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


# ---- The rest of the module, one concept per file (Cython `include`: one module, one C file, so the hot paths
# still inline across them). The order matters: each file uses only names declared above it or in _core.pxd.
include "_core_scalars.pxi"
include "_core_records.pxi"
include "_core_tables.pxi"
include "_core_heap.pxi"
include "_core_apply.pxi"
include "_core_validation.pxi"
include "_core_batch.pxi"
include "_core_replay.pxi"
include "_core_engine.pxi"
include "_core_functions.pxi"
