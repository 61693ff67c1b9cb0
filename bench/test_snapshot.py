"""Snapshot write and load for 10M accounts, and recovery from snapshot + journal tail.

Run: pytest bench/test_snapshot.py --benchmark-only   (not part of the CI test run).
LEDGER_BENCH_RECOVERY_EVENTS sets the journal size of the recovery benchmark (default 100M, as the issue asks;
it needs ~7 GB of disk and a few minutes to build)."""
from __future__ import annotations

import os
import time

import pytest

import ledger
from workload import TransferStream, funded_ledger

ACCOUNTS = 10_000_000


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

    def load():
        with ledger.open(directory) as reopened:
            assert reopened.recovered_from is not None
            return reopened.recovered_from.write_seconds

    benchmark.pedantic(load, rounds=3, iterations=1)
    benchmark.extra_info["snapshot_load_seconds"] = round(load(), 3)


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
