/* Old journal segments mapped on demand, a bounded number at a time (docs/FORMAT.md, "Segments in memory").
 *
 * The core keeps one address per segment in a table (State.segments). The segments being written (and the room
 * ahead of them) are handed to it by the journal and stay put. Every other entry may be NULL: the first read of
 * such a segment maps its file here, read-only and shared (the page cache's own pages), with no descriptor kept
 * open afterwards (a mapping does not need one), and records it in a ring of at most LEDGER_SEGMENTS_MAPPED_MAX
 * mappings. When the ring is full the oldest mapping made here is unmapped (first in, first out: the fast path
 * records nothing, so there is no recency to go by). So a ledger of any number of segments holds O(1)
 * descriptors and O(1) mappings.
 *
 * The caller's rule (the whole of the core follows it): an event pointer into a segment mapped here is valid
 * until the next read of a segment that is not mapped, which may unmap it. Code that reads two old records
 * (a pending transfer and its batch header) copies what it needs from the first before it reads the second.
 * Nothing ever holds more than two such pointers at once, far below the ring's size.
 *
 * Mechanism only: the journal says where the files are (a directory descriptor, which the cache owns), how they
 * are named and where their records start. I/O policy (what is written and synced, and when) stays there. */
#ifndef LEDGER_SEGMENT_CACHE_H
#define LEDGER_SEGMENT_CACHE_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "_core_helpers.h"

/* Old segments mapped at once (besides those the journal hands over). 64 segments of 64 MiB is 4 GiB of address
 * space and 64 of the kernel's vm.max_map_count (65530 by default): far from either limit. */
#define LEDGER_SEGMENTS_MAPPED_MAX 64
#define LEDGER_SEGMENT_NAME_BYTES 32
#define LEDGER_SEGMENT_EMPTY UINT64_MAX

typedef struct {
    int directory_fd;           /* the journal directory, or -1: no files, every segment is handed over */
    int reserve_fd;             /* a descriptor kept spare, given up for a moment when none is left to map */
    uint64_t header_bytes;      /* where the records start in a segment file (page-aligned) */
    uint64_t segment_bytes;     /* the records of one segment */
    uint64_t ring[LEDGER_SEGMENTS_MAPPED_MAX];   /* segment indexes mapped here, LEDGER_SEGMENT_EMPTY if none */
    uint32_t next;              /* the ring slot to fill (and evict) next */
    uint64_t maps;              /* mappings made since the engine began: how often the slow path ran */
    int populate;               /* map page tables in at once (replay reads whole segments in order) */
} LedgerSegmentCache;

/* The file name of segment `index` (the journal's segment_name(): 8 decimal digits and ".segment"). */
static void ledger_segment_file_name(char *name, uint64_t index) {
    snprintf(name, LEDGER_SEGMENT_NAME_BYTES, "%08llu.segment", (unsigned long long)index);
}

/* Open segment `index` for mapping. A process out of descriptors (the caller's own files) gives up the spare one
 * for a moment rather than fail inside a command; the spare is taken again afterwards if one is free. */
static int ledger_segment_cache_open(LedgerSegmentCache *cache, const char *name) {
    int fd = openat(cache->directory_fd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && (errno == EMFILE || errno == ENFILE) && cache->reserve_fd >= 0) {
        close(cache->reserve_fd);
        cache->reserve_fd = -1;
        fd = openat(cache->directory_fd, name, O_RDONLY | O_CLOEXEC);
    }
    return fd;
}

static void ledger_segment_cache_init(LedgerSegmentCache *cache) {
    memset(cache, 0, sizeof *cache);
    cache->directory_fd = -1;
    cache->reserve_fd = -1;
    for (int slot = 0; slot < LEDGER_SEGMENTS_MAPPED_MAX; slot++) cache->ring[slot] = LEDGER_SEGMENT_EMPTY;
}

