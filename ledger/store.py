"""The internal tier under `ledger.Ledger`: a `Store` owns one ledger's engine, journal and commit pipeline, knows
how to poison and close them, and `open_store` builds one, recovering at open (newest good snapshot + journal
replay, torn tail truncated, corruption refused).

`ledger.api` is the public face over it (argument checks, result types); the ring server, audit, history,
restore and scrub work on a Store. A Ledger hands its own out as one documented attribute, `Ledger.store`,
rather than each of those modules taking a Store beside the handle: the public functions of history
(`ledger.balance_at(handle, ...)`) take a Ledger, and an attribute keeps them and the handle's methods on one
path without widening any public signature."""
from __future__ import annotations

import operator
import os
import sys
import warnings
from typing import Any, Callable

from ledger import _core
from ledger.commit import CommitPipeline, Publish
from ledger.errors import LedgerCorruptError
from ledger.format import REPLAY_DAMAGED, REPLAY_END
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
from ledger.snapshot import SnapshotInfo, list_snapshots, load_into, remove_unfinished

__all__ = ["DURABILITY_MODES", "READONLY_RECOVERY_ATTEMPTS", "Store", "open_store"]

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
    for position, snapshot_path in list_snapshots(directory):
        engine = new_engine(False)
        try:
            return engine, load_into(snapshot_path, position, engine, accounts_capacity, transfers_capacity)
        except (LedgerCorruptError, ValueError, OSError) as error:
            warnings.warn(f"ledger: snapshot skipped, using an older one or the journal from genesis: {error}",
                          RuntimeWarning, stacklevel=4)
            engine.close()
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
