"""Durable throughput of the journal and recovery (replay) rate, beside the machine's own disk limit measured
in the same run.

Run: pytest bench/test_journal.py --benchmark-only   (not part of the CI test run)."""
from __future__ import annotations


import pytest

import ledger
from workload import TransferStream, funded_ledger

ACCOUNTS = 100_000
RECORD_BYTES = 64


def disk_probe(directory: str, chunk_bytes: int, total_bytes: int = 512 << 20) -> float:
    """Bytes/s of sequential writes with fdatasync after every chunk into a preallocated, zero-filled file: the
    same probe `ledger bench` runs (ledger.bench_command.disk_limit)."""
    from pathlib import Path

    from ledger.bench_command import RECORD_BYTES as BYTES_PER_RECORD, disk_limit
    limit = disk_limit(Path(directory), chunk_bytes // BYTES_PER_RECORD, total_bytes)
    return limit["records_per_second"] * BYTES_PER_RECORD


@pytest.mark.parametrize("batch_size", [1_024, 8_192, 65_536])
@pytest.mark.parametrize("durability", ["fsync", "os"])
def test_durable_batches(benchmark, tmp_path, batch_size, durability):
    if durability == "os" and batch_size != 8_192:
        pytest.skip("os mode measured at 8k")
    batches_per_round = max(1, 1_000_000 // batch_size)
    rounds = 5
    handle = funded_ledger(ACCOUNTS, path=str(tmp_path / "data"), durability=durability,
                           transfers_capacity=(rounds + 1) * batches_per_round * batch_size)
    stream = TransferStream(ACCOUNTS, batch_size)
    prepared = [[stream.batch() for _ in range(batches_per_round)] for _ in range(rounds + 1)]

    rejected = []   # result arrays with a non-OK code: a rate of rejections is no rate

    def run(batches):
        for batch in batches:
            codes = handle.transfers(batch)
            if codes.any():
                rejected.append(codes)

    iterator = iter(prepared)
    benchmark.pedantic(run, setup=lambda: ((next(iterator),), {}), rounds=rounds, iterations=1, warmup_rounds=1)
    handle.close()
    assert not rejected, f"{len(rejected)} batches had rejected transfers, e.g. codes {set(rejected[0].tolist())}"
    transfers = batches_per_round * batch_size
    rate = transfers / benchmark.stats.stats.median
    disk = disk_probe(str(tmp_path), batch_size * RECORD_BYTES)
    benchmark.extra_info.update(
        transfers_per_second=round(rate),
        disk_bytes_per_second_same_chunk=round(disk),
        disk_limit_events_per_second=round(disk / RECORD_BYTES),
        fraction_of_disk_limit=round(rate * RECORD_BYTES / disk, 3),
    )


def test_recovery_replay(benchmark, tmp_path):
    """Reopen a journal of 10M transfer events (8k batches): replay rate in events/s."""
    directory = str(tmp_path / "data")
    total = 10_000_000
    batch_size = 65_536
    handle = funded_ledger(ACCOUNTS, path=directory, durability="os", transfers_capacity=total)
    stream = TransferStream(ACCOUNTS, batch_size)
    written = 0
    while written < total:
        codes = handle.transfers(stream.batch())
        assert not codes.any(), f"rejected transfers in the journal to replay: codes {set(codes.tolist())}"
        written += batch_size
    events = handle.stats()["journal_position"]
    handle.close()

    def reopen():
        with ledger.open(directory, transfers_capacity=total + ACCOUNTS) as reopened:
            return reopened.stats()["journal_position"]

    assert benchmark.pedantic(reopen, rounds=3, iterations=1, warmup_rounds=1) == events
    benchmark.extra_info["events"] = events
    benchmark.extra_info["events_per_second"] = round(events / benchmark.stats.stats.median)
