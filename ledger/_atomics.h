/* Atomic loads, stores and read-modify-writes with their memory orders spelled out, for every word that another
 * thread or process reads while this one writes it: the journal's commit words (the core) and the command ring's
 * shared words (the ring). One header, declared once in _atomics.pxd, so both modules use the same orders. */
#ifndef LEDGER_ATOMICS_H
#define LEDGER_ATOMICS_H

#include <stdint.h>

/* Release store / acquire load: a reader that sees the stored value also sees every write made before it (the
 * commit word of a batch header is stored last this way; a ring slot's `published` word likewise). */
static inline void ledger_store_release_u64(uint64_t *address, uint64_t value) {
    __atomic_store_n(address, value, __ATOMIC_RELEASE);
}
static inline uint64_t ledger_load_acquire_u64(const uint64_t *address) {
    return __atomic_load_n(address, __ATOMIC_ACQUIRE);
}
static inline uint64_t ledger_fetch_add_u64(uint64_t *address, uint64_t value) {
    return __atomic_fetch_add(address, value, __ATOMIC_ACQ_REL);
}
/* Returns 1 and stores `desired` if *address held `expected`. */
static inline int ledger_compare_exchange_u64(uint64_t *address, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(address, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Sequentially consistent 32-bit words (futex words): "I am going to sleep" must be visible before re-checking
 * for work, and the re-check must not be reordered before it (Dekker). */
static inline uint32_t ledger_load_seq_cst_u32(const uint32_t *address) {
    return __atomic_load_n(address, __ATOMIC_SEQ_CST);
}
static inline void ledger_store_seq_cst_u32(uint32_t *address, uint32_t value) {
    __atomic_store_n(address, value, __ATOMIC_SEQ_CST);
}
static inline void ledger_fetch_add_u32(uint32_t *address, uint32_t value) {
    __atomic_fetch_add(address, value, __ATOMIC_ACQ_REL);
}

/* A full barrier: stores before it are visible to every thread and process before loads after it (store-load). */
static inline void ledger_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* A spin-wait hint to the CPU (x86 `pause`): yields the core's pipeline to its sibling hyperthread. */
static inline void ledger_cpu_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

#endif
