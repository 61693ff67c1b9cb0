"""The deterministic workload every peer runs, and the reference state `ledger` computes for it.

N accounts are funded from a settlement account with OPENING_BALANCE each; then M transfers between random
accounts (never an account to itself) with amounts in [1, AMOUNT_MAX_UNITS]. The opening balance is small enough
that a random walk of about 2 * M / N moves per account empties some accounts: roughly 8% of the transfers fail
for insufficient funds (with M / N = 10), so every peer's overdraft check does real work.

Transfers are applied one after the other in id order everywhere (a batch is applied in row order), so the
accepted set and the final balances are a function of the workload alone, whatever the batch size."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

import ledger

SETTLEMENT_ID = 1
FIRST_ACCOUNT_ID = 1_000
OPENING_BALANCE = 5_000
AMOUNT_MAX_UNITS = 2_000
# Funding transfers get ids far above the workload's 1..M, so the two never collide.
FUNDING_ID_BASE = 1 << 62
REFERENCE_BATCH_SIZE = 1 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
    """Account ids and the M transfers as column arrays (row i is applied i-th)."""

    account_count: int
    transfer_count: int
    seed: int
    account_ids: np.ndarray  # uint64, FIRST_ACCOUNT_ID + 0..N-1
    transfer_ids: np.ndarray  # uint64, 1..M: increasing, as a real system would hand them out
    debit_accounts: np.ndarray  # uint64
    credit_accounts: np.ndarray  # uint64
    amounts: np.ndarray  # int64

    def columns(self, start: int, stop: int) -> tuple[list[int], list[int], list[int], list[int]]:
        """Rows [start, stop) as four lists of Python ints: what a Python client hands its driver."""
        assert 0 <= start <= stop <= self.transfer_count, (start, stop)
        return (self.transfer_ids[start:stop].tolist(), self.debit_accounts[start:stop].tolist(),
                self.credit_accounts[start:stop].tolist(), self.amounts[start:stop].tolist())

    def all_account_ids(self) -> np.ndarray:
        """The settlement account first, then the N accounts: the order of every PeerState.balances."""
        return np.concatenate([np.array([SETTLEMENT_ID], np.uint64), self.account_ids])

    def opening_balances(self) -> np.ndarray:
        """Balances after funding, in all_account_ids() order."""
        balances = np.full(self.account_count + 1, OPENING_BALANCE, np.int64)
        balances[0] = -OPENING_BALANCE * self.account_count
        return balances


def make_workload(account_count: int, transfer_count: int, seed: int = 2026) -> Workload:
    assert account_count >= 2, "transfers need two different accounts"
    assert transfer_count >= 1
    # Float-based peers (Redis Lua numbers are doubles) stay exact below 2**53.
    assert OPENING_BALANCE * account_count < 2**53, "too many accounts for exact balances in every peer"
    rng = np.random.default_rng(seed)
    debit = rng.integers(0, account_count, transfer_count)
    credit = rng.integers(0, account_count - 1, transfer_count)
    credit += credit >= debit  # uniform over the other accounts
    account_ids = np.arange(FIRST_ACCOUNT_ID, FIRST_ACCOUNT_ID + account_count, dtype=np.uint64)
    return Workload(
        account_count=account_count,
        transfer_count=transfer_count,
        seed=seed,
        account_ids=account_ids,
        transfer_ids=np.arange(1, transfer_count + 1, dtype=np.uint64),
        debit_accounts=account_ids[debit],
        credit_accounts=account_ids[credit],
        amounts=rng.integers(1, AMOUNT_MAX_UNITS + 1, transfer_count).astype(np.int64),
    )


def transfer_rows(workload: Workload, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as a ledger.TRANSFER_DTYPE batch."""
    rows = ledger.transfers_batch(stop - start)
    rows["id"] = workload.transfer_ids[start:stop]
    rows["debit_account"] = workload.debit_accounts[start:stop]
    rows["credit_account"] = workload.credit_accounts[start:stop]
    rows["amount"] = workload.amounts[start:stop]
    return rows


