"""Focused tests of docs/SEMANTICS.md: every result code, every rule.

Tests taking the `lg` fixture run twice: against the engine and against the reference model (tests/support/model.py), so
the model is checked against hand-written expectations too. Tests taking `engine` are engine-only (numpy input
handling, misuse errors, large batches).
"""
from __future__ import annotations

import gc

import numpy as np
import pytest

from ledger.enums import (
    ACCOUNT_DTYPE,
    BATCH_SIZE_MAX,
    EXPIRE_BATCH_MAX,
    TRANSFER_DTYPE,
    AccountFlags,
    AccountResult,
    TransferFlags,
    TransferResult,
    TransferState,
)

R = TransferResult
A = AccountResult
F = TransferFlags
S = TransferState
MAX = 2**63 - 1
MIN = -(2**63)
U64MAX = 2**64 - 1
SEC = 10**9

# Accounts of the standard world.
SETTLE, ALICE, BOB, CAPPED, SETTLE2, CAROL = 1, 2, 3, 4, 5, 6
MISSING = 99


# ---------------------------------------------------------------------------------------------------- helpers
def tr(id, dr=ALICE, cr=BOB, amount=1, **kw):
    return dict(id=id, debit_account=dr, credit_account=cr, amount=amount, **kw)


def transfer_array(rows):
    arr = np.zeros(len(rows), dtype=TRANSFER_DTYPE)
    arr["ledger"] = 1
    for i, row in enumerate(rows):
        for k, v in row.items():
            arr[k][i] = v
    return arr


def account_array(rows):
    arr = np.zeros(len(rows), dtype=ACCOUNT_DTYPE)
    arr["ledger"] = 1
    arr["max_balance"] = MAX
    for i, row in enumerate(rows):
        for k, v in row.items():
            arr[k][i] = v
    return arr


def run(lg, *rows):
    """Apply transfer rows as one batch; return the codes as TransferResult members."""
    out = lg.transfers(transfer_array(rows))
    assert out.dtype == np.uint8 and out.shape == (len(rows),)
    return [R(int(c)) for c in out]


def run_accounts(lg, *rows):
    out = lg.create_accounts(account_array(rows))
    assert out.dtype == np.uint8 and out.shape == (len(rows),)
    return [A(int(c)) for c in out]


def ok(lg, *rows):
    codes = run(lg, *rows)
    assert codes == [R.OK] * len(rows)


def counters(lg, acc_id):
    a = lg.account(acc_id)
    return (int(a.debits_posted), int(a.credits_posted), int(a.debits_pending), int(a.credits_pending))


def state_snapshot(lg):
    acc = lg.accounts()
    names = ("id", "ledger", "debits_posted", "credits_posted", "debits_pending", "credits_pending", "timestamp")
    return sorted(tuple(int(r[f]) for f in names) for r in acc)


def lookup(lg, *ids):
    return lg.lookup_transfers(np.array(ids, dtype=np.uint64))


def states(lg, *ids):
    return [S(int(s)) for s in lookup(lg, *ids)["state"]]


def assert_conserved(lg):
    acc = lg.accounts()
    per_ledger = {}
    for r in acc:
        s = per_ledger.setdefault(int(r["ledger"]), [0, 0])
        s[0] += int(r["credits_posted"]) - int(r["debits_posted"])
        s[1] += int(r["debits_pending"]) - int(r["credits_pending"])
    for led, (bal, pend) in per_ledger.items():
        assert bal == 0, f"ledger {led}: sum of balances {bal}"
        assert pend == 0, f"ledger {led}: debits_pending - credits_pending {pend}"


def world(lg):
    """Settlement accounts (can go to -2**63), Alice funded with 1000, Bob empty, a capped account, ledger 2."""
    codes = run_accounts(
        lg,
        dict(id=SETTLE, min_balance=MIN),
        dict(id=ALICE),
        dict(id=BOB),
        dict(id=CAPPED, max_balance=100),
        dict(id=SETTLE2, ledger=2, min_balance=MIN),
        dict(id=CAROL, ledger=2),
    )
    assert codes == [A.OK] * 6
    ok(lg, tr(1000, SETTLE, ALICE, 1000))
    return lg


# ---------------------------------------------------------------------------------------------------- codes table
POST = int(F.POST_PENDING)
VOID = int(F.VOID_PENDING)
PEND = int(F.PENDING)
LINK = int(F.LINKED)

