# Included by ledger/_core.pyx (in the order listed there; every name of the module is visible here).
# Expiry heap: pending transfers' deadlines, oldest first.

# ---- Expiry heap: (deadline, position) min-heap with lazy deletion --------------------------------------

cdef inline bint heap_less(const HeapEntry *a, const HeapEntry *b) noexcept nogil:
    return a.deadline < b.deadline or (a.deadline == b.deadline and a.position < b.position)

cdef inline void heap_push(Heap *h, uint64_t deadline, uint64_t position) noexcept nogil:
    LEDGER_ASSERT(h.size < h.capacity)
    cdef uint64_t i = h.size, parent
    cdef HeapEntry entry
    entry.deadline = deadline
    entry.position = position
    h.size += 1
    while i > 0:
        parent = (i - 1) >> 1
        if not heap_less(&entry, &h.entries[parent]):
            break
        h.entries[i] = h.entries[parent]
        i = parent
    h.entries[i] = entry

cdef inline HeapEntry heap_pop(Heap *h) noexcept nogil:
    LEDGER_ASSERT(h.size > 0)
    cdef HeapEntry top = h.entries[0]
    h.size -= 1
    cdef HeapEntry last = h.entries[h.size]
    cdef uint64_t i = 0, child
    while True:
        child = 2 * i + 1
        if child >= h.size:
            break
        if child + 1 < h.size and heap_less(&h.entries[child + 1], &h.entries[child]):
            child += 1
        if not heap_less(&h.entries[child], &last):
            break
        h.entries[i] = h.entries[child]
        i = child
    if h.size > 0:
        h.entries[i] = last
    return top

cdef int heap_reserve(Heap *h, uint64_t extra) except -1:
    if h.size + extra <= h.capacity:
        return 0
    cdef uint64_t capacity = max(h.capacity * 2, h.size + extra, <uint64_t>1024)
    cdef void *memory = realloc(h.entries, capacity * sizeof(HeapEntry))
    if memory == NULL:
        raise MemoryError("cannot grow the expiry heap")
    h.entries = <HeapEntry *>memory
    h.capacity = capacity
    return 0