def create_funded_accounts(handle: ledger.Ledger, workload: Workload) -> None:
    """The settlement account and the N funded accounts, in that order (ledger keeps creation order)."""
    assert handle.create_account(SETTLEMENT_ID, min_balance=ledger.BALANCE_MIN) == ledger.AccountResult.OK
    accounts = ledger.accounts_batch(workload.account_count)
    accounts["id"] = workload.account_ids
    assert not handle.create_accounts(accounts).any()
    funding = ledger.transfers_batch(workload.account_count)
    funding["id"] = FUNDING_ID_BASE + workload.account_ids
    funding["debit_account"] = SETTLEMENT_ID
    funding["credit_account"] = workload.account_ids
    funding["amount"] = OPENING_BALANCE
    assert not handle.transfers(funding).any()


@dataclasses.dataclass(frozen=True, eq=False)
class PeerState:
    """What a peer holds after applying a prefix of the workload, read back from its own store."""

    balances: np.ndarray  # int64, in Workload.all_account_ids() order
    accepted_ids: np.ndarray  # uint64, sorted: the workload transfers the peer recorded as applied


def sql_state(connection, workload: Workload) -> PeerState:
    """Balances and accepted ids from a SQL peer's `accounts (id, balance)` and `transfers (id, ...)` tables
    (a DB-API connection whose execute() returns rows: sqlite3, psycopg)."""
    balance_by_id = dict(connection.execute("SELECT id, balance FROM accounts").fetchall())
    ids = workload.all_account_ids().tolist()
    assert ids[0] == SETTLEMENT_ID and len(balance_by_id) == len(ids)
    balances = np.array([balance_by_id[id] for id in ids], np.int64)
    accepted = np.array([row[0] for row in connection.execute("SELECT id FROM transfers ORDER BY id").fetchall()],
                        np.uint64)
    return PeerState(balances=balances, accepted_ids=accepted)


def ledger_state(handle: ledger.Ledger, workload: Workload, transfer_count: int) -> PeerState:
    """Balances and accepted ids as `ledger` records them (accounts in creation order, lookups by id)."""
    accounts = handle.accounts()
    assert np.array_equal(accounts["id"], workload.all_account_ids()), "unexpected account order"
    balances = accounts["credits_posted"] - accounts["debits_posted"]
    ids = workload.transfer_ids[:transfer_count]
    found = handle.lookup_transfers(ids)["state"] != ledger.TransferState.NOT_FOUND
    return PeerState(balances=balances, accepted_ids=ids[found])


@functools.lru_cache(maxsize=4)
def _reference_cached(workload: Workload, transfer_count: int) -> PeerState:
    with ledger.open(None, accounts_capacity=workload.account_count + 1,
                     transfers_capacity=workload.account_count + transfer_count) as handle:
        create_funded_accounts(handle, workload)
        for start in range(0, transfer_count, REFERENCE_BATCH_SIZE):
            handle.transfers(transfer_rows(workload, start, min(transfer_count, start + REFERENCE_BATCH_SIZE)))
        return ledger_state(handle, workload, transfer_count)


def reference_state(workload: Workload, transfer_count: int) -> PeerState:
    """`ledger` (in memory) after the first `transfer_count` transfers: what every peer must agree with."""
    assert 0 <= transfer_count <= workload.transfer_count
    return _reference_cached(workload, transfer_count)


def compare(state: PeerState, reference: PeerState, workload: Workload) -> str | None:
    """None when the peer agrees with `ledger`; otherwise what differs, with the first example."""
    problems = []
    if state.balances.shape != reference.balances.shape:
        problems.append(f"{state.balances.size} balances, ledger has {reference.balances.size}")
    else:
        differ = np.flatnonzero(state.balances != reference.balances)
        if differ.size:
            first = differ[0]
            account = int(workload.all_account_ids()[first])
            problems.append(f"{differ.size} balances differ (account {account}: peer "
                            f"{int(state.balances[first])}, ledger {int(reference.balances[first])})")
    only_peer = np.setdiff1d(state.accepted_ids, reference.accepted_ids)
    only_ledger = np.setdiff1d(reference.accepted_ids, state.accepted_ids)
    if only_peer.size or only_ledger.size:
        problems.append(f"accepted sets differ: {only_peer.size} only in the peer (first {only_peer[:3].tolist()}), "
                        f"{only_ledger.size} only in ledger (first {only_ledger[:3].tolist()})")
    return "; ".join(problems) or None
