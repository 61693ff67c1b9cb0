"""The internal tier under `ledger.Ledger`: a `Store` owns one ledger's engine, journal and commit pipeline, knows
how to poison and close them, and `open_store` builds one, recovering at open (newest good snapshot + journal
replay, torn tail truncated, corruption refused).

`ledger.api` is the public face over it (argument checks, result types); the ring server, audit, history,
restore and scrub work on a Store. A Ledger hands its own out as one documented attribute, `Ledger.store`,
rather than each of those modules taking a Store beside the handle: the public functions of history
(`ledger.balance_at(handle, ...)`) take a Ledger, and an attribute keeps them and the handle's methods on one
path without widening any public signature.

Replication (issue 14) meets the journal here, without any transport: a primary's publish hook copies each
committed batch out with `Store.batch_bytes`, byte for byte; a standby (`Store.follow`) takes such bytes in with
`Store.append_replicated`, which checks them, puts them into its journal at its write position and applies them
with the core's replay (the code recovery runs), so a standby's state is by construction the fold of the same
journal, and its segment files hold the same bytes as the primary's."""
from __future__ import annotations

import operator
import os
import sys
import warnings
from typing import Any, Callable

import numpy as np

from ledger import _core
from ledger.commit import CommitPipeline, Publish
from ledger.enums import TIMESTAMP_MAX
from ledger.errors import (LedgerClosedError, LedgerCorruptError, LedgerError, LedgerPoisonedError,
                           LedgerReplicationError)
from ledger.format import (
    COMMIT_MAGIC,
    HEADER_MAGIC_VERSION,
    HEADER_WORD_A,
    RECORD_SIZE,
    REPLAY_DAMAGED,
    REPLAY_END,
    REPLAY_REASONS,
    WORD_A,
    WORD_CHECKSUM,
    WORD_COMMIT,
    WORD_COUNT,
    WORD_MAGIC_VERSION,
    WORD_POSITION,
    WORD_PREVIOUS_CHECKSUM,
    WORD_TIMESTAMP,
    batch_checksum,
    header_problem,
)
from ledger.journal import (
    FLUSH_INTERVAL_MS_DEFAULT,
    FLUSH_INTERVAL_MS_MAX,
    SEGMENT_RECORDS_LOG2_DEFAULT,
    SEGMENT_RECORDS_LOG2_MAX,
    SEGMENT_RECORDS_LOG2_MIN,
    FaultInjector,
    FileJournal,
    MemoryJournal,
)
from ledger.progress import Progress
from ledger.snapshot import SnapshotInfo, journal_base, list_snapshots, load_into, remove_unfinished
from ledger.snapshot import snapshot_path as snapshot_path_at

__all__ = ["DURABILITY_MODES", "READONLY_RECOVERY_ATTEMPTS", "Store", "open_store", "replicated_batches",
           "standby_refusal"]

DURABILITY_MODES = ("fsync", "os")
# Opening replays the journal after the snapshot in slices of this many records, with a progress bar, when stderr
# is a terminal and at least this much may be left (about 0.4 s of replay): less is not worth a bar.
REPLAY_SLICE_RECORDS = 1 << 22
REPLAY_PROGRESS_RECORDS_MIN = 1 << 22
# Judgements of a moving stop a reader makes before it takes the journal as it has replayed it (see below).
READONLY_RECOVERY_ATTEMPTS = 5
CAPACITY_MAX = 2**36