# (name, rows applied first (must all be OK), the row, expected code)
TRANSFER_CASES = [
    ("ok_plain", [], tr(10), R.OK),
    ("ok_pending", [], tr(10, flags=PEND, timeout=5), R.OK),
    ("ok_post", [tr(50, flags=PEND, amount=50)], tr(10, 0, 0, 0, flags=POST, pending_id=50), R.OK),
    ("ok_void", [tr(50, flags=PEND, amount=50)], tr(10, 0, 0, 0, flags=VOID, pending_id=50), R.OK),
    ("flags_unknown_bit", [], tr(10, flags=16), R.FLAGS_INVALID),
    ("flags_high_bit", [], tr(10, flags=0x8000), R.FLAGS_INVALID),
    ("flags_pending_post", [], tr(10, flags=PEND | POST), R.FLAGS_INVALID),
    ("flags_post_void", [], tr(10, flags=POST | VOID, pending_id=50), R.FLAGS_INVALID),
    ("flags_pending_void", [], tr(10, flags=PEND | VOID), R.FLAGS_INVALID),
    ("flags_before_id", [], tr(0, flags=16), R.FLAGS_INVALID),
    ("id_zero", [], tr(0), R.ID_INVALID),
    ("id_max", [], tr(U64MAX), R.ID_INVALID),
    ("id_zero_post", [], tr(0, flags=POST, pending_id=50), R.ID_INVALID),
    ("id_before_pending_id", [], tr(0, pending_id=5), R.ID_INVALID),
    ("pending_id_must_be_zero", [], tr(10, pending_id=5), R.PENDING_ID_MUST_BE_ZERO),
    ("pending_id_must_be_zero_pending", [], tr(10, flags=PEND, pending_id=5), R.PENDING_ID_MUST_BE_ZERO),
    ("pending_id_before_timeout", [], tr(10, pending_id=5, timeout=1), R.PENDING_ID_MUST_BE_ZERO),
    ("pending_id_required_post", [], tr(10, 0, 0, 0, flags=POST), R.PENDING_ID_REQUIRED),
    ("pending_id_required_void", [], tr(10, 0, 0, 0, flags=VOID), R.PENDING_ID_REQUIRED),
    ("pending_id_invalid", [], tr(10, 0, 0, 0, flags=POST, pending_id=U64MAX), R.PENDING_ID_INVALID),
    ("pending_id_must_be_different", [], tr(10, 0, 0, 0, flags=VOID, pending_id=10),
     R.PENDING_ID_MUST_BE_DIFFERENT),
    ("timeout_plain", [], tr(10, timeout=1), R.TIMEOUT_RESERVED_FOR_PENDING),
    ("timeout_post", [tr(50, flags=PEND)], tr(10, 0, 0, 0, flags=POST, pending_id=50, timeout=1),
     R.TIMEOUT_RESERVED_FOR_PENDING),
    ("timeout_before_exists", [tr(10)], tr(10, timeout=1), R.TIMEOUT_RESERVED_FOR_PENDING),
    ("exists", [tr(10, amount=7, code=3, user_data=9)], tr(10, amount=7, code=3, user_data=9), R.EXISTS),
    ("exists_pending", [tr(10, flags=PEND, timeout=9)], tr(10, flags=PEND, timeout=9), R.EXISTS),
    ("exists_before_account_checks", [tr(10)], tr(10, MISSING, ALICE), R.EXISTS_WITH_DIFFERENT_FIELDS),
    ("exists_beats_insufficient_funds", [tr(10, amount=1000)], tr(10, amount=1000), R.EXISTS),
    ("exists_different_amount", [tr(10)], tr(10, amount=2), R.EXISTS_WITH_DIFFERENT_FIELDS),
    ("debit_id_zero", [], tr(10, 0, BOB), R.DEBIT_ACCOUNT_ID_INVALID),
    ("debit_id_max", [], tr(10, U64MAX, BOB), R.DEBIT_ACCOUNT_ID_INVALID),
    ("debit_id_before_credit_id", [], tr(10, 0, 0), R.DEBIT_ACCOUNT_ID_INVALID),
    ("credit_id_zero", [], tr(10, ALICE, 0), R.CREDIT_ACCOUNT_ID_INVALID),
    ("credit_id_max", [], tr(10, ALICE, U64MAX), R.CREDIT_ACCOUNT_ID_INVALID),
    ("credit_id_before_same", [], tr(10, U64MAX - 1, U64MAX), R.CREDIT_ACCOUNT_ID_INVALID),
    ("accounts_same", [], tr(10, ALICE, ALICE), R.ACCOUNTS_MUST_BE_DIFFERENT),
    ("accounts_same_missing", [], tr(10, MISSING, MISSING, 0), R.ACCOUNTS_MUST_BE_DIFFERENT),
    ("amount_zero", [], tr(10, amount=0), R.AMOUNT_MUST_BE_POSITIVE),
    ("amount_negative", [], tr(10, amount=-1), R.AMOUNT_MUST_BE_POSITIVE),
    ("amount_min", [], tr(10, amount=MIN), R.AMOUNT_MUST_BE_POSITIVE),
    ("amount_before_ledger", [], tr(10, amount=0, ledger=0), R.AMOUNT_MUST_BE_POSITIVE),
    ("amount_negative_post", [tr(50, flags=PEND)], tr(10, 0, 0, -1, flags=POST, pending_id=50),
     R.AMOUNT_MUST_BE_POSITIVE),
    ("amount_negative_void", [tr(50, flags=PEND)], tr(10, 0, 0, -5, flags=VOID, pending_id=50),
     R.AMOUNT_MUST_BE_POSITIVE),
    ("ledger_zero", [], tr(10, ledger=0), R.LEDGER_INVALID),
    ("ledger_before_not_found", [], tr(10, MISSING, BOB, ledger=0), R.LEDGER_INVALID),
    ("debit_not_found", [], tr(10, MISSING, BOB), R.DEBIT_ACCOUNT_NOT_FOUND),
    ("debit_not_found_first", [], tr(10, MISSING, MISSING + 1), R.DEBIT_ACCOUNT_NOT_FOUND),
    ("credit_not_found", [], tr(10, ALICE, MISSING), R.CREDIT_ACCOUNT_NOT_FOUND),
    ("ledger_mismatch_accounts", [], tr(10, ALICE, CAROL), R.LEDGER_MISMATCH),
    ("ledger_mismatch_field", [], tr(10, ALICE, BOB, ledger=2), R.LEDGER_MISMATCH),
    ("ledger_mismatch_field2", [], tr(10, SETTLE2, CAROL, ledger=1), R.LEDGER_MISMATCH),
    ("ok_ledger2", [], tr(10, SETTLE2, CAROL, ledger=2), R.OK),
    ("ledger_mismatch_post", [tr(50, flags=PEND)], tr(10, 0, 0, 0, flags=POST, pending_id=50, ledger=2),
     R.LEDGER_MISMATCH),
    ("overflow_credit", [tr(50, SETTLE, BOB, MAX - 1000)], tr(10, ALICE, BOB, 1001), R.OVERFLOW),
    ("credit_at_max_ok", [tr(50, SETTLE, BOB, MAX - 1000)], tr(10, ALICE, BOB, 1000), R.OK),
    ("overflow_debit", [tr(50, SETTLE, BOB, MAX - 1000)], tr(10, SETTLE, CAPPED, 1), R.OVERFLOW),
    ("overflow_pending_counts", [tr(50, SETTLE, BOB, MAX - 1000, flags=PEND)], tr(10, SETTLE, CAPPED, 1),
     R.OVERFLOW),
    ("overflow_credit_pending_counts", [tr(50, SETTLE, BOB, MAX - 1000, flags=PEND)], tr(10, ALICE, BOB, 1001),
     R.OVERFLOW),
    ("overflow_before_funds", [tr(50, SETTLE, BOB, MAX - 1000)], tr(10, CAPPED, BOB, 1001), R.OVERFLOW),
    ("insufficient", [], tr(10, ALICE, BOB, 1001), R.INSUFFICIENT_FUNDS),
    ("exact_funds_ok", [], tr(10, ALICE, BOB, 1000), R.OK),
    ("insufficient_pending_counts", [tr(50, ALICE, BOB, 1000, flags=PEND)], tr(10, ALICE, BOB, 1),
     R.INSUFFICIENT_FUNDS),
    ("insufficient_empty", [], tr(10, BOB, ALICE, 1), R.INSUFFICIENT_FUNDS),
    ("insufficient_before_max", [], tr(10, BOB, CAPPED, 1000), R.INSUFFICIENT_FUNDS),
    ("exceeds_max", [], tr(10, SETTLE, CAPPED, 101), R.EXCEEDS_MAX_BALANCE),
    ("max_exact_ok", [], tr(10, SETTLE, CAPPED, 100), R.OK),
    ("exceeds_max_pending_counts", [tr(50, SETTLE, CAPPED, 100, flags=PEND)], tr(10, SETTLE, CAPPED, 1),
     R.EXCEEDS_MAX_BALANCE),
    ("exceeds_max_after_spend", [tr(50, SETTLE, CAPPED, 100), tr(51, CAPPED, BOB, 40, flags=PEND)],
     tr(10, SETTLE, CAPPED, 1), R.EXCEEDS_MAX_BALANCE),
    ("max_after_posted_debit", [tr(50, SETTLE, CAPPED, 100), tr(51, CAPPED, BOB, 40)],
     tr(10, SETTLE, CAPPED, 40), R.OK),
    ("pending_not_found", [], tr(10, 0, 0, 0, flags=POST, pending_id=999), R.PENDING_NOT_FOUND),
    ("pending_not_found_void", [], tr(10, 0, 0, 0, flags=VOID, pending_id=999), R.PENDING_NOT_FOUND),
    ("pending_not_pending", [tr(50)], tr(10, 0, 0, 0, flags=POST, pending_id=50), R.PENDING_TRANSFER_NOT_PENDING),
    ("pending_not_pending_post",
     [tr(50, flags=PEND), tr(51, 0, 0, 0, flags=POST, pending_id=50)],
     tr(10, 0, 0, 0, flags=VOID, pending_id=51), R.PENDING_TRANSFER_NOT_PENDING),
    ("already_posted", [tr(50, flags=PEND), tr(51, 0, 0, 0, flags=POST, pending_id=50)],
     tr(10, 0, 0, 0, flags=POST, pending_id=50), R.PENDING_ALREADY_POSTED),
    ("already_posted_void", [tr(50, flags=PEND), tr(51, 0, 0, 0, flags=POST, pending_id=50)],
     tr(10, 0, 0, 0, flags=VOID, pending_id=50), R.PENDING_ALREADY_POSTED),
    ("already_voided", [tr(50, flags=PEND), tr(51, 0, 0, 0, flags=VOID, pending_id=50)],
     tr(10, 0, 0, 0, flags=POST, pending_id=50), R.PENDING_ALREADY_VOIDED),
    ("already_posted_before_different_debit",
     [tr(50, flags=PEND), tr(51, 0, 0, 0, flags=POST, pending_id=50)],
     tr(10, CAPPED, 0, 0, flags=POST, pending_id=50), R.PENDING_ALREADY_POSTED),
    ("different_debit", [tr(50, ALICE, BOB, flags=PEND)], tr(10, SETTLE, 0, 0, flags=POST, pending_id=50),
     R.PENDING_DIFFERENT_DEBIT_ACCOUNT),
    ("different_credit", [tr(50, ALICE, BOB, flags=PEND)], tr(10, 0, SETTLE, 0, flags=VOID, pending_id=50),
     R.PENDING_DIFFERENT_CREDIT_ACCOUNT),
    ("same_accounts_explicit_ok", [tr(50, ALICE, BOB, flags=PEND)],
     tr(10, ALICE, BOB, 0, ledger=1, flags=POST, pending_id=50), R.OK),
    ("different_debit_before_amount", [tr(50, ALICE, BOB, flags=PEND)],
     tr(10, BOB, 0, -1, flags=POST, pending_id=50), R.PENDING_DIFFERENT_DEBIT_ACCOUNT),
    ("exceeds_pending_amount", [tr(50, amount=50, flags=PEND)], tr(10, 0, 0, 51, flags=POST, pending_id=50),
     R.EXCEEDS_PENDING_AMOUNT),
    ("post_exact_amount_ok", [tr(50, amount=50, flags=PEND)], tr(10, 0, 0, 50, flags=POST, pending_id=50), R.OK),
    ("void_different_amount", [tr(50, amount=50, flags=PEND)], tr(10, 0, 0, 49, flags=VOID, pending_id=50),
     R.PENDING_DIFFERENT_AMOUNT),
    ("void_same_amount_ok", [tr(50, amount=50, flags=PEND)], tr(10, 0, 0, 50, flags=VOID, pending_id=50), R.OK),
]

# Codes produced by dedicated tests below (name of the test in the value, for the reader).
TRANSFER_CODES_ELSEWHERE = {
    R.LINKED_EVENT_FAILED: "test_linked_chain_rolls_back",
    R.LINKED_CHAIN_OPEN: "test_linked_chain_open",
    R.PENDING_EXPIRED: "test_expiry_with_injected_clock",
}


