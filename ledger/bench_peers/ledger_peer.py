"""`ledger` itself: batches of TRANSFER_DTYPE rows through `transfers()`, or one `transfer()` call per transfer;
plus the per-call latency of single calls and small batches.

The ledger is opened with accounts_capacity / transfers_capacity / journal_records_reserved for the whole run (as
bench/workload.py does), the documented way to avoid a rehash pause or page faults mid-run. The read-back for the
cross-check reopens the directory (recovery by journal replay), so what is compared is what the journal recorded."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

import ledger
from ledger.bench_peers.workload import PeerState, Workload, create_funded_accounts, ledger_state, transfer_rows

DURABILITY_WORDS = {"fsync": "fsync (durable)", "os": "os (page cache)"}


def open_funded(workload: Workload, directory: Path, durability: str, extra_transfers: int) -> ledger.Ledger:
    # Room for every account, transfer and journal record of the run, allocated at open (set-up, not timed), as
    # a service that knows its size would, and as TigerBeetle formats its data file before it starts.
    handle = ledger.open(directory, create=True, durability=durability,
                         accounts_capacity=workload.account_count + 1,
                         transfers_capacity=workload.account_count + extra_transfers,
                         journal_records_reserved=2 * workload.account_count + extra_transfers + (1 << 16))
    create_funded_accounts(handle, workload)
    return handle


class _LedgerPeer:
    """What both ledger rows share: a funded ledger with room for the run, read back by reopening it."""

    group = "ledger"
    durability: str

    def open(self, workload: Workload, directory: Path) -> None:
        self.workload = workload
        self.directory = directory
        self.done = 0
        self.handle = open_funded(workload, directory, self.durability, workload.transfer_count)

    def state(self) -> PeerState:
        return reopened_state(self, self.workload, self.directory, self.done)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class LedgerBatchPeer(_LedgerPeer):
    per_commit = False
    commit_unit = "batch"

    def __init__(self, batch_size: int, durability: str) -> None:
        assert batch_size >= 1 and durability in DURABILITY_WORDS
        self.step_size = batch_size
        self.durability = durability
        self.durable = durability == "fsync"
        self.label = f"ledger transfers(), batch of {batch_size:,}, durability={DURABILITY_WORDS[durability]}"
        self.handle: ledger.Ledger | None = None

    def apply(self, start: int, stop: int) -> None:
        self.handle.transfers(transfer_rows(self.workload, start, stop))
        self.done = stop


class LedgerSinglePeer(_LedgerPeer):
    """One `transfer()` call per transfer. With durability="fsync" every call syncs: capped like the other
    per-transfer-commit peers."""

    step_size = 8_192

    def __init__(self, durability: str) -> None:
        assert durability in DURABILITY_WORDS
        self.durability = durability
        self.per_commit = durability == "fsync"
        self.commit_unit = "transfer"
        self.durable = durability == "fsync"
        if self.per_commit:
            self.step_size = 256
        self.label = f"ledger transfer(), one call per transfer, durability={DURABILITY_WORDS[durability]}"
        self.handle: ledger.Ledger | None = None

    def apply(self, start: int, stop: int) -> None:
        transfer = self.handle.transfer
        for id, debit, credit, amount in zip(*self.workload.columns(start, stop)):
            transfer(id, debit, credit, amount)
        self.done = stop


def reopened_state(peer: _LedgerPeer, workload: Workload, directory: Path,
                   done: int) -> PeerState:
    peer.close()
    with ledger.open(directory, readonly=True) as reopened:
        return ledger_state(reopened, workload, done)


@dataclasses.dataclass
class LatencyResult:
    label: str
    batch_size: int  # 0: single transfer() calls
    durability: str
    calls: int
    p50_us: float
    p99_us: float
    p999_us: float
    transfers_per_second: float  # batch_size (or 1) * calls / total time of the calls

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def measure_latency(workload: Workload, directory: Path, batch_size: int, durability: str, calls_max: int,
                    seconds_max: float) -> LatencyResult:
    """Time each call on its own (perf_counter_ns around it) for up to calls_max calls or seconds_max seconds.
    batch_size 0 means single transfer() calls. Transfers cycle through the workload under fresh ids."""
    assert batch_size >= 0 and calls_max >= 1 and seconds_max > 0
    per_call = max(batch_size, 1)
    timings = np.empty(calls_max, np.int64)
    handle = open_funded(workload, directory, durability, calls_max * per_call)
    try:
        calls = _timed_calls(handle, workload, batch_size, timings, seconds_max)
    finally:
        handle.close()
    samples = timings[:calls] / 1_000
    p50, p99, p999 = np.percentile(samples, [50, 99, 99.9])
    what = "transfer()" if batch_size == 0 else f"transfers(), batch of {batch_size}"
    return LatencyResult(label=f"{what}, durability={durability}", batch_size=batch_size, durability=durability,
                         calls=calls, p50_us=float(p50), p99_us=float(p99), p999_us=float(p999),
                         transfers_per_second=per_call * calls / (samples.sum() / 1e6))


def _timed_calls(handle: ledger.Ledger, workload: Workload, batch_size: int, timings: np.ndarray,
                 seconds_max: float) -> int:
    per_call = max(batch_size, 1)
    count = workload.transfer_count
    deadline = time.perf_counter() + seconds_max
    clock = time.perf_counter_ns
    for call in range(timings.size):
        start = (call * per_call) % count
        stop = min(count, start + per_call)
        if batch_size == 0:
            id, debit, credit, amount = (int(column[start]) for column in (
                workload.transfer_ids, workload.debit_accounts, workload.credit_accounts, workload.amounts))
            id += (call // count + 1) * count  # a fresh id on every lap through the workload
            began = clock()
            handle.transfer(id, debit, credit, amount)
            timings[call] = clock() - began
        else:
            rows = transfer_rows(workload, start, stop)
            rows["id"] += np.uint64((call * per_call // count + 1) * count)
            began = clock()
            handle.transfers(rows)
            timings[call] = clock() - began
        if call % 64 == 63 and time.perf_counter() > deadline:
            return call + 1
    return timings.size