class Store:
    """One open ledger's engine (`engine`), journal (`journal`: a FileJournal, or a MemoryJournal for
    path=None) and commit pipeline (`commits`), with where it lives (`path`), its durability ("fsync", "os" or
    "memory") and the snapshot it was recovered from (`recovered_from`, or None)."""

    def __init__(self, engine: _core.Engine, journal: Any, path: str | None, durability: str,
                 commits: CommitPipeline, recovered_from: SnapshotInfo | None = None) -> None:
        self.engine = engine
        self.journal = journal
        self.path = path
        self.durability = durability
        self.commits = commits
        self.recovered_from = recovered_from
        self._following = False

    @property
    def on_disk(self) -> bool:
        """True for a ledger in a directory (a FileJournal), False in memory."""
        return isinstance(self.journal, FileJournal)

    @property
    def lock_fd(self) -> int | None:
        """The descriptor holding the directory's writer lock (None in memory or read-only): a snapshot's child
        keeps it until it exits."""
        return self.journal.lock_fd if self.on_disk else None

    @property
    def segment_bytes(self) -> int:
        """The size of one journal segment file (0 in memory)."""
        return self.journal.segment_bytes if self.on_disk else 0

    def location(self, position: int) -> tuple[str | None, int | None]:
        """(segment file, byte offset) of a journal position; (None, None) in memory."""
        return self.journal.location(position) if self.on_disk else (None, None)

    def poison(self) -> None:
        """Make the handle unusable: a write or sync failed, so the state in memory may be ahead of the files."""
        self.engine.poisoned = True

    # -- replication: a primary's batches out, a standby's in --

    def batch_bytes(self, start: int, end: int) -> bytes:
        """The journal records [start, end) exactly as journaled: one or more whole committed batches, each its
        header (with the commit word) and its events, from whatever holds them (the segments being written, or
        old segment files, read through the engine's checked reads). What a primary's publish hook sends for the
        range it is handed. ValueError unless `start` is a batch header and `end` the end of a batch, within
        the committed journal; LedgerCorruptError if a batch from before the snapshot this store was opened from
        fails its check. Safe from any thread: it holds the engine's lock (a ring server publishes on its sync
        thread while the owner applies the next group), so that thread must not be waited for by one holding
        that lock (settle a grouped store before closing its Ledger, as Server.close does)."""
        engine = self.engine
        with engine:
            committed_end = engine.write_position
            if not 1 <= start < end <= committed_end:
                raise ValueError(f"[{start}, {end}) is not a range of the committed journal [1, {committed_end})")
            try:
                headers = engine.batch_headers(start, end, end - start)
            except IndexError as error:
                raise ValueError(f"[{start}, {end}) does not start at a batch header: {error}") from None
            last_header, _, last_count = headers[-1]
            if last_header + 1 + last_count != end:
                raise ValueError(f"[{start}, {end}) does not end at a batch end: the batch at journal position "
                                 f"{last_header} ends at {last_header + 1 + last_count}")
            return engine.copy_records(start, end)

    @property
    def following(self) -> bool:
        """True while this store is a standby (follow() until stop_following())."""
        return self._following

    def follow(self, refusal: Callable[[], BaseException] | None = None) -> None:
        """Make this store a standby: from now on only append_replicated changes it. How commands are refused:
        through the engine's `write_refusal` (the core's check before any command is applied), not a flag the
        Ledger face checks, so that no path gets round it (a Ledger's `transfer` is the core's own method, and
        a ring server calls the engine directly): every create_account(s) / transfer(s) raises refusal() (the
        default: standby_refusal; the cluster layer passes one naming the primary). Reads go on. Replay is not a
        command, so append_replicated still applies. Not for a read-only store (it cannot write a journal)."""
        engine = self.engine
        if engine.readonly:
            raise LedgerError("a read-only ledger cannot follow a primary (it cannot write its journal)")
        # A ring server's last group durable, published and answered first; outside the engine's lock, which its
        # publish hook may take on the sync thread (batch_bytes).
        self.commits.settle()
        with engine:
            engine.write_refusal = refusal if refusal is not None else standby_refusal
            self._following = True

    def stop_following(self) -> None:
        """Apply commands again (a standby that becomes the primary). The commit pipeline's publish hook, if
        any, publishes from the current write position on: the batches appended while following came from the
        primary, which published them."""
        engine = self.engine
        with engine:
            engine.write_refusal = None
            self.commits.attach(engine, self.poison)   # publishes from here on; nothing before is its to publish
            self._following = False

    def append_replicated(self, data: bytes | bytearray | memoryview) -> int:
        """Make this standby's journal hold `data`, one or more whole committed batches exactly as a primary
        journaled them (Store.batch_bytes), after its own; returns the new write position.
        Every check is made BEFORE anything is applied (replicated_batches: whole records, each header well
        formed, at this journal's write position, within the message, committed, its checksum, the hash chain
        from this journal's last batch, its time after the last event's). Then the bytes go into the journal
        memory at the write position (Engine.put_records), the core's replay applies them (the code recovery
        runs), and with durability "fsync" each batch is written (events, then header) and synced through the
        journal, as the commit pipeline does; "os": they are in the shared mapping (the files) already, and
        the flusher syncs them. A refusal raises LedgerReplicationError naming the check, the position and
        expected against found: nothing was applied, the records put there are zeroed, and the next correct
        message is taken. A batch the checks pass but replay refuses (events that contradict this state, which
        no primary writes) is undone whole by the core; batches of the same message before it are whole, good
        batches and are kept (the error says where the journal now ends). A failed write or sync of batches
        already applied poisons the handle (reopening recovers), as for a command."""
        engine = self.engine
        with engine:
            if engine.closed:
                raise LedgerClosedError("the ledger is closed")
            if engine.poisoned:
                raise LedgerPoisonedError("the ledger handle is poisoned by a failed journal sync; reopen it")
            if not self._following:
                raise LedgerError("append_replicated on a store that is not following a primary (follow() first)")
            start = engine.write_position
            batches = replicated_batches(data, start, engine.last_checksum, engine.last_timestamp)
            end = batches[-1][1]
            engine.map_through(end)   # new segments first: a disk full then leaves nothing put there
            engine.put_records(start, data)
            try:
                reason, stopped, _, _ = engine.replay(end)
            except BaseException:   # Ctrl-C between batches of a long message: keep what was applied
                self._settle_replicated(batches, end)
                raise
            kept = self._settle_replicated(batches, end)
            applied_end = engine.write_position
            if applied_end < end:
                if reason == REPLAY_DAMAGED:
                    engine.raise_damage()   # a record of this journal, from before its snapshot, is damaged
                raise LedgerReplicationError(
                    f"replay refused the replicated batch at journal position {stopped} "
                    f"({REPLAY_REASONS[reason]}: its events contradict this standby's state, although its "
                    f"checksum and chain hold); nothing of it was applied, and the journal ends at {applied_end}"
                    + (f" (the {len(kept)} batches of the message before it were applied)" if kept else ""))
            return end

    def _settle_replicated(self, batches: list[tuple[int, int]], end: int) -> list[tuple[int, int]]:
        """After append_replicated's replay stopped at the write position: zero the records put in up to `end`
        that replay did not apply ("os": in the files, so synced too, or a crash could leave them past the
        durable mark, where recovery would replay them), and journal the batches it did apply. Returns those."""
        applied_end = self.engine.write_position
        if applied_end < end:
            self.engine.put_records(applied_end, bytes((end - applied_end) * RECORD_SIZE))
            if self.durability == "os":
                self.journal.sync(applied_end, end)
        applied = [batch for batch in batches if batch[1] <= applied_end]
        self._journal_replicated(applied)
        return applied

    def _journal_replicated(self, batches: list[tuple[int, int]]) -> None:
        """durability "fsync": each applied batch to the files, its events then its header, then synced, before
        the next batch's header is written (docs/FORMAT.md's recovery rule), through the commit pipeline's own
        step. A failure poisons the handle: the batches are applied in memory, maybe not in the files."""
        for header_position, end in batches:
            self.commits.commit_replicated(header_position, end)

    def close(self) -> None:
        """Close the engine, then the journal (with a final sync unless poisoned), then end the pipeline's sync
        thread. The caller holds the engine's lock. Idempotent."""
        if self.engine.closed:
            return
        poisoned = self.engine.poisoned
        self.engine.close()
        try:
            if self.on_disk:
                self.journal.close(final_sync=not poisoned)
            else:
                self.journal.close()
        finally:
            self.commits.stop()