@pytest.mark.parametrize("name,setup,row,expected", TRANSFER_CASES, ids=[c[0] for c in TRANSFER_CASES])
def test_transfer_code(lg, name, setup, row, expected):
    world(lg)
    if setup:
        ok(lg, *setup)
    before = state_snapshot(lg)
    assert run(lg, row) == [expected]
    if expected != R.OK:
        assert state_snapshot(lg) == before, "a failed row must have no effect"
        if expected != R.EXISTS and row["id"] not in [r["id"] for r in setup]:
            assert states(lg, row["id"]) == [S.NOT_FOUND]
    assert_conserved(lg)


def test_every_transfer_code_is_covered():
    covered = {c[3] for c in TRANSFER_CASES} | set(TRANSFER_CODES_ELSEWHERE)
    assert covered == set(TransferResult), set(TransferResult) - covered


ACCOUNT_CASES = [
    ("ok", [], dict(id=20), A.OK),
    ("ok_settlement", [], dict(id=20, min_balance=MIN, max_balance=MAX), A.OK),
    ("ok_zero_cap", [], dict(id=20, max_balance=0), A.OK),
    ("flags_invalid", [], dict(id=20, flags=2), A.FLAGS_INVALID),
    ("flags_before_id", [], dict(id=0, flags=0x8000), A.FLAGS_INVALID),
    ("id_zero", [], dict(id=0), A.ID_INVALID),
    ("id_max", [], dict(id=U64MAX), A.ID_INVALID),
    ("id_before_ledger", [], dict(id=0, ledger=0), A.ID_INVALID),
    ("ledger_zero", [], dict(id=20, ledger=0), A.LEDGER_INVALID),
    ("ledger_before_limits", [], dict(id=20, ledger=0, min_balance=1), A.LEDGER_INVALID),
    ("min_positive", [], dict(id=20, min_balance=1), A.BALANCE_LIMITS_INVALID),
    ("max_negative", [], dict(id=20, max_balance=-1), A.BALANCE_LIMITS_INVALID),
    ("max_min_int", [], dict(id=20, min_balance=MIN, max_balance=MIN), A.BALANCE_LIMITS_INVALID),
    ("limits_before_exists", [dict(id=20)], dict(id=20, min_balance=1), A.BALANCE_LIMITS_INVALID),
    ("exists", [dict(id=20, user_data=5)], dict(id=20, user_data=5), A.EXISTS),
    ("exists_ignores_linked", [dict(id=20)], None, A.EXISTS),  # see test_account_exists_ignores_linked
    ("exists_different_ledger", [dict(id=20)], dict(id=20, ledger=2), A.EXISTS_WITH_DIFFERENT_FIELDS),
    ("exists_different_min", [dict(id=20)], dict(id=20, min_balance=-1), A.EXISTS_WITH_DIFFERENT_FIELDS),
    ("exists_different_max", [dict(id=20)], dict(id=20, max_balance=5), A.EXISTS_WITH_DIFFERENT_FIELDS),
    ("exists_different_user_data", [dict(id=20)], dict(id=20, user_data=1), A.EXISTS_WITH_DIFFERENT_FIELDS),
]
ACCOUNT_CASES = [c for c in ACCOUNT_CASES if c[2] is not None]
ACCOUNT_CODES_ELSEWHERE = {
    A.LINKED_EVENT_FAILED: "test_account_chain_rolls_back",
    A.LINKED_CHAIN_OPEN: "test_account_chain_open",
}


@pytest.mark.parametrize("name,setup,row,expected", ACCOUNT_CASES, ids=[c[0] for c in ACCOUNT_CASES])
def test_account_code(lg, name, setup, row, expected):
    if setup:
        assert run_accounts(lg, *setup) == [A.OK] * len(setup)
    before = state_snapshot(lg)
    assert run_accounts(lg, row) == [expected]
    if expected == A.OK:
        a = lg.account(row["id"])
        assert a is not None
        assert int(a.ledger) == row.get("ledger", 1)
        assert int(a.min_balance) == row.get("min_balance", 0)
        assert int(a.max_balance) == row.get("max_balance", MAX)
        assert int(a.user_data) == row.get("user_data", 0)
        assert counters(lg, row["id"]) == (0, 0, 0, 0)
    else:
        assert state_snapshot(lg) == before


def test_every_account_code_is_covered():
    covered = {c[3] for c in ACCOUNT_CASES} | set(ACCOUNT_CODES_ELSEWHERE)
    assert covered == set(AccountResult), set(AccountResult) - covered


def test_account_exists_ignores_linked(lg):
    assert run_accounts(lg, dict(id=20)) == [A.OK]
    assert run_accounts(lg, dict(id=20, flags=int(AccountFlags.LINKED)), dict(id=21)) == [A.EXISTS, A.OK]
    assert run_accounts(lg, dict(id=21, flags=int(AccountFlags.LINKED)), dict(id=20)) == [A.EXISTS, A.EXISTS]


def test_account_duplicate_in_one_batch(lg):
    assert run_accounts(lg, dict(id=20), dict(id=20), dict(id=20, user_data=1)) == [
        A.OK, A.EXISTS, A.EXISTS_WITH_DIFFERENT_FIELDS]


def test_create_account_single(lg):
    assert lg.create_account(30) == A.OK
    assert lg.create_account(30) == A.EXISTS
    assert lg.create_account(30, 2) == A.EXISTS_WITH_DIFFERENT_FIELDS
    assert lg.create_account(31, ledger=1, min_balance=MIN, max_balance=MAX, flags=0, user_data=7) == A.OK
    assert lg.create_account(32, min_balance=1) == A.BALANCE_LIMITS_INVALID
    assert lg.create_account(0) == A.ID_INVALID
    a = lg.account(31)
    assert (int(a.id), int(a.ledger), int(a.min_balance), int(a.max_balance), int(a.user_data)) == (
        31, 1, MIN, MAX, 7)


def test_account_chain_rolls_back(lg):
    L = int(AccountFlags.LINKED)
    codes = run_accounts(lg, dict(id=20, flags=L), dict(id=21, flags=L), dict(id=0), dict(id=22))
    assert codes == [A.LINKED_EVENT_FAILED, A.LINKED_EVENT_FAILED, A.ID_INVALID, A.OK]
    assert lg.account(20) is None and lg.account(21) is None and lg.account(22) is not None
    # Rows after the failing row in the same chain fail too.
    codes = run_accounts(lg, dict(id=23, flags=L), dict(id=24, ledger=0, flags=L), dict(id=25), dict(id=26))
    assert codes == [A.LINKED_EVENT_FAILED, A.LEDGER_INVALID, A.LINKED_EVENT_FAILED, A.OK]
    assert [lg.account(i) is None for i in (23, 24, 25, 26)] == [True, True, True, False]
    # A chain that succeeds applies all.
    assert run_accounts(lg, dict(id=20, flags=L), dict(id=21)) == [A.OK, A.OK]
    # EXISTS does not fail a chain.
    assert run_accounts(lg, dict(id=20, flags=L), dict(id=27)) == [A.EXISTS, A.OK]
    # EXISTS_WITH_DIFFERENT_FIELDS does.
    assert run_accounts(lg, dict(id=28, flags=L), dict(id=20, user_data=1)) == [
        A.LINKED_EVENT_FAILED, A.EXISTS_WITH_DIFFERENT_FIELDS]
    assert lg.account(28) is None


def test_account_chain_open(lg):
    L = int(AccountFlags.LINKED)
    assert run_accounts(lg, dict(id=20), dict(id=21, flags=L), dict(id=22, flags=L)) == [
        A.OK, A.LINKED_EVENT_FAILED, A.LINKED_CHAIN_OPEN]
    assert lg.account(20) is not None and lg.account(21) is None and lg.account(22) is None
    assert run_accounts(lg, dict(id=23, flags=L)) == [A.LINKED_CHAIN_OPEN]
    assert lg.account(23) is None
    assert run_accounts(lg, dict(id=20, flags=L), dict(id=0, flags=L)) == [A.LINKED_EVENT_FAILED, A.LINKED_CHAIN_OPEN]


# ---------------------------------------------------------------------------------------------------- rules
def test_conservation_and_balances(lg):
    world(lg)
    ok(lg, tr(10, ALICE, BOB, 300), tr(11, BOB, CAPPED, 100), tr(12, SETTLE2, CAROL, 5, ledger=2),
       tr(13, ALICE, BOB, 200, flags=PEND))
    assert lg.balance(ALICE) == 700 and lg.available(ALICE) == 500
    assert lg.balance(BOB) == 200 and lg.available(BOB) == 200
    assert lg.balance(CAPPED) == 100
    assert lg.balance(SETTLE) == -1000
    assert lg.balance(CAROL) == 5 and lg.balance(SETTLE2) == -5
    a = lg.account(ALICE)
    assert a.balance == 700 and a.available == 500
    assert counters(lg, ALICE) == (300, 1000, 200, 0)
    assert counters(lg, BOB) == (100, 300, 0, 200)
    assert_conserved(lg)


