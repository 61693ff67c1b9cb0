# Included by ledger/_core.pyx (in the order listed there; every name of the module is visible here).
# Validation: one command row in, one result code out, one event written when it is OK.

# ---- Validation: one row in, one result code out (and one event written when OK) --------------------------

cdef inline uint8_t account_row(State *s, const AccountRow *a, uint64_t position, uint64_t offset,
                                uint64_t timestamp) noexcept nogil:
    if (a.flags & ~ACCOUNT_FLAGS_ALL) != 0:
        return R_FLAGS_INVALID
    if a.id == 0 or a.id == ID_MAX:
        return R_ID_INVALID
    if a.ledger == 0:
        return RA_LEDGER_INVALID
    if a.min_balance > 0 or a.max_balance < 0:
        return RA_BALANCE_LIMITS_INVALID
    cdef uint16_t flags = a.flags & ~FLAG_LINKED
    cdef TableSlot *existing = table_find(&s.account_table, a.id)
    cdef AccountHot *hot
    if existing != NULL:
        hot = &s.accounts[existing.value]
        if (hot.ledger == a.ledger and hot.flags == flags and hot.min_balance == a.min_balance
                and hot.max_balance == a.max_balance and s.accounts_cold[existing.value].user_data == a.user_data):
            return RA_EXISTS
        return RA_EXISTS_WITH_DIFFERENT_FIELDS
    cdef Event *e = event_written(s, position)
    e.id = a.id
    e.debit_account = <uint64_t>a.ledger | (<uint64_t>flags << 32)
    e.credit_account = 0
    e.amount = a.min_balance
    e.user_data = a.user_data
    e.aux = <uint64_t>a.max_balance
    e.word_a = word_a(0, 0, KIND_ACCOUNT | (KIND_LINKED if (a.flags & FLAG_LINKED) else 0))
    e.word_b = word_b(0, offset)
    apply_account(s, e, position, timestamp)
    return R_OK

cdef inline uint8_t compare_existing(State *s, const TableSlot *slot, const TransferRow *t) noexcept nogil:
    if not record_trusted(s, slot.value & POSITION_MASK):
        return R_DAMAGED   # the original event is damaged: no answer from it (the call is undone and raises)
    cdef Event *e = event_at(s, slot.value & POSITION_MASK)
    cdef uint32_t kind = event_kind(e)
    cdef uint16_t recorded_flags = 0
    if kind == KIND_PENDING:
        recorded_flags = FLAG_PENDING
    elif kind == KIND_POST:
        recorded_flags = FLAG_POST
    elif kind == KIND_VOID:
        recorded_flags = FLAG_VOID
    if (t.flags & ~FLAG_LINKED) != recorded_flags or t.code != event_code(e) or t.user_data != e.user_data:
        return RT_EXISTS_WITH_DIFFERENT_FIELDS
    cdef AccountHot *debit = account_of(s, e.debit_account)
    LEDGER_ASSERT(debit != NULL)
    if kind == KIND_POST or kind == KIND_VOID:
        # Zeros in a resolving row mean "as the pending transfer", so they match what was recorded.
        if (t.pending_id != e.aux
                or (t.debit_account != 0 and t.debit_account != e.debit_account)
                or (t.credit_account != 0 and t.credit_account != e.credit_account)
                or (t.amount != 0 and t.amount != e.amount)
                or (t.ledger != 0 and t.ledger != debit.ledger)):
            return RT_EXISTS_WITH_DIFFERENT_FIELDS
        return RT_EXISTS
    if (t.debit_account != e.debit_account or t.credit_account != e.credit_account or t.amount != e.amount
            or t.ledger != debit.ledger or t.timeout != (e.aux if kind == KIND_PENDING else 0)):
        return RT_EXISTS_WITH_DIFFERENT_FIELDS
    return RT_EXISTS

