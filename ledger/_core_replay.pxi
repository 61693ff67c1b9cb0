# Included by ledger/_core.pyx (in the order listed there; every name of the module is visible here).
# Replay: the state as a fold over committed batches, and the checks of each batch read back.

# ---- Replay: the state as a fold over committed batches ------------------------------------------------------

cdef int replay_batch(State *s, uint64_t header_position, uint64_t count) noexcept nogil:
    """Apply the events of a verified batch. Returns REPLAY_END (0), or REPLAY_INTEGRITY / REPLAY_DAMAGED with
    nothing of the batch applied (the events before the failing one are undone): the state stays the fold
    through the batch before, so a standby can refuse a replicated batch and go on. A batch is either all ACCOUNT
    events (a create_accounts call) or has none (transfers and expiries), as the writer makes them."""
    s.batch_pending_deadlines = 0   # counted by replay_transfers: the expiry pass is skipped when none
    cdef uint64_t stopped = header_position + 1
    cdef int reason
    if event_kind(event_at(s, header_position + 1)) == KIND_ACCOUNT:
        reason = replay_accounts(s, header_position, count, &stopped)
    else:
        reason = replay_transfers(s, header_position, count, &stopped)
    if reason != REPLAY_END:
        while stopped > header_position + 1:   # newest first, as the linked-chain rollback does
            stopped -= 1
            undo_event(s, stopped, True)
    return reason

cdef inline int stop_at(uint64_t *stopped, uint64_t position, int reason) noexcept nogil:
    """A replay failure at the event at `position`, before it was applied: every event before it in the batch was."""
    stopped[0] = position
    return reason

cdef int replay_accounts(State *s, uint64_t header_position, uint64_t count, uint64_t *stopped) noexcept nogil:
    cdef uint64_t position
    cdef Event *e
    # A copy: the batch's events may lie in the next segment, whose mapping may unmap the header's.
    cdef uint64_t timestamp_base = (<BatchHeader *>event_at(s, header_position)).timestamp
    for position in range(header_position + 1, header_position + 1 + count):
        e = event_at(s, position)
        if event_kind(e) != KIND_ACCOUNT or event_offset(e) != position - header_position:
            return stop_at(stopped, position, REPLAY_INTEGRITY)
        if e.id == 0 or e.id == ID_MAX or table_find(&s.account_table, e.id) != NULL:
            return stop_at(stopped, position, REPLAY_INTEGRITY)
        apply_account(s, e, position, timestamp_base + (position - header_position) - 1)
    return REPLAY_END

cdef int replay_transfers(State *s, uint64_t header_position, uint64_t count, uint64_t *stopped) noexcept nogil:
    cdef uint64_t position, slot_index
    cdef Event *e
    cdef uint32_t kind
    cdef AccountHot *debit
    cdef AccountHot *credit
    cdef TableSlot *slot
    cdef TableSlot *empty
    cdef Event pending_event
    cdef Event *pending
    cdef Pipeline pipeline
    cdef uint64_t first = header_position + 1, end = header_position + 1 + count
    for position in range(first, min(first + PREFETCH_TABLES_AHEAD, end)):
        e = event_at(s, position)
        pipeline_hash(s, &pipeline, e.debit_account, e.credit_account, e.id, position)
    for position in range(first, min(first + PREFETCH_ACCOUNTS_AHEAD, end)):
        e = event_at(s, position)
        pipeline_resolve(s, &pipeline, e.debit_account, e.credit_account, position)
    for position in range(first, end):
        pipeline_advance_events(s, &pipeline, position, end)
        e = event_at(s, position)
        kind = event_kind(e)
        if event_offset(e) != position - header_position:
            return stop_at(stopped, position, REPLAY_INTEGRITY)
        if kind < KIND_TRANSFER or kind > KIND_EXPIRE or e.amount <= 0:
            return stop_at(stopped, position, REPLAY_INTEGRITY)
        slot_index = position & (PREFETCH_RING - 1)
        debit = pipeline.debit[slot_index]
        credit = pipeline.credit[slot_index]
        if debit == NULL or credit == NULL or debit == credit:
            return stop_at(stopped, position, REPLAY_INTEGRITY)
        if debit.last_position != (e.word_a & POSITION_MASK) or credit.last_position != (e.word_b & POSITION_MASK):
            return stop_at(stopped, position, REPLAY_INTEGRITY)
        if kind == KIND_TRANSFER or kind == KIND_PENDING:
            if e.id == 0 or table_walk(&s.transfer_table, e.id, pipeline.id_group[slot_index], &empty) != NULL:
                return stop_at(stopped, position, REPLAY_INTEGRITY)   # a transfer id applied twice
            table_insert_at(&s.transfer_table, empty, e.id, position | (<uint64_t>(
                STATE_PENDING if kind == KIND_PENDING else STATE_POSTED) << POSITION_BITS))
            apply_transfer(debit, credit, e, position, kind)
            s.batch_pending_deadlines += kind == KIND_PENDING and e.aux != 0
            continue
        slot = table_find(&s.transfer_table, e.aux)
        if slot == NULL or ((slot.value >> POSITION_BITS) & 0xFF) != STATE_PENDING:
            return stop_at(stopped, position, REPLAY_INTEGRITY)
        if not record_trusted(s, slot.value & POSITION_MASK):
            # The pending transfer's record (before the snapshot) is damaged.
            return stop_at(stopped, position, REPLAY_DAMAGED)
        # A copy: mapping this event's segment again (below) may unmap the pending event's.
        pending_event = event_at(s, slot.value & POSITION_MASK)[0]
        pending = &pending_event
        e = event_at(s, position)   # mapping the pending event's segment may have unmapped this one
        if pending.debit_account != e.debit_account or pending.credit_account != e.credit_account \
                or e.amount > pending.amount:
            return stop_at(stopped, position, REPLAY_INTEGRITY)
        if kind != KIND_EXPIRE and table_find(&s.transfer_table, e.id) != NULL:
            return stop_at(stopped, position, REPLAY_INTEGRITY)
        apply_resolve(debit, credit, e, position, kind, slot, pending.amount)
        if kind != KIND_EXPIRE:
            table_insert(&s.transfer_table, e.id, position | (<uint64_t>STATE_POSTED << POSITION_BITS))
    return REPLAY_END

