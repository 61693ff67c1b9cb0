# The atomics both compiled modules use (ledger/_atomics.h): `from ledger._atomics cimport ...`.
from libc.stdint cimport uint32_t, uint64_t

cdef extern from "_atomics.h" nogil:
    void ledger_store_release_u64(uint64_t *address, uint64_t value)
    uint64_t ledger_load_acquire_u64(const uint64_t *address)
    uint64_t ledger_fetch_add_u64(uint64_t *address, uint64_t value)
    int ledger_compare_exchange_u64(uint64_t *address, uint64_t expected, uint64_t desired)
    uint32_t ledger_load_seq_cst_u32(const uint32_t *address)
    void ledger_store_seq_cst_u32(uint32_t *address, uint32_t value)
    void ledger_fetch_add_u32(uint32_t *address, uint32_t value)
    void ledger_fence_seq_cst()
    void ledger_cpu_pause()