cdef inline uint8_t resolve_row(State *s, const TransferRow *t, uint64_t position, uint64_t offset,
                                uint64_t timestamp, uint32_t kind) noexcept nogil:
    """POST_PENDING or VOID_PENDING (kind is KIND_POST or KIND_VOID)."""
    if t.pending_id == 0:
        return RT_PENDING_ID_REQUIRED
    if t.pending_id == ID_MAX:
        return RT_PENDING_ID_INVALID
    if t.pending_id == t.id:
        return RT_PENDING_ID_MUST_BE_DIFFERENT
    if t.timeout != 0:
        return RT_TIMEOUT_RESERVED_FOR_PENDING
    cdef TableSlot *existing = table_find(&s.transfer_table, t.id)
    if existing != NULL:
        return compare_existing(s, existing, t)
    cdef TableSlot *pending_slot = table_find(&s.transfer_table, t.pending_id)
    if pending_slot == NULL:
        return RT_PENDING_NOT_FOUND
    cdef uint64_t state = (pending_slot.value >> POSITION_BITS) & 0xFF
    if state == STATE_POSTED:
        return RT_PENDING_TRANSFER_NOT_PENDING
    if state == STATE_PENDING_POSTED:
        return RT_PENDING_ALREADY_POSTED
    if state == STATE_PENDING_VOIDED:
        return RT_PENDING_ALREADY_VOIDED
    if state == STATE_PENDING_EXPIRED:
        return RT_PENDING_EXPIRED
    LEDGER_ASSERT(state == STATE_PENDING)
    cdef uint64_t pending_position = pending_slot.value & POSITION_MASK
    if not record_trusted(s, pending_position):
        return R_DAMAGED   # never apply amounts or accounts read from a damaged record
    # A copy: reading the pending event's batch header may map another old segment and unmap this one.
    cdef Event pending_event = event_at(s, pending_position)[0]
    cdef Event *pending = &pending_event
    if pending.aux != 0 and (event_timestamp(s, pending, pending_position)
                             + pending.aux * NANOSECONDS_PER_SECOND) <= timestamp:
        return RT_PENDING_EXPIRED
    if t.debit_account != 0 and t.debit_account != pending.debit_account:
        return RT_PENDING_DIFFERENT_DEBIT_ACCOUNT
    if t.credit_account != 0 and t.credit_account != pending.credit_account:
        return RT_PENDING_DIFFERENT_CREDIT_ACCOUNT
    cdef AccountHot *debit = account_of(s, pending.debit_account)
    cdef AccountHot *credit = account_of(s, pending.credit_account)
    LEDGER_ASSERT(debit != NULL and credit != NULL)
    if t.ledger != 0 and t.ledger != debit.ledger:
        return RT_LEDGER_MISMATCH
    if t.amount < 0:
        return RT_AMOUNT_MUST_BE_POSITIVE
    cdef int64_t amount = pending.amount
    if kind == KIND_POST:
        if t.amount != 0:
            amount = t.amount
        if amount > pending.amount:
            return RT_EXCEEDS_PENDING_AMOUNT
    elif t.amount != 0 and t.amount != pending.amount:
        return RT_PENDING_DIFFERENT_AMOUNT
    cdef Event *e = event_written(s, position)
    e.id = t.id
    e.debit_account = pending.debit_account
    e.credit_account = pending.credit_account
    e.amount = amount
    e.user_data = t.user_data
    e.aux = t.pending_id
    e.word_a = word_a(debit.last_position, t.code, kind | (KIND_LINKED if (t.flags & FLAG_LINKED) else 0))
    e.word_b = word_b(credit.last_position, offset)
    apply_resolve(debit, credit, e, position, kind, pending_slot, pending.amount)
    table_insert(&s.transfer_table, t.id, position | (<uint64_t>STATE_POSTED << POSITION_BITS))
    return R_OK

cdef inline void debug_assert_pipeline_lookups(State *s, const TransferRow *t, const AccountHot *debit,
                                               const AccountHot *credit, uint64_t id_group) noexcept nogil:
    """The apply loop's pipeline looked up this row's accounts and id group (a lookup per check: debug builds only,
    LEDGER_DEBUG=1; in release builds this is empty)."""
    LEDGER_DEBUG_ASSERT(debit == account_at(s, t.debit_account, table_home_group(&s.account_table, t.debit_account)))
    LEDGER_DEBUG_ASSERT(credit == account_at(s, t.credit_account,
                                             table_home_group(&s.account_table, t.credit_account)))
    LEDGER_DEBUG_ASSERT(id_group == table_home_group(&s.transfer_table, t.id))

cdef inline void assert_within_limits(const AccountHot *debit, const AccountHot *credit) noexcept nogil:
    """After a transfer or a reservation: the debit account is not below its min_balance, the credit account not
    above its max_balance, pending amounts counted (the rule docs/SEMANTICS.md states)."""
    LEDGER_ASSERT(debit.credits_posted - (debit.debits_posted + debit.debits_pending) >= debit.min_balance)
    LEDGER_ASSERT((credit.credits_posted + credit.credits_pending) - credit.debits_posted <= credit.max_balance)