def test_missing_account_reads(lg):
    assert lg.account(12345) is None
    with pytest.raises(KeyError):
        lg.balance(12345)
    with pytest.raises(KeyError):
        lg.available(12345)


def test_limits_count_pending(lg):
    world(lg)
    # min_balance with debits_pending: Alice has 1000; reserving 600 leaves 400 to spend.
    ok(lg, tr(10, ALICE, BOB, 600, flags=PEND))
    assert run(lg, tr(11, ALICE, BOB, 401)) == [R.INSUFFICIENT_FUNDS]
    ok(lg, tr(11, ALICE, BOB, 400))
    assert lg.available(ALICE) == 0 and lg.balance(ALICE) == 600
    # An overdraft limit: min_balance -50 lets the account go to -50 counting pending.
    assert lg.create_account(40, min_balance=-50) == A.OK
    ok(lg, tr(12, 40, BOB, 30, flags=PEND))
    assert run(lg, tr(13, 40, BOB, 21)) == [R.INSUFFICIENT_FUNDS]
    ok(lg, tr(13, 40, BOB, 20))
    assert lg.available(40) == -50
    # max_balance with credits_pending: the cap counts what may still arrive.
    ok(lg, tr(14, SETTLE, CAPPED, 60, flags=PEND))
    assert run(lg, tr(15, SETTLE, CAPPED, 41)) == [R.EXCEEDS_MAX_BALANCE]
    ok(lg, tr(15, SETTLE, CAPPED, 40))
    # Voiding the reservation frees the room again.
    ok(lg, tr(16, 0, 0, 0, flags=VOID, pending_id=14))
    ok(lg, tr(17, SETTLE, CAPPED, 60))
    assert lg.balance(CAPPED) == 100
    assert_conserved(lg)


def test_zero_cap_account_from_zero_filled_row(lg):
    """A zero-filled account row has max_balance 0: valid, but nothing can ever arrive."""
    rows = np.zeros(1, dtype=ACCOUNT_DTYPE)
    rows["id"] = 20
    rows["ledger"] = 1
    assert list(lg.create_accounts(rows)) == [A.OK]
    world(lg)
    assert run(lg, tr(10, SETTLE, 20, 1)) == [R.EXCEEDS_MAX_BALANCE]


def test_partial_post_releases_the_rest(lg):
    world(lg)
    ok(lg, tr(10, ALICE, BOB, 100, flags=PEND))
    assert counters(lg, ALICE) == (0, 1000, 100, 0)
    assert counters(lg, BOB) == (0, 0, 0, 100)
    assert lg.available(ALICE) == 900
    ok(lg, tr(11, 0, 0, 30, flags=POST, pending_id=10))
    assert counters(lg, ALICE) == (30, 1000, 0, 0)
    assert counters(lg, BOB) == (0, 30, 0, 0)
    assert lg.balance(ALICE) == 970 and lg.available(ALICE) == 970
    assert states(lg, 10, 11) == [S.PENDING_POSTED, S.POSTED]
    rec = lookup(lg, 11)[0]
    assert int(rec["amount"]) == 30 and int(rec["pending_id"]) == 10
    # Resolved once.
    assert run(lg, tr(12, 0, 0, 0, flags=POST, pending_id=10)) == [R.PENDING_ALREADY_POSTED]
    assert run(lg, tr(12, 0, 0, 0, flags=VOID, pending_id=10)) == [R.PENDING_ALREADY_POSTED]
    assert_conserved(lg)


def test_full_post_with_amount_zero(lg):
    world(lg)
    ok(lg, tr(10, ALICE, BOB, 100, flags=PEND), tr(11, 0, 0, 0, flags=POST, pending_id=10))
    assert counters(lg, ALICE) == (100, 1000, 0, 0)
    assert counters(lg, BOB) == (0, 100, 0, 0)
    assert_conserved(lg)


def test_void(lg):
    world(lg)
    ok(lg, tr(10, ALICE, BOB, 100, flags=PEND))
    ok(lg, tr(11, ALICE, BOB, 100, flags=VOID, pending_id=10))
    assert counters(lg, ALICE) == (0, 1000, 0, 0)
    assert counters(lg, BOB) == (0, 0, 0, 0)
    assert states(lg, 10, 11) == [S.PENDING_VOIDED, S.POSTED]
    assert run(lg, tr(12, 0, 0, 0, flags=POST, pending_id=10)) == [R.PENDING_ALREADY_VOIDED]
    assert run(lg, tr(12, 0, 0, 0, flags=VOID, pending_id=10)) == [R.PENDING_ALREADY_VOIDED]
    assert_conserved(lg)


def test_pending_and_post_in_one_batch(lg):
    world(lg)
    ok(lg, tr(10, ALICE, BOB, 100, flags=PEND), tr(11, 0, 0, 40, flags=POST, pending_id=10),
       tr(12, ALICE, BOB, 5, flags=PEND), tr(13, 0, 0, 0, flags=VOID, pending_id=12))
    assert counters(lg, ALICE) == (40, 1000, 0, 0)
    assert states(lg, 10, 11, 12, 13) == [S.PENDING_POSTED, S.POSTED, S.PENDING_VOIDED, S.POSTED]
    # The same with timeouts: a pending made earlier in the batch is far from its deadline.
    ok(lg, tr(20, ALICE, BOB, 100, flags=PEND, timeout=1), tr(21, 0, 0, 40, flags=POST, pending_id=20),
       tr(22, ALICE, BOB, 5, flags=PEND, timeout=60), tr(23, 0, 0, 0, flags=VOID, pending_id=22))
    assert states(lg, 20, 21, 22, 23) == [S.PENDING_POSTED, S.POSTED, S.PENDING_VOIDED, S.POSTED]
    assert counters(lg, ALICE) == (80, 1000, 0, 0)
    assert_conserved(lg)


def test_expiry_with_injected_clock(lg, clock):
    world(lg)
    clock.advance(SEC)  # later than every event so far: the next call's timestamp is exactly clock()
    t0 = clock()
    ok(lg, tr(10, ALICE, BOB, 100, flags=PEND, timeout=1), tr(11, ALICE, BOB, 50, flags=PEND, timeout=2))
    assert int(lookup(lg, 10)[0]["timestamp"]) == t0
    assert lg.available(ALICE) == 850
    # One nanosecond before the deadline nothing expires.
    clock.set(t0 + SEC - 1)
    assert list(lg.transfers(transfer_array([]))) == []
    assert states(lg, 10, 11) == [S.PENDING, S.PENDING]
    # At the deadline the next transfers call (even an empty one) expires it.
    clock.set(t0 + SEC)
    assert list(lg.transfers(transfer_array([]))) == []
    assert states(lg, 10, 11) == [S.PENDING_EXPIRED, S.PENDING]
    assert counters(lg, ALICE) == (0, 1000, 50, 0)
    assert counters(lg, BOB) == (0, 0, 0, 50)
    assert_conserved(lg)
    # A later POST or VOID gets PENDING_EXPIRED and has no effect.
    clock.advance(1)
    assert run(lg, tr(12, 0, 0, 0, flags=POST, pending_id=10)) == [R.PENDING_EXPIRED]
    assert run(lg, tr(12, 0, 0, 0, flags=VOID, pending_id=10)) == [R.PENDING_EXPIRED]
    assert states(lg, 12) == [S.NOT_FOUND]
    # The other one can still be posted until its own deadline.
    ok(lg, tr(12, 0, 0, 0, flags=POST, pending_id=11))
    assert counters(lg, ALICE) == (50, 1000, 0, 0)
    assert_conserved(lg)


def test_expiry_runs_before_rows_and_takes_timestamps(lg, clock):
    world(lg)
    clock.advance(SEC)
    t0 = clock()
    ok(lg, tr(10, ALICE, BOB, 100, flags=PEND, timeout=1), tr(11, ALICE, BOB, 100, flags=PEND, timeout=1))
    clock.set(t0 + 5 * SEC)
    # The freed funds are available to the rows of the same call; the row comes after the two expiries.
    ok(lg, tr(12, ALICE, BOB, 1000))
    assert int(lookup(lg, 12)[0]["timestamp"]) == t0 + 5 * SEC + 2
    assert states(lg, 10, 11) == [S.PENDING_EXPIRED, S.PENDING_EXPIRED]
    assert_conserved(lg)


def test_post_at_deadline_within_a_call_is_expired(lg, clock):
    """The deadline is compared with the row's own timestamp, not only with the call's."""
    world(lg)
    clock.advance(SEC)
    t0 = clock()
    ok(lg, tr(10, ALICE, BOB, 100, flags=PEND, timeout=1))
    clock.set(t0 + SEC - 1)  # call timestamp T = deadline - 1: no expiry at the start of the call
    codes = run(lg, tr(11, ALICE, BOB, 1), tr(12, 0, 0, 0, flags=POST, pending_id=10))
    assert codes == [R.OK, R.PENDING_EXPIRED]  # the POST's timestamp is T + 1 == deadline
    assert states(lg, 10) == [S.PENDING]  # not expired as an event yet
    clock.set(t0 + SEC + 10)
    assert run(lg) == []
    assert states(lg, 10) == [S.PENDING_EXPIRED]
    assert counters(lg, ALICE) == (1, 1000, 0, 0)