def standby_refusal() -> LedgerError:
    """The exception a command on a following standby raises by default (Store.follow)."""
    return LedgerError("this ledger is a standby following a primary: it applies only the primary's replicated "
                       "batches; send commands to the primary")


def replicated_batches(data: bytes | bytearray | memoryview, position: int, previous_checksum: int,
                       last_timestamp: int) -> list[tuple[int, int]]:
    """The batches [(header position, end), ...] that `data` holds, after checking that it is one or more whole
    committed batches that continue a journal whose write position is `position`, whose last batch has checksum
    previous_checksum (0: none) and whose last event has time last_timestamp: whole 64-byte records; each
    header well formed (ledger.format), at its journal position, its batch within the message, committed
    (the commit word), its checksum over its bytes, its previous_checksum the batch before's (the hash chain),
    its events later than the batch before's (the clock rule). Reads only `data`: nothing is applied. The
    first failure raises LedgerReplicationError naming the check, the position, and expected against found."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.nbytes == 0 or view.nbytes % RECORD_SIZE:
        raise LedgerReplicationError(f"replicated message of {view.nbytes} bytes at journal position {position}: "
                                     f"expected whole {RECORD_SIZE}-byte records (one or more whole batches)")
    words = np.frombuffer(view, dtype="<u8").reshape(-1, 8)
    batches: list[tuple[int, int]] = []
    offset = 0
    while offset < words.shape[0]:
        header_position = position + offset
        fields = words[offset].tolist()
        _check_replicated_header(fields, header_position, position, words.shape[0] - offset)
        count = fields[WORD_COUNT]
        end = header_position + 1 + count
        events = view[(offset + 1) * RECORD_SIZE:(offset + 1 + count) * RECORD_SIZE]
        checksum = batch_checksum(words[offset], [events])
        if checksum != fields[WORD_CHECKSUM] or checksum != fields[WORD_COMMIT] & 0xFFFFFFFF:
            raise LedgerReplicationError(
                f"checksum mismatch in the replicated batch at journal position {header_position}: its bytes sum "
                f"to {checksum:#010x}, its header says {fields[WORD_CHECKSUM]:#x} (commit word "
                f"{fields[WORD_COMMIT]:#018x}): damaged in transit, or not written by a ledger")
        if fields[WORD_PREVIOUS_CHECKSUM] != previous_checksum:
            raise LedgerReplicationError(
                f"hash chain broken at the replicated batch at journal position {header_position}: its "
                f"previous_checksum is {fields[WORD_PREVIOUS_CHECKSUM]:#x}, expected {previous_checksum:#x} (the "
                f"checksum of this journal's batch before it): it follows another journal (another writer)")
        timestamp = fields[WORD_TIMESTAMP]
        if timestamp <= last_timestamp or timestamp + count - 1 > TIMESTAMP_MAX:
            raise LedgerReplicationError(
                f"the replicated batch at journal position {header_position} starts at {timestamp} ns, expected "
                f"after {last_timestamp} ns (the last event before it) and its {count} events at most at "
                f"TIMESTAMP_MAX")
        batches.append((header_position, end))
        previous_checksum, last_timestamp = checksum, timestamp + count - 1
        offset += 1 + count
    return batches


def _check_replicated_header(fields: list[int], header_position: int, write_position: int,
                             records_left: int) -> None:
    """replicated_batches' checks of one header record (eight words) where journal position header_position
    should hold one, with records_left records of the message from it on: a header, at its own position (the
    standby's write position for the first), whole in the message, committed."""
    if fields[WORD_A] != HEADER_WORD_A or fields[WORD_MAGIC_VERSION] != HEADER_MAGIC_VERSION:
        raise LedgerReplicationError(
            f"no batch header at journal position {header_position} of the replicated message: word A "
            f"{fields[WORD_A]:#018x}, magic and version {fields[WORD_MAGIC_VERSION]:#018x}, expected "
            f"{HEADER_WORD_A:#018x} and {HEADER_MAGIC_VERSION:#018x}")
    found = fields[WORD_POSITION]
    if found != header_position:
        if header_position != write_position:
            why = "the message's batches do not follow one another"
        elif found < header_position:
            why = "a duplicate: this standby holds that batch already"
        else:
            why = f"a gap: the batches from {header_position} to {found} are missing"
        where = " (this standby's write position)" if header_position == write_position else ""
        raise LedgerReplicationError(f"replicated batch for journal position {found}, expected {header_position}"
                                     f"{where}: {why}")
    if header_problem(header_position, fields) is not None:
        raise LedgerReplicationError(f"malformed batch header at journal position {header_position}: "
                                     f"{fields[WORD_COUNT]} events, expected 1 to 2**24 - 1 within the journal")
    if 1 + fields[WORD_COUNT] > records_left:
        raise LedgerReplicationError(
            f"truncated replicated message: the batch at journal position {header_position} has "
            f"{1 + fields[WORD_COUNT]} records (header and events), the message holds {records_left} from it")
    if fields[WORD_COMMIT] >> 32 != COMMIT_MAGIC:
        raise LedgerReplicationError(
            f"uncommitted batch at journal position {header_position}: commit word {fields[WORD_COMMIT]:#018x}, "
            f"expected {COMMIT_MAGIC:#x} in its high half")


def _check_options(durability: str, clock: Callable[[], int] | None, segment_records_log2: int,
                   flush_interval_ms: int, capacities: dict[str, int]) -> None:
    if durability not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
    if clock is not None and not callable(clock):
        raise TypeError("clock must be a zero-argument callable returning integer nanoseconds")
    for name, value in capacities.items():
        if not 0 <= operator.index(value) <= CAPACITY_MAX:
            raise ValueError(f"{name} must be in [0, 2**36], got {value}")
    # Checked here for every kind of ledger (the journal checks them again): an in-memory one took any segment size
    # the core allowed (4 to 30) and ignored a flush interval out of range.
    for name, value, low, high in (
            ("segment_records_log2", segment_records_log2, SEGMENT_RECORDS_LOG2_MIN, SEGMENT_RECORDS_LOG2_MAX),
            ("flush_interval_ms", flush_interval_ms, 1, FLUSH_INTERVAL_MS_MAX)):
        if not low <= operator.index(value) <= high:
            raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def open_store(path: str | os.PathLike[str] | None, create: bool = False, durability: str = "fsync", *,
               readonly: bool = False, clock: Callable[[], int] | None = None,
               segment_records_log2: int = SEGMENT_RECORDS_LOG2_DEFAULT,
               flush_interval_ms: int = FLUSH_INTERVAL_MS_DEFAULT, accounts_capacity: int = 0,
               transfers_capacity: int = 0, journal_records_reserved: int = 0,
               fault_injector: FaultInjector | None = None, grouped: bool = False,
               publish: Publish | None = None) -> Store:
    """Open (or create) the ledger in `path` (None: in memory) as `ledger.open` documents, recovering at open.
    The hooks ledger.open does not offer: fault_injector (tests): called as fault_injector("allocate" | "write" |
    "sync" | ...) before those journal operations. grouped: the commit pipeline runs in grouped mode (the ring
    server: one sync per drained group, see ledger/commit.py); per call otherwise. publish: called with each
    committed batch's range [start, end) once durable, before its call returns or its group is answered."""
    _check_options(durability, clock, segment_records_log2, flush_interval_ms,
                   {"accounts_capacity": accounts_capacity, "transfers_capacity": transfers_capacity,
                    "journal_records_reserved": journal_records_reserved})
    capacities = {"account_capacity": accounts_capacity, "transfer_capacity": transfers_capacity}
    if path is None:
        return _memory_store(segment_records_log2, clock, capacities, journal_records_reserved, grouped, publish)
    directory = os.fspath(path)
    journal = FileJournal(directory, create=create, durability=durability, readonly=readonly,
                          segment_records_log2=segment_records_log2, flush_interval_ms=flush_interval_ms,
                          fault_injector=fault_injector)
    commits = CommitPipeline(journal, writes=durability == "fsync" and not readonly, grouped=grouped,
                             publish=publish)
    engines: list[_core.Engine] = []   # every engine made here: a failed open closes them all
    try:
        if not readonly:
            remove_unfinished(directory)  # we hold the writer lock: no snapshot of ours is being written

        def new_engine(capacity: bool) -> _core.Engine:
            """capacity False: the smallest engine, to load a snapshot into (which replaces its tables)."""
            fresh = _core.Engine(journal.segment_records_log2, journal.segment, clock=clock,
                                 segment_files=journal.segment_files(), segment_release=journal.segment_release,
                                 **commits.engine_callbacks, **(capacities if capacity else {}))
            engines.append(fresh)
            fresh.map_through(journal.existing_end_position)
            fresh.damage_error = journal.damaged
            return fresh

        engine, recovered_from = _engine_from_snapshot(directory, new_engine, accounts_capacity,
                                                       transfers_capacity)
        _recover(engine, journal, readonly, journal_records_reserved)
        store = Store(engine, journal, directory, durability, commits, recovered_from)
        commits.attach(engine, store.poison)
        journal.poison_with(store.poison)   # a segment that cannot be created is fatal for the handle
        if durability == "os" and not readonly:
            journal.start_flusher(lambda: engine.write_position, store.poison)
        return store
    except BaseException as error:
        release_after_failed_open(engines, journal, commits, error)
        raise


def _memory_store(segment_records_log2: int, clock: Callable[[], int] | None, capacities: dict[str, int],
                  journal_records_reserved: int, grouped: bool, publish: Publish | None) -> Store:
    memory = MemoryJournal(segment_records_log2)
    commits = CommitPipeline(None, writes=False, grouped=grouped, publish=publish)
    callbacks = {name: value for name, value in commits.engine_callbacks.items() if value is not None}
    engine = _core.Engine(segment_records_log2, memory.segment, clock=clock, **callbacks, **capacities)
    engine.map_through(engine.write_position + journal_records_reserved)
    store = Store(engine, memory, None, "memory", commits)
    commits.attach(engine, store.poison)
    return store


def _recover(engine: _core.Engine, journal: FileJournal, readonly: bool, journal_records_reserved: int) -> None:
    """After the snapshot: replay the journal, judge its end, and make the engine ready to write after it."""
    replay_and_recover(engine, journal, readonly)
    report = journal.torn_tail_report()
    if report is not None:
        warnings.warn(report, RuntimeWarning, stacklevel=4)
    journal.begin_writing(engine.write_position)
    engine.provide_segments(journal.held_from)   # the existing segments it writes into next, if any
    if not readonly and journal_records_reserved:
        engine.map_through(engine.write_position + journal_records_reserved)
        journal.reserve(engine.write_position, engine.write_position + journal_records_reserved)
    engine.readonly = readonly


def release_after_failed_open(engines: list[_core.Engine], journal: FileJournal, commits: CommitPipeline,
                              error: BaseException) -> None:
    """Let go of everything a failed open took (the engines' hold on the segments first, then the journal's
    mappings, descriptors and writer lock, then the pipeline's sync thread), so the same process can open the
    directory again. A failure here is attached to the real error as a note and never replaces it."""
    for engine in engines:
        try:
            engine.close()
        except Exception as cleanup_error:  # noqa: BLE001 - reported on the real error
            error.add_note(f"ledger: also failed to close an engine after the failed open: {cleanup_error!r}")
    try:
        journal.close(final_sync=False)
    except Exception as cleanup_error:  # noqa: BLE001 - reported on the real error
        error.add_note(f"ledger: also failed to close the journal after the failed open: {cleanup_error!r}")
    commits.stop()


def replay_and_recover(engine: _core.Engine, journal: FileJournal, readonly: bool) -> None:
    """Replay the journal, then have the journal judge where replay stopped (torn tail or corruption).
    A reader beside a live writer can stop at a batch that is being written, which the writer then commits, with
    more batches after it, before the judgement looks: that is not corruption. Batches are committed in order, so
    the batch at the stop is complete by then: the reader replays on from it. A stop that does not move is judged.
    A writer that commits faster than a judgement takes (tmpfs, where syncs cost nothing) moves every stop on: a
    reader that has seen its stop move READONLY_RECOVERY_ATTEMPTS times takes what it replayed (whole batches,
    every check passed) as the journal's end, as it takes any stop beside a live writer. Damage never moves."""
    reason, position = replay(engine, journal)
    if reason == REPLAY_DAMAGED:
        engine.raise_damage()  # a batch replayed refers to a record from before the snapshot that is damaged
    for _ in range(READONLY_RECOVERY_ATTEMPTS):
        try:
            journal.recover_tail(reason, position, engine.mapped_end)
            return
        except LedgerCorruptError:
            if not readonly:
                raise
            stopped_at = position
            reason, position, _, _ = engine.replay()
            if reason == REPLAY_DAMAGED:
                engine.raise_damage()
            if position == stopped_at:
                raise
    assert readonly and position > stopped_at


def _engine_from_snapshot(directory: str, new_engine: Callable[[bool], _core.Engine], accounts_capacity: int,
                          transfers_capacity: int) -> tuple[_core.Engine, SnapshotInfo | None]:
    """A fresh engine loaded from the newest snapshot that passes its checks and belongs to this journal, with
    room for the capacities asked for. A damaged one is skipped with a warning and an older one (or genesis) is
    used. An engine to load into starts small: allocating the capacities first would fault in memory (4 GB for a
    100M-transfer table) that the snapshot's own tables then replace."""
    base = journal_base(directory)
    for position, snapshot_path in list_snapshots(directory):
        if base is not None and position < base:
            continue   # before the journal's base: its journal is not here to check it against
        engine = new_engine(False)
        try:
            return engine, load_into(snapshot_path, position, engine, accounts_capacity, transfers_capacity,
                                     base=position == base)
        except (LedgerCorruptError, ValueError, OSError) as error:
            if position == base:
                engine.close()
                raise LedgerCorruptError(f"{directory}: the journal begins at position {base} (rejoined from a "
                                         f"snapshot) and its base snapshot fails its checks: {error}") from error
            warnings.warn(f"ledger: snapshot skipped, using an older one or the journal from genesis: {error}",
                          RuntimeWarning, stacklevel=4)
            engine.close()
    if base is not None:
        raise LedgerCorruptError(f"{directory}: the journal begins at position {base} (rejoined from a snapshot) "
                                 f"and its base snapshot {snapshot_path_at(directory, base)} is missing")
    return new_engine(True), None


def replay(engine: _core.Engine, journal: FileJournal) -> tuple[int, int]:
    """engine.replay() to the end of the journal: (stop reason, position). Recovery's longest step (about 10 s per
    100M events), so on a terminal, when much is left, it runs in slices that stop at batch boundaries and draws a
    progress bar; the outcome is the same."""
    start = engine.write_position
    if journal.existing_end_position - start < REPLAY_PROGRESS_RECORDS_MIN or not sys.stderr.isatty():
        reason, position, _, _ = engine.replay()
        return reason, position
    end = journal.records_end(start)
    if end - start < REPLAY_PROGRESS_RECORDS_MIN:
        reason, position, _, _ = engine.replay()
        return reason, position
    with Progress(end - start, "replay", "records") as progress:
        position = start
        while True:
            reason, position, batches, _ = engine.replay(position + REPLAY_SLICE_RECORDS)
            progress.update(position - start)
            if reason != REPLAY_END:
                return reason, position  # torn tail or corruption: the caller decides which
            if batches == 0:
                # The clean end, or a batch longer than a slice: replay() without a bound says which, and
                # replays the rest in one go.
                reason, position, _, _ = engine.replay()
                return reason, position