cdef inline uint8_t transfer_row(State *s, const TransferRow *t, uint64_t position, uint64_t offset,
                                 uint64_t timestamp, AccountHot *debit, AccountHot *credit,
                                 uint64_t id_group) noexcept nogil:
    """debit, credit: the accounts of t.debit_account and t.credit_account, already looked up (NULL: none);
    id_group: the home group of t.id in the transfer table."""
    # Contracts: into reserved memory, at an offset its 24 bits hold (apply_rows checks that once per batch).
    LEDGER_DEBUG_ASSERT(position < s.mapped_end and offset != 0 and offset <= OFFSET_MAX)
    debug_assert_pipeline_lookups(s, t, debit, credit, id_group)
    cdef uint16_t flags = t.flags
    cdef uint16_t phase = flags & (FLAG_PENDING | FLAG_POST | FLAG_VOID)
    if (flags & ~TRANSFER_FLAGS_ALL) != 0 or (phase & (phase - 1)) != 0:
        return R_FLAGS_INVALID
    if t.id == 0 or t.id == ID_MAX:
        return R_ID_INVALID
    if phase == FLAG_POST:
        return resolve_row(s, t, position, offset, timestamp, KIND_POST)
    if phase == FLAG_VOID:
        return resolve_row(s, t, position, offset, timestamp, KIND_VOID)
    if t.pending_id != 0:
        return RT_PENDING_ID_MUST_BE_ZERO
    if t.timeout != 0 and phase != FLAG_PENDING:
        return RT_TIMEOUT_RESERVED_FOR_PENDING
    cdef TableSlot *empty = NULL
    cdef TableSlot *existing = table_find_for_insert(&s.transfer_table, t.id, id_group, &empty)
    if existing != NULL:
        return compare_existing(s, existing, t)
    if t.debit_account == 0 or t.debit_account == ID_MAX:
        return RT_DEBIT_ACCOUNT_ID_INVALID
    if t.credit_account == 0 or t.credit_account == ID_MAX:
        return RT_CREDIT_ACCOUNT_ID_INVALID
    if t.debit_account == t.credit_account:
        return RT_ACCOUNTS_MUST_BE_DIFFERENT
    cdef int64_t amount = t.amount
    if amount <= 0:
        return RT_AMOUNT_MUST_BE_POSITIVE
    if t.ledger == 0:
        return RT_LEDGER_INVALID
    if debit == NULL:
        return RT_DEBIT_ACCOUNT_NOT_FOUND
    if credit == NULL:
        return RT_CREDIT_ACCOUNT_NOT_FOUND
    if debit.ledger != credit.ledger or t.ledger != debit.ledger:
        return RT_LEDGER_MISMATCH
    # Invariant: posted + pending <= AMOUNT_MAX on each side, so these sums cannot wrap.
    if debit.debits_posted + debit.debits_pending > AMOUNT_MAX - amount:
        return RT_OVERFLOW
    if credit.credits_posted + credit.credits_pending > AMOUNT_MAX - amount:
        return RT_OVERFLOW
    # min_balance <= 0 <= max_balance (checked at creation), so neither side of these compares can wrap.
    if debit.credits_posted - (debit.debits_posted + debit.debits_pending) < debit.min_balance + amount:
        return RT_INSUFFICIENT_FUNDS
    if (credit.credits_posted + credit.credits_pending) - credit.debits_posted > credit.max_balance - amount:
        return RT_EXCEEDS_MAX_BALANCE
    cdef uint32_t kind = KIND_PENDING if phase == FLAG_PENDING else KIND_TRANSFER
    cdef Event *e = event_written(s, position)
    e.id = t.id
    e.debit_account = t.debit_account
    e.credit_account = t.credit_account
    e.amount = amount
    e.user_data = t.user_data
    e.aux = t.timeout
    e.word_a = word_a(debit.last_position, t.code, kind | (KIND_LINKED if (flags & FLAG_LINKED) else 0))
    e.word_b = word_b(credit.last_position, offset)
    apply_transfer(debit, credit, e, position, kind)
    assert_within_limits(debit, credit)   # what the checks above promise
    table_insert_at(&s.transfer_table, empty, t.id,
                    position | (<uint64_t>(STATE_PENDING if kind == KIND_PENDING else STATE_POSTED) << POSITION_BITS))
    if kind == KIND_PENDING and t.timeout != 0:
        s.batch_pending_deadlines += 1
    return R_OK
