"""Time-ordered 64-bit ids.

The id tables keep ids that differ only in their low bits in neighbouring slots (see `ledger_home_slot` in
`_core_helpers.h`), so ids handed out in increasing order, as this generator does, are inserted and found with
cache hits instead of a miss per transfer. Random ids work but cost more (bench/RESULTS.md has the figures).

Layout: 42 bits of milliseconds since 2024-01-01T00:00:00Z (good until the year 2163), then 22 bits of sequence
within the millisecond, of which the top `node_bits` name the generating node (process) so that nodes never collide.
Ids are strictly increasing per generator even when the wall clock steps back: the generator then borrows from
the future, as TigerBeetle's id() does.
"""
from __future__ import annotations

import threading
import time

import numpy as np

__all__ = ["IdGenerator", "EPOCH_MS"]

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
SEQUENCE_BITS = 22
MILLISECONDS_BITS = 64 - SEQUENCE_BITS


class IdGenerator:
    """Thread-safe, strictly increasing, time-ordered ids; `node` in [0, 2**node_bits) keeps processes apart."""

    def __init__(self, node: int = 0, node_bits: int = 0) -> None:
        if not 0 <= node_bits <= 16:
            raise ValueError(f"node_bits must be in [0, 16], got {node_bits}")
        if not 0 <= node < (1 << node_bits) or (node_bits == 0 and node != 0):
            raise ValueError(f"node must be in [0, {1 << node_bits}), got {node}")
        self._counter_bits = SEQUENCE_BITS - node_bits
        self._node_part = node << self._counter_bits
        self._counter_max = (1 << self._counter_bits) - 1
        self._milliseconds = 0
        self._counter = -1
        self._lock = threading.Lock()

    def _advance(self, count: int) -> tuple[int, int]:
        """Reserve `count` consecutive counter values; returns (milliseconds, first counter)."""
        now = time.time_ns() // 1_000_000 - EPOCH_MS
        if now > self._milliseconds:
            self._milliseconds = now
            self._counter = -1
        if self._counter + count > self._counter_max:
            self._milliseconds += 1  # borrow the next millisecond: stays increasing, stays unique
            self._counter = -1
        first = self._counter + 1
        self._counter += count
        if self._milliseconds >= 1 << MILLISECONDS_BITS:
            raise OverflowError("id time component exhausted")
        return self._milliseconds, first

    def __call__(self) -> int:
        with self._lock:
            milliseconds, counter = self._advance(1)
        return (milliseconds << SEQUENCE_BITS) | self._node_part | counter

    def batch(self, count: int) -> np.ndarray:
        """`count` increasing ids as a uint64 array (consecutive integers within each millisecond block)."""
        if count < 0:
            raise ValueError("count must be >= 0")
        out = np.empty(count, np.uint64)
        done = 0
        with self._lock:
            while done < count:
                take = min(count - done, self._counter_max + 1)
                milliseconds, first = self._advance(take)
                base = (milliseconds << SEQUENCE_BITS) | self._node_part | first
                out[done:done + take] = np.arange(base, base + take, dtype=np.uint64)
                done += take
        return out
