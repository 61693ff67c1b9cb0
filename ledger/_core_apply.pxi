# Included by ledger/_core.pyx (in the order listed there; every name of the module is visible here).
# Applying events to the account arrays (the live path, linked-chain undo and replay share these).

# ---- Applying events (shared by the live path, linked-chain undo and replay) ------------------------------

cdef inline void apply_account(State *s, const Event *e, uint64_t position, uint64_t timestamp) noexcept nogil:
    LEDGER_ASSERT(s.account_count < s.account_capacity)
    cdef uint64_t index = s.account_count
    cdef AccountHot *hot = &s.accounts[index]
    cdef AccountCold *cold = &s.accounts_cold[index]
    memset(hot, 0, sizeof(AccountHot))
    hot.min_balance = e.amount
    hot.max_balance = <int64_t>e.aux
    hot.last_position = position
    hot.ledger = <uint32_t>e.debit_account   # low 32 bits
    hot.flags = <uint16_t>((e.debit_account >> 32) & 0xFFFF)
    cold.id = e.id
    cold.user_data = e.user_data
    cold.timestamp = timestamp
    cold.position = position
    table_insert(&s.account_table, e.id, index)
    s.account_count += 1

cdef inline void apply_transfer(AccountHot *debit, AccountHot *credit, const Event *e, uint64_t position,
                                uint32_t kind) noexcept nogil:
    if kind == KIND_TRANSFER:
        debit.debits_posted += e.amount
        credit.credits_posted += e.amount
    else:
        debit.debits_pending += e.amount
        credit.credits_pending += e.amount
    debit.last_position = position
    credit.last_position = position

cdef inline void apply_resolve(AccountHot *debit, AccountHot *credit, const Event *e, uint64_t position,
                               uint32_t kind, TableSlot *pending_slot, int64_t pending_amount) noexcept nogil:
    """POST, VOID or EXPIRE of a pending transfer: release the reservation, post the amount if POST."""
    debit.debits_pending -= pending_amount
    credit.credits_pending -= pending_amount
    cdef uint64_t state = STATE_PENDING_EXPIRED
    if kind == KIND_POST:
        debit.debits_posted += e.amount
        credit.credits_posted += e.amount
        state = STATE_PENDING_POSTED
    elif kind == KIND_VOID:
        state = STATE_PENDING_VOIDED
    LEDGER_ASSERT(debit.debits_pending >= 0 and credit.credits_pending >= 0)
    pending_slot.value = (pending_slot.value & POSITION_MASK) | (state << POSITION_BITS)
    debit.last_position = position
    credit.last_position = position

cdef inline AccountHot *account_of(State *s, uint64_t id) noexcept nogil:
    cdef TableSlot *slot = table_find(&s.account_table, id)
    if slot == NULL:
        return NULL
    return &s.accounts[slot.value]

cdef inline AccountHot *account_at(State *s, uint64_t id, uint64_t group) noexcept nogil:
    """account_of with the id's home group already known (the apply loop's pipeline)."""
    if id == 0:
        return NULL
    cdef TableSlot *slot = table_find_at(&s.account_table, id, group)
    if slot == NULL:
        return NULL
    return &s.accounts[slot.value]

cdef void undo_event(State *s, uint64_t position, bint replayed=False) noexcept nogil:
    """Reverse the event at `position`, which must be the newest applied one (linked-chain rollback, and the
    whole-batch undo of a call that met a damaged record, which also undoes its EXPIRE events). replayed: the
    event was applied by replay (undo_replayed), which pops no deadline for an EXPIRE (the heap deletes lazily),
    so none is pushed back; its record may lie in an old segment."""
    # A copy: in an old segment (replayed) the reads below may unmap the record; otherwise it is the batch being
    # applied, never unmapped.
    cdef Event event = event_at(s, position)[0] if replayed else event_written(s, position)[0]
    cdef Event *e = &event
    cdef uint32_t kind = event_kind(e)
    cdef AccountHot *debit
    cdef AccountHot *credit
    cdef TableSlot *pending_slot
    cdef Event pending_event
    cdef Event *pending
    if kind == KIND_ACCOUNT:
        LEDGER_ASSERT(s.account_count > 0 and s.accounts_cold[s.account_count - 1].id == e.id)
        table_remove_newest(&s.account_table, e.id)
        s.account_count -= 1
        memset(&s.accounts[s.account_count], 0, sizeof(AccountHot))
        memset(&s.accounts_cold[s.account_count], 0, sizeof(AccountCold))
        return
    debit = account_of(s, e.debit_account)
    credit = account_of(s, e.credit_account)
    LEDGER_ASSERT(debit != NULL and credit != NULL)
    LEDGER_ASSERT(debit.last_position == position and credit.last_position == position)
    if kind == KIND_TRANSFER:
        debit.debits_posted -= e.amount
        credit.credits_posted -= e.amount
    elif kind == KIND_PENDING:
        debit.debits_pending -= e.amount
        credit.credits_pending -= e.amount
    else:
        LEDGER_ASSERT(kind == KIND_POST or kind == KIND_VOID or kind == KIND_EXPIRE)
        pending_slot = table_find(&s.transfer_table, e.aux)
        LEDGER_ASSERT(pending_slot != NULL)
        # Applying this event read (and so checked) the pending record: its batch is remembered as good.
        LEDGER_ASSERT(record_trusted(s, pending_slot.value & POSITION_MASK))
        # A copy: event_timestamp below may map another old segment and unmap this one.
        pending_event = event_at(s, pending_slot.value & POSITION_MASK)[0]
        pending = &pending_event
        debit.debits_pending += pending.amount
        credit.credits_pending += pending.amount
        if kind == KIND_POST:
            debit.debits_posted -= e.amount
            credit.credits_posted -= e.amount
        pending_slot.value = (pending_slot.value & POSITION_MASK) | (<uint64_t>STATE_PENDING << POSITION_BITS)
        if kind == KIND_EXPIRE:
            # expire_due popped its deadline (there is room: this batch popped it): put it back. EXPIRE adds
            # no id to the transfer table.
            if not replayed:
                heap_push(&s.expiry_heap, event_timestamp(s, pending, pending_slot.value & POSITION_MASK)
                          + pending.aux * NANOSECONDS_PER_SECOND, pending_slot.value & POSITION_MASK)
            debit.last_position = e.word_a & POSITION_MASK
            credit.last_position = e.word_b & POSITION_MASK
            return
    debit.last_position = e.word_a & POSITION_MASK
    credit.last_position = e.word_b & POSITION_MASK
    table_remove_newest(&s.transfer_table, e.id)
