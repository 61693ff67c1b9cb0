/* Small C helpers for the Cython core: checksums, hashing, assertions, memory (atomics: _atomics.h).
 * Kept in C because they need compiler builtins and CPU dispatch that Cython cannot express. */
#ifndef LEDGER_CORE_HELPERS_H
#define LEDGER_CORE_HELPERS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define LEDGER_X86 1
#endif

#define ledger_likely(x) __builtin_expect(!!(x), 1)
#define ledger_unlikely(x) __builtin_expect(!!(x), 0)

/* Invariants stay checked in release builds (TigerStyle): a broken invariant in a ledger must stop the process
 * before it journals a wrong balance. They are cheap compares off the data dependency chain. */
static void ledger_panic(const char *file, int line, const char *expression) {
    fprintf(stderr, "ledger: invariant violated at %s:%d: %s\n", file, line, expression);
    fflush(stderr);
    abort();
}
#define LEDGER_ASSERT(x) do { if (ledger_unlikely(!(x))) ledger_panic(__FILE__, __LINE__, #x); } while (0)

/* Extra checks that cost real time (bounds of every slot index); on with LEDGER_DEBUG=1 at build time. */
#ifdef LEDGER_DEBUG
#define LEDGER_DEBUG_ASSERT(x) LEDGER_ASSERT(x)
#else
#define LEDGER_DEBUG_ASSERT(x) do { (void)sizeof(x); } while (0)
#endif

/* ---- CRC32C (Castagnoli) ---------------------------------------------------------------------------- */

static uint32_t ledger_crc32c_table[256];
static int ledger_crc32c_hardware = -1;

static void ledger_crc32c_zeros_tables(uint32_t tables[4][256], size_t length);
static uint32_t ledger_crc32c_long[4][256];
static uint32_t ledger_crc32c_short[4][256];

static void ledger_crc32c_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : (c >> 1);
        ledger_crc32c_table[i] = c;
    }
    ledger_crc32c_zeros_tables(ledger_crc32c_long, 8192);
    ledger_crc32c_zeros_tables(ledger_crc32c_short, 256);
#ifdef LEDGER_X86
    __builtin_cpu_init();
    ledger_crc32c_hardware = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#else
    ledger_crc32c_hardware = 0;
#endif
    if (getenv("LEDGER_CRC32C_SOFTWARE") != NULL) ledger_crc32c_hardware = 0;
}

