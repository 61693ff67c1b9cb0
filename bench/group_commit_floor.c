// The floor of acknowledged-durable latency under group commit on this machine, with no ledger in the way:
// `producer_count` threads each keep one request in flight; `writer_count` writer threads each take every
// pending request, pwrite 192 bytes per request at the end of a file (a single transfer's batch is 3 records
// of 64 bytes), fdatasync, and answer. One writer is a serial group commit (what `ledger serve` does); two let a
// second group be written and synced while the first one's sync runs. Prints one JSON line: the 64 KiB
// pwrite + fdatasync probe that bench/test_ring.py uses as "the fsync time", and the requests' latencies.
//
//     gcc -O2 -pthread bench/group_commit_floor.c -o floor && ./floor PRODUCERS WRITERS REQUESTS FILE
//
// Used by bench/test_ring.py::test_group_commit_floor; see bench/RESULTS.md ("Command ring").
#define _GNU_SOURCE
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum {
    PRODUCER_COUNT_MAX = 16,
    WRITER_COUNT_MAX = 4,
    REQUESTS_PER_PRODUCER_MAX = 1000000,
    REQUEST_BYTES = 192,
    FILE_HEADER_BYTES = 4096,
    FILE_BYTES = 64 << 20,
    PROBE_BYTES = 64 << 10,
    PROBE_COUNT = 200,
};

static int file_descriptor;
static int producer_count, writer_count, requests_per_producer;
static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work_published = PTHREAD_COND_INITIALIZER;
static pthread_cond_t work_answered = PTHREAD_COND_INITIALIZER;
// Per producer: the sequence of its request waiting for a writer (0: none), and the last one answered.
static long pending_sequence[PRODUCER_COUNT_MAX];
static long answered_sequence[PRODUCER_COUNT_MAX];
static long file_end_bytes = 0;
static int stopping = 0;
static double *latencies_us;

static double now_us(void) {
    struct timespec moment;
    clock_gettime(CLOCK_MONOTONIC, &moment);
    return moment.tv_sec * 1e6 + moment.tv_nsec / 1e3;
}

static void write_fully(const char *data, long size, long offset) {
    while (size > 0) {
        ssize_t written = pwrite(file_descriptor, data, (size_t)size, offset);
        if (written < 0 && errno == EINTR) continue;
        if (written <= 0) { perror("pwrite"); exit(1); }
        data += written; size -= written; offset += written;
    }
}

static void sync_file(void) {
    if (fdatasync(file_descriptor) != 0) { perror("fdatasync"); exit(1); }
}

static void *producer(void *argument) {
    long index = (long)argument;
    for (long sequence = 1; sequence <= requests_per_producer; sequence++) {
        double began_us = now_us();
        pthread_mutex_lock(&state_lock);
        pending_sequence[index] = sequence;
        pthread_cond_signal(&work_published);
        while (answered_sequence[index] < sequence) pthread_cond_wait(&work_answered, &state_lock);
        pthread_mutex_unlock(&state_lock);
        latencies_us[index * requests_per_producer + sequence - 1] = now_us() - began_us;
    }
    return NULL;
}

static void *writer(void *unused) {
    (void)unused;
    char request_bytes[REQUEST_BYTES * PRODUCER_COUNT_MAX];   // per thread: 3 KiB
    memset(request_bytes, 7, sizeof request_bytes);
    for (;;) {
        long taken[PRODUCER_COUNT_MAX];
        int taken_count = 0;
        pthread_mutex_lock(&state_lock);
        for (;;) {
            if (stopping) { pthread_mutex_unlock(&state_lock); return NULL; }
            taken_count = 0;
            for (int index = 0; index < producer_count; index++) taken_count += pending_sequence[index] != 0;
            if (taken_count > 0) break;
            pthread_cond_wait(&work_published, &state_lock);
        }
        for (int index = 0; index < producer_count; index++) {
            taken[index] = pending_sequence[index];
            pending_sequence[index] = 0;
        }
        long offset = FILE_HEADER_BYTES + file_end_bytes;
        file_end_bytes += (long)REQUEST_BYTES * taken_count;
        assert(FILE_HEADER_BYTES + file_end_bytes <= FILE_BYTES);
        pthread_mutex_unlock(&state_lock);
        write_fully(request_bytes, (long)REQUEST_BYTES * taken_count, offset);
        sync_file();
        pthread_mutex_lock(&state_lock);
        for (int index = 0; index < producer_count; index++) {
            if (taken[index] != 0) answered_sequence[index] = taken[index];
        }
        pthread_cond_broadcast(&work_answered);
        pthread_mutex_unlock(&state_lock);
    }
}

