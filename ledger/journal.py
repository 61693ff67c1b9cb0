"""Where the core's journal memory comes from. This module decides I/O policy; the core only writes records."""
from __future__ import annotations

import mmap
import threading

from ledger.memory import anonymous_buffer

__all__ = ["MemoryJournal", "RECORD_SIZE", "SEGMENT_RECORDS_LOG2_DEFAULT"]

RECORD_SIZE = 64
SEGMENT_RECORDS_LOG2_DEFAULT = 20  # 2**20 records of 64 bytes = 64 MiB per segment


class MemoryJournal:
    """Journal segments in anonymous memory. Nothing survives the process: this is `ledger.open(None)`.

    The next segment is prepared (mapped and faulted in) by a background thread while the current one fills, so
    the writer does not pay first-touch page faults in its loop."""

    durability = "memory"
    after_commit = None

    def __init__(self, segment_records_log2: int = SEGMENT_RECORDS_LOG2_DEFAULT) -> None:
        self.segment_records_log2 = segment_records_log2
        self.segment_bytes = RECORD_SIZE << segment_records_log2
        self.segments: list[mmap.mmap] = []
        self._spare: mmap.mmap | None = None
        self._preparing: threading.Thread | None = None

    def _prepare(self) -> None:
        self._spare = anonymous_buffer(self.segment_bytes)

    def segment(self, index: int) -> mmap.mmap:
        assert index == len(self.segments), "segments are handed out in order"
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None
        buffer = self._spare if self._spare is not None else anonymous_buffer(self.segment_bytes)
        self._spare = None
        self.segments.append(buffer)
        self._preparing = threading.Thread(target=self._prepare, name="ledger-segment-prepare", daemon=True)
        self._preparing.start()
        return buffer

    def close(self) -> None:
        if self._preparing is not None:
            self._preparing.join()
        for segment in self.segments:
            segment.close()
        self.segments = []
        if self._spare is not None:
            self._spare.close()
            self._spare = None
