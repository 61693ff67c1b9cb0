"""The batch loop resolves accounts ahead of time (a prefetch pipeline); these rows are built so that a wrong
or stale look-ahead would credit the wrong account."""
from __future__ import annotations

import numpy as np
import pytest

import ledger
from ledger import TransferFlags, TransferResult


@pytest.mark.parametrize("chain_length", [1, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("fail_at", ["first", "middle", "last"])
def test_rows_after_a_failed_chain_use_their_own_accounts(chain_length, fail_at):
    with ledger.open(None) as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        accounts = ledger.accounts_batch(200)
        accounts["id"] = np.arange(100, 300)
        assert not handle.create_accounts(accounts).any()
        rows = ledger.transfers_batch(chain_length + 30)
        rows["id"] = np.arange(1, rows.size + 1)
        rows["debit_account"] = 1
        rows["credit_account"] = 100 + np.arange(rows.size)  # every row credits a different account
        rows["amount"] = 1 + np.arange(rows.size)
        rows["flags"][:chain_length - 1] = TransferFlags.LINKED
        failing = {"first": 0, "middle": chain_length // 2, "last": chain_length - 1}[fail_at]
        rows["debit_account"][failing] = 999  # not found: the chain fails
        codes = handle.transfers(rows)
        assert codes[failing] == TransferResult.DEBIT_ACCOUNT_NOT_FOUND
        assert (np.delete(codes[:chain_length], failing) == TransferResult.LINKED_EVENT_FAILED).all()
        assert (codes[chain_length:] == TransferResult.OK).all()
        for index in range(rows.size):
            expected = int(rows["amount"][index]) if index >= chain_length else 0
            assert handle.balance(100 + index) == expected, index
        assert handle.verify().ok


def test_many_chains_and_random_accounts_agree_with_a_numpy_fold():
    rng = np.random.default_rng(11)
    with ledger.open(None) as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        accounts = ledger.accounts_batch(500)
        accounts["id"] = np.arange(100, 600)
        handle.create_accounts(accounts)
        rows = ledger.transfers_batch(20_000)
        rows["id"] = np.arange(1, rows.size + 1)
        rows["debit_account"] = 1
        rows["credit_account"] = rng.integers(100, 600, rows.size)
        rows["amount"] = rng.integers(1, 100, rows.size)
        rows["flags"] = np.where(rng.random(rows.size) < 0.4, TransferFlags.LINKED, 0)
        broken = rng.random(rows.size) < 0.03
        rows["credit_account"][broken] = 5  # not found: fails its chain
        codes = handle.transfers(rows)
        applied = codes == TransferResult.OK
        credits = np.bincount(rows["credit_account"][applied], weights=rows["amount"][applied], minlength=600)
        state = handle.accounts()
        for account, credited in zip(state["id"].tolist(), state["credits_posted"].tolist()):
            if account >= 100:
                assert credited == int(credits[account])
        assert handle.verify().ok


def test_exists_on_something_the_same_chain_created_is_undone_with_it():
    with ledger.open(None) as handle:
        accounts = ledger.accounts_batch(3)
        accounts["id"] = [7, 7, 0]
        accounts["flags"] = [ledger.AccountFlags.LINKED, ledger.AccountFlags.LINKED, 0]
        assert handle.create_accounts(accounts).tolist() == [ledger.AccountResult.LINKED_EVENT_FAILED,
                                                              ledger.AccountResult.LINKED_EVENT_FAILED,
                                                              ledger.AccountResult.ID_INVALID]
        assert handle.account(7) is None
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        handle.create_account(2)
        assert handle.transfer(50, 1, 2, 5) == TransferResult.OK
        rows = ledger.transfers_batch(4)
        rows["id"] = [50, 60, 60, 61]  # 50 exists from an earlier call; 60 is made and matched in this chain
        rows["debit_account"], rows["credit_account"] = 1, 2
        rows["amount"] = [5, 3, 3, 4]
        rows["credit_account"][3] = 9  # fails the chain
        rows["flags"][:3] = TransferFlags.LINKED
        assert handle.transfers(rows).tolist() == [TransferResult.EXISTS, TransferResult.LINKED_EVENT_FAILED,
                                                   TransferResult.LINKED_EVENT_FAILED,
                                                   TransferResult.CREDIT_ACCOUNT_NOT_FOUND]
        assert handle.lookup_transfers([60])["state"][0] == ledger.TransferState.NOT_FOUND
        assert handle.balance(2) == 5