def test_only_transfers_calls_expire(lg, clock):
    world(lg)
    ok(lg, tr(10, ALICE, BOB, 100, flags=PEND, timeout=1))
    clock.advance(5 * SEC)
    assert lg.create_account(40) == A.OK  # not a transfers call: no expiry
    assert int(lg.account(40).timestamp) == clock()
    assert states(lg, 10) == [S.PENDING]
    assert lg.available(ALICE) == 900
    assert run(lg) == []
    assert states(lg, 10) == [S.PENDING_EXPIRED]
    assert lg.available(ALICE) == 1000


def test_timeout_zero_never_expires(lg, clock):
    world(lg)
    ok(lg, tr(10, ALICE, BOB, 100, flags=PEND))
    clock.advance(10**6 * SEC)
    assert run(lg) == []
    assert states(lg, 10) == [S.PENDING]
    ok(lg, tr(11, 0, 0, 0, flags=POST, pending_id=10))


def test_expire_batch_max(lg, clock):
    """At most EXPIRE_BATCH_MAX expiries per call, in deadline order, then position order."""
    n = EXPIRE_BATCH_MAX
    assert lg.create_account(1, min_balance=MIN) == A.OK
    assert lg.create_account(2) == A.OK
    rows = np.zeros(n + 1, dtype=TRANSFER_DTYPE)
    rows["id"] = np.arange(1, n + 2)
    rows["debit_account"] = 1
    rows["credit_account"] = 2
    rows["amount"] = 1
    rows["ledger"] = 1
    rows["flags"] = PEND
    rows["timeout"] = 2
    rows["timeout"][-1] = 1  # created last, but the earliest deadline: expires first
    assert not lg.transfers(rows).any()
    clock.advance(10 * SEC)
    assert len(lg.transfers(transfer_array([]))) == 0
    st = lookup(lg, *range(1, n + 2))["state"]
    assert int(st[-1]) == S.PENDING_EXPIRED
    assert int(st[-2]) == S.PENDING  # the latest deadline is left for the next call
    assert int((st == S.PENDING_EXPIRED).sum()) == n
    assert counters(lg, 2) == (0, 0, 0, 1)
    assert len(lg.transfers(transfer_array([]))) == 0
    assert int(lookup(lg, n)[0]["state"]) == S.PENDING_EXPIRED
    assert counters(lg, 2) == (0, 0, 0, 0)
    assert_conserved(lg)


def test_linked_chain_rolls_back(lg):
    world(lg)
    ok(lg, tr(5, ALICE, BOB, 10, flags=PEND))
    before = state_snapshot(lg)
    codes = run(
        lg,
        tr(10, ALICE, BOB, 100, flags=LINK),
        tr(11, BOB, CAPPED, 50, flags=LINK | PEND),
        tr(12, 0, 0, 0, flags=LINK | POST, pending_id=5),
        tr(13, ALICE, BOB, 10_000),  # fails: the chain is undone
        tr(14, ALICE, BOB, 1),  # a new chain of one
    )
    assert codes == [R.LINKED_EVENT_FAILED] * 3 + [R.INSUFFICIENT_FUNDS, R.OK]
    after = state_snapshot(lg)
    assert [r for r in after if r[0] != ALICE and r[0] != BOB] == [r for r in before if r[0] not in (ALICE, BOB)]
    assert counters(lg, ALICE) == (1, 1000, 10, 0)  # only transfer 14
    assert counters(lg, BOB) == (0, 1, 0, 10)
    assert states(lg, 5, 10, 11, 12, 13, 14) == [S.PENDING, S.NOT_FOUND, S.NOT_FOUND, S.NOT_FOUND,
                                                 S.NOT_FOUND, S.POSTED]
    # Failed ids may be retried.
    ok(lg, tr(10, ALICE, BOB, 100), tr(13, ALICE, BOB, 5))
    assert_conserved(lg)


def test_linked_chain_rows_after_failure_fail(lg):
    world(lg)
    codes = run(lg, tr(10, flags=LINK), tr(11, amount=0, flags=LINK), tr(12, flags=LINK), tr(13), tr(14))
    assert codes == [R.LINKED_EVENT_FAILED, R.AMOUNT_MUST_BE_POSITIVE, R.LINKED_EVENT_FAILED,
                     R.LINKED_EVENT_FAILED, R.OK]
    assert states(lg, 10, 11, 12, 13, 14) == [S.NOT_FOUND] * 4 + [S.POSTED]


def test_linked_chain_success_and_exists(lg):
    world(lg)
    ok(lg, tr(10, flags=LINK), tr(11, flags=LINK), tr(12))
    assert counters(lg, BOB) == (0, 3, 0, 0)
    # EXISTS keeps EXISTS and does not fail the chain (LINKED is ignored in the comparison).
    assert run(lg, tr(10), tr(11, flags=LINK), tr(20)) == [R.EXISTS, R.EXISTS, R.OK]
    # A chain that fails: rows that answered EXISTS keep EXISTS.
    assert run(lg, tr(10, flags=LINK), tr(21, flags=LINK), tr(22, amount=-1)) == [
        R.EXISTS, R.LINKED_EVENT_FAILED, R.AMOUNT_MUST_BE_POSITIVE]
    assert states(lg, 21) == [S.NOT_FOUND]
    # EXISTS_WITH_DIFFERENT_FIELDS fails the chain.
    assert run(lg, tr(23, flags=LINK), tr(10, amount=2)) == [R.LINKED_EVENT_FAILED, R.EXISTS_WITH_DIFFERENT_FIELDS]
    assert counters(lg, BOB) == (0, 4, 0, 0)


def test_linked_chain_open(lg):
    world(lg)
    before = state_snapshot(lg)
    assert run(lg, tr(10), tr(11, flags=LINK), tr(12, flags=LINK)) == [
        R.OK, R.LINKED_EVENT_FAILED, R.LINKED_CHAIN_OPEN]
    assert states(lg, 10, 11, 12) == [S.POSTED, S.NOT_FOUND, S.NOT_FOUND]
    assert run(lg, tr(13, flags=LINK)) == [R.LINKED_CHAIN_OPEN]
    assert states(lg, 13) == [S.NOT_FOUND]
    # An open chain is not evaluated: no EXISTS and no codes of their own, only the two chain codes.
    assert run(lg, tr(10, flags=LINK), tr(0, flags=LINK), tr(14, amount=-1, flags=LINK), tr(15, flags=LINK)) == [
        R.LINKED_EVENT_FAILED, R.LINKED_EVENT_FAILED, R.LINKED_EVENT_FAILED, R.LINKED_CHAIN_OPEN]
    assert counters(lg, BOB) == (0, 1, 0, 0)
    assert len(before) == len(state_snapshot(lg))


def test_linked_chain_undoes_post_and_void(lg):
    world(lg)
    ok(lg, tr(10, ALICE, BOB, 100, flags=PEND), tr(11, ALICE, BOB, 100, flags=PEND))
    before = state_snapshot(lg)
    codes = run(lg, tr(12, 0, 0, 40, flags=LINK | POST, pending_id=10),
                tr(13, 0, 0, 0, flags=LINK | VOID, pending_id=11),
                tr(14, 0, 0, 0, flags=POST, pending_id=10))  # already posted within the chain
    assert codes == [R.LINKED_EVENT_FAILED, R.LINKED_EVENT_FAILED, R.PENDING_ALREADY_POSTED]
    assert state_snapshot(lg) == before
    assert states(lg, 10, 11, 12, 13, 14) == [S.PENDING, S.PENDING, S.NOT_FOUND, S.NOT_FOUND, S.NOT_FOUND]
    ok(lg, tr(12, 0, 0, 40, flags=POST, pending_id=10))
    assert_conserved(lg)


def test_idempotency_exists_has_no_effect(lg):
    world(lg)
    ok(lg, tr(10, ALICE, BOB, 100, code=7, user_data=3))
    before = state_snapshot(lg)
    assert run(lg, tr(10, ALICE, BOB, 100, code=7, user_data=3)) == [R.EXISTS]
    assert lg.transfer(10, ALICE, BOB, 100, code=7, user_data=3) == R.EXISTS
    assert state_snapshot(lg) == before
    # Within one batch, a repeated id sees the earlier row.
    assert run(lg, tr(11), tr(11), tr(11, amount=2)) == [R.OK, R.EXISTS, R.EXISTS_WITH_DIFFERENT_FIELDS]
    # A failed id is not remembered and may be retried.
    assert run(lg, tr(12, BOB, ALICE, 500)) == [R.INSUFFICIENT_FUNDS]
    ok(lg, tr(12, ALICE, BOB, 500))


