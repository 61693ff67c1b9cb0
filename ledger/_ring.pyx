# cython: language_level=3
# The command ring (docs/RING.md): a file-backed mmap of fixed-size slots shared by many producer processes and
# one consumer (the writer). Producers claim sequences with an atomic fetch-add, write the slot, then publish it
# with a compare-and-swap of its `published` word; the consumer drains published slots in order, applies them
# through the core in one call, group-commits, and writes each result back into its slot. Every slot is
# untrusted input: the consumer checks it before use and answers a malformed one with a status, not a crash.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.exc cimport PyErr_CheckSignals

cimport cython
import numpy as np
cimport numpy as cnp

cnp.import_array()

from ledger._atomics cimport (
    ledger_load_acquire_u64, ledger_store_release_u64, ledger_fetch_add_u64, ledger_compare_exchange_u64,
    ledger_load_seq_cst_u32, ledger_store_seq_cst_u32, ledger_fetch_add_u32, ledger_cpu_pause, ledger_fence_seq_cst,
)

cdef extern from "_ring_helpers.h" nogil:
    # `published` word: sequence + 1, with these flags. WRITING: a producer owns the slot and is writing it.
    # ABANDONED: the writer gave this sequence up (ABANDONED | WRITING: while its owner was writing it).
    const uint64_t ABANDONED "RING_ABANDONED"
    const uint64_t WRITING "RING_WRITING"
    const uint64_t SEQUENCE_MASK "RING_SEQUENCE_MASK"
    # `released` word: DETACHED | (sequence + 1): the producer stopped waiting for this result (timeout, writer
    # gone, Ctrl-C); whoever needs the slot next frees it once the result is written.
    const uint64_t DETACHED "RING_DETACHED"
    uint64_t ring_monotonic_ns()
    int ring_futex_wait(uint32_t *address, uint32_t expected, uint64_t timeout_ns)
    int ring_futex_wake(uint32_t *address, int count)
    int ring_process_alive(uint32_t pid)

DEF HEADER_BYTES = 4096
DEF SLOT_BYTES = 128
DEF PAYLOAD_BYTES = 80
# The wait strategy (docs/RING.md): spin `spin_count` pause instructions, then sleep on a futex in slices.
DEF SPIN_COUNT_DEFAULT = 2000     # ~50-300 us of pauses: a round trip through an idle writer usually fits
DEF SPIN_COUNT_MAX = 1000000
DEF WAIT_SLICE_MS_DEFAULT = 10    # between re-checks of deadlines, the writer's heartbeat and Ctrl-C
DEF WAIT_SLICE_MS_MAX = 1000
DEF WRITER_TIMEOUT_MS_DEFAULT = 3000
SPIN_COUNT_DEFAULT_VALUE = SPIN_COUNT_DEFAULT
SPIN_COUNT_LIMIT = SPIN_COUNT_MAX
WAIT_SLICE_MS_DEFAULT_VALUE = WAIT_SLICE_MS_DEFAULT
WAIT_SLICE_MS_LIMIT = WAIT_SLICE_MS_MAX
# _wait_until_free outcomes.
DEF SLOT_FREE = 0
DEF SLOT_BUSY = 1
DEF SLOT_GIVEN_UP = 2
DEF SLOT_WRITER_GONE = 3
DEF SLOT_SLICE_OVER = 4           # one futex wait is over: check for signals (Ctrl-C) and wait again

RING_MAGIC = 0x474E495252474C44  # "LDGRRING"
RING_VERSION = 2
HEADER_SIZE = HEADER_BYTES
SLOT_SIZE = SLOT_BYTES
PAYLOAD_SIZE = PAYLOAD_BYTES

# What a slot carries (SLOT_ because the journal's event kinds, _core.EVENT_KINDS, are another numbering).
SLOT_KIND_TRANSFER = 1
SLOT_KIND_ACCOUNT = 2
SLOT_KIND_QUERY_ACCOUNT = 3
SLOT_KINDS = (SLOT_KIND_TRANSFER, SLOT_KIND_ACCOUNT, SLOT_KIND_QUERY_ACCOUNT)
DEF SLOT_KIND_LAST = 3            # slot kinds are 1..SLOT_KIND_LAST
assert SLOT_KINDS == tuple(range(1, SLOT_KIND_LAST + 1))

# What happened to a slot (the result code is only meaningful with STATUS_APPLIED).
STATUS_APPLIED = 0
STATUS_INVALID_SLOT = 1
STATUS_ABANDONED = 2
STATUS_NOT_FOUND = 3
STATUS_REJECTED = 4               # a well-formed slot of a batch that holds a malformed one: refused with it
STATUS_DAMAGED = 5    # the writer met a damaged journal record applying the batch: nothing of it was applied

ctypedef struct RingHeader:
    uint64_t magic
    uint32_t version
    uint32_t slot_size
    uint64_t slot_count
    uint64_t writer_pid
    uint64_t writer_epoch
    uint64_t created_ns
    uint64_t batch_rows_max          # the most rows one producer batch may hold (the writer's drain fits it)
    uint64_t padding0[1]
    uint64_t claim_sequence          # producers: fetch-add; its own cache line
    uint64_t padding1[7]
    uint64_t consume_sequence        # consumer: next sequence to apply
    uint64_t padding2[7]
    uint64_t heartbeat_ns            # consumer: CLOCK_MONOTONIC of its last loop, so clients can tell it died
    uint64_t state                   # 1 running, 2 stopped cleanly
    uint64_t padding3[6]
    uint32_t consumer_wake           # futex: producers bump it after publishing
    uint32_t consumer_sleeping
    uint64_t padding4[7]
    uint32_t results_epoch           # futex: the consumer bumps it after writing results
    uint32_t result_waiters
    uint32_t space_waiters           # producers asleep until a slot is released (releasing producers wake them)
    uint64_t padding5[7]

