"""Shared set-up for the benchmarks: ledgers with funded accounts and pre-built transfer batches, so that what
is timed is the engine and nothing else."""
from __future__ import annotations

import numpy as np
import ledger

SETTLEMENT_ID = 1
FIRST_ACCOUNT_ID = 1_000
OPENING_BALANCE = 10**9


def funded_ledger(account_count: int, path=None, durability: str = "fsync", transfers_capacity: int = 0,
                  **open_options) -> ledger.Ledger:
    """A ledger with a settlement account and `account_count` accounts each funded with OPENING_BALANCE.
    Room for `transfers_capacity` more transfers is allocated up front, journal memory included."""
    open_options.update(accounts_capacity=account_count + 1, transfers_capacity=account_count + transfers_capacity)
    open_options.setdefault("journal_records_reserved", 2 * account_count + transfers_capacity + (1 << 20))
    if path:
        handle = ledger.open(path, create=True, durability=durability, **open_options)
    else:
        handle = ledger.open(None, **open_options)
    assert handle.create_account(SETTLEMENT_ID, min_balance=ledger.BALANCE_MIN) == ledger.AccountResult.OK
    ids = np.arange(FIRST_ACCOUNT_ID, FIRST_ACCOUNT_ID + account_count, dtype=np.uint64)
    for start in range(0, account_count, 1 << 20):
        chunk = ids[start:start + (1 << 20)]
        accounts = ledger.accounts_batch(chunk.size)
        accounts["id"] = chunk
        assert not handle.create_accounts(accounts).any()
        funding = ledger.transfers_batch(chunk.size)
        funding["id"] = (1 << 62) + chunk
        funding["debit_account"] = SETTLEMENT_ID
        funding["credit_account"] = chunk
        funding["amount"] = OPENING_BALANCE
        assert not handle.transfers(funding).any()
    return handle


class TransferStream:
    """Batches of transfers between random funded accounts with fresh, increasing ids for every batch."""

    def __init__(self, account_count: int, batch_size: int, hot: bool = False, random_ids: bool = False,
                 seed: int = 7) -> None:
        self.account_count = account_count
        self.batch_size = batch_size
        self.hot = hot
        self.random_ids = random_ids
        self.rng = np.random.default_rng(seed)
        self.next_id = 1

    def _accounts(self, count: int) -> np.ndarray:
        if not self.hot:
            return self.rng.integers(0, self.account_count, count)
        # 90% of transfers touch the hottest 1% of accounts.
        hot_count = max(1, self.account_count // 100)
        picks = self.rng.integers(0, self.account_count, count)
        hot = self.rng.random(count) < 0.9
        picks[hot] = self.rng.integers(0, hot_count, int(hot.sum()))
        return picks

    def batch(self) -> np.ndarray:
        count = self.batch_size
        transfers = ledger.transfers_batch(count)
        if self.random_ids:
            transfers["id"] = self.rng.integers(1, 2**63, count, dtype=np.uint64)
        else:
            transfers["id"] = np.arange(self.next_id, self.next_id + count, dtype=np.uint64)
        self.next_id += count
        debit = self._accounts(count)
        credit = self._accounts(count)
        credit[credit == debit] = (debit[credit == debit] + 1) % self.account_count
        transfers["debit_account"] = FIRST_ACCOUNT_ID + debit
        transfers["credit_account"] = FIRST_ACCOUNT_ID + credit
        transfers["amount"] = self.rng.integers(1, 1000, count)
        return transfers

