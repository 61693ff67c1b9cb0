"""A deterministic workload for crash testing: batch k is a pure function of k, so after a crash the parent can
rebuild exactly what the journal must contain with an in-memory model ledger.

Run as a writer:  python tests/crash_workload.py DIR DURABILITY ACK_LOG
It appends "k\\n" to ACK_LOG after batch k's call returned (i.e. was acknowledged), forever, until killed."""
from __future__ import annotations

import sys

import numpy as np

import ledger

ACCOUNTS = 40
SETTLEMENT = 1
FIRST_ACCOUNT = 100
SEGMENT_RECORDS_LOG2 = 12  # small segments: crashes also land on segment creation
BATCH_ID_STRIDE = 1 << 20


def accounts() -> np.ndarray:
    rows = ledger.accounts_batch(ACCOUNTS + 1)
    rows["id"][0] = SETTLEMENT
    rows["min_balance"][0] = ledger.BALANCE_MIN
    rows["id"][1:] = np.arange(FIRST_ACCOUNT, FIRST_ACCOUNT + ACCOUNTS)
    return rows


def batch(k: int) -> np.ndarray:
    """Batch k: funding from the settlement account, transfers that sometimes overdraw, and LINKED chains."""
    rng = np.random.default_rng(k)
    count = int(rng.choice([1, 3, 17, 200, 1500]))
    rows = ledger.transfers_batch(count)
    rows["id"] = (k + 1) * BATCH_ID_STRIDE + np.arange(count)
    debit = FIRST_ACCOUNT + rng.integers(0, ACCOUNTS, count)
    credit = FIRST_ACCOUNT + (debit - FIRST_ACCOUNT + rng.integers(1, ACCOUNTS, count)) % ACCOUNTS
    funding = rng.random(count) < 0.2
    debit[funding] = SETTLEMENT
    rows["debit_account"] = debit
    rows["credit_account"] = credit
    rows["amount"] = rng.integers(1, 5_000, count)
    linked = rng.random(count) < 0.3
    linked[-1] = False
    rows["flags"] = np.where(linked, ledger.TransferFlags.LINKED, 0)
    # Row 0 always applies (funding, not linked), so every batch leaves a trace: its first id.
    rows[0]["debit_account"] = SETTLEMENT
    rows[0]["flags"] = 0
    return rows


def first_id(k: int) -> int:
    return (k + 1) * BATCH_ID_STRIDE


def applied_batches(handle: ledger.Ledger) -> int:
    """How many batches (0..m-1) the ledger holds: every batch's first row always applies."""
    k = 0
    while handle.lookup_transfers([first_id(k)])["state"][0] != 0:
        k += 1
    return k


class Model:
    """The in-memory reference: the same batches applied to ledger.open(None), in order, keeping the account
    state after each batch."""

    def __init__(self) -> None:
        self.handle = ledger.open(None)
        assert not self.handle.create_accounts(accounts()).any()
        self.codes: list[np.ndarray] = []
        self.states: list[np.ndarray] = [self.handle.accounts()]

    def codes_of(self, k: int) -> np.ndarray:
        while len(self.codes) <= k:
            self.codes.append(self.handle.transfers(batch(len(self.codes))))
            self.states.append(self.handle.accounts())
        return self.codes[k]

    def state_after(self, k: int) -> np.ndarray:
        """Account counters after batches 0..k-1."""
        if k > 0:
            self.codes_of(k - 1)
        return self.states[k]


def writer(directory: str, durability: str, ack_log: str) -> None:
    handle = ledger.open(directory, create=True, durability=durability, segment_records_log2=SEGMENT_RECORDS_LOG2)
    if handle.account(SETTLEMENT) is None:
        handle.create_accounts(accounts())
    k = applied_batches(handle)
    with open(ack_log, "a", buffering=1) as log:
        while True:
            handle.transfers(batch(k))
            log.write(f"{k}\n")  # written only after the call returned: the batch was acknowledged
            k += 1


if __name__ == "__main__":
    writer(sys.argv[1], sys.argv[2], sys.argv[3])