ctypedef struct Slot:
    uint64_t published               # sequence + 1 once published; | WRITING while owned; | ABANDONED if given up
    uint64_t result                  # (sequence + 1) << 16 | status << 8 | code, written by the consumer
    uint64_t released                # sequence + 1 once the producer has read its result: the slot is free;
                                     # | DETACHED if the producer stopped waiting
    uint32_t pid
    uint16_t kind
    uint16_t reserved
    uint64_t batch_first             # sequence of the first slot of the producer's batch
    uint32_t batch_count
    uint32_t reserved2
    uint8_t payload[PAYLOAD_BYTES]   # a TRANSFER_DTYPE or ACCOUNT_DTYPE row; for queries, the answer

assert sizeof(RingHeader) <= HEADER_BYTES
assert sizeof(Slot) == SLOT_BYTES


class RingBusyError(Exception):
    pass


class RingWriterGoneError(Exception):
    pass


class RingTimeoutError(Exception):
    pass


class RingAbandonedError(Exception):
    pass


class RingProtocolError(Exception):
    """The ring's words say something no honest writer or producer writes (a hostile or broken process)."""


cdef int check_wait_strategy(uint64_t spin_count, uint64_t wait_slice_ms) except -1:
    if spin_count > SPIN_COUNT_MAX:
        raise ValueError(f"spin_count must be in [0, {SPIN_COUNT_MAX}], got {spin_count}")
    if not 1 <= wait_slice_ms <= WAIT_SLICE_MS_MAX:
        raise ValueError(f"wait_slice_ms must be in [1, {WAIT_SLICE_MS_MAX}], got {wait_slice_ms}")
    return 0


# Where gather writes its rows: the consumer's arrays (kinds uint16, 80-byte payloads, batch_ends and statuses
# uint8), one entry per gathered slot.
ctypedef struct GatherOutput:
    uint16_t *kinds
    uint8_t *payloads
    uint8_t *batch_ends
    uint8_t *statuses


cdef inline void _answer_alone(GatherOutput *out, uint64_t index, uint8_t status) noexcept nogil:
    """Gathered row `index` is not applied: it is answered on its own with `status`."""
    out.kinds[index] = 0
    out.batch_ends[index] = 1
    out.statuses[index] = status


cdef int _refuse_with_batch_before(GatherOutput *out, uint64_t index, uint64_t last_index,
                                   uint64_t last_count) except -1:
    """Gathered row `index` is well-formed, but its batch did not start where it is (the consume position is a
    batch boundary). Continuing no batch, it is the rest of a batch refused or given up before: answered alone,
    never applied (the caller does that). Continuing the batch completed just before (rows last_index ..
    last_index + last_count), that batch ended early: one of them lies about the batch (a lowered count on its
    first slot), so that batch is refused too, unapplied as yet (here)."""
    cdef uint64_t refused
    for refused in range(last_index, last_index + last_count):
        _answer_alone(out, refused, STATUS_REJECTED)
    _answer_alone(out, index, STATUS_INVALID_SLOT)
    return 0


cdef int _refuse_malformed(GatherOutput *out, uint64_t index, uint64_t sequence, uint64_t open_first,
                           uint64_t open_count) except -1:
    """Gathered row `index` (of `sequence`) is malformed: answered alone, the consumer never trusts its batch
    fields. The rows of the open batch gathered before it (open_count != 0) are refused with it (one call is
    applied whole or not at all); the batch's later slots then do not start a batch: refused as well."""
    cdef uint64_t refused
    if open_count != 0:
        assert index >= sequence - open_first
        for refused in range(index - (sequence - open_first), index):
            _answer_alone(out, refused, STATUS_REJECTED)
    _answer_alone(out, index, STATUS_INVALID_SLOT)
    return 0


cdef int raise_submit_failure(int outcome, uint64_t slot_index, uint64_t busy_timeout_ms) except -1:
    """The exception for a submit that stopped at `slot_index` with `outcome` (nothing of its batch is applied)."""
    if outcome == SLOT_BUSY:
        raise RingBusyError(f"ring slot {slot_index} still busy after {busy_timeout_ms} ms; "
                            f"nothing of this batch was applied")
    if outcome == SLOT_GIVEN_UP:
        raise RingAbandonedError("the writer gave up on this batch (too slow to publish); nothing of it was "
                                 "applied")
    if outcome == SLOT_WRITER_GONE:
        raise RingWriterGoneError("the ledger writer stopped (or stopped beating) while this call waited for "
                                  "ring space; nothing of it was applied: reconnect when it is back")
    raise AssertionError(f"submit outcome {outcome}")


