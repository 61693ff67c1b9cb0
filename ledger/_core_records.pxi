# Included by ledger/_core.pyx (in the order listed there; every name of the module is visible here).
# Record access: journal positions to records, and the once-per-batch check of records older than this process.

# ---- Record access ----------------------------------------------------------------------------------------

cdef inline Event *event_at(State *s, uint64_t position) noexcept nogil:
    """The record at `position`. An old segment that is not mapped now is mapped here (the slow path, out of
    line); the pointer stays valid until the next such mapping (the rule in _segment_cache.h)."""
    LEDGER_DEBUG_ASSERT(position < s.mapped_end)
    cdef uint64_t mask = (<uint64_t>1 << s.segment_records_log2) - 1
    cdef uint64_t index = position >> s.segment_records_log2
    cdef char *segment = s.segments[index]
    if ledger_unlikely(segment == NULL):
        segment = ledger_segment_cache_map(&s.segment_cache, s.segments, index)
    return <Event *>(segment + ((position & mask) << 6))

cdef inline Event *event_written(State *s, uint64_t position) noexcept nogil:
    """event_at for a record of the batch being applied (at or after the write position): always in a segment
    handed over by the journal, never unmapped, so without even the test for the slow path."""
    LEDGER_DEBUG_ASSERT(position < s.mapped_end and s.segments[position >> s.segment_records_log2] != NULL)
    cdef uint64_t mask = (<uint64_t>1 << s.segment_records_log2) - 1
    return <Event *>(s.segments[position >> s.segment_records_log2] + ((position & mask) << 6))

cdef inline uint32_t event_kind(const Event *e) noexcept nogil:
    return <uint32_t>((e.word_a >> 56) & KIND_MASK)

cdef inline uint64_t event_offset(const Event *e) noexcept nogil:
    return e.word_b >> POSITION_BITS

cdef inline uint16_t event_code(const Event *e) noexcept nogil:
    return <uint16_t>((e.word_a >> POSITION_BITS) & 0xFFFF)

cdef inline uint64_t event_timestamp(State *s, const Event *e, uint64_t position) noexcept nogil:
    cdef uint64_t offset = event_offset(e)
    cdef BatchHeader *header = <BatchHeader *>event_at(s, position - offset)
    return header.timestamp + offset - 1

cdef inline uint64_t word_a(uint64_t previous_position, uint16_t code, uint32_t kind_byte) noexcept nogil:
    return previous_position | (<uint64_t>code << POSITION_BITS) | (<uint64_t>kind_byte << 56)

cdef inline uint64_t word_b(uint64_t previous_position, uint64_t offset) noexcept nogil:
    return previous_position | (offset << POSITION_BITS)

# ---- Records from before the snapshot: checked once per batch before any field is used ------------------------
# Replay checks every batch it applies, and this process writes the rest; but the records below verified_from
# (the snapshot position the engine was opened at) were only checksummed by the process that wrote them. A read
# of one (a lookup, a history walk, a POST of an old pending transfer, an EXISTS retry) checks its batch first:
# bounds, header and the whole batch's checksum, once, remembered as a bit per header position.

cdef inline bint record_damaged(State *s, uint64_t position, uint64_t header_position, uint32_t reason) noexcept nogil:
    """Note the first damage found (the caller undoes what it did and raises once it holds the GIL)."""
    if s.damage_reason == DAMAGE_NONE:
        s.damage_position = position
        s.damage_header_position = header_position
        s.damage_reason = reason
    return False

cdef inline bint header_verified(const State *s, uint64_t header_position) noexcept nogil:
    return header_position < s.verified_headers_bytes * 8 and \
        (s.verified_headers[header_position >> 3] >> (header_position & 7)) & 1

