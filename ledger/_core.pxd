# Declarations of the core state machine: the C structs it keeps and the records it reads and writes.
# Layouts here are part of the on-disk format (docs/FORMAT.md) and of the public dtypes (ledger/enums.py).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from ledger._atomics cimport ledger_load_acquire_u64, ledger_store_release_u64

cdef extern from "_core_helpers.h" nogil:
    void LEDGER_ASSERT(bint condition)
    void LEDGER_DEBUG_ASSERT(bint condition)
    bint ledger_likely(bint condition)
    bint ledger_unlikely(bint condition)
    void ledger_crc32c_init()
    int ledger_crc32c_hardware
    uint32_t ledger_crc32c(uint32_t crc, const void *data, size_t size)
    uint32_t ledger_crc32c_reference(uint32_t crc, const void *data, size_t size)
    uint32_t ledger_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b)
    uint64_t ledger_home_slot(uint64_t key, uint32_t capacity_log2)
    uint64_t ledger_probe_step(uint64_t key)
    void *ledger_map_anonymous(size_t size, int populate)
    void ledger_unmap(void *memory, size_t size)
    void ledger_prefetch(const void *address)

cdef extern from "_segment_cache.h" nogil:
    enum: LEDGER_SEGMENTS_MAPPED_MAX
    ctypedef struct LedgerSegmentCache:
        int directory_fd
        int reserve_fd
        uint64_t header_bytes
        uint64_t segment_bytes
        uint64_t maps
        int populate
    void ledger_segment_cache_init(LedgerSegmentCache *cache)
    char *ledger_segment_cache_map(LedgerSegmentCache *cache, char **segments, uint64_t index)
    int ledger_segment_cache_forget(LedgerSegmentCache *cache, char **segments, uint64_t index)
    int ledger_segment_cache_count(const LedgerSegmentCache *cache)
    void ledger_segment_cache_release(LedgerSegmentCache *cache, char **segments)
    void ledger_segment_file_name(char *name, uint64_t index)

# One row of a create_accounts batch (ledger.ACCOUNT_DTYPE, 40 bytes).
ctypedef struct AccountRow:
    uint64_t id
    uint64_t user_data
    int64_t min_balance
    int64_t max_balance
    uint32_t ledger
    uint16_t flags

# One row of a transfers batch (ledger.TRANSFER_DTYPE, 64 bytes).
ctypedef struct TransferRow:
    uint64_t id
    uint64_t debit_account
    uint64_t credit_account
    int64_t amount
    uint64_t pending_id
    uint64_t user_data
    uint32_t ledger
    uint32_t timeout
    uint16_t code
    uint16_t flags

# The part of an account every transfer touches: one 64-byte cache line.
ctypedef struct AccountHot:
    int64_t debits_posted
    int64_t credits_posted
    int64_t debits_pending
    int64_t credits_pending
    int64_t min_balance
    int64_t max_balance
    uint64_t last_position    # journal position of the newest event that touched this account
    uint32_t ledger
    uint16_t flags
    uint16_t reserved

# The part only reads need.
ctypedef struct AccountCold:
    uint64_t id
    uint64_t user_data
    uint64_t timestamp
    uint64_t position         # journal position of the ACCOUNT event that created it

# A journal record (64 bytes, little-endian). Field use by kind is in docs/FORMAT.md.
ctypedef struct Event:
    uint64_t id
    uint64_t debit_account
    uint64_t credit_account
    int64_t amount
    uint64_t user_data
    uint64_t aux
    uint64_t word_a           # previous debit position:40 | code:16 | kind:8
    uint64_t word_b           # previous credit position:40 | offset in batch:24

# The record in front of every batch (same size, same kind byte position as an Event).
ctypedef struct BatchHeader:
    uint64_t magic_version
    uint64_t timestamp
    uint64_t position
    uint64_t event_count
    uint64_t previous_checksum
    uint64_t checksum
    uint64_t word_a
    uint64_t commit

ctypedef struct TableSlot:
    uint64_t key              # 0 = empty (0 is never a valid id)
    uint64_t value

ctypedef struct Table:
    TableSlot *slots
    uint64_t count
    uint64_t count_max        # load factor limit, in slots
    uint32_t capacity_log2

ctypedef struct HeapEntry:
    uint64_t deadline
    uint64_t position

ctypedef struct Heap:
    HeapEntry *entries
    uint64_t size
    uint64_t capacity

ctypedef struct State:
    AccountHot *accounts
    AccountCold *accounts_cold
    uint64_t account_count
    uint64_t account_capacity
    Table account_table
    Table transfer_table
    Heap expiry_heap
    char **segments               # per segment: its records, or NULL if not mapped now (_segment_cache.h)
    uint64_t segment_count
    LedgerSegmentCache segment_cache   # old segments mapped on demand from their files
    uint32_t segment_records_log2
    uint64_t write_position       # next free journal position
    uint64_t mapped_end           # positions below this have memory behind them
    uint64_t last_timestamp
    uint64_t last_checksum
    uint64_t last_header_position
    uint64_t batch_pending_deadlines  # PENDING events with a timeout written in the current batch (upper bound)
    # Records below verified_from (the position replay started at when the journal was opened: the snapshot's)
    # were never checked by this process: each read of one first checks its batch (bounds, header, checksum),
    # once per batch, remembered as one bit per header position in verified_headers (anonymous memory faulted in
    # only where a batch was checked: at most verified_from / 8 bytes). A failed check sets damage_position (the
    # record or header found damaged) and damage_reason (a DAMAGE_* code) for the caller to report.
    uint64_t verified_from
    uint8_t *verified_headers
    uint64_t verified_headers_bytes
    uint64_t damage_position
    uint64_t damage_header_position   # its batch header, when known (0: not known)
    uint32_t damage_reason