BASE_PENDING = dict(dr=ALICE, cr=BOB, amount=10, ledger=1, code=1, flags=PEND, timeout=100, user_data=1)


@pytest.mark.parametrize("field,value", [
    ("dr", SETTLE), ("cr", CAPPED), ("amount", 11), ("ledger", 2), ("code", 2), ("flags", 0),
    ("timeout", 99), ("user_data", 2),
])
def test_idempotency_each_field(lg, field, value):
    world(lg)
    ok(lg, tr(10, **BASE_PENDING))
    changed = dict(BASE_PENDING, **{field: value})
    if field == "flags":
        changed["timeout"] = 0  # a plain row must not carry a timeout
    assert run(lg, tr(10, **changed)) == [R.EXISTS_WITH_DIFFERENT_FIELDS]
    assert run(lg, tr(10, **BASE_PENDING)) == [R.EXISTS]


def test_idempotency_post_void(lg):
    world(lg)
    ok(lg, tr(10, ALICE, BOB, 100, flags=PEND), tr(11, ALICE, BOB, 100, flags=PEND),
       tr(12, ALICE, BOB, 100, flags=PEND))
    ok(lg, tr(20, 0, 0, 0, flags=POST, pending_id=10, code=5))
    before = state_snapshot(lg)
    # Zeros are "as the pending transfer": explicit values equal to the pending's match too.
    assert run(lg, tr(20, 0, 0, 0, flags=POST, pending_id=10, code=5)) == [R.EXISTS]
    assert run(lg, tr(20, ALICE, BOB, 100, ledger=1, flags=POST, pending_id=10, code=5)) == [R.EXISTS]
    assert run(lg, tr(20, ALICE, 0, 0, ledger=0, flags=POST, pending_id=10, code=5)) == [R.EXISTS]
    assert run(lg, tr(20, 0, 0, 0, flags=POST, pending_id=10, code=6)) == [R.EXISTS_WITH_DIFFERENT_FIELDS]
    assert run(lg, tr(20, 0, 0, 99, flags=POST, pending_id=10, code=5)) == [R.EXISTS_WITH_DIFFERENT_FIELDS]
    assert run(lg, tr(20, SETTLE, 0, 0, flags=POST, pending_id=10, code=5)) == [R.EXISTS_WITH_DIFFERENT_FIELDS]
    assert run(lg, tr(20, 0, CAPPED, 0, flags=POST, pending_id=10, code=5)) == [
        R.EXISTS_WITH_DIFFERENT_FIELDS]
    assert run(lg, tr(20, 0, 0, 0, ledger=2, flags=POST, pending_id=10, code=5)) == [
        R.EXISTS_WITH_DIFFERENT_FIELDS]
    assert run(lg, tr(20, 0, 0, 0, flags=POST, pending_id=10, code=5, user_data=1)) == [
        R.EXISTS_WITH_DIFFERENT_FIELDS]
    # pending_id differs.
    assert run(lg, tr(20, 0, 0, 0, flags=POST, pending_id=11, code=5)) == [R.EXISTS_WITH_DIFFERENT_FIELDS]
    # flags differ (VOID instead of POST).
    assert run(lg, tr(20, 0, 0, 0, flags=VOID, pending_id=10, code=5)) == [R.EXISTS_WITH_DIFFERENT_FIELDS]
    assert state_snapshot(lg) == before
    # A partial post: its retry must name the same amount.
    ok(lg, tr(21, 0, 0, 30, flags=POST, pending_id=11))
    assert run(lg, tr(21, 0, 0, 30, flags=POST, pending_id=11)) == [R.EXISTS]
    assert run(lg, tr(21, 0, 0, 31, flags=POST, pending_id=11)) == [R.EXISTS_WITH_DIFFERENT_FIELDS]
    assert run(lg, tr(21, 0, 0, 100, flags=POST, pending_id=11)) == [R.EXISTS_WITH_DIFFERENT_FIELDS]
    # Reading of SEMANTICS.md ("a 0 ... matches what was recorded"): amount 0 matches the recorded 30.
    assert run(lg, tr(21, 0, 0, 0, flags=POST, pending_id=11)) == [R.EXISTS]
    # A void with amount 0 matches an explicit full amount.
    ok(lg, tr(22, 0, 0, 0, flags=VOID, pending_id=12))
    assert run(lg, tr(22, 0, 0, 100, flags=VOID, pending_id=12)) == [R.EXISTS]
    assert run(lg, tr(22, ALICE, BOB, 0, flags=VOID, pending_id=12)) == [R.EXISTS]
    assert_conserved(lg)


def test_overflow_at_int64_edges(lg):
    assert run_accounts(lg, dict(id=1, min_balance=MIN), dict(id=2), dict(id=3), dict(id=4, min_balance=MIN),
                        dict(id=5)) == [A.OK] * 5
    # Fund an account with the largest amount there is.
    ok(lg, tr(10, 1, 2, MAX))
    assert lg.balance(2) == MAX and lg.balance(1) == -MAX
    assert lg.available(1) == -MAX
    assert run(lg, tr(11, 1, 3, 1)) == [R.OVERFLOW]  # debits_posted of 1 would pass 2**63 - 1
    assert run(lg, tr(11, 4, 2, 1)) == [R.OVERFLOW]  # credits_posted of 2 would pass 2**63 - 1
    # Spend it all: counters stay in range.
    ok(lg, tr(12, 2, 3, MAX))
    assert counters(lg, 2) == (MAX, MAX, 0, 0) and lg.balance(2) == 0
    assert run(lg, tr(13, 4, 2, 1)) == [R.OVERFLOW]  # credits_posted of 2 is already at the maximum
    assert run(lg, tr(13, 4, 3, 1, flags=PEND)) == [R.OVERFLOW]  # and of 3, pending or not
    # Pending amounts count for overflow too.
    ok(lg, tr(16, 4, 5, MAX - 1, flags=PEND))
    assert run(lg, tr(17, 4, 5, 2)) == [R.OVERFLOW]
    ok(lg, tr(17, 4, 5, 1))
    assert counters(lg, 5) == (0, 1, 0, MAX - 1)
    assert counters(lg, 4) == (1, 0, MAX - 1, 0)
    assert run(lg, tr(18, 4, 5, 1, flags=PEND)) == [R.OVERFLOW]
    # Posting the pending brings the counters exactly to the maximum.
    ok(lg, tr(19, 0, 0, 0, flags=POST, pending_id=16))
    assert counters(lg, 5) == (0, MAX, 0, 0)
    assert counters(lg, 4) == (MAX, 0, 0, 0)
    assert lg.balance(5) == MAX and lg.balance(4) == -MAX
    assert_conserved(lg)


def test_settlement_issues_int64_max(lg):
    """min_balance = -2**63: a settlement can issue up to 2**63 - 1 (its debits counter is capped there)."""
    assert run_accounts(lg, dict(id=1, min_balance=MIN), dict(id=2), dict(id=3)) == [A.OK] * 3
    ok(lg, tr(10, 1, 2, MAX - 5))
    ok(lg, tr(11, 1, 3, 5, flags=PEND))
    assert lg.available(1) == -MAX
    assert run(lg, tr(12, 1, 3, 1)) == [R.OVERFLOW]
    ok(lg, tr(13, 0, 0, 0, flags=POST, pending_id=11))
    assert lg.balance(1) == -MAX and lg.balance(2) + lg.balance(3) == MAX
    assert_conserved(lg)


def test_timestamps_strictly_increasing(lg, clock):
    t0 = clock()
    world(lg)  # 6 accounts then 1 transfer at a constant clock
    acc = lg.accounts()
    ts_acc = sorted(int(x) for x in acc["timestamp"])
    assert ts_acc == list(range(t0, t0 + 6))
    assert int(lookup(lg, 1000)[0]["timestamp"]) == t0 + 6
    # Clock stands still: each call continues after the last event.
    ok(lg, tr(10), tr(11))
    ok(lg, tr(12))
    assert [int(x) for x in lookup(lg, 10, 11, 12)["timestamp"]] == [t0 + 7, t0 + 8, t0 + 9]
    # Clock goes backwards: still strictly increasing.
    clock.set(t0 - 10 * SEC)
    ok(lg, tr(13))
    assert int(lookup(lg, 13)[0]["timestamp"]) == t0 + 10
    # Failed rows take no timestamp; a call that applies nothing does not advance time.
    assert run(lg, tr(14, amount=0), tr(15, MISSING, BOB)) == [R.AMOUNT_MUST_BE_POSITIVE, R.DEBIT_ACCOUNT_NOT_FOUND]
    assert run(lg) == []
    assert run(lg, tr(14, amount=0), tr(16)) == [R.AMOUNT_MUST_BE_POSITIVE, R.OK]
    assert int(lookup(lg, 16)[0]["timestamp"]) == t0 + 11
    # Undone chain rows give their timestamps back.
    assert run(lg, tr(17, flags=LINK), tr(18, amount=-1), tr(19)) == [
        R.LINKED_EVENT_FAILED, R.AMOUNT_MUST_BE_POSITIVE, R.OK]
    assert int(lookup(lg, 19)[0]["timestamp"]) == t0 + 12
    # Clock jumps ahead: T = now.
    clock.set(t0 + 100 * SEC)
    ok(lg, tr(20), tr(21))
    assert [int(x) for x in lookup(lg, 20, 21)["timestamp"]] == [t0 + 100 * SEC, t0 + 100 * SEC + 1]
    # Accounts share the same timeline.
    assert lg.create_account(30) == A.OK
    assert int(lg.account(30).timestamp) == t0 + 100 * SEC + 2
    ok(lg, tr(22))
    assert int(lookup(lg, 22)[0]["timestamp"]) == t0 + 100 * SEC + 3
    ts = lookup(lg, 1000, *range(10, 23))
    found = ts[ts["state"] != S.NOT_FOUND]
    assert np.all(np.diff(found["timestamp"].astype(np.int64)) > 0)