static uint32_t ledger_crc32c_software(uint32_t crc, const uint8_t *data, size_t size) {
    crc = ~crc;
    for (size_t i = 0; i < size; i++) crc = ledger_crc32c_table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* Three CRC streams at once (after Mark Adler's crc32c.c): the crc32 instruction has a latency of three cycles
 * and a throughput of one per cycle, so one stream runs at a third of the speed the hardware allows. A buffer is
 * cut into three equal blocks whose CRC registers are computed together and then combined: shifting a register
 * over N zero bytes is a linear map over GF(2), applied here through four 256-entry tables per block length. */
#define LEDGER_CRC_LONG 8192
#define LEDGER_CRC_SHORT 256

static uint32_t ledger_gf2_times(const uint32_t *matrix, uint32_t vector) {
    uint32_t sum = 0;
    while (vector) {
        if (vector & 1) sum ^= *matrix;
        vector >>= 1;
        matrix++;
    }
    return sum;
}

static void ledger_gf2_square(uint32_t *square, const uint32_t *matrix) {
    for (int n = 0; n < 32; n++) square[n] = ledger_gf2_times(matrix, matrix[n]);
}

/* The operator that appends `length` zero bytes (a power of two) to a CRC register. */
static void ledger_crc32c_zeros_operator(uint32_t *even, size_t length) {
    uint32_t odd[32];
    uint32_t row = 1;
    odd[0] = 0x82F63B78u;
    for (int n = 1; n < 32; n++) {
        odd[n] = row;
        row <<= 1;
    }
    ledger_gf2_square(even, odd);  /* two zero bits */
    ledger_gf2_square(odd, even);  /* four zero bits */
    do {                           /* eight zero bits, then doubling until `length` bytes */
        ledger_gf2_square(even, odd);
        length >>= 1;
        if (length == 0) return;
        ledger_gf2_square(odd, even);
        length >>= 1;
    } while (length);
    for (int n = 0; n < 32; n++) even[n] = odd[n];
}

static void ledger_crc32c_zeros_tables(uint32_t tables[4][256], size_t length) {
    uint32_t operator_matrix[32];
    ledger_crc32c_zeros_operator(operator_matrix, length);
    for (uint32_t n = 0; n < 256; n++) {
        tables[0][n] = ledger_gf2_times(operator_matrix, n);
        tables[1][n] = ledger_gf2_times(operator_matrix, n << 8);
        tables[2][n] = ledger_gf2_times(operator_matrix, n << 16);
        tables[3][n] = ledger_gf2_times(operator_matrix, n << 24);
    }
}

static inline uint32_t ledger_crc32c_shift(uint32_t tables[4][256], uint32_t crc) {
    return tables[0][crc & 0xFF] ^ tables[1][(crc >> 8) & 0xFF] ^ tables[2][(crc >> 16) & 0xFF] ^ tables[3][crc >> 24];
}

#ifdef LEDGER_X86
/* One round: three blocks of `block` bytes from `*data` on three streams, combined into crc0. */
__attribute__((target("sse4.2")))
static inline uint64_t ledger_crc32c_three_blocks(uint64_t crc0, const uint8_t **data, size_t block,
                                                  uint32_t tables[4][256]) {
    uint64_t crc1 = 0, crc2 = 0, word;
    const uint8_t *next = *data, *end = *data + block;
    for (; next < end; next += 8) {
        memcpy(&word, next, 8);
        crc0 = _mm_crc32_u64(crc0, word);
        memcpy(&word, next + block, 8);
        crc1 = _mm_crc32_u64(crc1, word);
        memcpy(&word, next + 2 * block, 8);
        crc2 = _mm_crc32_u64(crc2, word);
    }
    crc0 = ledger_crc32c_shift(tables, (uint32_t)crc0) ^ crc1;
    crc0 = ledger_crc32c_shift(tables, (uint32_t)crc0) ^ crc2;
    *data += 3 * block;
    return crc0;
}

__attribute__((target("sse4.2")))
static uint32_t ledger_crc32c_sse42(uint32_t crc, const uint8_t *data, size_t size) {
    uint64_t crc0 = (uint32_t)~crc, word;
    for (; size >= 3 * LEDGER_CRC_LONG; size -= 3 * LEDGER_CRC_LONG)
        crc0 = ledger_crc32c_three_blocks(crc0, &data, LEDGER_CRC_LONG, ledger_crc32c_long);
    for (; size >= 3 * LEDGER_CRC_SHORT; size -= 3 * LEDGER_CRC_SHORT)
        crc0 = ledger_crc32c_three_blocks(crc0, &data, LEDGER_CRC_SHORT, ledger_crc32c_short);
    for (; size >= 8; size -= 8, data += 8) {
        memcpy(&word, data, 8);
        crc0 = _mm_crc32_u64(crc0, word);
    }
    uint32_t c32 = (uint32_t)crc0;
    for (; size > 0; size--, data++) c32 = _mm_crc32_u8(c32, *data);
    return ~c32;
}
#endif

/* The one-byte-at-a-time table implementation, whatever the CPU: the reference the tests compare against. */
static uint32_t ledger_crc32c_reference(uint32_t crc, const void *data, size_t size) {
    return ledger_crc32c_software(crc, (const uint8_t *)data, size);
}

/* crc: the running value (0 to start); returns the CRC32C of everything fed so far. */
static inline uint32_t ledger_crc32c(uint32_t crc, const void *data, size_t size) {
#ifdef LEDGER_X86
    if (ledger_likely(ledger_crc32c_hardware == 1)) return ledger_crc32c_sse42(crc, (const uint8_t *)data, size);
#endif
    return ledger_crc32c_software(crc, (const uint8_t *)data, size);
}

/* The CRC32C of A followed by B, from crc_a = CRC32C(A), crc_b = CRC32C(B) and B's length: crc_a shifted over
 * length_b zero bytes, XOR crc_b (the pre- and post-inversions cancel, as in zlib's crc32_combine). Lets pieces of
 * one stream be checksummed on several threads and chained afterwards. Costs O(log length_b) 32x32 GF(2) steps. */
static uint32_t ledger_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b) {
    uint32_t operator_matrix[32], square[32];
    ledger_crc32c_zeros_operator(operator_matrix, 1);  /* one zero byte */
    while (length_b) {
        if (length_b & 1) crc_a = ledger_gf2_times(operator_matrix, crc_a);
        length_b >>= 1;
        if (length_b == 0) break;
        ledger_gf2_square(square, operator_matrix);
        memcpy(operator_matrix, square, sizeof operator_matrix);
    }
    return crc_a ^ crc_b;
}

/* ---- Hashing ------------------------------------------------------------------------------------------ */

/* splitmix64 finaliser: a full-avalanche bijection on 64 bits. */
static inline uint64_t ledger_mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* Home slot of a key in a table of 2**capacity_log2 slots. The low capacity_log2 bits of the key are kept and
 * XORed with a hash of the bits above them: ids that differ only in their low bits (consecutive, time-ordered ids)
 * land in neighbouring slots and never collide with each other, while ids that differ in their high bits are
 * spread uniformly. The locality is what keeps the id table from costing a cache miss per transfer. */
static inline uint64_t ledger_home_slot(uint64_t key, uint32_t capacity_log2) {
    /* capacity_log2 is at most 40 (TABLE_CAPACITY_LOG2_MAX), so both shifts are defined. */
    uint64_t mask = (1ULL << capacity_log2) - 1;
    uint64_t high = key >> capacity_log2;
    return (key ^ ledger_mix64(high + 0x9E3779B97F4A7C15ULL)) & mask;
}

/* Step between probe groups: odd, so the walk visits every group of a power-of-two table. Drawn from the whole
 * key, so two dense id blocks whose home ranges collide scatter instead of piling into one long run. */
static inline uint64_t ledger_probe_step(uint64_t key) {
    return (ledger_mix64(key ^ 0xD6E8FEB86659FD93ULL) >> 7) | 1ULL;
}

/* ---- Memory ------------------------------------------------------------------------------------------- */

/* Anonymous zero-filled memory with transparent huge pages requested: the tables and account arrays are read at
 * random, and with 4 KiB pages every access would also be a TLB miss (doubly costly under virtualisation). */
static void *ledger_map_anonymous(size_t size, int populate) {
    void *memory = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    if (size >= ((size_t)2 << 20)) madvise(memory, size, MADV_HUGEPAGE);
#endif
#ifdef MADV_POPULATE_WRITE
    /* Fault the pages in now, in one call, rather than one first-touch fault at a time inside the hot loop:
     * on virtual machines a first touch is costly (seen here: ~1 GB/s). */
    if (populate) madvise(memory, size, MADV_POPULATE_WRITE);
#else
    (void)populate;
#endif
    return memory;
}
static void ledger_unmap(void *memory, size_t size) {
    if (memory != NULL) munmap(memory, size);
}

static inline void ledger_prefetch(const void *address) { __builtin_prefetch(address, 1, 3); }

#endif
