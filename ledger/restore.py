"""Point-in-time restore: a new data directory holding the state as of a journal position or a moment.

    ledger restore SNAPSHOT_OR_DIR DEST [--until SEQ | --until-time ISO8601] [--journal DIR]

The new directory gets the journal up to the cut (segment files copied, everything after the cut zeroed) and a
snapshot at or before the cut, so opening it loads that snapshot and replays the rest. Batches are atomic, so the
cut falls on a batch boundary: the last batch whose events are all at or before the requested position (or time)
is the last one kept.

Which snapshot: a named snapshot file is used if its checks pass (header and body checksums, state hash, and it
ends on a batch of this journal) and it is at or before the cut; one after the cut is refused. Given a data
directory, the newest snapshot at or before the cut that passes the checks is used (a damaged one is skipped with
a warning), or none (the restored ledger replays from genesis). The journal is the one in the snapshot's data
directory, or in `--journal DIR`.

Crash safety: everything is built in a temporary directory beside DEST, fsynced (files and directories), then
renamed to DEST (never over anything that appeared at DEST meanwhile: FileExistsError) and the parent directory
fsynced: after a crash DEST is either complete or absent. A restore holds an flock on its temporary directory
(`.DEST.restoring-*`) while it builds; the next restore to the same DEST deletes any such directory nobody holds
(what a killed or crashed restore left, possibly gigabytes) and says so in a warning."""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any, Callable

import ledger
from ledger.errors import LedgerCorruptError
from ledger.format import RECORD_SIZE, SEGMENT_HEADER_BYTES, segment_name
from ledger.moments import At
from ledger.rebuild import fsync_path, remove_abandoned_stagings, rename_no_replace, restore_from_snapshot
from ledger.snapshot import list_snapshots, read_snapshot, write_snapshot

__all__ = ["RestoreResult", "restore", "parse_time", "restore_from_snapshot"]

COPY_CHUNK_BYTES = 16 << 20   # bytes per read/write while copying segments
HEADERS_PER_CALL = 1 << 16    # batch headers fetched per call while looking for the cut

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    destination: str
    cut_position: int
    last_timestamp: int
    snapshot: str | None  # the snapshot file used (its source path), or None: replayed from genesis
    segments_copied: int
    verified: bool


def parse_time(text: str) -> int:
    """--until-time: ISO 8601 with up to 9 fractional digits (`Z`, an offset, or none = UTC) or `NNNns`, to
    integer nanoseconds since the Unix epoch (the engine's timestamps are ns: a cut at microseconds would move
    it)."""
    at = At.parse(text)
    if at.ns is None:
        raise ValueError(f"--until-time takes a time (ISO 8601, or nanoseconds as 123ns), not {text!r}; "
                         f"for a journal position use --until")
    return at.ns


def _journal_directory(source: str, journal: str | None) -> tuple[str, str | None]:
    """(the data directory whose journal to cut, the named snapshot file or None)."""
    if journal is not None and not os.path.isdir(os.path.join(journal, "journal")) \
            and os.path.basename(os.path.normpath(journal)) == "journal":
        journal = os.path.dirname(os.path.normpath(journal)) or "."  # the journal/ folder itself was named
    if os.path.isfile(source):
        directory = journal or os.path.dirname(os.path.dirname(os.path.abspath(source)))
        if journal is None and not os.path.isdir(os.path.join(directory, "journal")):
            raise FileNotFoundError(errno.ENOENT, "this snapshot is not inside a data directory; pass --journal DIR "
                                    "(the data directory whose journal it belongs to)", source)
        return directory, source
    if os.path.isdir(source):
        return journal or source, None
    raise FileNotFoundError(errno.ENOENT, "no such snapshot file or data directory", source)


def _find_cut(handle: ledger.Ledger, until_position: int | None, until_time: int | None) -> tuple[int, int]:
    """(cut position, timestamp of the last kept event, 0 if none): walk the batch headers from genesis."""
    engine = handle.store.engine
    cut, last_timestamp = 1, 0
    while True:
        headers = engine.batch_headers(cut, limit=HEADERS_PER_CALL)
        if not headers:
            return cut, last_timestamp
        for header_position, timestamp, count in headers:
            end = header_position + 1 + count
            batch_last_time = timestamp + count - 1
            if until_position is not None and end - 1 > until_position:
                return cut, last_timestamp
            if until_time is not None and batch_last_time > until_time:
                return cut, last_timestamp
            cut, last_timestamp = end, batch_last_time


def _checked_snapshot(path: str, handle: ledger.Ledger, cut: int) -> tuple[dict[str, int], dict[str, Any]]:
    """Read a snapshot (checksums and state hash checked) and check that it fits the journal before the cut."""
    scalars, arrays, _ = read_snapshot(path)
    position = scalars["write_position"]
    if position > cut:
        raise ValueError(f"snapshot {path} is at journal position {position}, after the cut at {cut}: name an "
                         f"earlier snapshot, or the data directory")
    journal = handle.store.journal
    if scalars["segment_records_log2"] != journal.segment_records_log2 or not handle.store.engine.check_batch_end(
            scalars["last_header_position"], position, scalars["last_checksum"]):
        raise ValueError(f"snapshot {path} does not belong to the journal in {journal.directory}: it has no batch "
                         f"ending at position {position} with the snapshot's checksum")
    return scalars, arrays


