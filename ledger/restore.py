"""Point-in-time restore: a new data directory holding the state as of a journal position or a moment.

    ledger restore SNAPSHOT_OR_DIR DEST [--until SEQ | --until-time ISO8601]

The new directory gets the journal up to the cut (segment files copied, everything after the cut zeroed) and the
newest snapshot at or before the cut, so opening it loads that snapshot and replays the rest. Batches are atomic,
so the cut falls on a batch boundary: the last batch whose events are all at or before the requested position
(or time) is the last one kept."""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import sys
from typing import Callable

import ledger
from ledger.journal import RECORD_SIZE, SEGMENT_HEADER_BYTES, segment_name
from ledger.snapshot import list_snapshots

__all__ = ["RestoreResult", "restore", "parse_time"]


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    destination: str
    cut_position: int
    last_timestamp: int
    snapshot: str | None
    segments_copied: int
    verified: bool


def parse_time(text: str) -> int:
    """ISO 8601 (naive = UTC) to integer nanoseconds since the Unix epoch."""
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    delta = moment - epoch
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _source_directory(source: str) -> str:
    """Accept a data directory or a snapshot file inside <dir>/snapshots/."""
    if os.path.isfile(source):
        return os.path.dirname(os.path.dirname(os.path.abspath(source)))
    return source


def _find_cut(handle: ledger.Ledger, start: int, until_position: int | None, until_time: int | None) -> tuple[int, int]:
    """(cut position, timestamp of the last kept event): walk batch headers from `start`, a header position."""
    engine = handle._engine
    cut, last_timestamp = start, 0
    position = start
    while True:
        headers = engine.batch_headers(position, limit=1 << 16)
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
        position = cut


def restore(source: str, destination: str, until_position: int | None = None, until_time: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> RestoreResult:
    """Build `destination` (must not exist) from `source` up to the cut; open and verify it."""
    directory = _source_directory(source)
    if os.path.exists(destination):
        raise FileExistsError(f"{destination} exists; restore builds a new directory")
    with ledger.open(directory, readonly=True) as handle:
        journal = handle._journal
        records_log2 = journal.segment_records_log2
        # Newest snapshot at or before the cut: find the cut from genesis positions, then pick the snapshot.
        cut, last_timestamp = _find_cut(handle, 1, until_position, until_time)
        chosen = next(((position, path) for position, path in list_snapshots(directory) if position <= cut), None)
        segments = max(1, ((cut - 1) >> records_log2) + 1) if cut > 1 else 1
        segments = min(segments, journal.existing)
        os.makedirs(os.path.join(destination, "journal"), mode=0o700)
        total = segments * journal.segment_bytes
        for index in range(segments):
            source_path = os.path.join(journal.journal_directory, segment_name(index))
            target_path = os.path.join(destination, "journal", segment_name(index))
            shutil.copyfile(source_path, target_path)
            if progress is not None:
                progress((index + 1) * journal.segment_bytes, total)
        # Zero everything after the cut in the last copied segment, so the journal ends exactly there.
        last_path = os.path.join(destination, "journal", segment_name(segments - 1))
        first_zero = cut - ((segments - 1) << records_log2)
        with open(last_path, "r+b") as file:
            length = ((1 << records_log2) - first_zero) * RECORD_SIZE
            if length > 0:
                file.seek(SEGMENT_HEADER_BYTES + first_zero * RECORD_SIZE)
                chunk = bytes(min(length, 16 << 20))
                while length > 0:
                    file.write(chunk[:min(length, len(chunk))])
                    length -= min(length, len(chunk))
            file.flush()
            os.fsync(file.fileno())
        if chosen is not None:
            os.makedirs(os.path.join(destination, "snapshots"), mode=0o700)
            shutil.copyfile(chosen[1], os.path.join(destination, "snapshots", os.path.basename(chosen[1])))
    with ledger.open(destination) as restored:
        assert restored.stats()["journal_position"] == cut, "restored journal does not end at the cut"
        verified = restored.verify().ok
    return RestoreResult(destination, cut, last_timestamp, chosen[1] if chosen else None, segments, verified)


def print_progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        width = 40
        filled = int(width * done / max(total, 1))
        print(f"\rrestore [{'#' * filled}{'.' * (width - filled)}] {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB",
              end="" if done < total else "\n", file=sys.stderr, flush=True)