cdef bint verify_old_header(State *s, uint64_t header_position) noexcept nogil:
    """The record at header_position (1 <= it < verified_from) is the header of a good committed batch that
    ends at or before verified_from: well-formed, and its checksum matches (computed once, then remembered)."""
    LEDGER_ASSERT(header_position < s.verified_from)
    if header_verified(s, header_position):
        return True
    if header_position == 0:
        return record_damaged(s, header_position, header_position, DAMAGE_HEADER)
    # A copy: the checksum below reads the whole batch, which may map other old segments and unmap this one.
    cdef BatchHeader header_copy = (<BatchHeader *>event_at(s, header_position))[0]
    cdef BatchHeader *header = &header_copy
    cdef uint64_t commit = header.commit
    if (header.word_a != (<uint64_t>KIND_HEADER << 56) or (commit >> 32) != COMMIT_MAGIC
            or header.magic_version != (<uint64_t>MAGIC | (<uint64_t>FORMAT_VERSION_C << 32))
            or header.position != header_position or header.event_count == 0 or header.event_count > OFFSET_MAX
            or header_position + 1 + header.event_count > s.verified_from):
        return record_damaged(s, header_position, header_position, DAMAGE_HEADER)
    cdef uint32_t crc = header_checksum(s, header_position, header_position + 1 + header.event_count)
    if crc != header.checksum or crc != <uint32_t>commit:
        return record_damaged(s, header_position, header_position, DAMAGE_CHECKSUM)
    s.verified_headers[header_position >> 3] |= <uint8_t>(1 << (header_position & 7))
    return True

cdef bint verify_old_record(State *s, uint64_t position) noexcept nogil:
    """The event record at `position` (< verified_from) lies in a good committed batch: its offset in the batch
    leads to a header (>= 1, before it) whose batch covers it, and that batch passes verify_old_header. Only then
    may a field of the record (or its timestamp, read through the header) be used."""
    LEDGER_ASSERT(position < s.verified_from)
    cdef Event *e = event_at(s, position)
    cdef uint64_t offset = event_offset(e)
    if offset == 0 or offset >= position:
        return record_damaged(s, position, 0, DAMAGE_OFFSET)
    cdef uint64_t header_position = position - offset
    # A copy: verify_old_header may map other old segments and unmap this one.
    cdef BatchHeader header_copy = (<BatchHeader *>event_at(s, header_position))[0]
    cdef BatchHeader *header = &header_copy
    if not header_verified(s, header_position):
        if (header.word_a != (<uint64_t>KIND_HEADER << 56) or header.position != header_position
                or header.event_count < offset):
            return record_damaged(s, position, header_position, DAMAGE_OFFSET)   # no header there: the offset
        if not verify_old_header(s, header_position):
            s.damage_position = position   # report the record read, and its batch's header beside it
            return False
    # A verified batch covers exactly its records: a wrong offset cannot lead to one that covers this record.
    if header.event_count < offset:
        return record_damaged(s, position, header_position, DAMAGE_OFFSET)
    return True

cdef inline bint record_trusted(State *s, uint64_t position) noexcept nogil:
    """The record at `position` may be used: replayed or written by this process, or its batch checks out."""
    return ledger_likely(position >= s.verified_from) or verify_old_record(s, position)

cdef bint verify_position(State *s, uint64_t position) noexcept nogil:
    """record_trusted for any committed record, header or event (decided by the kind byte, itself checked: a
    record whose kind reads as a header must be a good header)."""
    if position >= s.verified_from:
        return True
    if event_kind(event_at(s, position)) == KIND_HEADER:
        return verify_old_header(s, position)
    return verify_old_record(s, position)

# ---- Records put in from outside: a standby's copy of a primary's batches ------------------------------------

cdef void put_records_in(State *s, uint64_t position, const char *records, uint64_t count) noexcept nogil:
    """Copy `count` records to [position, position + count) (past the write position, in segments handed over):
    every record but the batch headers first, then each header in order, its commit word last with a release
    store, so a reader of a shared mapping never sees a commit word before the records it seals."""
    cdef uint64_t i
    cdef const BatchHeader *source
    cdef BatchHeader *header
    for i in range(count):
        source = <const BatchHeader *>(records + i * 64)
        if source.word_a != (<uint64_t>KIND_HEADER << 56):
            memcpy(event_written(s, position + i), source, 64)
    for i in range(count):
        source = <const BatchHeader *>(records + i * 64)
        if source.word_a == (<uint64_t>KIND_HEADER << 56):
            header = <BatchHeader *>event_written(s, position + i)
            memcpy(header, source, 56)
            ledger_store_release_u64(&header.commit, source.commit)
