# Included by ledger/_core.pyx (in the order listed there; every name of the module is visible here).
# Id tables: the open-addressing hash tables from account and transfer ids to positions.

# ---- Id tables: open addressing over groups of four slots (one cache line) -----------------------------
# The home group keeps consecutive ids together (see ledger_home_slot); a full group hands over to a probe
# walk with a per-key odd step. Entries are never deleted except to undo the newest inserts of a failed
# linked chain, in reverse order, which restores the table exactly; so no tombstones are needed.

cdef inline uint64_t table_home_group(const Table *t, uint64_t key) noexcept nogil:
    """The group (of four slots, one cache line) where `key`'s probe walk starts. Computed once per key and row by
    the apply loop's prefetch stage and handed on, so no key is hashed twice."""
    return ledger_home_slot(key, t.capacity_log2) >> 2

cdef inline TableSlot *table_walk(const Table *t, uint64_t key, uint64_t group, TableSlot **empty) noexcept nogil:
    """Find `key`, starting at its home `group`. Returns its slot, or NULL with `empty` set to the free slot where
    it would be inserted (valid until the next insert). The home group is scanned here, inline; a full home group
    without the key (rare below the load limit) continues in table_walk_on."""
    cdef TableSlot *slots = t.slots + (group << 2)
    cdef int k
    for k in range(4):
        if slots[k].key == key:
            empty[0] = NULL
            return &slots[k]
        if slots[k].key == 0:
            empty[0] = &slots[k]
            return NULL
    return table_walk_on(t, key, group, empty)

cdef TableSlot *table_walk_on(const Table *t, uint64_t key, uint64_t group, TableSlot **empty) noexcept nogil:
    """The probe walk past a full home group, with a per-key odd step (not inlined: the step's hash stays out of
    the hot path)."""
    cdef uint64_t group_mask = ((<uint64_t>1 << t.capacity_log2) >> 2) - 1
    cdef uint64_t step = ledger_probe_step(key)
    cdef TableSlot *slots
    cdef int k
    while True:
        group = (group + step) & group_mask
        slots = t.slots + (group << 2)
        for k in range(4):
            if slots[k].key == key:
                empty[0] = NULL
                return &slots[k]
            if slots[k].key == 0:
                empty[0] = &slots[k]
                return NULL

cdef inline TableSlot *table_find_at(const Table *t, uint64_t key, uint64_t group) noexcept nogil:
    """table_find with the home group already known. `key` must not be 0."""
    LEDGER_DEBUG_ASSERT(key != 0 and group == table_home_group(t, key))
    cdef TableSlot *empty
    return table_walk(t, key, group, &empty)

cdef inline TableSlot *table_find(const Table *t, uint64_t key) noexcept nogil:
    if key == 0:
        return NULL   # 0 marks an empty slot: it is never a key (a search for it would "find" an empty slot)
    return table_find_at(t, key, table_home_group(t, key))

cdef inline TableSlot *table_find_for_insert(const Table *t, uint64_t key, uint64_t group,
                                             TableSlot **empty) noexcept nogil:
    """table_find that also hands back the empty slot where `key` would go, so a later insert of the same key
    (with no other insert in between) needs no second probe walk. `group`: the key's home group."""
    LEDGER_DEBUG_ASSERT(key != 0 and group == table_home_group(t, key))
    return table_walk(t, key, group, empty)

cdef inline void table_insert_at(Table *t, TableSlot *empty, uint64_t key, uint64_t value) noexcept nogil:
    LEDGER_ASSERT(empty != NULL and empty.key == 0 and key != 0)
    LEDGER_ASSERT(t.count < t.count_max)
    empty.key = key
    empty.value = value
    t.count += 1

cdef inline void table_prefetch_group(const Table *t, uint64_t group) noexcept nogil:
    ledger_prefetch(t.slots + (group << 2))

cdef inline TableSlot *table_insert(Table *t, uint64_t key, uint64_t value) noexcept nogil:
    """Insert a key that is not in the table."""
    LEDGER_ASSERT(key != 0)
    cdef TableSlot *empty
    cdef TableSlot *found = table_walk(t, key, table_home_group(t, key), &empty)
    LEDGER_ASSERT(found == NULL)
    table_insert_at(t, empty, key, value)
    return empty

cdef inline TableSlot *table_insert_unique(Table *t, uint64_t key, uint64_t value) noexcept nogil:
    """Insert a key that must be new; NULL (and no change) if it is already there. One probe walk for both."""
    LEDGER_ASSERT(key != 0)
    cdef TableSlot *empty
    if table_walk(t, key, table_home_group(t, key), &empty) != NULL:
        return NULL
    table_insert_at(t, empty, key, value)
    return empty

cdef inline void table_remove_newest(Table *t, uint64_t key) noexcept nogil:
    cdef TableSlot *slot = table_find(t, key)
    LEDGER_ASSERT(slot != NULL)
    slot.key = 0
    slot.value = 0
    t.count -= 1

cdef int table_allocate(Table *t, uint32_t capacity_log2, bint populate=True) except -1:
    """populate=False leaves the pages to be faulted in by whoever fills the table first (a snapshot load, whose
    reads then zero and fill each page in one go, on several threads)."""
    if capacity_log2 > TABLE_CAPACITY_LOG2_MAX:
        raise MemoryError(f"id table limit reached (2**{TABLE_CAPACITY_LOG2_MAX} slots)")
    cdef size_t size = (<size_t>1 << capacity_log2) * sizeof(TableSlot)
    cdef void *memory = ledger_map_anonymous(size, populate)   # page-aligned, zero-filled, huge pages
    if memory == NULL:
        raise MemoryError(f"cannot allocate an id table of {size} bytes")
    t.slots = <TableSlot *>memory
    t.count = 0
    t.capacity_log2 = capacity_log2
    # Load factor limit 0.7: probe walks stay short for random ids; dense ids fill groups exactly anyway.
    t.count_max = ((<uint64_t>1 << capacity_log2) * 7) // 10
    return 0

cdef void table_free(Table *t) noexcept:
    if t.slots != NULL:
        ledger_unmap(t.slots, (<size_t>1 << t.capacity_log2) * sizeof(TableSlot))
        t.slots = NULL

cdef int table_reserve(Table *t, uint64_t extra) except -1:
    """Grow (rehash) so that `extra` more keys fit under the load limit. Never called inside a batch."""
    if t.count + extra <= t.count_max:
        return 0
    cdef uint32_t capacity_log2 = t.capacity_log2
    while ((<uint64_t>1 << capacity_log2) * 7) // 10 < t.count + extra:
        capacity_log2 += 1
    cdef Table grown
    table_allocate(&grown, capacity_log2)
    cdef uint64_t i, old_capacity = <uint64_t>1 << t.capacity_log2
    with nogil:
        for i in range(old_capacity):
            if t.slots[i].key != 0:
                table_insert(&grown, t.slots[i].key, t.slots[i].value)
    LEDGER_ASSERT(grown.count == t.count)
    table_free(t)
    t[0] = grown
    return 0