def test_lookup_transfers(lg):
    world(lg)
    ok(lg, tr(10, ALICE, BOB, 7, code=3, user_data=4, flags=PEND, timeout=60))
    out = lookup(lg, 10, 11, 0, U64MAX)
    assert len(out) == 4
    r = out[0]
    assert (int(r["id"]), int(r["debit_account"]), int(r["credit_account"]), int(r["amount"]), int(r["code"]),
            int(r["user_data"]), int(r["timeout"]), int(r["ledger"]), int(r["pending_id"])) == (
        10, ALICE, BOB, 7, 3, 4, 60, 1, 0)
    assert int(r["flags"]) & ~LINK == PEND
    assert int(r["state"]) == S.PENDING
    for empty in out[1:]:
        assert int(empty["state"]) == S.NOT_FOUND
        assert all(int(empty[f]) == 0 for f in empty.dtype.names)
    assert len(lookup(lg)) == 0


# ---------------------------------------------------------------------------------------------------- batches
def test_batch_of_zero_rows(lg):
    out = lg.transfers(transfer_array([]))
    assert out.dtype == np.uint8 and out.shape == (0,)
    out = lg.create_accounts(account_array([]))
    assert out.dtype == np.uint8 and out.shape == (0,)
    assert len(lg.accounts()) == 0


def test_batch_of_one_row(lg):
    world(lg)
    assert run(lg, tr(10)) == [R.OK]
    assert lg.transfer(11, ALICE, BOB, 2) == R.OK
    assert lg.transfer(11, ALICE, BOB, 3) == R.EXISTS_WITH_DIFFERENT_FIELDS
    assert isinstance(lg.transfer(12, ALICE, BOB, 0), TransferResult)
    assert lg.balance(BOB) == 3


def test_dict_of_columns(lg):
    world(lg)
    n = 5
    cols = {
        "id": np.arange(10, 10 + n, dtype=np.uint64),
        "debit_account": np.full(n, ALICE, dtype=np.uint64),
        "credit_account": np.full(n, BOB, dtype=np.uint64),
        "amount": np.array([1, 2, 3, 0, 5], dtype=np.int64),
        "pending_id": np.zeros(n, dtype=np.uint64),
        "user_data": np.zeros(n, dtype=np.uint64),
        "ledger": np.ones(n, dtype=np.uint32),
        "timeout": np.zeros(n, dtype=np.uint32),
        "code": np.zeros(n, dtype=np.uint16),
        "flags": np.zeros(n, dtype=np.uint16),
    }
    out = lg.transfers(cols)
    assert [R(int(c)) for c in out] == [R.OK, R.OK, R.OK, R.AMOUNT_MUST_BE_POSITIVE, R.OK]
    assert lg.balance(BOB) == 11


def test_one_million_transfers(engine):
    import ledger

    lg = engine
    n_acc, n = 1000, 1_000_000
    acc = ledger.accounts_batch(n_acc)
    acc["id"] = np.arange(1, n_acc + 1)
    acc["min_balance"] = MIN
    assert not engine.create_accounts(acc).any()
    rng = np.random.default_rng(7)
    dr = rng.integers(1, n_acc + 1, n)
    cr = (dr - 1 + rng.integers(1, n_acc, n)) % n_acc + 1  # never equal to dr
    amount = rng.integers(1, 1000, n)
    batch = ledger.transfers_batch(n)
    batch["id"] = np.arange(1, n + 1)
    batch["debit_account"] = dr
    batch["credit_account"] = cr
    batch["amount"] = amount
    out = lg.transfers(batch)
    assert out.dtype == np.uint8 and out.shape == (n,)
    assert not out.any(), np.bincount(out)
    debits = np.bincount(dr, weights=amount, minlength=n_acc + 1).astype(np.int64)
    credits = np.bincount(cr, weights=amount, minlength=n_acc + 1).astype(np.int64)
    accs = lg.accounts()
    order = np.argsort(accs["id"])
    accs = accs[order]
    assert np.array_equal(accs["id"].astype(np.int64), np.arange(1, n_acc + 1))
    assert np.array_equal(accs["debits_posted"].astype(np.int64), debits[1:])
    assert np.array_equal(accs["credits_posted"].astype(np.int64), credits[1:])
    for i in (1, 500, 1000):
        assert lg.balance(i) == int(credits[i]) - int(debits[i])
    assert int(accs["credits_posted"].astype(np.int64).sum()) == int(accs["debits_posted"].astype(np.int64).sum())
    assert_conserved(lg)
    # Idempotent replay of the whole batch: all EXISTS, nothing changes.
    out = lg.transfers(batch)
    assert (out == R.EXISTS).all()
    assert lg.balance(1) == int(credits[1]) - int(debits[1])
    ts = lg.lookup_transfers(batch["id"])["timestamp"].astype(np.int64)
    assert np.all(np.diff(ts) == 1)


def test_ten_million_accounts(engine):
    import ledger

    lg = engine
    n_acc, step = 10_000_000, 2_500_000
    for start in range(0, n_acc, step):
        acc = ledger.accounts_batch(step)
        acc["id"] = np.arange(start + 1, start + step + 1)
        if start == 0:
            acc["min_balance"][:1000] = MIN
        out = lg.create_accounts(acc)
        assert not out.any()
        del acc, out
    gc.collect()
    n = 1_000_000
    rng = np.random.default_rng(3)
    batch = ledger.transfers_batch(n)
    batch["id"] = np.arange(1, n + 1)
    batch["debit_account"] = rng.integers(1, 1001, n)  # the 1000 settlement accounts pay
    batch["credit_account"] = rng.integers(1001, n_acc + 1, n)
    batch["amount"] = rng.integers(1, 100, n)
    out = lg.transfers(batch)
    assert not out.any()
    last = int(batch["credit_account"][-1])
    expected = int(batch["amount"][batch["credit_account"] == last].sum())
    assert lg.balance(last) == expected
    assert lg.account(n_acc) is not None and lg.account(n_acc + 1) is None
    accs = lg.accounts()
    assert len(accs) == n_acc
    assert int(accs["credits_posted"].astype(np.int64).sum()) == int(batch["amount"].sum())
    assert int(accs["debits_posted"].astype(np.int64).sum()) == int(batch["amount"].sum())


# ---------------------------------------------------------------------------------------------------- API surface
def test_batch_defaults():
    import ledger

    a = ledger.accounts_batch(3)
    assert a.dtype == ledger.ACCOUNT_DTYPE and a.shape == (3,)
    assert (a["max_balance"] == 2**63 - 1).all()
    assert ledger.accounts_batch(1)["max_balance"][0] == 2**63 - 1
    assert (a["ledger"] == 1).all()
    assert (a["id"] == 0).all() and (a["min_balance"] == 0).all() and (a["flags"] == 0).all()
    assert (a["user_data"] == 0).all()
    t = ledger.transfers_batch(4)
    assert t.dtype == ledger.TRANSFER_DTYPE and t.shape == (4,)
    assert (t["ledger"] == 1).all()
    for f in t.dtype.names:
        if f != "ledger":
            assert (t[f] == 0).all(), f
    assert len(ledger.transfers_batch(0)) == 0 and len(ledger.accounts_batch(0)) == 0


def test_public_names():
    import ledger

    assert ledger.TransferResult is TransferResult and ledger.AccountResult is AccountResult
    assert ledger.TransferFlags is TransferFlags and ledger.AccountFlags is AccountFlags
    assert ledger.TransferState is TransferState
    assert ledger.BATCH_SIZE_MAX == 2**23
    assert issubclass(ledger.LedgerClosedError, Exception)


