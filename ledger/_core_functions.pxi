# Included by ledger/_core.pyx (in the order listed there; every name of the module is visible here).
# Module functions: CRC32C, table inspection for snapshots, segment file names (advise: ledger/_madvise.pyx).

cdef uint32_t _crc32c_of(object data, uint32_t crc, bint reference) except? 0:
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if reference:
            return ledger_crc32c_reference(crc, view.buf, view.len)
        if view.len < CRC_NOGIL_BYTES_MIN:
            return ledger_crc32c(crc, view.buf, view.len)
        with nogil:  # snapshot sections are checksummed on several threads at once
            crc = ledger_crc32c(crc, view.buf, view.len)
        return crc
    finally:
        PyBuffer_Release(&view)


def crc32c(data, uint32_t crc=0):
    """CRC32C of a bytes-like object (hardware-accelerated where the CPU has SSE4.2)."""
    return _crc32c_of(data, crc, False)


def crc32c_reference(data, uint32_t crc=0):
    """CRC32C computed a byte at a time from a table, whatever the CPU: what tests check crc32c against."""
    return _crc32c_of(data, crc, True)


def crc32c_hardware():
    return ledger_crc32c_hardware == 1


def crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b):
    """CRC32C of A followed by B, given crc32c(A), crc32c(B) and len(B)."""
    return ledger_crc32c_combine(crc_a, crc_b, length_b)


def table_values_in(cnp.ndarray slots not None, cnp.ndarray keys not None, cnp.ndarray values not None,
                    cnp.ndarray found not None):
    """Look keys up in an id table held in an array laid out as the engine's (a snapshot's section, or an engine's
    state_views() table): each key's value into `values`, and into `found` whether it is there (0 is a valid
    value: the first account's index). verify compares two tables this way, both ways, a chunk at a time, instead
    of sorting copies of both. The caller checks that the table is a power of two of at least 1,024 slots and at
    most 70% full, so that every probe walk ends at an empty slot."""
    LEDGER_ASSERT(slots.dtype.itemsize == sizeof(TableSlot) and cnp.PyArray_IS_C_CONTIGUOUS(slots))
    cdef uint64_t slot_count = slots.shape[0]
    LEDGER_ASSERT(slot_count >= (<uint64_t>1 << TABLE_CAPACITY_LOG2_MIN) and (slot_count & (slot_count - 1)) == 0)
    LEDGER_ASSERT(keys.dtype.itemsize == 8 and cnp.PyArray_IS_C_CONTIGUOUS(keys))
    LEDGER_ASSERT(values.dtype.itemsize == 8 and cnp.PyArray_IS_C_CONTIGUOUS(values))
    LEDGER_ASSERT(found.dtype.itemsize == 1 and cnp.PyArray_IS_C_CONTIGUOUS(found))
    LEDGER_ASSERT(values.shape[0] == keys.shape[0] and found.shape[0] == keys.shape[0])
    cdef Table table
    memset(&table, 0, sizeof(Table))
    table.slots = <TableSlot *>cnp.PyArray_DATA(slots)
    table.capacity_log2 = <uint32_t>(slot_count.bit_length() - 1)
    cdef const uint64_t *key = <const uint64_t *>cnp.PyArray_DATA(keys)
    cdef uint64_t *value = <uint64_t *>cnp.PyArray_DATA(values)
    cdef uint8_t *present = <uint8_t *>cnp.PyArray_DATA(found)
    cdef uint64_t i, count = keys.shape[0]
    cdef TableSlot *slot
    with nogil:
        for i in range(count):
            slot = table_find(&table, key[i])
            present[i] = slot != NULL
            value[i] = slot.value if slot != NULL else 0


def count_table_keys(data):
    """How many slots of an id table section (16-byte slots: key, value) hold a key (non-zero), without the GIL."""
    cdef Py_buffer view
    cdef uint64_t count = 0, i, slots
    cdef const TableSlot *slot
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if view.len % sizeof(TableSlot) != 0:
            raise ValueError(f"id table section of {view.len} bytes is not whole 16-byte slots")
        slots = view.len // sizeof(TableSlot)
        slot = <const TableSlot *>view.buf
        with nogil:
            for i in range(slots):
                count += slot[i].key != 0
        return count
    finally:
        PyBuffer_Release(&view)


def segment_file_name(uint64_t index):
    """The name the core opens segment `index` by (the journal checks that it names its files the same way)."""
    cdef char name[32]
    ledger_segment_file_name(name, index)
    return name.decode()
