# Included by ledger/_core.pyx (in the order listed there; every name of the module is visible here).
# Batch drivers: the hot loop over a batch of rows, expiry, batch headers and the commit word.

# ---- Batch drivers ------------------------------------------------------------------------------------------

ctypedef fused Row:
    AccountRow
    TransferRow

cdef inline bint row_id_exists(State *s, const Row *row) noexcept nogil:
    if Row is AccountRow:
        return table_find(&s.account_table, row.id) != NULL
    else:
        return table_find(&s.transfer_table, row.id) != NULL

DEF PREFETCH_TABLES_AHEAD = 16
DEF PREFETCH_ACCOUNTS_AHEAD = 8
DEF PREFETCH_RING = 32   # power of two > PREFETCH_TABLES_AHEAD

ctypedef struct Pipeline:
    # Per row, indexed by row & (PREFETCH_RING - 1): the home groups of its debit account, credit account and
    # transfer id (hashed once, PREFETCH_TABLES_AHEAD rows ahead, when their cache lines are prefetched), and its
    # account records (resolved PREFETCH_ACCOUNTS_AHEAD rows ahead, when they are prefetched). Transfers never
    # create or move accounts, so the pointers stay valid for the whole batch.
    uint64_t debit_group[PREFETCH_RING]
    uint64_t credit_group[PREFETCH_RING]
    uint64_t id_group[PREFETCH_RING]
    AccountHot *debit[PREFETCH_RING]
    AccountHot *credit[PREFETCH_RING]

cdef inline void pipeline_hash(State *s, Pipeline *p, uint64_t debit_account, uint64_t credit_account,
                               uint64_t id, uint64_t i) noexcept nogil:
    """Stage 1 for row (or event) i: hash its three keys and prefetch their id-table groups."""
    cdef uint64_t slot = i & (PREFETCH_RING - 1)
    p.debit_group[slot] = table_home_group(&s.account_table, debit_account)
    p.credit_group[slot] = table_home_group(&s.account_table, credit_account)
    p.id_group[slot] = table_home_group(&s.transfer_table, id)
    table_prefetch_group(&s.account_table, p.debit_group[slot])
    table_prefetch_group(&s.account_table, p.credit_group[slot])
    table_prefetch_group(&s.transfer_table, p.id_group[slot])

cdef inline void pipeline_resolve(State *s, Pipeline *p, uint64_t debit_account, uint64_t credit_account,
                                  uint64_t i) noexcept nogil:
    """Stage 2 for row (or event) i: find its accounts in the (now cached) groups and prefetch their records."""
    cdef uint64_t slot = i & (PREFETCH_RING - 1)
    cdef AccountHot *debit = account_at(s, debit_account, p.debit_group[slot])
    cdef AccountHot *credit = account_at(s, credit_account, p.credit_group[slot])
    if debit != NULL:
        ledger_prefetch(debit)
    if credit != NULL:
        ledger_prefetch(credit)
    p.debit[slot] = debit
    p.credit[slot] = credit

cdef inline void pipeline_fill(State *s, Pipeline *p, const TransferRow *rows, uint64_t i, uint64_t end) noexcept nogil:
    """Start (or restart, after rows were skipped) the pipeline at row i: rows i .. i + 15 hashed, rows
    i .. i + 7 resolved, as if the loop had run the stages for them."""
    cdef uint64_t k
    for k in range(i, min(i + PREFETCH_TABLES_AHEAD, end)):
        pipeline_hash(s, p, rows[k].debit_account, rows[k].credit_account, rows[k].id, k)
    for k in range(i, min(i + PREFETCH_ACCOUNTS_AHEAD, end)):
        pipeline_resolve(s, p, rows[k].debit_account, rows[k].credit_account, k)

cdef inline void pipeline_advance(State *s, Pipeline *p, const TransferRow *rows, uint64_t i,
                                  uint64_t end) noexcept nogil:
    """Software pipeline for random account access, run once per row i: 16 rows ahead, hash and prefetch the
    id-table groups; 8 rows ahead, resolve the account slots and prefetch the account records. The row at hand
    then finds everything in cache, so the loop is bound by bandwidth rather than by one memory latency after
    another."""
    cdef const TransferRow *ahead
    if i + PREFETCH_TABLES_AHEAD < end:
        ahead = &rows[i + PREFETCH_TABLES_AHEAD]
        pipeline_hash(s, p, ahead.debit_account, ahead.credit_account, ahead.id, i + PREFETCH_TABLES_AHEAD)
    if i + PREFETCH_ACCOUNTS_AHEAD < end:
        ahead = &rows[i + PREFETCH_ACCOUNTS_AHEAD]
        pipeline_resolve(s, p, ahead.debit_account, ahead.credit_account, i + PREFETCH_ACCOUNTS_AHEAD)