static int compare_doubles(const void *left, const void *right) {
    double a = *(const double *)left, b = *(const double *)right;
    return (a > b) - (a < b);
}

static double percentile(const double *sorted, int count, double fraction) {
    int index = (int)(fraction * (count - 1));
    return sorted[index];
}

int main(int argument_count, char **arguments) {
    if (argument_count != 5) {
        fprintf(stderr, "usage: %s PRODUCERS WRITERS REQUESTS_PER_PRODUCER FILE\n", arguments[0]);
        return 2;
    }
    producer_count = atoi(arguments[1]);
    writer_count = atoi(arguments[2]);
    requests_per_producer = atoi(arguments[3]);
    if (producer_count < 1 || producer_count > PRODUCER_COUNT_MAX || writer_count < 1
            || writer_count > WRITER_COUNT_MAX || requests_per_producer < 1
            || requests_per_producer > REQUESTS_PER_PRODUCER_MAX
            || (long)REQUEST_BYTES * producer_count * requests_per_producer > FILE_BYTES - FILE_HEADER_BYTES) {
        fprintf(stderr, "producers 1..%d, writers 1..%d, requests 1..%d (and at most %d MiB written)\n",
                PRODUCER_COUNT_MAX, WRITER_COUNT_MAX, REQUESTS_PER_PRODUCER_MAX, FILE_BYTES >> 20);
        return 2;
    }
    file_descriptor = open(arguments[4], O_RDWR | O_CREAT | O_EXCL, 0600);
    if (file_descriptor < 0) { perror(arguments[4]); return 1; }
    // Written zeros, as a ledger's reserved room: a sync then writes data only (no extent conversion).
    static char zeros[1 << 20];
    for (long offset = 0; offset < FILE_BYTES; offset += sizeof zeros) write_fully(zeros, sizeof zeros, offset);
    sync_file();

    double probe_us[PROBE_COUNT];
    static char probe_bytes[PROBE_BYTES];
    memset(probe_bytes, 1, sizeof probe_bytes);
    for (int index = 0; index < PROBE_COUNT; index++) {
        double began_us = now_us();
        write_fully(probe_bytes, PROBE_BYTES, (long)index * PROBE_BYTES);
        sync_file();
        probe_us[index] = now_us() - began_us;
    }
    qsort(probe_us, PROBE_COUNT, sizeof probe_us[0], compare_doubles);

    int request_count = producer_count * requests_per_producer;
    latencies_us = calloc((size_t)request_count, sizeof latencies_us[0]);
    if (latencies_us == NULL) { perror("calloc"); return 1; }
    pthread_t writers[WRITER_COUNT_MAX], producers[PRODUCER_COUNT_MAX];
    for (int index = 0; index < writer_count; index++) pthread_create(&writers[index], NULL, writer, NULL);
    for (long index = 0; index < producer_count; index++) {
        pthread_create(&producers[index], NULL, producer, (void *)index);
    }
    for (int index = 0; index < producer_count; index++) pthread_join(producers[index], NULL);
    pthread_mutex_lock(&state_lock);
    stopping = 1;
    pthread_cond_broadcast(&work_published);
    pthread_mutex_unlock(&state_lock);
    for (int index = 0; index < writer_count; index++) pthread_join(writers[index], NULL);
    qsort(latencies_us, (size_t)request_count, sizeof latencies_us[0], compare_doubles);
    printf("{\"producers\": %d, \"writers\": %d, \"requests\": %d, \"fsync_us_median\": %.1f, "
           "\"fsync_us_p99\": %.1f, \"ack_us_p50\": %.1f, \"ack_us_p99\": %.1f, \"ack_us_p999\": %.1f}\n",
           producer_count, writer_count, request_count, percentile(probe_us, PROBE_COUNT, 0.5),
           percentile(probe_us, PROBE_COUNT, 0.99), percentile(latencies_us, request_count, 0.5),
           percentile(latencies_us, request_count, 0.99), percentile(latencies_us, request_count, 0.999));
    close(file_descriptor);
    unlink(arguments[4]);
    free(latencies_us);
    return 0;
}
