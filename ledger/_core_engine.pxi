# Included by ledger/_core.pyx (in the order listed there; every name of the module is visible here).
# The Engine: the Python face of the state machine (single writer, its lock, commit, sync, snapshots).

cdef object memory_view(void *memory, uint64_t count, object dtype):
    """A writable numpy view (no copy) of `count` items of `dtype` at `memory`; the owner keeps it alive."""
    if count == 0:
        return np.empty(0, dtype)
    return np.frombuffer(PyMemoryView_FromMemory(<char *>memory, count * dtype.itemsize, PyBUF_WRITE), dtype)


@cython.final
cdef class Engine:
    """The state machine. One lock serialises every call on it: the batch paths run without the GIL, so without
    it two threads could be inside the state at once (growing a table under another's batch). The commands, the
    single-row reads, lookup_transfers, replay, state_views, account_arrays and close take it themselves; the
    journal reads (account_history, decode_events, batch_headers, ...) and import_* expect the caller to hold it
    across what it reads (`with engine:`, re-entrant), as the Ledger does for history, explain and verify."""

    cdef State state
    cdef object _accounts_hot
    cdef object _accounts_cold
    cdef list _segment_objects           # per segment: the buffer handed over (held), or None (file-backed)
    cdef object _segment_provider
    cdef object _segment_release
    cdef uint64_t _release_next          # segments below this were offered to _segment_release already
    cdef object _after_commit
    cdef object _write_ahead
    cdef object _clock
    cdef object _write_refusal        # None, or what makes the exception every command raises (write_refusal)
    cdef public bint closed
    cdef public bint poisoned
    cdef public bint readonly
    cdef uint64_t _batch_size_max
    cdef PyThread_type_lock _wake     # a semaphore: posted to wake a waiter for the engine lock (see _enter)
    cdef unsigned long _lock_owner    # thread ident of the holder; meaningful while _lock_depth > 0
    cdef uint32_t _lock_depth         # how many times the holder has taken it (the lock is re-entrant)
    cdef uint32_t _lock_waiters       # threads waiting in _enter_contended
    cdef bint _lock_handoff           # released to the waiters: the first to look takes it
    cdef object _interrupted          # a Ctrl-C held back during write_ahead, raised once the batch is durable
    cdef public object timestamp_problem   # set by replay: the first batch whose time breaks the clock rule
    # damage_error(position, header_position, reason) -> the LedgerCorruptError to raise for a damaged record
    # (the journal names its file and byte offset); None: a message with the journal position only.
    cdef public object damage_error

    def __cinit__(self):
        memset(&self.state, 0, sizeof(State))
        self._wake = PyThread_allocate_lock()
        if self._wake == NULL:
            raise MemoryError("cannot allocate the engine lock")
        PyThread_acquire_lock(self._wake, 1)  # taken: a waiter sleeps on it until a release posts it
        ledger_segment_cache_init(&self.state.segment_cache)

    def __init__(self, segment_records_log2, segment_provider, *, after_commit=None, write_ahead=None, clock=None,
                 account_capacity=ACCOUNT_CAPACITY_MIN, transfer_capacity=1024, segment_files=None,
                 segment_release=None):
        """segment_provider(index) returns a writable buffer of 64 << segment_records_log2 bytes (zero-filled
        or holding earlier journal data), or None for a segment to be read from its file when needed (only
        with segment_files); after_commit(start, end) makes positions [start, end) durable;
        write_ahead(header_position, end), if given, is called inside a large batch with the events
        [header_position + 1, end) that are final so far (the journal may start writing them out).
        segment_files: (directory descriptor, header bytes): where segment files NNNNNNNN.segment are and where
        their records start; the engine keeps its own duplicate of the descriptor and maps old segments from
        there on demand, at most SEGMENTS_MAPPED_MAX at a time (_segment_cache.h).
        segment_release(index), if given, is offered each handed-over segment once the engine writes past it:
        it returns a callable that closes the journal's mapping (called once the engine has let go of the
        buffer; the segment is read from its file from then on), or None to keep it handed over for now."""
        if not 4 <= segment_records_log2 <= 30:
            raise ValueError("segment_records_log2 must be in [4, 30]")
        self.state.segment_records_log2 = segment_records_log2
        self.state.segment_cache.segment_bytes = <uint64_t>64 << segment_records_log2
        if segment_files is not None:
            directory_fd, header_bytes = segment_files
            if header_bytes <= 0 or header_bytes % mmap_module.PAGESIZE:
                raise ValueError(f"segment header bytes must be a positive multiple of the page size, "
                                 f"got {header_bytes}")
            self.state.segment_cache.header_bytes = header_bytes
            self.state.segment_cache.directory_fd = os.dup(directory_fd)
            self.state.segment_cache.reserve_fd = os.dup(directory_fd)   # the spare (_segment_cache.h)
        self._segment_provider = segment_provider
        self._segment_release = segment_release
        self._after_commit = after_commit
        self._write_ahead = write_ahead
        self._clock = clock
        self._segment_objects = []
        self._batch_size_max = BATCH_SIZE_MAX
        table_allocate(&self.state.account_table, TABLE_CAPACITY_LOG2_MIN)
        table_allocate(&self.state.transfer_table, TABLE_CAPACITY_LOG2_MIN)
        heap_reserve(&self.state.expiry_heap, 1024)
        self._grow_accounts(max(int(account_capacity), ACCOUNT_CAPACITY_MIN))
        table_reserve(&self.state.account_table, int(account_capacity))
        table_reserve(&self.state.transfer_table, int(transfer_capacity))
        # Position 0 is never written: a back-pointer of 0 means "no earlier event".
        self.state.write_position = 1
        self._map_through(2)

    def __dealloc__(self):
        if self._wake != NULL:
            PyThread_release_lock(self._wake)  # (freeing a taken lock is not allowed)
            PyThread_free_lock(self._wake)
        ledger_segment_cache_release(&self.state.segment_cache, self.state.segments)
        if self.state.verified_headers != NULL:
            ledger_unmap(self.state.verified_headers, self.state.verified_headers_bytes)
        table_free(&self.state.account_table)
        table_free(&self.state.transfer_table)
        free(self.state.expiry_heap.entries)
        free(self.state.segments)

    # -- the lock --
    # Every field of it is read and written with the GIL held (Cython modules keep the GIL even on free-threaded
    # builds unless they declare otherwise), so taking a free lock is a few plain stores: no atomic, no system
    # call on the single-call path. Only a thread that finds it held waits, without the GIL, on the _wake
    # semaphore; a release with waiters hands the lock straight to one of them (the depth stays 1, _lock_handoff
    # set), so a thread that calls in a loop cannot take it back before the waiter has had its turn.

    cdef int _enter(self) except -1:
        """Take the engine lock for this thread (re-entrant)."""
        cdef unsigned long thread = PyThread_get_thread_ident()
        if self._lock_depth == 0:
            self._lock_depth = 1
            self._lock_owner = thread
            return 0
        if self._lock_owner == thread and not self._lock_handoff:
            self._lock_depth += 1
            return 0
        return self._enter_contended(thread)

    cdef int _enter_contended(self, unsigned long thread) except -1:
        """Wait for the lock without the GIL, so the holder (which may be running a batch without it too) goes
        on. Ctrl-C in the main thread interrupts the wait (KeyboardInterrupt, the lock not taken)."""
        cdef PyLockStatus status
        self._lock_waiters += 1
        try:
            while True:
                if self._lock_handoff:
                    self._lock_handoff = False   # handed over by the last holder: the depth is 1 already
                    break
                if self._lock_depth == 0:
                    self._lock_depth = 1
                    break
                with nogil:
                    status = PyThread_acquire_lock_timed(self._wake, LOCK_WAIT_SLICE_US, 1)
                if status == PY_LOCK_INTR:
                    PyErr_CheckSignals()
        except BaseException:
            self._lock_waiters -= 1
            if self._lock_waiters == 0 and self._lock_handoff:  # handed to nobody now: free it
                self._lock_handoff = False
                self._lock_depth = 0
            raise
        self._lock_waiters -= 1
        self._lock_owner = thread
        return 0

    cdef inline void _exit(self) noexcept:
        LEDGER_ASSERT(self._lock_depth > 0 and not self._lock_handoff)
        LEDGER_DEBUG_ASSERT(self._lock_owner == PyThread_get_thread_ident())
        self._lock_depth -= 1
        if self._lock_depth == 0 and self._lock_waiters != 0:
            self._lock_depth = 1
            self._lock_handoff = True
            self._lock_owner = 0
            PyThread_release_lock(self._wake)

    def __enter__(self):
        """`with engine:` holds the engine lock across several calls (a consistent view for composite reads)."""
        self._enter()
        return self

    def __exit__(self, *exc_info):
        self._exit()
        return False

    # -- capacity (all growth happens here, between batches, never inside the hot loop) --

    cdef int _grow_accounts(self, uint64_t capacity, bint populate=True) except -1:
        hot = anonymous_array(capacity, ACCOUNT_HOT_DTYPE, populate)
        cold = anonymous_array(capacity, ACCOUNT_COLD_DTYPE, populate)
        cdef uint64_t count = self.state.account_count
        if count:
            hot[:count] = self._accounts_hot[:count]
            cold[:count] = self._accounts_cold[:count]
        self._accounts_hot = hot
        self._accounts_cold = cold
        self.state.accounts = <AccountHot *>cnp.PyArray_DATA(hot)
        self.state.accounts_cold = <AccountCold *>cnp.PyArray_DATA(cold)
        self.state.account_capacity = capacity
        return 0

    cdef int _map_through(self, uint64_t end) except -1:
        """Ensure memory behind every position below `end`."""
        cdef Py_buffer view
        cdef uint64_t segment_bytes = <uint64_t>64 << self.state.segment_records_log2
        cdef void *grown
        if end > POSITION_MASK + 1:
            raise OverflowError(f"journal position limit (2**40 records) reached")
        while self.state.mapped_end < end:
            index = self.state.segment_count
            provided = self._segment_provider(index)   # first: if it raises (disk full), nothing has changed
            grown = realloc(self.state.segments, (index + 1) * sizeof(char *))
            if grown == NULL:
                raise MemoryError("cannot grow the segment table")
            self.state.segments = <char **>grown
            self.state.segments[index] = NULL
            self._segment_objects.append(None)
            try:
                self._attach(index, provided)
            except BaseException:
                self._segment_objects.pop()
                raise
            self.state.segment_count = index + 1
            self.state.mapped_end = (index + 1) << self.state.segment_records_log2
        self._release_behind()
        return 0

    cdef int _attach(self, uint64_t index, object provided) except -1:
        """Make `provided` (a buffer, or None: read the segment from its file on demand) segment `index`."""
        cdef Py_buffer view
        cdef uint64_t segment_bytes = <uint64_t>64 << self.state.segment_records_log2
        if provided is None:
            if self.state.segment_cache.directory_fd < 0:
                raise ValueError(f"segment {index}: the provider gave no buffer and there are no segment files")
            return 0
        # A memoryview holds an export on the buffer for as long as we keep it: an mmap cannot be closed
        # (BufferError) while the core still writes through its address.
        buffer = memoryview(provided)
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_SIMPLE)
        try:
            if <uint64_t>view.len < segment_bytes:
                raise ValueError(f"segment {index} buffer has {view.len} bytes, need {segment_bytes}")
            ledger_segment_cache_forget(&self.state.segment_cache, self.state.segments, index)
            self.state.segments[index] = <char *>view.buf
        finally:
            PyBuffer_Release(&view)
        self._segment_objects[index] = buffer   # keeps the memory alive while we hold its address
        return 0

    cdef int _release_behind(self) except -1:
        """Offer the journal the handed-over segments below the one being written (between commands: no record
        pointer is alive): those it lets go of are read from their files from now on."""
        cdef uint64_t write_index = self.state.write_position >> self.state.segment_records_log2
        if self._segment_release is None or self.readonly:
            return 0
        while self._release_next < write_index:
            index = self._release_next
            buffer = self._segment_objects[index]
            if buffer is not None:
                close_segment = self._segment_release(index)
                if close_segment is None:
                    return 0   # not durable yet: offered again after a later command
                self.state.segments[index] = NULL
                self._segment_objects[index] = None
                buffer.release()
                close_segment()
            self._release_next = index + 1
        return 0

    def provide_segments(self, uint64_t first_index):
        """Ask the provider again for segments [first_index, segment_count) that are read from their files: the
        journal hands over the ones it is about to write (a writer continuing inside segments that already
        exist). Call between commands."""
        self._check_open()
        for index in range(first_index, self.state.segment_count):
            if self._segment_objects[index] is None:
                self._attach(index, self._segment_provider(index))
        self._release_next = min(self._release_next, first_index)

    @property
    def segments_mapped(self):
        """(old segments mapped from their files now, mappings made so far, segments handed over now)."""
        return (ledger_segment_cache_count(&self.state.segment_cache), self.state.segment_cache.maps,
                sum(buffer is not None for buffer in self._segment_objects))

    cdef int _reserve(self, uint64_t accounts, uint64_t transfers, uint64_t records) except -1:
        if self.state.account_count + accounts > self.state.account_capacity:
            self._grow_accounts(max(self.state.account_capacity * 2, self.state.account_count + accounts))
        table_reserve(&self.state.account_table, accounts)
        table_reserve(&self.state.transfer_table, transfers)
        heap_reserve(&self.state.expiry_heap, transfers)
        self._map_through(self.state.write_position + records)   # and offers the segments written past
        return 0

    cdef int _raise_damage(self) except -1:
        """Raise LedgerCorruptError for the damage a read (or a call, now undone) found, and forget it."""
        cdef State *s = &self.state
        LEDGER_ASSERT(s.damage_reason != DAMAGE_NONE)
        position, header_position, reason = s.damage_position, s.damage_header_position, s.damage_reason
        s.damage_position = s.damage_header_position = 0
        s.damage_reason = DAMAGE_NONE
        text = DAMAGE_REASONS[reason]
        if header_position != 0 and header_position != position:
            text = f"{text}; its batch header is at journal position {header_position}"
        if self.damage_error is not None:
            raise self.damage_error(position, header_position, text)
        raise LedgerCorruptError(f"journal corrupt ({text}) at journal position {position}")

    cdef int _check_open(self) except -1:
        if self.poisoned:
            raise LedgerPoisonedError("the ledger handle is poisoned by a failed journal sync; reopen it")
        if self.closed:
            raise LedgerClosedError("the ledger is closed")
        return 0

    cdef int _check_writable(self) except -1:
        self._check_open()
        if self.readonly:
            raise LedgerError("the ledger was opened read-only")
        if self._write_refusal is not None:
            raise self._write_refusal()
        return 0

    @property
    def write_refusal(self):
        """None (commands are applied), or a zero-argument callable returning the exception every command
        (create_account(s), transfer(s)) raises instead, before anything is applied: a standby that follows a
        primary (ledger/store.py, Store.follow) applies only the primary's batches, through put_records and
        replay, which this does not stop. Reads go on either way."""
        return self._write_refusal

    @write_refusal.setter
    def write_refusal(self, value):
        if value is not None and not callable(value):
            raise TypeError("write_refusal must be None or a zero-argument callable returning an exception")
        self._write_refusal = value

    cdef inline uint64_t _now(self, uint64_t events_max) except? 0:
        """The clock reading for a call that writes at most `events_max` events. The call's events get
        T, T + 1, ... with T = max(now, last timestamp + 1) (a clock that goes backwards is overtaken, not
        refused); LedgerClockError, before anything is applied, if the last of them would pass TIMESTAMP_MAX."""
        cdef uint64_t now = clock_now_ns() if self._clock is None else self._clock_reading()
        cdef uint64_t timestamp_base = now if now > self.state.last_timestamp else self.state.last_timestamp + 1
        if timestamp_base > TIMESTAMP_MAX or events_max > TIMESTAMP_MAX - timestamp_base + 1:
            self._refuse_clock(now, timestamp_base, events_max)
        return now

    cdef uint64_t _clock_reading(self) except? 0:
        """The injected clock's reading, checked: an integer in [0, TIMESTAMP_MAX]."""
        value = self._clock()
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"the ledger's clock returned {type(value).__name__} {value!r}; it must return integer "
                            f"nanoseconds since the Unix epoch") from None
        if not 0 <= value <= TIMESTAMP_MAX:
            raise LedgerClockError(f"the ledger's clock reads {value} ns, outside [0, TIMESTAMP_MAX={TIMESTAMP_MAX}]; "
                                   f"nothing was applied")
        return <uint64_t>value

    cdef int _refuse_clock(self, uint64_t now, uint64_t timestamp_base, uint64_t events_max) except -1:
        raise LedgerClockError(
            f"the ledger's clock reads {now} ns (last event at {self.state.last_timestamp} ns): a call of up to "
            f"{events_max} events from {timestamp_base} ns would pass TIMESTAMP_MAX={TIMESTAMP_MAX} ns; "
            f"nothing was applied")

    cdef int _committed(self, uint64_t start, uint64_t events) except -1:
        """Have after_commit write and sync the batch just applied. It is applied in memory already, so a failure
        of that poisons the handle: nothing may build on a batch that may not be durable. Except Ctrl-C: a
        KeyboardInterrupt (raised at the first Python line after a long batch, or inside a write or sync) is held
        back, after_commit is called again (it writes the whole batch again and syncs: doing it twice is harmless),
        and once the batch is durable the KeyboardInterrupt is raised saying so. The handle stays usable."""
        # The batch handed on is the one just sealed: it ends at the write position.
        LEDGER_ASSERT(events == 0 or start + 1 + events == self.state.write_position)
        interrupted, self._interrupted = self._interrupted, None
        if events == 0 or self._after_commit is None:
            if interrupted is not None:
                raise interrupted
            return 0
        cdef int attempt
        for attempt in range(COMMIT_INTERRUPTED_ATTEMPTS_MAX):
            try:
                self._after_commit(start, start + 1 + events)
                break
            except KeyboardInterrupt as error:
                if interrupted is None:
                    interrupted = error
                if attempt == COMMIT_INTERRUPTED_ATTEMPTS_MAX - 1:
                    self.poisoned = True
                    raise
            except BaseException:
                self.poisoned = True
                raise
        if interrupted is not None:
            raise KeyboardInterrupt(
                f"interrupted while journal positions [{start}, {start + 1 + events}) were being made durable: "
                f"the batch was applied and is durable; only its result codes are lost (lookup_transfers() on "
                f"its ids gives each one's state); the handle is still usable") from interrupted
        return 0

    # -- commands --

    def create_accounts(self, cnp.ndarray batch not None, cnp.ndarray results not None):
        """Apply a C-contiguous ACCOUNT_DTYPE array; write codes into `results` (uint8, same length)."""
        self._enter()
        try:
            return self._create_accounts(batch, results)
        finally:
            self._exit()

    cdef object _create_accounts(self, cnp.ndarray batch, cnp.ndarray results):
        self._check_writable()
        cdef uint64_t count = batch.shape[0]
        LEDGER_ASSERT(batch.dtype.itemsize == sizeof(AccountRow) and results.shape[0] == batch.shape[0])
        LEDGER_ASSERT(cnp.PyArray_IS_C_CONTIGUOUS(batch) and cnp.PyArray_IS_C_CONTIGUOUS(results))
        LEDGER_ASSERT(count <= self._batch_size_max)
        self._reserve(count, 0, count + 1)
        cdef uint64_t now = self._now(count)
        cdef uint64_t start = self.state.write_position, events
        cdef const AccountRow *rows = <const AccountRow *>cnp.PyArray_DATA(batch)
        cdef uint8_t *codes = <uint8_t *>cnp.PyArray_DATA(results)
        with nogil:
            events = run_accounts(&self.state, rows, count, codes, now)
        self._committed(start, events)
        return events

    def transfers(self, cnp.ndarray batch not None, cnp.ndarray results not None):
        """Apply a C-contiguous TRANSFER_DTYPE array; write codes into `results` (uint8, same length)."""
        self._enter()
        try:
            return self._transfers(batch, results)
        finally:
            self._exit()

    cdef object _transfers(self, cnp.ndarray batch, cnp.ndarray results):
        self._check_writable()
        cdef uint64_t count = batch.shape[0]
        LEDGER_ASSERT(batch.dtype.itemsize == sizeof(TransferRow) and results.shape[0] == batch.shape[0])
        LEDGER_ASSERT(cnp.PyArray_IS_C_CONTIGUOUS(batch) and cnp.PyArray_IS_C_CONTIGUOUS(results))
        LEDGER_ASSERT(count <= self._batch_size_max)
        # Room for the rows, the header and the expiries that can be due (at most one per scheduled deadline).
        self._reserve(0, count, count + min(self.state.expiry_heap.size, EXPIRE_BATCH_MAX_C) + 1)
        cdef uint64_t now = self._now(count + min(self.state.expiry_heap.size, EXPIRE_BATCH_MAX_C))
        cdef uint64_t start = self.state.write_position, events
        cdef const TransferRow *rows = <const TransferRow *>cnp.PyArray_DATA(batch)
        cdef uint8_t *codes = <uint8_t *>cnp.PyArray_DATA(results)
        if self._write_ahead is not None and count >= WRITE_AHEAD_BATCH_MIN_ROWS:
            events = self._transfers_in_chunks(rows, count, codes, now)
        else:
            with nogil:
                events = run_transfers(&self.state, rows, count, codes, now)
        if self.state.damage_reason != DAMAGE_NONE:
            self._raise_damage()   # the batch was undone: nothing of it is applied
        self._committed(start, events)
        return events

    cdef uint64_t _transfers_in_chunks(self, const TransferRow *rows, uint64_t count, uint8_t *codes,
                                       uint64_t now) except? 0xFFFFFFFFFFFFFFFF:
        """run_transfers for a large batch, in chunks of about WRITE_AHEAD_ROWS rows: after each chunk the events
        written so far (final: no linked chain crosses a chunk boundary, and a rollback undoes only its chain)
        are handed to write_ahead(header_position, end), which writes them to the files and starts their sync
        in the background while the next chunk is applied. The batch is still one atomic batch: nothing of it
        counts until commit_batch writes its header, and after_commit syncs before the call returns."""
        cdef State *s = &self.state
        cdef uint64_t header_position = s.write_position, timestamp_base, position, written_end
        cdef uint64_t first = 0, last
        cdef bint written_ahead = False
        with nogil:
            timestamp_base = begin_batch(s, now)
            position = expire_due(s, header_position, header_position + 1, timestamp_base)
        written_end = position
        while first < count and s.damage_reason == DAMAGE_NONE:
            last = chunk_end(rows, first, count)
            with nogil:
                position = apply_rows(s, rows + first, last - first, codes + first, header_position, position,
                                      timestamp_base, &written_end)
            if s.damage_reason != DAMAGE_NONE:
                break
            if last < count and position > header_position + 1:
                # Only events of this batch, all in memory, none sealed yet.
                LEDGER_ASSERT(s.write_position == header_position and position <= s.mapped_end)
                try:
                    # True: events reached the files (the journal may hold them back: hold_writes).
                    written_ahead = bool(self._write_ahead(header_position, position)) or written_ahead
                except KeyboardInterrupt as error:
                    # Ctrl-C (it lands at the first Python line after a chunk): finish the batch, which
                    # after_commit then makes durable in full, and raise it after that (_committed). Some of its
                    # events may have reached the files: count them written ahead.
                    written_ahead = True
                    if self._interrupted is None:
                        self._interrupted = error
                except BaseException:
                    self.poisoned = True   # half a batch is applied in memory: nothing more may use this state
                    raise
            first = last
        if s.damage_reason != DAMAGE_NONE:
            with nogil:
                position = undo_batch(s, header_position, position, &written_end)
                commit_batch(s, header_position, position, timestamp_base, written_end)
            if written_ahead:
                # Events of the undone batch reached the files ahead of a header that will never be written, and
                # the journal believes them written: only a reopen (which drops them as a torn tail) is safe.
                self.poisoned = True
            return 0
        with nogil:
            commit_batch(s, header_position, position, timestamp_base, written_end)
        return position - header_position - 1

    @cython.embedsignature(False)   # the generated one would name the shared default objects (_ONE, _ZERO)
    def transfer(self, id, debit_account, credit_account, amount, *, ledger=_ONE, code=_ZERO, flags=_ZERO,
                 pending_id=_ZERO, timeout=_ZERO, user_data=_ZERO):
        """Apply one transfer as a batch of its own and return its TransferResult (OK = 0; every outcome of a
        valid call is a code, not an exception). When it returns, the transfer is as durable as the ledger's
        durability mode says.

        id: the transfer's id and idempotency key (uint64, not 0 nor 2**64 - 1): a retry with the same id and
          fields answers EXISTS and changes nothing.
        debit_account: the account the money leaves; credit_account: the account it arrives at (for
          POST_PENDING / VOID_PENDING: 0, or those of the pending transfer).
        amount: int64 > 0 (POST_PENDING: 0 posts the whole pending amount, less posts part of it;
          VOID_PENDING: 0 or the pending amount).
        ledger: the ledger (asset) of both accounts, uint32, default 1 (POST/VOID: 0 means the pending's).
        code: the caller's reason code (uint16); user_data: the caller's uint64, stored with the transfer.
        flags: TransferFlags. PENDING reserves the amount; POST_PENDING / VOID_PENDING resolve transfer
          `pending_id`.
        pending_id: the PENDING transfer that a POST_PENDING / VOID_PENDING resolves (0 otherwise).
        timeout: seconds (uint32) after which a PENDING transfer expires; 0: never.

        TypeError / ValueError naming the argument if one is not an integer in its field's range;
        LedgerClockError if the clock is past TIMESTAMP_MAX; LedgerClosedError on a closed handle.
        The single-call fast path: no array, no allocation."""
        cdef TransferRow row
        row.id = to_unsigned(id, "id", ID_MAX)
        row.debit_account = to_unsigned(debit_account, "debit_account", ID_MAX)
        row.credit_account = to_unsigned(credit_account, "credit_account", ID_MAX)
        row.amount = to_signed(amount, "amount")
        # Keywords left at their defaults (the same int objects: small ints are shared) skip the conversion.
        row.ledger = 1 if ledger is _ONE else <uint32_t>to_unsigned(ledger, "ledger", 0xFFFFFFFF)
        if code is _ZERO and flags is _ZERO and pending_id is _ZERO and timeout is _ZERO and user_data is _ZERO:
            row.code = row.flags = row.timeout = 0
            row.pending_id = row.user_data = 0
        else:
            row.pending_id = to_unsigned(pending_id, "pending_id", ID_MAX)
            row.user_data = to_unsigned(user_data, "user_data", ID_MAX)
            row.timeout = <uint32_t>to_unsigned(timeout, "timeout", 0xFFFFFFFF)
            row.code = <uint16_t>to_unsigned(code, "code", 0xFFFF)
            row.flags = <uint16_t>to_unsigned(flags, "flags", 0xFFFF)
        self._enter()
        try:
            return self._transfer_row(&row)
        finally:
            self._exit()

    cdef object _transfer_row(self, const TransferRow *row):
        if self.closed or self.poisoned or self.readonly or self._write_refusal is not None:
            self._check_writable()
        cdef State *s = &self.state
        cdef uint64_t records = min(s.expiry_heap.size, EXPIRE_BATCH_MAX_C) + 2
        if (s.write_position + records > s.mapped_end
                or s.transfer_table.count + 1 > s.transfer_table.count_max
                or s.expiry_heap.size + 1 > s.expiry_heap.capacity):
            self._reserve(0, 1, records)
        cdef uint64_t start = s.write_position
        cdef uint8_t result = 0
        cdef uint64_t events = run_transfers(s, row, 1, &result, self._now(records - 1))
        if ledger_unlikely(s.damage_reason != DAMAGE_NONE):
            self._raise_damage()   # undone: nothing applied
        if events != 0 and self._after_commit is not None:
            self._committed(start, events)
        return TRANSFER_RESULTS[result]

    def create_account(self, id, ledger=1, *, min_balance=0, max_balance=AMOUNT_MAX, flags=0, user_data=0):
        """One account as a batch of its own; returns its AccountResult (see Ledger.create_account)."""
        cdef AccountRow row
        row.id = to_unsigned(id, "id", ID_MAX)
        row.user_data = to_unsigned(user_data, "user_data", ID_MAX)
        row.min_balance = to_signed(min_balance, "min_balance")
        row.max_balance = to_signed(max_balance, "max_balance")
        row.ledger = <uint32_t>to_unsigned(ledger, "ledger", 0xFFFFFFFF)
        row.flags = <uint16_t>to_unsigned(flags, "flags", 0xFFFF)
        self._enter()
        try:
            return self._account_row(&row)
        finally:
            self._exit()

    cdef object _account_row(self, const AccountRow *row):
        self._check_writable()
        self._reserve(1, 0, 2)
        cdef uint64_t start = self.state.write_position
        cdef uint8_t result = 0
        cdef uint64_t events = run_accounts(&self.state, row, 1, &result, self._now(1))
        self._committed(start, events)
        return ACCOUNT_RESULTS[result]

    # -- reads --

    def account(self, id_object):
        """(id, ledger, flags, min_balance, max_balance, user_data, debits_posted, credits_posted,
        debits_pending, credits_pending, timestamp) or None."""
        self._enter()
        try:
            return self._account(id_object)
        finally:
            self._exit()

    cdef object _account(self, object id_object):
        self._check_open()
        cdef uint64_t id = to_unsigned(id_object, "id", ID_MAX)
        cdef TableSlot *slot = table_find(&self.state.account_table, id)
        if slot == NULL:
            return None
        cdef AccountHot *hot = &self.state.accounts[slot.value]
        cdef AccountCold *cold = &self.state.accounts_cold[slot.value]
        return (cold.id, hot.ledger, hot.flags, hot.min_balance, hot.max_balance, cold.user_data,
                hot.debits_posted, hot.credits_posted, hot.debits_pending, hot.credits_pending, cold.timestamp)

    def balance(self, id_object):
        self._enter()
        try:
            return self._balance(id_object)
        finally:
            self._exit()

    cdef object _balance(self, object id_object):
        self._check_open()
        cdef uint64_t id = to_unsigned(id_object, "id", ID_MAX)
        cdef TableSlot *slot = table_find(&self.state.account_table, id)
        if slot == NULL:
            raise KeyError(f"account {id} not found")
        cdef AccountHot *hot = &self.state.accounts[slot.value]
        return hot.credits_posted - hot.debits_posted

    def available(self, id_object):
        self._enter()
        try:
            return self._available(id_object)
        finally:
            self._exit()

    cdef object _available(self, object id_object):
        self._check_open()
        cdef uint64_t id = to_unsigned(id_object, "id", ID_MAX)
        cdef TableSlot *slot = table_find(&self.state.account_table, id)
        if slot == NULL:
            raise KeyError(f"account {id} not found")
        cdef AccountHot *hot = &self.state.accounts[slot.value]
        return <object>hot.credits_posted - hot.debits_posted - hot.debits_pending

    def account_arrays(self):
        """Views (not copies) of the live hot and cold account arrays, trimmed to the account count."""
        self._enter()
        try:
            return self._account_arrays()
        finally:
            self._exit()

    cdef object _account_arrays(self):
        self._check_open()
        cdef uint64_t count = self.state.account_count
        return self._accounts_hot[:count], self._accounts_cold[:count]

    def lookup_transfers(self, cnp.ndarray ids not None, cnp.ndarray out not None):
        self._enter()
        try:
            return self._lookup_transfers(ids, out)
        finally:
            self._exit()

    cdef object _lookup_transfers(self, cnp.ndarray ids, cnp.ndarray out):
        self._check_open()
        LEDGER_ASSERT(ids.dtype.itemsize == 8 and cnp.PyArray_IS_C_CONTIGUOUS(ids))
        LEDGER_ASSERT(out.dtype.itemsize == sizeof(TransferRecord) and cnp.PyArray_IS_C_CONTIGUOUS(out))
        LEDGER_ASSERT(out.shape[0] == ids.shape[0])
        cdef uint64_t *keys = <uint64_t *>cnp.PyArray_DATA(ids)
        cdef TransferRecord *records = <TransferRecord *>cnp.PyArray_DATA(out)
        cdef uint64_t i, count = ids.shape[0], position
        cdef TableSlot *slot
        cdef Event *e
        cdef uint32_t kind
        cdef AccountHot *debit
        with nogil:
            for i in range(count):
                memset(&records[i], 0, sizeof(TransferRecord))
                slot = table_find(&self.state.transfer_table, keys[i]) if keys[i] != 0 else NULL
                if slot == NULL:
                    continue
                position = slot.value & POSITION_MASK
                if not record_trusted(&self.state, position):
                    break   # raised below: no field of a damaged record is returned
                e = event_at(&self.state, position)
                kind = event_kind(e)
                debit = account_of(&self.state, e.debit_account)
                LEDGER_ASSERT(debit != NULL)
                records[i].id = e.id
                records[i].debit_account = e.debit_account
                records[i].credit_account = e.credit_account
                records[i].amount = e.amount
                records[i].user_data = e.user_data
                records[i].sequence = position
                records[i].ledger = debit.ledger
                records[i].code = event_code(e)
                records[i].state = <uint8_t>((slot.value >> POSITION_BITS) & 0xFF)
                records[i].flags = FLAG_LINKED if (e.word_a >> 56) & KIND_LINKED else 0
                if kind == KIND_PENDING:
                    records[i].timeout = <uint32_t>e.aux
                    records[i].flags |= FLAG_PENDING
                elif kind == KIND_POST or kind == KIND_VOID:
                    records[i].pending_id = e.aux
                    records[i].flags |= FLAG_POST if kind == KIND_POST else FLAG_VOID
                # Last: the batch header may lie in another old segment, whose mapping may unmap e's.
                records[i].timestamp = event_timestamp(&self.state, e, position)
        if self.state.damage_reason != DAMAGE_NONE:
            self._raise_damage()
        return out

    # -- replay --

    def replay(self, uint64_t end_position=POSITION_MASK):
        """Apply every committed batch from the current write position on, stopping at the first record that
        is not a good batch header or at `end_position`. Returns (reason, position, batches, events)."""
        self._enter()
        try:
            return self._replay_populating(end_position)
        finally:
            self._exit()

    cdef object _replay_populating(self, uint64_t end_position):
        self._check_open()
        self.state.segment_cache.populate = 1   # whole segments, in order (_segment_cache.h)
        try:
            return self._replay(end_position)
        finally:
            self.state.segment_cache.populate = 0

    cdef tuple _replay(self, uint64_t end_position):
        cdef uint64_t position = self.state.write_position, count = 0, batches = 0, events = 0
        cdef uint64_t unchecked_records = 0
        cdef uint32_t crc = 0
        cdef int reason
        cdef BatchHeader *header
        while True:
            if position >= end_position:
                reason = REPLAY_END
                break
            reason = check_header(&self.state, position, &count, &crc)
            if reason >= 0:
                break
            if position + 1 + count > end_position:
                reason = REPLAY_END
                break
            self._reserve(count_accounts(&self.state, position, count), count, 0)
            with nogil:
                reason = replay_batch(&self.state, position, count)
            if reason != REPLAY_END:
                break
            header = <BatchHeader *>event_at(&self.state, position)
            # The clock rule (docs/SEMANTICS.md): a writer never makes such a batch; verify reports the first.
            if (header.timestamp <= self.state.last_timestamp or header.timestamp > TIMESTAMP_MAX
                    or count - 1 > TIMESTAMP_MAX - header.timestamp) and self.timestamp_problem is None:
                self.timestamp_problem = (position, header.timestamp, count, self.state.last_timestamp)
            self.state.last_timestamp = header.timestamp + count - 1   # before the pass below unmaps it
            if self.state.batch_pending_deadlines != 0:   # a pass over the batch only if it made deadlines
                with nogil:
                    schedule_expiries(&self.state, position + 1, position + 1 + count)
            self.state.last_checksum = crc
            self.state.last_header_position = position
            position += 1 + count
            self.state.write_position = position
            batches += 1
            events += count
            # Ctrl-C stops a long replay (an open) here, between batches: the state is whole, and the caller
            # releases the partly opened handle.
            unchecked_records += 1 + count
            if unchecked_records >= REPLAY_SIGNAL_CHECK_RECORDS:
                unchecked_records = 0
                PyErr_CheckSignals()
        return reason, position, batches, events

    def map_through(self, uint64_t end):
        self._enter()
        try:
            self._map_through(end)
        finally:
            self._exit()

    # -- replication: batches copied out of a primary's journal and into a standby's --

    def copy_records(self, uint64_t start, uint64_t end):
        """The committed journal records [start, end) as bytes (64 each, exactly as journaled), from whatever
        holds them: the segments handed over, or old segments mapped from their files. It checks no batch
        itself: a caller copying batches walks them first with batch_headers (which checks each batch from
        before verified_from, once) under the same `with engine:`, as Store.batch_bytes does."""
        self._enter()
        try:
            return self._copy_records(start, end)
        finally:
            self._exit()

    cdef object _copy_records(self, uint64_t start, uint64_t end):
        self._check_open()
        cdef State *s = &self.state
        if start < 1 or start > end or end > s.write_position:
            raise IndexError(f"journal records [{start}, {end}) are not all committed (the committed journal is "
                             f"[1, {s.write_position}))")
        out = PyBytes_FromStringAndSize(NULL, (end - start) * 64)
        cdef char *buffer = PyBytes_AS_STRING(out)
        cdef uint64_t position = start, chunk_end, segment_mask = (<uint64_t>1 << s.segment_records_log2) - 1
        with nogil:
            while position < end:   # a segment at a time: mapping the next old one may unmap the last
                chunk_end = min(end, (position | segment_mask) + 1)
                memcpy(buffer + (position - start) * 64, event_at(s, position), (chunk_end - position) * 64)
                position = chunk_end
        return out

    def put_records(self, uint64_t position, data):
        """Copy `data` (whole 64-byte records, any buffer) into the journal memory at position .., at or after
        the write position and below mapped_end, in segments handed over (map_through first). A standby puts a
        primary's batches there for replay to apply (Store.append_replicated), and zeros to take them back.
        The batch headers in it (records whose word A is exactly the header kind's) are copied after everything
        else, in order, each commit word last (a release store): a reader of a shared mapping never sees a
        commit word before the records it seals. Applies nothing. Returns the position after the records."""
        self._enter()
        try:
            return self._put_records(position, data)
        finally:
            self._exit()

    cdef object _put_records(self, uint64_t position, object data):
        self._check_open()
        if self.readonly:
            raise LedgerError("the ledger was opened read-only")
        cdef State *s = &self.state
        cdef Py_buffer view
        cdef uint64_t count, end, index
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len % 64:
                raise ValueError(f"{view.len} bytes are not whole 64-byte records")
            count = view.len // 64
            end = position + count
            if position < s.write_position or end > s.mapped_end:
                raise ValueError(f"records [{position}, {end}) are not between the write position "
                                 f"{s.write_position} and the end of the mapped journal {s.mapped_end}")
            for index in range(position >> s.segment_records_log2, (end + (<uint64_t>1 << s.segment_records_log2)
                                                                    - 1) >> s.segment_records_log2):
                if s.segments[index] == NULL:
                    raise ValueError(f"segment {index} is not handed over for writing")
            with nogil:
                put_records_in(s, position, <const char *>view.buf, count)
        finally:
            PyBuffer_Release(&view)
        return end

    # -- journal reads for history, explain and the read side --

    def account_positions(self, id_object):
        """(creation position, newest event position) of an account, or None."""
        self._check_open()
        cdef uint64_t id = to_unsigned(id_object, "id", ID_MAX)
        cdef TableSlot *slot = table_find(&self.state.account_table, id)
        if slot == NULL:
            return None
        return self.state.accounts_cold[slot.value].position, self.state.accounts[slot.value].last_position

    def account_history(self, uint64_t id, uint64_t before_position=POSITION_MASK + 1,
                        uint64_t after_position=0, uint64_t limit=POSITION_MASK):
        """Positions of the account's events with after_position < position < before_position, newest first,
        at most `limit`, found by walking the per-account back-pointers (cost: the events returned plus those
        skipped at or after before_position, never the journal size)."""
        self._check_open()
        cdef TableSlot *slot = table_find(&self.state.account_table, id)
        if slot == NULL:
            raise KeyError(f"account {id} not found")
        cdef State *s = &self.state
        cdef uint64_t position = s.accounts[slot.value].last_position, count = 0, newer = s.write_position
        cdef uint64_t creation = s.accounts_cold[slot.value].position
        cdef Event *e
        cdef uint32_t kind
        out = []
        # Each step must go strictly backwards (so a damaged pointer can neither loop nor leave the journal) to an
        # event of this account, checked before its fields are used, and end at the account's creation.
        while count < limit:
            if position <= after_position and position >= creation:
                break
            if position >= newer or position < creation:   # (a pointer to 0 ends the chain before the creation)
                record_damaged(s, newer, 0, DAMAGE_POINTER)   # the record holding the bad pointer
                self._raise_damage()
            if not record_trusted(s, position):
                self._raise_damage()
            e = event_at(s, position)
            kind = event_kind(e)
            if (kind < KIND_ACCOUNT or kind > KIND_EXPIRE or (kind == KIND_ACCOUNT) != (position == creation)
                    or (kind == KIND_ACCOUNT and e.id != id)
                    or (kind != KIND_ACCOUNT and e.debit_account != id and e.credit_account != id)):
                record_damaged(s, newer if newer < s.write_position else position, 0, DAMAGE_POINTER)
                self._raise_damage()
            if position < before_position:
                out.append(position)
                count += 1
            if kind == KIND_ACCOUNT:
                break
            newer = position
            position = (e.word_a if e.debit_account == id else e.word_b) & POSITION_MASK
        return np.array(out, dtype=np.uint64)

    def decode_events(self, cnp.ndarray positions not None):
        """Decode the events at the given journal positions (uint64, each a committed event) into EVENT_DTYPE."""
        self._check_open()
        LEDGER_ASSERT(positions.dtype.itemsize == 8)
        positions = np.ascontiguousarray(positions, dtype=np.uint64)
        cdef uint64_t count = positions.shape[0], i, position
        out = np.zeros(count, EVENT_DTYPE)
        cdef uint64_t *keys = <uint64_t *>cnp.PyArray_DATA(positions)
        cdef DecodedEvent *decoded = <DecodedEvent *>cnp.PyArray_DATA(out)
        cdef Event *e
        for i in range(count):
            position = keys[i]
            if position == 0 or position >= self.state.write_position:
                raise IndexError(f"journal position {position} is not a committed record")
            if not verify_position(&self.state, position):
                self._raise_damage()
            e = event_at(&self.state, position)
            if event_kind(e) == KIND_HEADER or event_kind(e) == 0:
                raise IndexError(f"journal position {position} is a batch header, not an event")
        with nogil:
            for i in range(count):
                position = keys[i]
                e = event_at(&self.state, position)
                decoded[i].position = position
                decoded[i].id = e.id
                decoded[i].debit_account = e.debit_account
                decoded[i].credit_account = e.credit_account
                decoded[i].amount = e.amount
                decoded[i].user_data = e.user_data
                decoded[i].aux = e.aux
                decoded[i].previous_debit_position = e.word_a & POSITION_MASK
                decoded[i].previous_credit_position = e.word_b & POSITION_MASK
                decoded[i].code = event_code(e)
                decoded[i].kind = <uint8_t>event_kind(e)
                decoded[i].linked = 1 if (e.word_a >> 56) & KIND_LINKED else 0
                # Last: the batch header may lie in another old segment, whose mapping may unmap e's.
                decoded[i].timestamp = event_timestamp(&self.state, e, position)
        return out

    def batch_headers(self, uint64_t start=1, uint64_t end=POSITION_MASK, uint64_t limit=1 << 20):
        """(header position, timestamp, event count) of committed batches with start <= header position < end.
        `start` must be a batch header position (1 is the first)."""
        self._check_open()
        cdef uint64_t position = start, count = 0
        cdef BatchHeader *header
        out = []
        end = min(end, self.state.write_position)
        while position < end and count < limit:
            header = <BatchHeader *>event_at(&self.state, position)
            if (header.word_a >> 56) != KIND_HEADER:
                if position < self.state.verified_from and position > start:
                    # Reached from the previous header's count: a good header must be here.
                    record_damaged(&self.state, position, position, DAMAGE_HEADER)
                    self._raise_damage()
                raise IndexError(f"journal position {position} is not a batch header")
            timestamp, event_count = header.timestamp, header.event_count   # verify_old_header may unmap it
            if position < self.state.verified_from and not verify_old_header(&self.state, position):
                self._raise_damage()
            out.append((position, timestamp, event_count))
            position += 1 + event_count
            count += 1
        return out

    # -- introspection --

    @property
    def write_position(self):
        return self.state.write_position

    @property
    def last_timestamp(self):
        return self.state.last_timestamp

    @property
    def last_checksum(self):
        return self.state.last_checksum

    @property
    def account_count(self):
        return self.state.account_count

    @property
    def transfer_count(self):
        return self.state.transfer_table.count

    @property
    def pending_expiry_count(self):
        return self.state.expiry_heap.size

    @property
    def mapped_end(self):
        return self.state.mapped_end

    @property
    def segment_count(self):
        return self.state.segment_count

    # -- snapshots: the whole state as arrays, and back --

    def state_views(self):
        """The scalars and numpy views (no copies) of every piece of state: accounts, both id tables, the expiry
        heap. Valid until the next command; a forked child uses them as a frozen copy-on-write image."""
        self._enter()
        try:
            return self._state_views()
        finally:
            self._exit()

    cdef object _state_views(self):
        self._check_open()
        cdef State *s = &self.state
        cdef uint64_t count = s.account_count
        scalars = {
            "write_position": s.write_position, "last_timestamp": s.last_timestamp,
            "last_checksum": s.last_checksum, "last_header_position": s.last_header_position,
            "account_count": count, "transfer_count": s.transfer_table.count,
            "segment_records_log2": s.segment_records_log2,
        }
        return scalars, {
            "accounts_hot": self._accounts_hot[:count], "accounts_cold": self._accounts_cold[:count],
            "account_slots": memory_view(s.account_table.slots, (<uint64_t>1 << s.account_table.capacity_log2),
                                         TABLE_SLOT_DTYPE),
            "transfer_slots": memory_view(s.transfer_table.slots, (<uint64_t>1 << s.transfer_table.capacity_log2),
                                          TABLE_SLOT_DTYPE),
            "expiry_heap": memory_view(s.expiry_heap.entries, s.expiry_heap.size, HEAP_ENTRY_DTYPE),
        }

    def import_begin(self, dict scalars, uint64_t account_slots, uint64_t transfer_slots, uint64_t heap_size):
        """Make room for a snapshot in this fresh engine and return writable views to read it into; then call
        import_end. If reading fails, discard this engine."""
        self._check_open()
        cdef State *s = &self.state
        LEDGER_ASSERT(s.account_count == 0 and s.transfer_table.count == 0 and s.write_position == 1)
        if scalars["segment_records_log2"] != s.segment_records_log2:
            raise ValueError("snapshot segment size differs from the journal's")
        for slots in (account_slots, transfer_slots):
            if slots < 1024 or slots & (slots - 1) or slots > (<uint64_t>1 << TABLE_CAPACITY_LOG2_MAX):
                raise ValueError("snapshot id table size is not a power of two in range")
        cdef uint64_t count = scalars["account_count"]
        # Not pre-faulted: the snapshot's reads fault each page in as they fill it (a page is zeroed once either
        # way, and faulting it separately first would cost a second pass over the memory).
        if count > s.account_capacity:
            self._grow_accounts(count, False)
        cdef Table table
        table_allocate(&table, (<uint64_t>account_slots).bit_length() - 1, False)
        table_free(&s.account_table)
        s.account_table = table
        table_allocate(&table, (<uint64_t>transfer_slots).bit_length() - 1, False)
        table_free(&s.transfer_table)
        s.transfer_table = table
        heap_reserve(&s.expiry_heap, heap_size)
        return {
            "accounts_hot": self._accounts_hot[:count], "accounts_cold": self._accounts_cold[:count],
            "account_slots": memory_view(s.account_table.slots, account_slots, TABLE_SLOT_DTYPE),
            "transfer_slots": memory_view(s.transfer_table.slots, transfer_slots, TABLE_SLOT_DTYPE),
            "expiry_heap": memory_view(s.expiry_heap.entries, heap_size, HEAP_ENTRY_DTYPE),
        }

    def import_end(self, dict scalars, uint64_t heap_size, uint64_t account_capacity=0,
                   uint64_t transfer_capacity=0):
        """Adopt what import_begin's views were filled with. Replay continues from scalars["write_position"].
        account_capacity, transfer_capacity: room to make for that many accounts and transfers in all, as the
        constructor does from genesis (so an engine to load into is best constructed small: its tables are
        replaced by the snapshot's)."""
        cdef State *s = &self.state
        s.account_count = scalars["account_count"]
        s.account_table.count = s.account_count
        s.transfer_table.count = scalars["transfer_count"]
        s.expiry_heap.size = heap_size
        if s.account_table.count > s.account_table.count_max or s.transfer_table.count > s.transfer_table.count_max:
            raise ValueError("snapshot id table is over its load limit")
        self._map_through(scalars["write_position"] + 1)
        s.write_position = scalars["write_position"]
        self._trust_from(s.write_position)
        s.last_timestamp = scalars["last_timestamp"]
        s.last_checksum = scalars["last_checksum"]
        s.last_header_position = scalars["last_header_position"]
        if account_capacity > s.account_capacity:
            self._grow_accounts(account_capacity)
        if account_capacity > s.account_count:
            table_reserve(&s.account_table, account_capacity - s.account_count)
        if transfer_capacity > s.transfer_table.count:
            table_reserve(&s.transfer_table, transfer_capacity - s.transfer_table.count)

    cdef int _trust_from(self, uint64_t position) except -1:
        """Records from `position` on are replayed (checked) or written by this engine; the ones before are
        checked on first read (verify_old_record). The bitmap of checked batch headers is one bit per record
        before `position` (2 MiB per GiB of journal), in anonymous memory that is faulted in only where a batch
        is checked (a page, or a 2 MiB huge page, at a time)."""
        cdef State *s = &self.state
        LEDGER_ASSERT(s.verified_headers == NULL)
        cdef size_t size = (position + 7) // 8
        if size == 0:
            return 0
        cdef void *memory = ledger_map_anonymous(size, 0)
        if memory == NULL:
            raise MemoryError(f"cannot allocate {size} bytes to remember the checked journal batches")
        s.verified_headers = <uint8_t *>memory
        s.verified_headers_bytes = size
        s.verified_from = position
        return 0

    @property
    def verified_from(self):
        """Records before this position were not checked by this engine when it opened (the snapshot's position);
        each is checked, with its batch, the first time it is read."""
        return self.state.verified_from

    def raise_damage(self):
        """Raise the LedgerCorruptError for what replay() stopped at with reason "damaged"."""
        self._raise_damage()

    def scrub(self, uint64_t position, uint64_t previous_checksum, uint64_t end, uint64_t records_max):
        """Re-check committed batches from the header at `position` (1: the first), which follows a batch with
        checksum previous_checksum (0 for the first), up to `end` (at most write_position), stopping after the
        batch that reaches records_max records (at least one batch is checked). Every check of replay is made
        (header, checksum, hash chain); a damaged batch whose header is still well-formed is stepped over (its
        recorded checksum continues the chain), otherwise the next good batch is searched for. Batches before
        verified_from found good are remembered, so later reads of them are not checked again.
        Returns (next position, its previous checksum, batches, records, [(position, DAMAGE_* reason), ...])."""
        self._enter()   # one step at a time (records_max): other threads' calls go on between steps
        try:
            return self._scrub(position, previous_checksum, end, records_max)
        finally:
            self._exit()

    cdef object _scrub(self, uint64_t position, uint64_t previous_checksum, uint64_t end, uint64_t records_max):
        self._check_open()
        cdef State *s = &self.state
        end = min(end, s.write_position)
        cdef uint64_t records = 0, batches = 0, count = 0, found
        cdef uint32_t crc = 0
        cdef int reason
        cdef BatchHeader *header
        damaged = []
        while position < end and (records < records_max or batches == 0):
            count = 0
            with nogil:
                reason = check_batch(s, position, previous_checksum, end, &count, &crc)
            if reason == -1:
                if position + 1 + count <= s.verified_from and s.verified_headers != NULL:
                    s.verified_headers[position >> 3] |= <uint8_t>(1 << (position & 7))
                previous_checksum = crc
                position += 1 + count
                records += 1 + count
                batches += 1
                continue
            header = <BatchHeader *>event_at(s, position)
            damaged.append((position, DAMAGE_CHECKSUM if reason == REPLAY_CHECKSUM else DAMAGE_CHAIN
                            if reason == REPLAY_CHAIN else DAMAGE_TORN if reason == REPLAY_TORN else DAMAGE_HEADER))
            batches += 1
            if reason == REPLAY_CHECKSUM or reason == REPLAY_CHAIN:
                previous_checksum = header.checksum   # go on with the chain as the batch recorded it
                position += 1 + count
                records += 1 + count
                continue
            # No count to trust: the next good batch (any chain) is within the largest batch after this one.
            found = 0
            with nogil:
                found = scrub_resync(s, position + 1, min(end, position + 2 + OFFSET_MAX), end, &previous_checksum)
            if found == 0:
                records += end - position
                position = end
                break
            records += found - position
            position = found
        return position, previous_checksum, batches, records, damaged

    def check_batch_end(self, uint64_t header_position, uint64_t end, uint64_t checksum):
        """True if the journal holds a committed batch at header_position ending at `end` with this checksum:
        a snapshot taken at `end` belongs to this journal."""
        if header_position == 0:
            return end == 1 and checksum == 0
        if end > self.state.mapped_end or header_position >= end:
            return False
        cdef BatchHeader *header = <BatchHeader *>event_at(&self.state, header_position)
        return ((header.word_a >> 56) == KIND_HEADER and header.position == header_position
                and header_position + 1 + header.event_count == end and header.checksum == checksum
                and (ledger_load_acquire_u64(&header.commit) >> 32) == COMMIT_MAGIC)

    def memory_bytes(self):
        """Bytes held by the in-memory state (accounts, id tables, expiry heap), not the journal."""
        return {
            "accounts": int(self.state.account_capacity) * (sizeof(AccountHot) + sizeof(AccountCold)),
            "account_table": (1 << self.state.account_table.capacity_log2) * sizeof(TableSlot),
            "transfer_table": (1 << self.state.transfer_table.capacity_log2) * sizeof(TableSlot),
            "expiry_heap": int(self.state.expiry_heap.capacity) * sizeof(HeapEntry),
        }

    def close(self):
        self._enter()
        try:
            return self._close()
        finally:
            self._exit()

    cdef object _close(self):
        self.closed = True
        ledger_segment_cache_release(&self.state.segment_cache, self.state.segments)
        for buffer in self._segment_objects:
            if buffer is not None:
                buffer.release()
        self._segment_objects = []
        self._segment_release = None
        self._segment_provider = None
        self._after_commit = None
        self._write_ahead = None