cdef inline void pipeline_advance_events(State *s, Pipeline *p, uint64_t position, uint64_t end) noexcept nogil:
    """The same pipeline for replay, over the journal records of a transfers batch instead of rows."""
    cdef Event *ahead
    if position + PREFETCH_TABLES_AHEAD < end:
        ahead = event_at(s, position + PREFETCH_TABLES_AHEAD)
        pipeline_hash(s, p, ahead.debit_account, ahead.credit_account, ahead.id, position + PREFETCH_TABLES_AHEAD)
    if position + PREFETCH_ACCOUNTS_AHEAD < end:
        ahead = event_at(s, position + PREFETCH_ACCOUNTS_AHEAD)
        pipeline_resolve(s, p, ahead.debit_account, ahead.credit_account, position + PREFETCH_ACCOUNTS_AHEAD)

cdef inline void assert_batch_room(const State *s, uint64_t header_position, uint64_t position,
                                   uint64_t count) noexcept nogil:
    """The contracts of apply_rows: the batch is the one being written (no damage pending from a read), and its
    next `count` events fit the memory the engine reserved and the 24-bit offset of a record in its batch."""
    LEDGER_ASSERT(header_position == s.write_position and header_position < position)
    LEDGER_ASSERT(s.damage_reason == DAMAGE_NONE)
    LEDGER_ASSERT(position + count <= s.mapped_end and position - header_position + count <= OFFSET_MAX)

cdef uint64_t apply_rows(State *s, const Row *rows, uint64_t count, uint8_t *results, uint64_t header_position,
                         uint64_t position, uint64_t timestamp_base, uint64_t *written_end) noexcept nogil:
    """Apply rows in order with linked-chain semantics; return the next free position. `written_end` gets the
    end of every record written, rolled-back ones included, so the caller can zero what was undone."""
    cdef uint8_t exists_code = RA_EXISTS if Row is AccountRow else RT_EXISTS
    cdef uint64_t evaluated_end = count, i, k, p, offset
    cdef uint64_t chain_start = count, chain_position = 0, first_position = position
    cdef bint linked
    cdef uint8_t code
    cdef Pipeline pipeline
    assert_batch_room(s, header_position, position, count)   # once per call, not per row
    # A chain still open at the end of the batch is not evaluated.
    if count > 0 and (rows[count - 1].flags & FLAG_LINKED):
        evaluated_end = count - 1
        while evaluated_end > 0 and (rows[evaluated_end - 1].flags & FLAG_LINKED):
            evaluated_end -= 1
        for k in range(evaluated_end, count - 1):
            results[k] = R_LINKED_EVENT_FAILED
        results[count - 1] = R_LINKED_CHAIN_OPEN
    i = 0
    if Row is TransferRow:
        pipeline_fill(s, &pipeline, rows, 0, evaluated_end)
    while i < evaluated_end:
        if Row is TransferRow:
            pipeline_advance(s, &pipeline, rows, i, evaluated_end)
        linked = (rows[i].flags & FLAG_LINKED) != 0
        if linked and chain_start == count:
            chain_start = i
            chain_position = position
        offset = position - header_position
        if Row is AccountRow:
            code = account_row(s, &rows[i], position, offset, timestamp_base + offset - 1)
        else:
            k = i & (PREFETCH_RING - 1)
            code = transfer_row(s, &rows[i], position, offset, timestamp_base + offset - 1,
                                pipeline.debit[k], pipeline.credit[k], pipeline.id_group[k])
        results[i] = code
        if code == R_OK:
            position += 1
        elif ledger_unlikely(code == R_DAMAGED):
            break   # the caller undoes the whole batch (undo_batch) and raises
        elif code != exists_code and chain_start != count:
            if position > written_end[0]:
                written_end[0] = position
            p = position
            while p > chain_position:
                p -= 1
                undo_event(s, p)
            position = chain_position
            for k in range(chain_start, i):
                # EXISTS stays EXISTS only if what it matched survives the undo (it was not made by this chain).
                if results[k] != exists_code or not row_id_exists(s, &rows[k]):
                    results[k] = R_LINKED_EVENT_FAILED
            k = i
            while rows[k].flags & FLAG_LINKED:
                k += 1
                results[k] = R_LINKED_EVENT_FAILED
            i = k + 1
            chain_start = count
            if Row is TransferRow:
                # The skipped rows' iterations did not run the pipeline's stages: restart it at the next row.
                pipeline_fill(s, &pipeline, rows, i, evaluated_end)
            continue
        if not linked:
            chain_start = count
        i += 1
    LEDGER_ASSERT(first_position <= position and position - first_position <= count)   # at most one event a row
    return position

