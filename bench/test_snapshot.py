"""Snapshot write and load for 10M accounts, and recovery from snapshot + journal tail.

Run: pytest bench/test_snapshot.py --benchmark-only   (not part of the CI test run).
LEDGER_BENCH_RECOVERY_EVENTS sets the journal size of the recovery benchmark (default 100M, as the issue asks;
it needs ~7 GB of disk and a few minutes to build). LEDGER_BENCH_SNAPSHOT_ACCOUNTS sets the account count of the
writer-while-snapshotting benchmark (default 10M)."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

import ledger
from workload import TransferStream, funded_ledger

ACCOUNTS = 10_000_000
CONCURRENT_ACCOUNTS = int(os.environ.get("LEDGER_BENCH_SNAPSHOT_ACCOUNTS", ACCOUNTS))
CONCURRENT_BATCH = 8192
CONCURRENT_TRANSFERS_MAX = 8_000_000    # room allocated up front, so no table growth disturbs the figures
BASELINE_SECONDS = 1.0
FIRST_TRANSFER_ID = 1 << 40             # clear of the funding transfers' ids


@pytest.fixture(scope="module")
def ten_million(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("snap") / "data")
    handle = funded_ledger(ACCOUNTS, path=directory, durability="os", transfers_capacity=1_000_000)
    yield handle, directory
    handle.close()


def test_snapshot_write_10M_accounts(benchmark, ten_million):
    handle, _ = ten_million
    infos = []

    def write():
        infos.append(handle.snapshot(keep=2))

    benchmark.pedantic(write, rounds=3, iterations=1)
    info = infos[-1]
    benchmark.extra_info.update(bytes=info.bytes, writer_stall_seconds=round(info.stall_seconds, 4),
                                write_seconds=round(info.write_seconds, 3))


def test_snapshot_load_10M_accounts(benchmark, ten_million):
    handle, directory = ten_million
    handle.snapshot(keep=2)
    handle.close()

    loads = []

    def open_and_close():
        with ledger.open(directory) as reopened:
            assert reopened.recovered_from is not None
            loads.append(reopened.recovered_from.write_seconds)

    # Timed: the whole open (journal mapping and tail check included) and close; the load itself (reading and
    # checking the snapshot into the engine) is reported per round.
    benchmark.pedantic(open_and_close, rounds=3, iterations=1)
    benchmark.extra_info["snapshot_load_seconds"] = [round(seconds, 3) for seconds in loads]


def test_recovery_from_snapshot_and_tail(benchmark, tmp_path):
    events = int(os.environ.get("LEDGER_BENCH_RECOVERY_EVENTS", 100_000_000))
    directory = str(tmp_path / "data")
    handle = funded_ledger(100_000, path=directory, durability="os", transfers_capacity=events)
    stream = TransferStream(100_000, 1 << 20)
    written = 0
    started = time.perf_counter()
    while written < events:
        handle.transfers(stream.batch())
        written += 1 << 20
        if written == (events // 2) // (1 << 20) * (1 << 20):
            handle.snapshot()
    build_seconds = time.perf_counter() - started
    position = handle.stats()["journal_position"]
    handle.close()

    def reopen():
        with ledger.open(directory, transfers_capacity=events + 200_000) as reopened:
            return reopened.stats()["journal_position"]

    assert benchmark.pedantic(reopen, rounds=2, iterations=1) == position
    benchmark.extra_info.update(events=position, build_seconds=round(build_seconds, 1),
                                recovery_seconds=round(benchmark.stats.stats.median, 3))


def _apply(handle: ledger.Ledger, pool: list, next_id: int, keep_going) -> tuple[int, float, int]:
    """Apply batches from `pool` (fresh ids each time) while keep_going(transfers applied) holds:
    (transfers, seconds, next id)."""
    started = time.perf_counter()
    applied = 0
    while keep_going(applied) and applied + CONCURRENT_BATCH <= CONCURRENT_TRANSFERS_MAX // 2:
        rows = pool[(applied // CONCURRENT_BATCH) % len(pool)]
        rows["id"] = np.arange(next_id, next_id + CONCURRENT_BATCH, dtype=np.uint64)
        next_id += CONCURRENT_BATCH
        handle.transfers(rows)
        applied += CONCURRENT_BATCH
    return applied, time.perf_counter() - started, next_id


def test_writer_throughput_while_the_child_writes(benchmark, tmp_path):
    """The writer's transfers/s alone, then while a forked child writes a snapshot (snapshot(wait=False)): what
    copy-on-write page faults and sharing the CPUs and the disk with the child cost the writer."""
    handle = funded_ledger(CONCURRENT_ACCOUNTS, path=str(tmp_path / "data"), durability="os",
                           transfers_capacity=CONCURRENT_TRANSFERS_MAX)
    stream = TransferStream(CONCURRENT_ACCOUNTS, CONCURRENT_BATCH)
    pool = [stream.batch() for _ in range(32)]
    deadline = time.perf_counter() + BASELINE_SECONDS
    alone, alone_seconds, next_id = _apply(handle, pool, FIRST_TRANSFER_ID,
                                           lambda applied: time.perf_counter() < deadline)
    outcome = {}

    def during_snapshot():
        job = handle.snapshot(wait=False)
        applied, seconds, _ = _apply(handle, pool, next_id, lambda applied: not job.done())
        outcome.update(info=job.wait(), applied=applied, seconds=seconds)

    benchmark.pedantic(during_snapshot, rounds=1, iterations=1)
    handle.close()
    info = outcome["info"]
    assert outcome["applied"] > 0, "the writer applied nothing while the child wrote"
    alone_rate = alone / alone_seconds
    during_rate = outcome["applied"] / outcome["seconds"]
    benchmark.extra_info.update(accounts=CONCURRENT_ACCOUNTS, snapshot_bytes=info.bytes,
                                writer_stall_seconds=round(info.stall_seconds, 4),
                                child_write_seconds=round(info.write_seconds, 3),
                                transfers_per_second_alone=round(alone_rate),
                                transfers_per_second_during_snapshot=round(during_rate),
                                during_over_alone=round(during_rate / alone_rate, 3))
