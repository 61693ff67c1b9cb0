"""Apply rate of the core, in memory (no journal sync): batch transfers/s and single-call transfer()/s.

Run: pytest bench/test_core.py --benchmark-only   (not part of the CI test run)."""
from __future__ import annotations

import numpy as np
import pytest

import ledger
from workload import FIRST_ACCOUNT_ID, TransferStream, funded_ledger

BATCH_SIZE = 1_000_000
_ledgers: dict[int, ledger.Ledger] = {}


def ledger_with(account_count: int) -> ledger.Ledger:
    # One funded ledger per size for the whole session: funding 10M accounts takes seconds.
    if account_count not in _ledgers:
        for handle in _ledgers.values():
            handle.close()
        _ledgers.clear()
        _ledgers[account_count] = funded_ledger(account_count, transfers_capacity=20 * BATCH_SIZE)
    return _ledgers[account_count]


def measure(benchmark, handle, stream):
    results = []

    def setup():
        return (stream.batch(),), {}

    def apply(batch):
        results.append(handle.transfers(batch))

    benchmark.pedantic(apply, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
    codes = np.concatenate(results)
    assert (codes == ledger.TransferResult.OK).all(), np.bincount(codes)
    benchmark.extra_info["transfers_per_second"] = round(BATCH_SIZE / benchmark.stats.stats.median)
    benchmark.extra_info["batch_size"] = BATCH_SIZE


@pytest.mark.parametrize("hot", [False, True], ids=["uniform", "hot"])
@pytest.mark.parametrize("account_count", [100_000, 10_000_000], ids=["100k_accounts", "10M_accounts"])
def test_batch_apply(benchmark, account_count, hot):
    """Time-ordered transfer ids (ledger.IdGenerator's kind), as recommended."""
    handle = ledger_with(account_count)
    stream = TransferStream(account_count, BATCH_SIZE, hot=hot, seed=account_count + hot)
    stream.next_id = 1 + handle.stats()["transfers"] * 2  # fresh ids on every parametrisation
    measure(benchmark, handle, stream)


def test_batch_apply_random_ids(benchmark):
    """Uniformly random 64-bit transfer ids in a ledger of their own: what ignoring the id advice costs."""
    for handle in _ledgers.values():
        handle.close()
    _ledgers.clear()
    handle = funded_ledger(100_000, transfers_capacity=8 * BATCH_SIZE)
    measure(benchmark, handle, TransferStream(100_000, BATCH_SIZE, random_ids=True, seed=99))
    handle.close()


def test_single_call(benchmark):
    handle = ledger_with(100_000)
    count = 200_000
    rng = np.random.default_rng(3)
    debit = (FIRST_ACCOUNT_ID + rng.integers(0, 100_000, count)).tolist()
    credit = (FIRST_ACCOUNT_ID + (rng.integers(1, 100_000, count))).tolist()
    credit = [c if c != d else d + 1 for c, d in zip(credit, debit)]
    credit = [c if c < FIRST_ACCOUNT_ID + 100_000 else FIRST_ACCOUNT_ID for c in credit]
    next_id = [10**15]

    def run():
        transfer = handle.transfer
        base = next_id[0]
        next_id[0] += count
        ok = 0
        for i in range(count):
            ok += transfer(base + i, debit[i], credit[i], 1) == 0
        return ok

    ok = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert ok == count
    benchmark.extra_info["transfers_per_second"] = round(count / benchmark.stats.stats.median)