cdef uint64_t expire_due(State *s, uint64_t header_position, uint64_t position, uint64_t timestamp_base) noexcept nogil:
    """Write an EXPIRE event for each pending transfer whose deadline has passed (bounded per call)."""
    cdef uint64_t expired = 0, offset
    cdef HeapEntry top
    cdef Event *pending
    cdef Event *e
    cdef TableSlot *slot
    cdef AccountHot *debit
    cdef AccountHot *credit
    while s.expiry_heap.size > 0 and s.expiry_heap.entries[0].deadline <= timestamp_base \
            and expired < EXPIRE_BATCH_MAX_C:
        top = heap_pop(&s.expiry_heap)
        if not record_trusted(s, top.position):
            heap_push(&s.expiry_heap, top.deadline, top.position)   # as it was; the caller undoes the batch
            break
        pending = event_at(s, top.position)
        slot = table_find(&s.transfer_table, pending.id)
        if slot == NULL or (slot.value & POSITION_MASK) != top.position \
                or ((slot.value >> POSITION_BITS) & 0xFF) != STATE_PENDING:
            continue  # posted or voided before its deadline: a stale entry
        debit = account_of(s, pending.debit_account)
        credit = account_of(s, pending.credit_account)
        LEDGER_ASSERT(debit != NULL and credit != NULL)
        offset = position - header_position
        e = event_written(s, position)
        e.id = pending.id
        e.debit_account = pending.debit_account
        e.credit_account = pending.credit_account
        e.amount = pending.amount
        e.user_data = 0
        e.aux = pending.id
        e.word_a = word_a(debit.last_position, 0, KIND_EXPIRE)
        e.word_b = word_b(credit.last_position, offset)
        apply_resolve(debit, credit, e, position, KIND_EXPIRE, slot, pending.amount)
        position += 1
        expired += 1
    return position

cdef void schedule_expiries(State *s, uint64_t start, uint64_t end) noexcept nogil:
    """Push the deadlines of the PENDING events in [start, end) once their batch is final (after rollbacks)."""
    cdef uint64_t position
    cdef Event *e
    cdef uint64_t timeout_seconds
    for position in range(start, end):
        e = event_at(s, position)
        if event_kind(e) == KIND_PENDING and e.aux != 0:
            timeout_seconds = e.aux   # read before the header: in replay that may map another old segment
            heap_push(&s.expiry_heap, event_timestamp(s, e, position) + timeout_seconds * NANOSECONDS_PER_SECOND,
                      position)

cdef uint32_t checksum_range(State *s, uint32_t crc, uint64_t start, uint64_t end) noexcept nogil:
    """CRC32C over the records [start, end), which may span segments."""
    cdef uint64_t records_per_segment = <uint64_t>1 << s.segment_records_log2
    cdef uint64_t chunk_end
    while start < end:
        chunk_end = min(end, (start | (records_per_segment - 1)) + 1)
        crc = ledger_crc32c(crc, event_at(s, start), (chunk_end - start) * 64)
        start = chunk_end
    return crc

cdef void zero_range(State *s, uint64_t start, uint64_t end) noexcept nogil:
    cdef uint64_t records_per_segment = <uint64_t>1 << s.segment_records_log2
    cdef uint64_t chunk_end
    while start < end:
        chunk_end = min(end, (start | (records_per_segment - 1)) + 1)
        memset(event_at(s, start), 0, (chunk_end - start) * 64)
        start = chunk_end

cdef uint32_t header_checksum(State *s, uint64_t header_position, uint64_t end) noexcept nogil:
    cdef uint32_t crc = checksum_range(s, 0, header_position + 1, end)
    # After the events: reading them may have mapped another old segment and unmapped the header's.
    cdef BatchHeader *header = <BatchHeader *>event_at(s, header_position)
    # The header fields up to and including previous_checksum: this is what chains batch to batch.
    return ledger_crc32c(crc, header, 40)