__attribute__((noreturn, cold))
static void ledger_segment_cache_panic(uint64_t index, const char *what, int error) {
    char name[LEDGER_SEGMENT_NAME_BYTES];
    ledger_segment_file_name(name, index);
    fprintf(stderr, "ledger: cannot read journal segment %s: %s failed: %s. The engine stops here rather than "
            "apply a command against records it cannot read; reopening recovers from the journal.\n",
            name, what, strerror(error));
    fflush(stderr);
    abort();
}

/* Map segment `index` (its table entry is NULL) and return its records. Evicts the oldest mapping made here
 * when the ring is full. A segment that cannot be mapped (its file gone, no descriptor or address space left)
 * stops the process: the caller is inside a command and cannot unwind it (see the header comment). */
__attribute__((noinline, cold))
static char *ledger_segment_cache_map(LedgerSegmentCache *cache, char **segments, uint64_t index) {
    LEDGER_ASSERT(cache->directory_fd >= 0);   /* without files every segment is handed over: never NULL */
    LEDGER_ASSERT(segments[index] == NULL);
    char name[LEDGER_SEGMENT_NAME_BYTES];
    ledger_segment_file_name(name, index);
    int fd = ledger_segment_cache_open(cache, name);
    if (fd < 0) ledger_segment_cache_panic(index, "open", errno);
    void *memory = mmap(NULL, cache->segment_bytes, PROT_READ, MAP_SHARED, fd, (off_t)cache->header_bytes);
    int map_error = errno;
    close(fd);   /* the mapping keeps the file: no descriptor is held per segment */
    if (cache->reserve_fd < 0) cache->reserve_fd = fcntl(cache->directory_fd, F_DUPFD_CLOEXEC, 0);
    if (memory == MAP_FAILED) ledger_segment_cache_panic(index, "mmap", map_error);
    uint64_t victim = cache->ring[cache->next];
    if (victim != LEDGER_SEGMENT_EMPTY) {
        LEDGER_ASSERT(segments[victim] != NULL);
        munmap(segments[victim], cache->segment_bytes);
        segments[victim] = NULL;
    }
#ifdef MADV_POPULATE_READ
    /* Replay reads every record: one call instead of a fault per few pages. Not for a lone read of an old record
     * (a pending transfer resolved): that would read the whole segment from disk. */
    if (cache->populate) madvise(memory, cache->segment_bytes, MADV_POPULATE_READ);
#endif
    cache->ring[cache->next] = index;
    cache->next = (cache->next + 1) % LEDGER_SEGMENTS_MAPPED_MAX;
    cache->maps += 1;
    segments[index] = (char *)memory;
    return (char *)memory;
}

/* Unmap segment `index` if it is mapped here (its table entry is then NULL); 1 if it was. */
static int ledger_segment_cache_forget(LedgerSegmentCache *cache, char **segments, uint64_t index) {
    for (int slot = 0; slot < LEDGER_SEGMENTS_MAPPED_MAX; slot++) {
        if (cache->ring[slot] == index) {
            munmap(segments[index], cache->segment_bytes);
            segments[index] = NULL;
            cache->ring[slot] = LEDGER_SEGMENT_EMPTY;
            return 1;
        }
    }
    return 0;
}

/* How many segments are mapped here now. */
static int ledger_segment_cache_count(const LedgerSegmentCache *cache) {
    int count = 0;
    for (int slot = 0; slot < LEDGER_SEGMENTS_MAPPED_MAX; slot++) count += cache->ring[slot] != LEDGER_SEGMENT_EMPTY;
    return count;
}

/* Unmap everything mapped here and close the directory. */
static void ledger_segment_cache_release(LedgerSegmentCache *cache, char **segments) {
    for (int slot = 0; slot < LEDGER_SEGMENTS_MAPPED_MAX; slot++) {
        uint64_t index = cache->ring[slot];
        if (index != LEDGER_SEGMENT_EMPTY) {
            munmap(segments[index], cache->segment_bytes);
            segments[index] = NULL;
            cache->ring[slot] = LEDGER_SEGMENT_EMPTY;
        }
    }
    if (cache->directory_fd >= 0) close(cache->directory_fd);
    if (cache->reserve_fd >= 0) close(cache->reserve_fd);
    cache->directory_fd = -1;
    cache->reserve_fd = -1;
}

#endif
