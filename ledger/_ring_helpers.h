/* Futexes, clocks and word flags for the command ring: many producer processes, one consumer, one shared mapping.
 * Every word shared between processes is accessed through the atomics of _atomics.h, never by plain loads and
 * stores. */
#ifndef LEDGER_RING_HELPERS_H
#define LEDGER_RING_HELPERS_H

#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* 64-bit flags of the shared words (docs/RING.md), as macros: Cython's DEF would make them Python integers.
 * `published` = sequence + 1 | WRITING while a producer owns the slot | ABANDONED if the writer gave it up;
 * `released` = DETACHED | sequence + 1 once the producer stopped waiting for the result. */
#define RING_ABANDONED 0x8000000000000000ULL
#define RING_WRITING 0x4000000000000000ULL
#define RING_SEQUENCE_MASK 0x3FFFFFFFFFFFFFFFULL
#define RING_DETACHED 0x8000000000000000ULL

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