@cython.final
cdef class Ring:
    """A view of a ring mapping. Producer and consumer operations are on the same class; a process uses one side."""

    cdef object _buffer
    cdef Py_buffer _view
    cdef bint _has_view
    cdef RingHeader *header
    cdef Slot *slots
    cdef uint64_t slot_count
    cdef uint64_t mask
    cdef uint64_t batch_rows_max
    cdef uint32_t pid
    cdef uint64_t _head_since_ns      # consumer: when the current head slot was first seen unpublished
    cdef uint64_t _head_sequence      # consumer: that head sequence + 1 (0: none)
    # Consumer: claim_sequence as seen when that head was first seen unpublished. Only sequences below it were
    # claimed at least abandon_after_ns before the head is given up; later claims belong to live producers.
    cdef uint64_t _head_claimed
    # Consumer: the next sequence to answer (complete), and the next to gather; they differ while a gathered
    # group is applied and synced but not answered yet. Kept here, not read back from the shared header, which
    # any producer can overwrite: the header copy is only published for observers.
    cdef uint64_t _consume
    cdef uint64_t _gather
    cdef bint _has_stall_hook         # tests only: submit calls _stall_hook(sequence) before taking each slot
    cdef object _stall_hook

    def __cinit__(self):
        self._has_view = False

    def __init__(self, buffer, uint32_t pid):
        PyObject_GetBuffer(buffer, &self._view, PyBUF_WRITABLE | PyBUF_SIMPLE)
        self._has_view = True
        self._buffer = buffer
        if self._view.len < HEADER_BYTES:
            raise ValueError("ring mapping too small")
        self.header = <RingHeader *>self._view.buf
        self.slots = <Slot *>(<char *>self._view.buf + HEADER_BYTES)
        self.pid = pid

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)

    def release(self):
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False
        self.header = NULL
        self.slots = NULL

    def initialise(self, uint64_t slot_count, uint64_t batch_rows_max, uint64_t writer_pid, uint64_t epoch,
                   uint64_t now_ns):
        """Stamp a new ring (the writer does this on a freshly created, zeroed file). batch_rows_max: the most rows
        one producer batch may hold; at most half the ring, and no more than the writer gathers per drain (a
        bigger batch could never be seen complete)."""
        if slot_count < 16 or slot_count & (slot_count - 1):
            raise ValueError("slot_count must be a power of two >= 16")
        if not 1 <= batch_rows_max <= slot_count // 2:
            raise ValueError(f"batch_rows_max must be in [1, {slot_count // 2}], got {batch_rows_max}")
        if HEADER_BYTES + slot_count * SLOT_BYTES > <uint64_t>self._view.len:
            raise ValueError("ring mapping smaller than its slots")
        self.header.version = RING_VERSION
        self.header.slot_size = SLOT_BYTES
        self.header.slot_count = slot_count
        self.header.batch_rows_max = batch_rows_max
        self.header.writer_pid = writer_pid
        self.header.writer_epoch = epoch
        self.header.created_ns = now_ns
        self.header.heartbeat_ns = ring_monotonic_ns()
        self.header.state = 1
        self._consume = 0
        self._gather = 0
        ledger_store_release_u64(&self.header.magic, RING_MAGIC)
        self.attach()

    def attach(self):
        """Check the header of an existing ring (a client does this) and adopt its geometry."""
        if ledger_load_acquire_u64(&self.header.magic) != RING_MAGIC or self.header.version != RING_VERSION \
                or self.header.slot_size != SLOT_BYTES:
            raise ValueError(f"not a version {RING_VERSION} ledger command ring")
        cdef uint64_t slot_count = self.header.slot_count
        if slot_count < 16 or slot_count & (slot_count - 1) \
                or HEADER_BYTES + slot_count * SLOT_BYTES > <uint64_t>self._view.len:
            raise ValueError("ring header geometry is invalid")
        cdef uint64_t batch_rows_max = self.header.batch_rows_max
        if not 1 <= batch_rows_max <= slot_count // 2:
            raise ValueError("ring header batch_rows_max is invalid")
        self.batch_rows_max = batch_rows_max
        self.slot_count = slot_count
        self.mask = slot_count - 1

    @property
    def slot_count(self):
        return self.slot_count

    @property
    def batch_rows_max(self):
        return self.batch_rows_max

    @property
    def writer_pid(self):
        return self.header.writer_pid

    @property
    def writer_epoch(self):
        return self.header.writer_epoch

    @property
    def consume_sequence(self):
        """The next sequence the writer applies, as published in the header (the writer's own copy is private)."""
        return ledger_load_acquire_u64(&self.header.consume_sequence)

    @property
    def claim_sequence(self):
        return ledger_load_acquire_u64(&self.header.claim_sequence)

    # ---- producer side ----

    def submit(self, uint16_t kind, cnp.ndarray rows not None, uint64_t busy_timeout_ms,
               uint64_t writer_timeout_ms=WRITER_TIMEOUT_MS_DEFAULT, uint64_t spin_count=SPIN_COUNT_DEFAULT,
               uint64_t wait_slice_ms=WAIT_SLICE_MS_DEFAULT):
        """Claim len(rows) consecutive slots, wait until each is free, take it, write and publish it. Returns the
        first sequence. RingBusyError if a slot stays occupied past busy_timeout_ms, RingAbandonedError if the
        writer gave the batch up meanwhile, RingWriterGoneError if the writer stops (or stops beating for
        writer_timeout_ms) while we wait for space: nothing of this batch is applied (the slots it claimed and
        did not publish are given up by the writer after its abandon timeout). Ctrl-C interrupts the wait."""
        cdef uint64_t count = rows.shape[0], row_size = rows.dtype.itemsize, i, sequence
        if count == 0 or count > self.batch_rows_max:
            raise ValueError(f"a ring batch holds 1 to {self.batch_rows_max} rows, got {count}")
        if row_size > PAYLOAD_BYTES or not cnp.PyArray_IS_C_CONTIGUOUS(rows):
            raise ValueError("rows must be C-contiguous with at most 80-byte rows")
        check_wait_strategy(spin_count, wait_slice_ms)
        cdef char *data = <char *>cnp.PyArray_DATA(rows)
        cdef uint64_t first = ledger_fetch_add_u64(&self.header.claim_sequence, count)
        cdef uint64_t deadline = ring_monotonic_ns() + busy_timeout_ms * 1000000
        cdef uint64_t writer_timeout_ns = writer_timeout_ms * 1000000, wait_slice_ns = wait_slice_ms * 1000000
        cdef Slot *slot
        cdef int outcome = SLOT_FREE
        with nogil:
            for i in range(count):
                sequence = first + i
                slot = &self.slots[sequence & self.mask]
                outcome = self._wait_for_slot(slot, sequence, deadline, writer_timeout_ns, spin_count, wait_slice_ns)
                if outcome != SLOT_FREE:
                    break
                if self._has_stall_hook:
                    with gil:
                        self._stall_hook(sequence)
                outcome = self._write_slot(slot, sequence, kind, first, count, data + i * row_size, row_size)
                if outcome != SLOT_FREE:
                    break
        if outcome != SLOT_FREE:
            raise_submit_failure(outcome, sequence & self.mask, busy_timeout_ms)
        ledger_fetch_add_u32(&self.header.consumer_wake, 1)
        if ledger_load_seq_cst_u32(&self.header.consumer_sleeping):
            ring_futex_wake(&self.header.consumer_wake, 1)
        return first

    cdef int _wait_for_slot(self, Slot *slot, uint64_t sequence, uint64_t deadline, uint64_t writer_timeout_ns,
                            uint64_t spin_count, uint64_t wait_slice_ns) except -1 nogil:
        """_wait_until_free until it decides, spinning only before the first slice, with a look for Ctrl-C (which
        raises here) after every slice."""
        cdef int outcome = self._wait_until_free(slot, sequence, deadline, writer_timeout_ns, spin_count,
                                                 wait_slice_ns)
        while outcome == SLOT_SLICE_OVER:
            with gil:
                PyErr_CheckSignals()
            outcome = self._wait_until_free(slot, sequence, deadline, writer_timeout_ns, 0, wait_slice_ns)
        return outcome

    cdef int _write_slot(self, Slot *slot, uint64_t sequence, uint16_t kind, uint64_t first, uint64_t count,
                         const char *row, uint64_t row_size) noexcept nogil:
        """Take the free slot, write the row and publish it: SLOT_FREE, or SLOT_GIVEN_UP if the writer gave the
        sequence up first. The slot is taken (compare-and-swap to WRITING) before it is written: a producer
        stalled since it saw the slot free must not write into it once the writer has given this sequence up and
        the slot has gone to the next lap."""
        cdef uint64_t published = ledger_load_acquire_u64(&slot.published)
        while True:
            if (published & SEQUENCE_MASK) >= sequence + 1:
                # Our sequence, or a later lap's: the writer gave ours up (and the slot may have moved on).
                return SLOT_GIVEN_UP
            if ledger_compare_exchange_u64(&slot.published, published, WRITING | (sequence + 1)):
                break
            published = ledger_load_acquire_u64(&slot.published)
        slot.pid = self.pid
        slot.kind = kind
        slot.batch_first = first
        slot.batch_count = <uint32_t>count
        memset(slot.payload, 0, PAYLOAD_BYTES)
        memcpy(slot.payload, row, row_size)
        if not ledger_compare_exchange_u64(&slot.published, WRITING | (sequence + 1), sequence + 1):
            # The writer gave it up while we wrote and left the slot to us: free it for the next lap.
            ledger_store_release_u64(&slot.released, sequence + 1)
            return SLOT_GIVEN_UP
        return SLOT_FREE

    cdef int _wait_until_free(self, Slot *slot, uint64_t sequence, uint64_t deadline, uint64_t writer_timeout_ns,
                              uint64_t spin_count, uint64_t wait_slice_ns) noexcept nogil:
        """Wait until the slot's previous lap is released: spin spin_count times, then sleep one futex slice.
        SLOT_FREE; SLOT_BUSY at the deadline; SLOT_GIVEN_UP if the writer already gave this sequence up (fail at
        once: the batch can no longer complete); SLOT_WRITER_GONE; SLOT_SLICE_OVER after one slice."""
        cdef uint64_t required = sequence + 1 - self.slot_count if sequence >= self.slot_count else 0
        cdef uint64_t released, now
        cdef uint32_t epoch
        cdef uint64_t rounds = 0
        while True:
            released = ledger_load_acquire_u64(&slot.released)
            if released == required:
                return SLOT_FREE
            if (ledger_load_acquire_u64(&slot.published) & SEQUENCE_MASK) >= sequence + 1 \
                    or (released & SEQUENCE_MASK) >= sequence + 1:
                return SLOT_GIVEN_UP  # the writer gave our sequence up (and the slot may already serve a later lap)
            if self._release_on_behalf(slot, sequence, released, required):
                continue
            if rounds < spin_count:
                rounds += 1
                ledger_cpu_pause()
                continue
            now = ring_monotonic_ns()
            if now > deadline:
                return SLOT_BUSY
            if not self._writer_alive(now, writer_timeout_ns):
                return SLOT_WRITER_GONE
            # Sleep until a producer releases a slot or the writer answers (both bump results_epoch), at most
            # one slice. "I sleep" is visible before the re-check (fence), so a release in between wakes us.
            epoch = ledger_load_seq_cst_u32(&self.header.results_epoch)
            ledger_fetch_add_u32(&self.header.space_waiters, 1)
            ledger_fence_seq_cst()
            if ledger_load_acquire_u64(&slot.released) == released:
                ring_futex_wait(&self.header.results_epoch, epoch, wait_slice_ns)
            ledger_fetch_add_u32(&self.header.space_waiters, <uint32_t>-1)
            return SLOT_SLICE_OVER

    cdef inline bint _writer_alive(self, uint64_t now, uint64_t writer_timeout_ns) noexcept nogil:
        """Running, beating within writer_timeout_ns, and its process exists."""
        return ledger_load_acquire_u64(&self.header.state) == 1 \
            and now <= ledger_load_acquire_u64(&self.header.heartbeat_ns) + writer_timeout_ns \
            and ring_process_alive(<uint32_t>self.header.writer_pid)

    def writer_alive(self, uint64_t writer_timeout_ms):
        """Whether this ring's writer runs (beating within writer_timeout_ms, its process there): a client asks
        before it sends anything, so that a call made while `serve` starts (the old ring still in place) waits for
        the new writer instead of publishing into a ring nobody drains."""
        return self._writer_alive(ring_monotonic_ns(), writer_timeout_ms * 1000000)

    cdef bint _release_on_behalf(self, Slot *slot, uint64_t sequence, uint64_t released,
                                 uint64_t required) noexcept nogil:
        """Free an earlier lap of this slot that nobody else will free; True if `released` moved. Each step is a
        compare-and-swap from the value seen, so producers of several later laps may try at once."""
        cdef uint64_t lap = released & SEQUENCE_MASK  # sequence + 1 of the last lap released (0: none yet)
        cdef uint64_t next_lap, published
        if released & DETACHED:
            # Its producer stopped waiting for the result: free once the writer has answered it.
            return (ledger_load_acquire_u64(&slot.result) >> 16) == lap \
                and ledger_compare_exchange_u64(&slot.released, released, lap)
        next_lap = lap + self.slot_count if lap != 0 else (sequence & self.mask) + 1
        if next_lap > required:
            return False  # the lap before ours is still owned by a live producer or the writer
        if (ledger_load_acquire_u64(&slot.result) >> 16) == next_lap and not ring_process_alive(slot.pid):
            # Answered, and its producer died before collecting.
            return ledger_compare_exchange_u64(&slot.released, released, next_lap)
        published = ledger_load_acquire_u64(&slot.published)
        if published == ABANDONED | next_lap:
            # Given up before anyone took it: nobody wrote it and nobody reads it.
            return ledger_compare_exchange_u64(&slot.released, released, next_lap)
        if published == ABANDONED | WRITING | next_lap and not ring_process_alive(slot.pid):
            # Given up while its producer wrote it, and that producer died before freeing it.
            return ledger_compare_exchange_u64(&slot.released, released, next_lap)
        return False

    def wait_results(self, uint64_t first, uint64_t count, cnp.ndarray codes not None, cnp.ndarray statuses not None,
                     uint64_t timeout_ms, uint64_t writer_timeout_ms, cnp.ndarray payloads=None,
                     uint64_t spin_count=SPIN_COUNT_DEFAULT, uint64_t wait_slice_ms=WAIT_SLICE_MS_DEFAULT):
        """Wait until the consumer has answered every slot of the batch, copy codes (and for queries the answer
        payloads) out, and release the slots. RingWriterGoneError if the writer stops beating, RingTimeoutError
        past timeout_ms (the batch may still be applied later: retry with the same ids, which is safe). On any
        failure the slots are detached: the next producer to need one frees it once the writer has answered."""
        assert 1 <= count <= self.batch_rows_max
        assert <uint64_t>codes.shape[0] >= count and <uint64_t>statuses.shape[0] >= count
        assert payloads is None or <uint64_t>payloads.shape[0] >= count
        check_wait_strategy(spin_count, wait_slice_ms)
        cdef uint8_t *code_out = <uint8_t *>cnp.PyArray_DATA(codes)
        cdef uint8_t *status_out = <uint8_t *>cnp.PyArray_DATA(statuses)
        cdef uint8_t *payload_out = <uint8_t *>cnp.PyArray_DATA(payloads) if payloads is not None else NULL
        cdef uint64_t deadline = ring_monotonic_ns() + timeout_ms * 1000000
        cdef uint64_t last = first + count - 1
        cdef int outcome = 0
        try:
            with nogil:
                outcome = self._wait_for_answer(&self.slots[last & self.mask], last, deadline,
                                                writer_timeout_ms * 1000000, spin_count, wait_slice_ms * 1000000)
        except BaseException:
            self._detach(first, count)
            raise
        if outcome == 1:
            self._detach(first, count)
            raise RingTimeoutError(f"no result within {timeout_ms} ms; the batch may still be applied: "
                                   f"retry with the same ids (EXISTS means it was)")
        if outcome == 2:
            self._detach(first, count)
            raise RingWriterGoneError("the ledger writer stopped (or stopped beating); the batch may or may not "
                                      "be applied: reconnect when it is back and retry with the same ids")
        self._copy_results(first, count, code_out, status_out, payload_out)
        self._release_results(first, count)
        return count

    cdef int _wait_for_answer(self, Slot *slot, uint64_t last, uint64_t deadline, uint64_t writer_timeout_ns,
                              uint64_t spin_count, uint64_t wait_slice_ns) except -1 nogil:
        """Wait until `slot` holds the result of sequence `last` (the consumer answers a batch in order, so its
        last slot answered means all are): 0; 1 past the deadline; 2 if the writer stops beating. Spins
        spin_count times, then sleeps on the results futex in slices, looking for Ctrl-C (raised here) after
        each."""
        cdef uint64_t rounds = 0, now
        cdef uint32_t epoch
        while (ledger_load_acquire_u64(&slot.result) >> 16) != last + 1:
            if rounds < spin_count:
                rounds += 1
                ledger_cpu_pause()
                continue
            now = ring_monotonic_ns()
            if now > deadline:
                return 1
            if not self._writer_alive(now, writer_timeout_ns):
                return 2
            epoch = ledger_load_seq_cst_u32(&self.header.results_epoch)
            ledger_fetch_add_u32(&self.header.result_waiters, 1)
            if (ledger_load_acquire_u64(&slot.result) >> 16) != last + 1:
                ring_futex_wait(&self.header.results_epoch, epoch, wait_slice_ns)
            ledger_fetch_add_u32(&self.header.result_waiters, <uint32_t>-1)
            with gil:
                PyErr_CheckSignals()  # Ctrl-C: raises here (KeyboardInterrupt), between slices
        return 0

    cdef int _copy_results(self, uint64_t first, uint64_t count, uint8_t *code_out, uint8_t *status_out,
                           uint8_t *payload_out) except -1:
        """Copy the answered batch's codes, statuses (and query answers, if payload_out) out. RingProtocolError
        (the slots detached) if a slot holds the result of another sequence."""
        cdef uint64_t i, result
        cdef Slot *slot
        for i in range(count):
            slot = &self.slots[(first + i) & self.mask]
            result = ledger_load_acquire_u64(&slot.result)
            if (result >> 16) != first + i + 1:
                self._detach(first, count)
                raise RingProtocolError(f"ring slot {(first + i) & self.mask} holds the result of another "
                                        f"sequence ({(result >> 16) - 1}, expected {first + i}): the ring was "
                                        f"written by a process that does not follow its protocol")
            code_out[i] = <uint8_t>(result & 0xFF)
            status_out[i] = <uint8_t>((result >> 8) & 0xFF)
            if payload_out != NULL:
                memcpy(payload_out + i * PAYLOAD_BYTES, slot.payload, PAYLOAD_BYTES)
        return 0

    cdef void _release_results(self, uint64_t first, uint64_t count) noexcept nogil:
        """Free the batch's slots once every result is read (a released slot may be rewritten at once), and wake
        the producers waiting for space."""
        cdef uint64_t i
        for i in range(count):
            ledger_store_release_u64(&self.slots[(first + i) & self.mask].released, first + i + 1)
        ledger_fence_seq_cst()  # the releases are visible before we look for sleepers (they re-check after announcing)
        if ledger_load_seq_cst_u32(&self.header.space_waiters):
            ledger_fetch_add_u32(&self.header.results_epoch, 1)
            ring_futex_wake(&self.header.results_epoch, 1 << 30)

    cdef void _detach(self, uint64_t first, uint64_t count) noexcept nogil:
        """Stop waiting for these results: mark each slot so the next producer that needs it frees it as soon as
        the writer has answered (until then the slot still holds a published command)."""
        cdef uint64_t i, sequence, required
        cdef Slot *slot
        for i in range(count):
            sequence = first + i
            slot = &self.slots[sequence & self.mask]
            required = sequence + 1 - self.slot_count if sequence >= self.slot_count else 0
            ledger_compare_exchange_u64(&slot.released, required, DETACHED | (sequence + 1))

    def set_stall_hook(self, hook):
        """Call hook(sequence) in submit after each slot is free and before taking it, as if the producer stalled
        there. Tests only (None removes it)."""
        self._stall_hook = hook
        self._has_stall_hook = hook is not None

    def claim_without_publishing(self, uint64_t count):
        """Claim slots and never publish them: what a producer that dies right after claiming leaves behind.
        Tests and the fuzz campaign only."""
        return ledger_fetch_add_u64(&self.header.claim_sequence, count)

    def publish_raw(self, uint64_t sequence, bytes slot_bytes):
        """Write arbitrary bytes into the slot of `sequence` and publish it: a hostile or broken producer.
        Tests and the fuzz campaign only."""
        if len(slot_bytes) != SLOT_BYTES - 24:
            raise ValueError("slot bytes after the three control words must be 104 bytes")
        cdef Slot *slot = &self.slots[sequence & self.mask]
        memcpy(<char *>slot + 24, <const char *>slot_bytes, SLOT_BYTES - 24)
        ledger_store_release_u64(&slot.published, sequence + 1)

    # ---- consumer side ----

    def heartbeat(self):
        ledger_store_release_u64(&self.header.heartbeat_ns, ring_monotonic_ns())

    def stop(self):
        ledger_store_release_u64(&self.header.state, 2)
        ledger_fetch_add_u32(&self.header.results_epoch, 1)
        ring_futex_wake(&self.header.results_epoch, 1 << 30)

    def wait_for_work(self, uint64_t timeout_ms, uint64_t spin_count=SPIN_COUNT_DEFAULT):
        """Sleep until a producer publishes (or timeout_ms): spin spin_count times, then a futex wait (no CPU when
        idle)."""
        check_wait_strategy(spin_count, 1)
        cdef uint64_t sequence = self._gather
        cdef Slot *slot = &self.slots[sequence & self.mask]
        cdef uint64_t rounds
        cdef uint32_t wake
        cdef bint ready = False
        with nogil:
            for rounds in range(spin_count):
                if ledger_load_acquire_u64(&slot.published) == sequence + 1:
                    ready = True
                    break
                ledger_cpu_pause()
        if ready:
            return True
        with nogil:
            wake = ledger_load_seq_cst_u32(&self.header.consumer_wake)
            ledger_store_seq_cst_u32(&self.header.consumer_sleeping, 1)
            if ledger_load_acquire_u64(&slot.published) != sequence + 1:
                ring_futex_wait(&self.header.consumer_wake, wake, timeout_ms * 1000000)
            ledger_store_seq_cst_u32(&self.header.consumer_sleeping, 0)
        return ledger_load_acquire_u64(&slot.published) == sequence + 1

    def gather(self, uint64_t limit, uint64_t abandon_after_ns, cnp.ndarray kinds not None,
               cnp.ndarray payloads not None, cnp.ndarray batch_ends not None, cnp.ndarray statuses not None):
        """Collect published slots after those gathered before, whole producer batches only, at most `limit`.
        Fills kinds (uint16), payloads (uint8 rows of 80 bytes), batch_ends (uint8: 1 on a batch's last row) and
        statuses (STATUS_INVALID_SLOT for malformed slots, STATUS_REJECTED for the other slots of a batch that holds
        one, else 0: a batch is applied whole or not at all). Gives up on a head batch that stays
        unpublished for abandon_after_ns (its producer died or hangs). Returns (first sequence, count); the
        caller answers every gathered group with complete(), in order."""
        assert kinds.shape[0] == payloads.shape[0] == batch_ends.shape[0] == statuses.shape[0]
        assert payloads.shape[0] == 0 or payloads.strides[0] == PAYLOAD_BYTES
        cdef GatherOutput out
        out.kinds = <uint16_t *>cnp.PyArray_DATA(kinds)
        out.payloads = <uint8_t *>cnp.PyArray_DATA(payloads)
        out.batch_ends = <uint8_t *>cnp.PyArray_DATA(batch_ends)
        out.statuses = <uint8_t *>cnp.PyArray_DATA(statuses)
        cdef uint64_t first = self._gather
        cdef uint64_t claimed = ledger_load_acquire_u64(&self.header.claim_sequence)
        limit = min(limit, <uint64_t>kinds.shape[0], self.slot_count)
        cdef uint64_t complete = self._gather_slots(first, limit, &claimed, &out)
        self._gather = first + complete
        if complete == 0 and claimed > first and self._consume == first:
            # (Only with every gathered group answered: giving up a batch answers it, in sequence order.)
            self._maybe_abandon(first, claimed, abandon_after_ns)
        return first, complete

    cdef uint64_t _gather_slots(self, uint64_t first, uint64_t limit, uint64_t *claimed,
                                GatherOutput *out) except? 0xFFFFFFFFFFFFFFFF:
        """gather's loop: the rows of at most `limit` published slots from `first` into `out`; returns how many
        rows end with a whole batch (the count gather hands out). `claimed`: claim_sequence, re-read as needed."""
        cdef uint64_t count = 0, sequence, batch_count, batch_first, complete = 0
        cdef uint64_t open_first = 0, open_count = 0  # the producer batch being gathered (count 0: none)
        cdef uint16_t kind, open_kind = 0
        # The batch completed last in this gather (count 0: none), and its first row's index in the output.
        cdef uint64_t last_first = 0, last_count = 0, last_index = 0
        cdef bint valid
        cdef Slot *slot
        while count < limit:
            sequence = first + count
            slot = &self.slots[sequence & self.mask]
            if ledger_load_acquire_u64(&slot.published) != sequence + 1:
                break
            # Each field is read once: a hostile producer may rewrite the slot while we look at it.
            kind = slot.kind
            batch_first = slot.batch_first
            batch_count = slot.batch_count
            if batch_first + batch_count > claimed[0]:  # claimed since we looked? (producers claim, then publish)
                claimed[0] = ledger_load_acquire_u64(&self.header.claim_sequence)
            valid = self._batch_fields_valid(kind, sequence, batch_first, batch_count, claimed[0])
            if valid and open_count != 0:
                # Inside a batch, every slot continues it, described the same way and of its kind: else a producer
                # could make a batch that no slot ever ends (the writer would wait for it forever), or slip a row
                # of another kind into it.
                valid = batch_first == open_first and batch_count == open_count and kind == open_kind
            elif valid and batch_first != sequence:
                # Well-formed, but its batch did not start here (see _refuse_with_batch_before).
                if last_count != 0 and batch_first == last_first:
                    _refuse_with_batch_before(out, count, last_index, last_count)
                    last_count = 0
                else:
                    _answer_alone(out, count, STATUS_REJECTED)
                count += 1
                complete = count
                continue
            elif valid:
                open_first, open_count, open_kind = batch_first, batch_count, kind  # a batch starts here
            if not valid:
                _refuse_malformed(out, count, sequence, open_first, open_count)
                open_count = 0
                count += 1
                complete = count
                continue
            out.kinds[count] = kind
            memcpy(out.payloads + count * PAYLOAD_BYTES, slot.payload, PAYLOAD_BYTES)
            out.statuses[count] = 0
            out.batch_ends[count] = 1 if sequence + 1 == batch_first + batch_count else 0
            count += 1
            if out.batch_ends[count - 1]:
                complete = count
                last_first, last_count, last_index = open_first, open_count, count - open_count
                open_count = 0
        return complete

    cdef inline bint _batch_fields_valid(self, uint16_t kind, uint64_t sequence, uint64_t batch_first,
                                         uint64_t batch_count, uint64_t claimed) noexcept nogil:
        """An honest producer's slot: a known kind, and a batch that holds `sequence`, fits the per-call limit and
        was claimed in full (producers claim a whole batch with one fetch-add before publishing any of it)."""
        return 1 <= kind <= SLOT_KIND_LAST \
            and 1 <= batch_count <= self.batch_rows_max \
            and batch_first <= sequence < batch_first + batch_count \
            and batch_first + batch_count <= claimed

    cdef _maybe_abandon(self, uint64_t head, uint64_t claimed, uint64_t abandon_after_ns):
        """The head batch is claimed but incomplete. After abandon_after_ns, give it up in one step, in two phases:
        first mark every unpublished slot of it abandoned (a late owner then fails its compare-and-swap), then
        answer and free the slots that were published. How far the head batch goes: the head slot says so once
        published; otherwise every slot up to the next published slot that starts a batch, at most one batch
        long, and never past what was claimed when the head was first seen stuck (sequences claimed since belong
        to producers that may be publishing right now, such as the retry of a call that timed out here: each gets
        its own abandon timeout once it is the head)."""
        cdef uint64_t now = ring_monotonic_ns()
        if self._head_sequence != head + 1:
            self._head_sequence = head + 1
            self._head_since_ns = now
            self._head_claimed = claimed
            return
        if now - self._head_since_ns < abandon_after_ns:
            return
        assert claimed > head
        cdef Slot *slot = &self.slots[head & self.mask]
        cdef uint64_t end = head, published, batch_first, batch_count
        assert self._head_claimed > head
        cdef uint64_t limit = min(self._head_claimed, head + self.batch_rows_max)
        cdef bint head_published = False, marked = False
        cdef uint64_t attempts = 0
        cdef uint16_t kind
        published = ledger_load_acquire_u64(&slot.published)
        if published == head + 1:
            head_published = True
            kind = slot.kind  # each field read once, as in gather
            batch_first = slot.batch_first
            batch_count = slot.batch_count
            if not self._batch_fields_valid(kind, head, batch_first, batch_count, claimed) \
                    or batch_first != head:
                return  # malformed: the next gather answers it INVALID_SLOT on its own
            limit = head + batch_count
        elif not self._mark_abandoned(slot, head, published):
            return  # published or taken just now: look again at the next gather
        else:
            marked = True
            end = head + 1
        # Phase 1: mark. A mark fails only when its slot moved on (taken, or published): look at it again. An
        # honest slot moves on at most twice; a hostile process flipping words gets this round cut short (marks
        # are final, so the next round goes on from them).
        while end < limit:
            attempts += 1
            if attempts > 3 * (limit - head) + 16:
                return
            slot = &self.slots[end & self.mask]
            published = ledger_load_acquire_u64(&slot.published)
            if published == end + 1:
                if not head_published and slot.batch_first == end:
                    break  # the next producer's batch starts here: not ours to give up
                end += 1
            elif self._mark_abandoned(slot, end, published):
                marked = True
                end += 1
        if not marked:
            return  # the whole head batch was published meanwhile: the next gather applies it
        assert head < end <= claimed
        self._answer_abandoned(head, end)

    cdef _answer_abandoned(self, uint64_t head, uint64_t end):
        """Phase 2 of _maybe_abandon: the range [head, end), marked, can no longer complete, so its producers never
        read a result: answer and free the published slots, and move the consume position past the range. Slots
        marked while unowned or being written are freed by their owner or the next lap (their previous lap may
        hold a result nobody has read yet: never overwrite it)."""
        cdef uint64_t sequence
        cdef Slot *slot
        for sequence in range(head, end):
            slot = &self.slots[sequence & self.mask]
            if ledger_load_acquire_u64(&slot.published) == sequence + 1:
                ledger_store_release_u64(&slot.result, ((sequence + 1) << 16) | (STATUS_ABANDONED << 8))
                ledger_store_release_u64(&slot.released, sequence + 1)
        assert self._consume == self._gather == head
        self._consume = self._gather = end
        ledger_store_release_u64(&self.header.consume_sequence, end)
        self._head_sequence = 0
        self.wake_producers()

    cdef inline bint _mark_abandoned(self, Slot *slot, uint64_t sequence, uint64_t published) noexcept nogil:
        """Give up an unpublished sequence: unowned, or owned and being written (its owner then frees the slot).
        False if the slot moved on meanwhile (the caller looks again). Never called on a published slot."""
        if published == WRITING | (sequence + 1):
            return ledger_compare_exchange_u64(&slot.published, published, ABANDONED | WRITING | (sequence + 1))
        if (published & SEQUENCE_MASK) == sequence + 1:
            # Already marked: only a hostile producer writes that (this writer marks a sequence once). Counting
            # it as marked keeps the writer moving.
            return (published & ABANDONED) != 0
        return ledger_compare_exchange_u64(&slot.published, published, ABANDONED | (sequence + 1))

    def complete(self, uint64_t first, cnp.ndarray codes not None, cnp.ndarray statuses not None,
                 cnp.ndarray payloads=None):
        """Write each slot's result (and query answers), advance the consume position, wake the producers."""
        cdef uint64_t count = codes.shape[0], i, sequence
        cdef uint8_t *code_in = <uint8_t *>cnp.PyArray_DATA(codes)
        cdef uint8_t *status_in = <uint8_t *>cnp.PyArray_DATA(statuses)
        cdef uint8_t *payload_in = <uint8_t *>cnp.PyArray_DATA(payloads) if payloads is not None else NULL
        cdef Slot *slot
        assert first == self._consume and first + count <= self._gather and count <= self.slot_count
        assert <uint64_t>statuses.shape[0] == count and (payloads is None or <uint64_t>payloads.shape[0] >= count)
        with nogil:  # the ring server answers from its sync thread while its writer thread applies the next group
            for i in range(count):
                sequence = first + i
                slot = &self.slots[sequence & self.mask]
                if payload_in != NULL:
                    memcpy(slot.payload, payload_in + i * PAYLOAD_BYTES, PAYLOAD_BYTES)
                ledger_store_release_u64(&slot.result,
                                   ((sequence + 1) << 16) | (<uint64_t>status_in[i] << 8) | code_in[i])
        self._consume = first + count
        ledger_store_release_u64(&self.header.consume_sequence, first + count)
        self._head_sequence = 0
        self.wake_producers()

    def wake_producers(self):
        ledger_fetch_add_u32(&self.header.results_epoch, 1)
        if ledger_load_seq_cst_u32(&self.header.result_waiters) or ledger_load_seq_cst_u32(&self.header.space_waiters):
            ring_futex_wake(&self.header.results_epoch, 1 << 30)
