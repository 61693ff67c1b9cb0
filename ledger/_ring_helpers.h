/* Atomics, futexes and clocks for the command ring: many producer processes, one consumer, one shared mapping.
 * Every word shared between processes is accessed through these helpers, never by plain loads and stores. */
#ifndef LEDGER_RING_HELPERS_H
#define LEDGER_RING_HELPERS_H

#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t ring_load_acquire(const uint64_t *address) { return __atomic_load_n(address, __ATOMIC_ACQUIRE); }
static inline void ring_store_release(uint64_t *address, uint64_t value) { __atomic_store_n(address, value, __ATOMIC_RELEASE); }
static inline uint64_t ring_fetch_add(uint64_t *address, uint64_t value) {
    return __atomic_fetch_add(address, value, __ATOMIC_ACQ_REL);
}
/* Returns 1 and stores `desired` if *address held `expected`. */
static inline int ring_compare_exchange(uint64_t *address, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(address, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline uint32_t ring_load_acquire_u32(const uint32_t *address) { return __atomic_load_n(address, __ATOMIC_SEQ_CST); }
/* Sequentially consistent: "I am going to sleep" must be visible before re-checking for work (Dekker). */
static inline void ring_store_u32(uint32_t *address, uint32_t value) { __atomic_store_n(address, value, __ATOMIC_SEQ_CST); }
static inline void ring_add_u32(uint32_t *address, uint32_t value) { __atomic_fetch_add(address, value, __ATOMIC_ACQ_REL); }
/* A full barrier: stores before it are visible to every process before loads after it (store-load order). */
static inline void ring_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void ring_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline uint64_t ring_monotonic_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
}

/* Shared (not FUTEX_PRIVATE) futexes: the word lives in a file mapping used by several processes. */
static inline int ring_futex_wait(uint32_t *address, uint32_t expected, uint64_t timeout_ns) {
    struct timespec timeout;
    timeout.tv_sec = (time_t)(timeout_ns / 1000000000ULL);
    timeout.tv_nsec = (long)(timeout_ns % 1000000000ULL);
    return (int)syscall(SYS_futex, address, FUTEX_WAIT, expected, &timeout, NULL, 0);
}
static inline int ring_futex_wake(uint32_t *address, int count) {
    return (int)syscall(SYS_futex, address, FUTEX_WAKE, count, NULL, NULL, 0);
}

/* 1 if a process with this pid exists (EPERM means it exists but is not ours). */
static inline int ring_process_alive(uint32_t pid) {
    if (pid == 0) return 0;
    return kill((pid_t)pid, 0) == 0 || errno == EPERM;
}

#endif