def _choose_snapshot(source: str, named: str | None, handle: ledger.Ledger, cut: int
                     ) -> tuple[str, dict[str, int], dict[str, Any]] | None:
    """The named snapshot (its errors raise), or the newest good one at or before the cut in `source`."""
    if named is not None:
        return (named, *_checked_snapshot(named, handle, cut))
    for position, path in list_snapshots(source):
        if position > cut:
            continue
        try:
            return (path, *_checked_snapshot(path, handle, cut))
        except (LedgerCorruptError, ValueError, OSError) as error:
            warnings.warn(f"ledger: snapshot skipped, using an older one or the journal from genesis: {error}",
                          RuntimeWarning, stacklevel=3)
    return None


def _copy_segment(source_path: str, target_path: str, keep_bytes: int, segment_bytes: int) -> None:
    """Copy the first `keep_bytes` of a segment file, write zeros up to its full size, fsync."""
    assert SEGMENT_HEADER_BYTES <= keep_bytes <= segment_bytes
    zeros = bytes(COPY_CHUNK_BYTES)
    with open(source_path, "rb") as source, open(target_path, "xb") as target:
        copied = 0
        while copied < keep_bytes:
            chunk = source.read(min(COPY_CHUNK_BYTES, keep_bytes - copied))
            if not chunk:
                raise LedgerCorruptError(f"{source_path}: shorter than its segment size")
            target.write(chunk)
            copied += len(chunk)
        while copied < segment_bytes:
            length = min(COPY_CHUNK_BYTES, segment_bytes - copied)
            target.write(zeros[:length])
            copied += length
        target.flush()
        os.fsync(target.fileno())


def _build(staging: str, handle: ledger.Ledger, cut: int, chosen: tuple[str, dict, dict] | None,
           progress: Progress | None) -> int:
    """Write the journal up to the cut and the chosen snapshot into `staging`, all fsynced; return the number of
    segments copied."""
    journal = handle.store.journal
    records_log2 = journal.segment_records_log2
    segments = ((cut - 1) >> records_log2) + 1  # the segments holding positions 0 .. cut - 1
    assert 1 <= segments <= journal.existing, "the cut is past the journal's segment files"
    os.mkdir(os.path.join(staging, "journal"), 0o700)
    total = segments * journal.segment_bytes
    for index in range(segments):
        kept_records = min(1 << records_log2, cut - (index << records_log2))
        _copy_segment(os.path.join(journal.journal_directory, segment_name(index)),
                      os.path.join(staging, "journal", segment_name(index)),
                      SEGMENT_HEADER_BYTES + kept_records * RECORD_SIZE, journal.segment_bytes)
        if progress is not None:
            progress((index + 1) * journal.segment_bytes, total)
    fsync_path(os.path.join(staging, "journal"))
    if chosen is not None:
        _, scalars, arrays = chosen
        write_snapshot(staging, scalars, arrays, keep=1, stall_seconds=0.0)  # fsyncs the file and its folder
    fsync_path(staging)
    return segments


def restore(source: str, destination: str, until_position: int | None = None, until_time: int | None = None,
            progress: Progress | None = None, journal: str | None = None) -> RestoreResult:
    """Build `destination` (must not exist) from `source` (a data directory or a snapshot file) and the journal
    (of `journal`, a data directory, or the source's) up to the cut; then open and verify it."""
    if until_position is not None and until_position < 0:
        raise ValueError(f"until_position must be >= 0, got {until_position}")
    if until_position is not None and until_time is not None:
        raise ValueError("give until_position or until_time, not both")
    directory, named = _journal_directory(source, journal)
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, "exists; restore builds a new directory", destination)
    parent = os.path.dirname(os.path.abspath(destination))
    prefix = f".{os.path.basename(os.path.abspath(destination))}.restoring-"
    remove_abandoned_stagings(parent, prefix)
    with ledger.open(directory, readonly=True) as handle:
        cut, last_timestamp = _find_cut(handle, until_position, until_time)
        chosen = _choose_snapshot(source, named, handle, cut)
        staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
        staging_fd = -1
        try:
            staging_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(staging_fd, fcntl.LOCK_EX)   # held until it is DEST or gone: "this restore is alive"
            segments = _build(staging, handle, cut, chosen, progress)
            rename_no_replace(staging, destination)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            if staging_fd >= 0:
                os.close(staging_fd)
    fsync_path(parent)
    with ledger.open(destination) as restored:
        if restored.stats()["journal_position"] != cut:   # what was copied did not read back as written
            raise LedgerCorruptError(f"{destination}: the restored journal ends at journal position "
                                     f"{restored.stats()['journal_position']}, not at the cut {cut}")
        verified = restored.verify().ok
    return RestoreResult(destination, cut, last_timestamp, chosen[0] if chosen else None, segments, verified)


def print_progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        width = 40
        filled = int(width * done / max(total, 1))
        print(f"\rrestore [{'#' * filled}{'.' * (width - filled)}] {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB",
              end="" if done < total else "\n", file=sys.stderr, flush=True)