cdef uint64_t count_accounts(State *s, uint64_t header_position, uint64_t count) noexcept nogil:
    """Accounts a batch can create: all of its events if it is an accounts batch (replay_batch checks that every
    one is), none otherwise. One record read instead of a pass over the batch."""
    return count if event_kind(event_at(s, header_position + 1)) == KIND_ACCOUNT else 0

cdef int check_header(State *s, uint64_t position, uint64_t *count_out, uint32_t *crc_out) noexcept nogil:
    """Classify the record where the next batch header should be."""
    return check_batch(s, position, s.last_checksum, s.mapped_end, count_out, crc_out)

cdef int check_batch(State *s, uint64_t position, uint64_t previous_checksum, uint64_t end, uint64_t *count_out,
                     uint32_t *crc_out) noexcept nogil:
    """Classify the record at `position` as the header of a batch that follows one with checksum
    previous_checksum, within the records below `end`: -1 a good batch (its count and checksum out), else a
    REPLAY_* reason. Replay (check_header) and scrub share it. count_out is also set when the header is
    well-formed but its checksum or chain fails (scrub goes on after such a batch)."""
    if position >= end:
        return REPLAY_END
    cdef BatchHeader *header = <BatchHeader *>event_at(s, position)
    cdef uint32_t kind = <uint32_t>((header.word_a >> 56) & KIND_MASK)
    cdef uint64_t commit = ledger_load_acquire_u64(&header.commit)
    if kind == 0 and header.magic_version == 0 and commit == 0:
        return REPLAY_END if header.word_a == 0 and header.event_count == 0 else REPLAY_TORN
    if kind != KIND_HEADER:
        return REPLAY_HEADER
    if header.word_a != (<uint64_t>KIND_HEADER << 56):
        return REPLAY_HEADER   # the rest of this word is not under the checksum: it must be exactly this
    if (commit >> 32) != COMMIT_MAGIC:
        return REPLAY_TORN
    if header.magic_version != (<uint64_t>MAGIC | (<uint64_t>FORMAT_VERSION_C << 32)) \
            or header.position != position or header.event_count == 0 or header.event_count > OFFSET_MAX:
        return REPLAY_HEADER
    if position + 1 + header.event_count > end:
        return REPLAY_TORN
    count_out[0] = header.event_count
    cdef uint32_t crc = header_checksum(s, position, position + 1 + header.event_count)
    header = <BatchHeader *>event_at(s, position)   # the checksum's reads may have unmapped it (old segments)
    if crc != header.checksum or crc != <uint32_t>commit:
        return REPLAY_CHECKSUM
    if header.previous_checksum != previous_checksum:
        return REPLAY_CHAIN
    crc_out[0] = crc
    return -1   # a good batch


cdef uint64_t scrub_resync(State *s, uint64_t start, uint64_t search_end, uint64_t end,
                           uint64_t *previous_checksum) noexcept nogil:
    """The first position in [start, search_end) holding a good batch header of a batch within the records
    below `end` (its checksum matching; the chain is not asked), with previous_checksum set to what that batch
    chains to; 0 if none."""
    cdef uint64_t position, count
    cdef uint32_t crc
    cdef int reason
    cdef BatchHeader *header
    for position in range(start, search_end):
        header = <BatchHeader *>event_at(s, position)
        if header.word_a != (<uint64_t>KIND_HEADER << 56):
            continue
        reason = check_batch(s, position, header.previous_checksum, end, &count, &crc)
        if reason == -1:
            previous_checksum[0] = header.previous_checksum
            return position
    return 0