cdef void commit_batch(State *s, uint64_t header_position, uint64_t end, uint64_t timestamp_base,
                       uint64_t dirty_end) noexcept nogil:
    """Seal the batch [header_position, end): header fields, checksum, and last the commit word."""
    LEDGER_ASSERT(header_position == s.write_position and header_position < end)
    LEDGER_ASSERT(dirty_end <= s.mapped_end and timestamp_base > s.last_timestamp)
    cdef uint64_t count = end - header_position - 1
    if dirty_end > end:
        zero_range(s, end, dirty_end)   # records of rolled-back chains past the end: keep the tail zero
    if count == 0:
        zero_range(s, header_position, header_position + 1)   # the timestamp stamped by begin_batch
        return
    LEDGER_ASSERT(count <= OFFSET_MAX)
    cdef BatchHeader *header = <BatchHeader *>event_written(s, header_position)
    header.magic_version = <uint64_t>MAGIC | (<uint64_t>FORMAT_VERSION_C << 32)
    header.timestamp = timestamp_base
    header.position = header_position
    header.event_count = count
    header.previous_checksum = s.last_checksum
    header.word_a = <uint64_t>KIND_HEADER << 56
    cdef uint32_t crc = header_checksum(s, header_position, end)
    header.checksum = crc
    ledger_store_release_u64(&header.commit, (<uint64_t>COMMIT_MAGIC << 32) | crc)
    if s.batch_pending_deadlines != 0:   # an upper bound (rolled-back ones count): skip the pass when zero
        schedule_expiries(s, header_position + 1, end)
    s.last_checksum = crc
    s.last_timestamp = timestamp_base + count - 1
    s.last_header_position = header_position
    s.write_position = end
    LEDGER_ASSERT(s.last_timestamp <= TIMESTAMP_MAX)

cdef inline uint64_t clock_now_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_REALTIME, &now)
    return <uint64_t>now.tv_sec * NANOSECONDS_PER_SECOND + <uint64_t>now.tv_nsec

cdef inline uint64_t begin_batch(State *s, uint64_t now) noexcept nogil:
    """Stamp the batch's base timestamp into its header slot first: events of this batch that are read back
    before the commit (a POST of a PENDING made earlier in the same batch) find their time there. A crash before
    the commit leaves a header without its commit word, which recovery treats as a torn tail."""
    cdef uint64_t timestamp_base = now if now > s.last_timestamp else s.last_timestamp + 1
    (<BatchHeader *>event_written(s, s.write_position)).timestamp = timestamp_base
    s.batch_pending_deadlines = 0
    return timestamp_base

cdef uint64_t run_transfers(State *s, const TransferRow *rows, uint64_t count, uint8_t *results,
                           uint64_t now) noexcept nogil:
    """One transfers call: expiries, rows, commit. Returns the number of events written (0 and nothing applied
    when a damaged record was met: s.damage_reason says so)."""
    cdef uint64_t header_position = s.write_position
    cdef uint64_t timestamp_base = begin_batch(s, now)
    cdef uint64_t position = expire_due(s, header_position, header_position + 1, timestamp_base)
    cdef uint64_t written_end = position
    cdef uint64_t end = position
    if ledger_likely(s.damage_reason == DAMAGE_NONE):
        end = apply_rows(s, rows, count, results, header_position, position, timestamp_base, &written_end)
    if ledger_unlikely(s.damage_reason != DAMAGE_NONE):
        end = undo_batch(s, header_position, end, &written_end)
    commit_batch(s, header_position, end, timestamp_base, written_end)
    return end - header_position - 1

cdef uint64_t undo_batch(State *s, uint64_t header_position, uint64_t end, uint64_t *written_end) noexcept nogil:
    """A row (or an expiry) of the batch being applied met a damaged record: undo every event of the batch, newest
    first, so that the call changes nothing (commit_batch then seals an empty batch: it zeroes what was written).
    Returns the batch's new end (the position after its header)."""
    if end > written_end[0]:
        written_end[0] = end
    while end > header_position + 1:
        end -= 1
        undo_event(s, end)
    return end

DEF WRITE_AHEAD_ROWS = 4096       # 256 KiB of events per chunk
# Each background sync is a device cache flush as well as data: below about four chunks the extra flush costs
# what the overlap saves (measured: 8k batches no faster, 64k batches 4.3 -> 4.9-6.0M transfers/s).
DEF WRITE_AHEAD_BATCH_MIN_ROWS = 16384

cdef inline uint64_t chunk_end(const TransferRow *rows, uint64_t first, uint64_t count) noexcept nogil:
    """The end of the chunk that starts at row `first`: about WRITE_AHEAD_ROWS rows, moved past the end of a
    LINKED chain it would cut (a chain is applied or undone as a whole inside one apply_rows call)."""
    cdef uint64_t last = min(first + WRITE_AHEAD_ROWS, count)
    while last < count and (rows[last - 1].flags & FLAG_LINKED):
        last += 1
    return last

cdef uint64_t run_accounts(State *s, const AccountRow *rows, uint64_t count, uint8_t *results,
                          uint64_t now) noexcept nogil:
    cdef uint64_t header_position = s.write_position
    cdef uint64_t timestamp_base = begin_batch(s, now)
    cdef uint64_t written_end = header_position + 1
    cdef uint64_t end = apply_rows(s, rows, count, results, header_position, header_position + 1, timestamp_base,
                                   &written_end)
    commit_batch(s, header_position, end, timestamp_base, written_end)
    return end - header_position - 1