def test_account_named_tuple(engine):
    world(engine)
    ok(engine, tr(10, ALICE, BOB, 100, flags=PEND))
    a = engine.account(ALICE)
    assert isinstance(a, tuple)
    assert a.id == ALICE and a.ledger == 1 and a.balance == 1000 and a.available == 900
    assert (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending) == (0, 1000, 100, 0)
    assert a.min_balance == 0 and a.max_balance == MAX and a.user_data == 0 and a.timestamp > 0
    with pytest.raises((AttributeError, TypeError)):
        a.credits_posted = 5
    assert engine.balance(ALICE) == 1000 and engine.available(ALICE) == 900


def test_context_manager_and_close(clock):
    import ledger

    with ledger.open(None, clock=clock) as lg:
        assert lg.create_account(1) == A.OK
    with pytest.raises(ledger.LedgerClosedError):
        lg.transfer(1, 1, 2, 1)
    lg2 = ledger.open(None)  # default wall clock
    assert lg2.create_account(1) == A.OK
    lg2.close()
    for call in (
        lambda: lg2.transfers(ledger.transfers_batch(1)),
        lambda: lg2.create_accounts(ledger.accounts_batch(1)),
        lambda: lg2.transfer(1, 1, 2, 1),
        lambda: lg2.create_account(2),
        lambda: lg2.account(1),
        lambda: lg2.balance(1),
        lambda: lg2.available(1),
        lambda: lg2.accounts(),
        lambda: lg2.lookup_transfers(np.array([1], dtype=np.uint64)),
        lambda: lg2.verify(),
        lambda: lg2.stats(),
    ):
        with pytest.raises(ledger.LedgerClosedError):
            call()


def test_scalar_arguments_must_be_integers(engine):
    """A float, Decimal or Fraction amount (or id) is refused, never truncated: 1.5 must not move 1."""
    from decimal import Decimal
    from fractions import Fraction

    world(engine)
    before = engine.balance(BOB)
    for bad in (1.5, 2.0, np.float64(3.0), Decimal("3.99"), Fraction(7, 2), "5", None):
        with pytest.raises(TypeError, match="amount must be an integer"):
            engine.transfer(10, ALICE, BOB, bad)
        with pytest.raises(TypeError, match="id must be an integer"):
            engine.transfer(bad, ALICE, BOB, 1)
        with pytest.raises(TypeError, match="id must be an integer"):
            engine.create_account(bad)
        with pytest.raises(TypeError, match="must be an integer"):
            engine.balance(bad)
    with pytest.raises(TypeError, match="min_balance must be an integer"):
        engine.create_account(77, min_balance=-0.5)
    assert engine.balance(BOB) == before
    # numpy integers and IntFlag members are integers.
    assert engine.transfer(np.uint64(10), np.int64(ALICE), BOB, np.int32(5), flags=ledger_module().TransferFlags(0)) \
        == R.OK
    assert engine.balance(BOB) == before + 5


def test_out_of_range_scalars_name_the_argument(engine):
    world(engine)
    cases = [(dict(ledger=2**32), "ledger"), (dict(code=2**16), "code"), (dict(timeout=-1), "timeout"),
             (dict(flags=2**16), "flags"), (dict(pending_id=-1), "pending_id"), (dict(user_data=2**64), "user_data")]
    for keywords, name in cases:
        with pytest.raises(ValueError, match=f"^{name} .* is outside"):
            engine.transfer(10, ALICE, BOB, 1, **keywords)
    with pytest.raises(ValueError, match="^amount .* int64"):
        engine.transfer(10, ALICE, BOB, 2**63)
    with pytest.raises(ValueError, match="^id .* is outside"):
        engine.balance(-1)


def test_account_zero_is_never_found(engine):
    """0 marks an empty id-table slot; looking it up must not return whatever account sits in slot 0."""
    world(engine)
    assert engine.account(0) is None
    with pytest.raises(KeyError):
        engine.balance(0)
    with pytest.raises(KeyError):
        engine.available(0)


def test_wall_clock_timestamps():
    import time

    import ledger

    with ledger.open(None) as lg:
        before = time.time_ns()
        assert lg.create_account(1, min_balance=MIN) == A.OK
        assert lg.create_account(2) == A.OK
        assert lg.transfer(1, 1, 2, 5) == R.OK
        after = time.time_ns()
        ts = int(lg.lookup_transfers(np.array([1], dtype=np.uint64))["timestamp"][0])
        assert before <= ts <= after + 10


def test_misuse_wrong_dtype(engine):
    world(engine)
    with pytest.raises((TypeError, ValueError)):
        engine.transfers(np.zeros(3, dtype=np.int64))
    with pytest.raises((TypeError, ValueError)):
        engine.transfers(np.zeros(3, dtype=ACCOUNT_DTYPE))
    with pytest.raises((TypeError, ValueError)):
        engine.create_accounts(np.zeros(3, dtype=TRANSFER_DTYPE))
    unaligned = np.dtype([(n, TRANSFER_DTYPE.fields[n][0]) for n in TRANSFER_DTYPE.names])  # packed layout
    with pytest.raises((TypeError, ValueError)):
        engine.transfers(np.zeros(3, dtype=unaligned))
    with pytest.raises((TypeError, ValueError)):
        engine.transfers([(1, 2, 3)])
    with pytest.raises((TypeError, ValueError)):
        engine.transfers(None)


def test_misuse_shape_and_layout(engine):
    import ledger

    world(engine)
    before = state_snapshot(engine)
    with pytest.raises((TypeError, ValueError)):
        engine.transfers(ledger.transfers_batch(4).reshape(2, 2))
    with pytest.raises((TypeError, ValueError)):
        engine.create_accounts(ledger.accounts_batch(4).reshape(2, 2))
    batch = ledger.transfers_batch(6)
    batch["id"] = np.arange(10, 16)
    batch["debit_account"] = ALICE
    batch["credit_account"] = BOB
    batch["amount"] = 1
    with pytest.raises((TypeError, ValueError)):
        engine.transfers(batch[::2])
    acc = ledger.accounts_batch(4)
    acc["id"] = np.arange(50, 54)
    with pytest.raises((TypeError, ValueError)):
        engine.create_accounts(acc[::2])
    with pytest.raises((TypeError, ValueError)):
        engine.transfers(np.zeros((), dtype=TRANSFER_DTYPE))
    with pytest.raises((TypeError, ValueError)):
        engine.transfers({"id": np.arange(3, dtype=np.uint64), "amount": np.ones(2, dtype=np.int64)})
    assert state_snapshot(engine) == before
    # A contiguous copy of the same slice works.
    assert not engine.transfers(np.ascontiguousarray(batch[::2])).any()


def test_read_only_input(engine):
    """Batches are only read: a read-only array (np.frombuffer of bytes) is accepted."""
    world(engine)
    ro = np.frombuffer(transfer_array([tr(10), tr(11)]).tobytes(), dtype=TRANSFER_DTYPE)
    assert not ro.flags.writeable
    assert [R(int(c)) for c in engine.transfers(ro)] == [R.OK, R.OK]
    acc = np.frombuffer(account_array([dict(id=20)]).tobytes(), dtype=ACCOUNT_DTYPE)
    assert [A(int(c)) for c in engine.create_accounts(acc)] == [A.OK]
    ids = np.array([10, 11, 12], dtype=np.uint64)
    ids.flags.writeable = False
    assert [S(int(x)) for x in engine.lookup_transfers(ids)["state"]] == [S.POSTED, S.POSTED, S.NOT_FOUND]


def test_misuse_id_out_of_range(engine):
    world(engine)
    for bad in (2**64, -1):
        with pytest.raises(ValueError):
            engine.transfer(bad, ALICE, BOB, 1)
        with pytest.raises(ValueError):
            engine.transfer(10, bad, BOB, 1)
        with pytest.raises(ValueError):
            engine.transfer(10, ALICE, bad, 1)
        with pytest.raises(ValueError):
            engine.create_account(bad)
    with pytest.raises(ValueError):
        engine.transfer(10, ALICE, BOB, 2**63)
    with pytest.raises(ValueError):
        engine.transfer(10, ALICE, BOB, -(2**63) - 1)
    with pytest.raises(ValueError):
        engine.create_account(10, max_balance=2**63)
    assert engine.transfer(10, ALICE, BOB, 1) == R.OK


def test_misuse_batch_too_large(engine):
    import ledger

    world(engine)
    before = state_snapshot(engine)
    try:
        big = np.empty(BATCH_SIZE_MAX + 1, dtype=TRANSFER_DTYPE)  # ~537 MB, pages untouched
    except MemoryError:  # pragma: no cover
        pytest.skip("cannot allocate BATCH_SIZE_MAX + 1 rows")
    with pytest.raises(ValueError):
        engine.transfers(big)
    del big
    big = np.empty(BATCH_SIZE_MAX + 1, dtype=ACCOUNT_DTYPE)
    with pytest.raises(ValueError):
        engine.create_accounts(big)
    del big
    gc.collect()
    assert state_snapshot(engine) == before
    assert ledger.BATCH_SIZE_MAX == BATCH_SIZE_MAX


def ledger_module():
    import ledger
    return ledger
