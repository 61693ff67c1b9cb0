"""The engine and the reference model (tests/support/model.py), driven side by side with identical random operations.

After every step: identical result codes, identical accounts (every counter, limit and timestamp), conservation
per ledger, and identical lookup_transfers answers for every transfer id of the (small) id space.

Sizes: HYPOTHESIS_PROFILE=default (CI: 300 examples x up to 50 steps, ~10,000 steps in 30-50 s)
or HYPOTHESIS_PROFILE=long (2,000 x 100).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from support.clock import Clock
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from support.model import TRANSFER_FIELDS, Model, ModelLedger

from ledger.enums import ACCOUNT_DTYPE, TRANSFER_DTYPE, AccountResult, TransferResult, TransferState

MAX = 2**63 - 1
MIN = -(2**63)
U64MAX = 2**64 - 1
SEC = 10**9
N_ACCOUNT_IDS = 12  # account ids 1..12
N_TRANSFER_IDS = 40  # transfer ids 1..40
LOOKUP_IDS = np.array([0, *range(1, N_TRANSFER_IDS + 1), U64MAX], dtype=np.uint64)

STATS = {"examples": 0, "steps": 0, "rows": 0, "ok_rows": 0}

PROFILES = {
    "default": dict(max_examples=300, stateful_step_count=50),
    "long": dict(max_examples=2000, stateful_step_count=100),
    "quick": dict(max_examples=20, stateful_step_count=30),
}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
if PROFILE not in PROFILES:
    PROFILE = "default"


def _open_engine(clock):
    if os.environ.get("LEDGER_STATEFUL_BACKEND") == "model":  # self-test of this file: model against model
        return ModelLedger(clock)
    import ledger

    return ledger.open(None, clock=clock)


# ------------------------------------------------------------------------------------------------ strategies
def _mapped(n_valid: int, extra: dict):
    """0..n_valid as they are, then a few special values."""
    specials = list(extra.values())
    return st.integers(0, n_valid + len(specials)).map(lambda i: i if i <= n_valid else specials[i - n_valid - 1])


# Account ids 0..12 and 2**64-1; 13 is a valid id that never exists.
account_id = _mapped(N_ACCOUNT_IDS, {"max": U64MAX})
account_ref = _mapped(N_ACCOUNT_IDS + 1, {"max": U64MAX})
transfer_id = _mapped(N_TRANSFER_IDS, {"max": U64MAX})
ledger_id = st.sampled_from([1, 1, 1, 2, 2, 0, 3])
small = st.sampled_from([0, 0, 1])

account_row = st.fixed_dictionaries({
    "id": account_id,
    "ledger": st.sampled_from([1, 1, 1, 2, 2, 0, 3]),
    "flags": st.sampled_from([0] * 6 + [1, 1, 1, 2, 3, 0x8000]),
    "min_balance": st.sampled_from([0] * 6 + [MIN] * 5 + [-1, -100, -(2**62), 1, MAX]),
    "max_balance": st.sampled_from([MAX] * 8 + [0, 100, 1000, 10**6, 2**62, -1, MIN]),
    "user_data": small,
})
# Accounts that mostly succeed: the opening set of every example.
good_account_row = st.fixed_dictionaries({
    "id": st.integers(1, N_ACCOUNT_IDS),
    "ledger": st.sampled_from([1, 1, 2]),
    "flags": st.just(0),
    "min_balance": st.sampled_from([0, 0, 0, MIN, MIN, -100]),
    "max_balance": st.sampled_from([MAX, MAX, MAX, 1000, 10**6, 0]),
    "user_data": small,
})

amount_special = st.sampled_from([0, -1, MIN, MAX, MAX - 1, 2**62, 2**62 + 1, 10**6, 999])
amount = st.one_of(st.integers(1, 300), st.integers(1, 300), st.integers(1, 300), amount_special)
timeout_pending = st.sampled_from([0, 0, 1, 1, 1, 2, 3, 5, 2**32 - 1])
timeout_other = st.sampled_from([0] * 19 + [1])
linked = st.sampled_from([0, 0, 0, 1])


@st.composite
def transfer_row(draw, model: Model):
    """A transfer row, steered by the model's state so that many rows get far into the checks."""
    existing = sorted(model.accounts)
    known = sorted(model.transfers_by_id)
    pendings = [t for t in known if model.transfers_by_id[t].flags & 2]

    def account():
        if existing and draw(st.integers(0, 9)) < 8:
            return draw(st.sampled_from(existing))
        return draw(account_ref)

    def ledger_for(acc_id):
        a = model.accounts.get(acc_id)
        if a is not None and draw(st.integers(0, 9)) < 8:
            return a.ledger
        return draw(ledger_id)

    kind = draw(st.sampled_from(["plain"] * 3 + ["pending"] * 3 + ["post"] * 2 + ["void", "random"]))
    row = {"id": draw(transfer_id), "code": draw(small), "user_data": draw(small)}
    if kind == "random":  # every flag combination, valid or not, with fields of any kind
        row.update(
            flags=draw(st.one_of(st.integers(0, 31), st.sampled_from([0x10, 0x8000, 0xFFFF]))),
            debit_account=draw(account_ref), credit_account=draw(account_ref), amount=draw(amount),
            ledger=draw(ledger_id), pending_id=draw(transfer_id), timeout=draw(timeout_pending),
        )
        return row
    if kind in ("plain", "pending"):
        debit = account()
        same_ledger = [a for a in existing if a != debit and model.accounts[a].ledger == getattr(
            model.accounts.get(debit), "ledger", None)]
        if same_ledger and draw(st.integers(0, 9)) < 7:
            credit = draw(st.sampled_from(same_ledger))
        else:
            credit = account()
        row.update(
            flags=draw(linked) | (2 if kind == "pending" else 0),
            debit_account=debit, credit_account=credit, amount=draw(amount), ledger=ledger_for(debit),
            pending_id=draw(st.sampled_from([0] * 19 + [U64MAX])),
            timeout=draw(timeout_pending if kind == "pending" else timeout_other),
        )
        return row
    # POST / VOID: mostly against a pending we know about; fields mostly 0 ("as the pending").
    roll = draw(st.integers(0, 9))
    if pendings and roll < 7:
        pending_id = draw(st.sampled_from(pendings))
    elif known and roll < 9:
        pending_id = draw(st.sampled_from(known))
    else:
        pending_id = draw(transfer_id)
    p = model.transfers_by_id.get(pending_id)

    def zero_or(value_strategy, pending_value):
        r = draw(st.integers(0, 9))
        if r < 6:
            return 0
        if r < 9 and p is not None:
            return pending_value
        return draw(value_strategy)

    if p is not None and draw(st.integers(0, 9)) < 4:
        amt = draw(st.integers(0, p.amount + 1)) if p.amount < 10**9 else draw(st.sampled_from(
            [p.amount, p.amount - 1, p.amount + 1 if p.amount < MAX else 1]))
    else:
        amt = draw(st.one_of(st.just(0), st.just(0), st.integers(1, 300), amount_special))
    row.update(
        flags=draw(linked) | (4 if kind == "post" else 8),
        debit_account=zero_or(account_ref, p and p.debit_account),
        credit_account=zero_or(account_ref, p and p.credit_account),
        amount=amt, ledger=zero_or(ledger_id, p and p.ledger), pending_id=pending_id, timeout=draw(timeout_other),
    )
    return row


def transfer_array(rows):
    return np.array([tuple(r[f] for f in TRANSFER_DTYPE.names) for r in rows], dtype=TRANSFER_DTYPE)


def account_array(rows):
    return np.array([tuple(r[f] for f in ACCOUNT_DTYPE.names) for r in rows], dtype=ACCOUNT_DTYPE)


def _names(codes, enum):
    return [enum(int(c)).name for c in codes]


ACC_COMPARED = ("id", "ledger", "flags", "min_balance", "max_balance", "user_data", "debits_posted",
                "credits_posted", "debits_pending", "credits_pending", "timestamp")
REC_COMPARED = ("id", "debit_account", "credit_account", "amount", "ledger", "code", "flags", "pending_id",
                "timeout", "user_data", "timestamp", "state")


# ------------------------------------------------------------------------------------------------ the machine
class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = Clock(1_700_000_000 * SEC)
        self.lg = _open_engine(self.clock)
        self.model = Model()
        self.history: list[dict] = []  # transfer rows submitted before, for retries
        STATS["examples"] += 1

    def teardown(self):
        self.lg.close()

    # ---- operations
    def _create_accounts(self, rows, single=False):
        now = self.clock()
        want = self.model.create_accounts(rows, now)
        if single:
            r = rows[0]
            got = [int(self.lg.create_account(r["id"], r["ledger"], min_balance=r["min_balance"],
                                              max_balance=r["max_balance"], flags=r["flags"],
                                              user_data=r["user_data"]))]
        else:
            out = self.lg.create_accounts(account_array(rows))
            assert out.dtype == np.uint8 and out.shape == (len(rows),)
            got = [int(c) for c in out]
        note(f"create_accounts at {now}: {rows}\n  -> engine {_names(got, AccountResult)}")
        assert _names(got, AccountResult) == _names(want, AccountResult), rows
        self._count(want, AccountResult.OK)

    def _transfers(self, rows, how="array"):
        now = self.clock()
        want = self.model.transfers(rows, now)
        if how == "single":
            r = rows[0]
            got = [int(self.lg.transfer(r["id"], r["debit_account"], r["credit_account"], r["amount"],
                                        ledger=r["ledger"], code=r["code"], flags=r["flags"],
                                        pending_id=r["pending_id"], timeout=r["timeout"],
                                        user_data=r["user_data"]))]
        else:
            batch = transfer_array(rows)
            if how == "columns":
                batch = {f: np.ascontiguousarray(batch[f]) for f in TRANSFER_DTYPE.names}
            out = self.lg.transfers(batch)
            assert out.dtype == np.uint8 and out.shape == (len(rows),)
            got = [int(c) for c in out]
        note(f"transfers at {now}: {rows}\n  -> engine {_names(got, TransferResult)}")
        assert _names(got, TransferResult) == _names(want, TransferResult), rows
        self.history.extend(rows)
        del self.history[:-200]
        self._count(want, TransferResult.OK)

    def _count(self, codes, ok):
        STATS["steps"] += 1
        STATS["rows"] += len(codes)
        STATS["ok_rows"] += sum(1 for c in codes if c == ok)

    # ---- rules
    @rule(rows=st.lists(account_row, min_size=0, max_size=6))
    def create_accounts(self, rows):
        self._create_accounts(rows)

    @rule(row=account_row)
    def create_one_account(self, row):
        row = dict(row, flags=row["flags"] & ~1)  # a lone LINKED row is a chain left open
        self._create_accounts([row], single=True)

    @initialize(rows=st.lists(good_account_row, min_size=2, max_size=10))
    def open_accounts(self, rows):
        self._create_accounts(rows)

    @rule(data=st.data(), n=st.integers(1, 4))
    def fund(self, data, n):
        """Plain transfers out of a settlement account (min_balance -2**63) into its ledger: keeps money moving."""
        settlements = [a for a in self.model.accounts.values() if a.min_balance == MIN]
        if not settlements:
            led = data.draw(st.sampled_from([1, 2]), label="ledger")
            settle = data.draw(st.integers(1, N_ACCOUNT_IDS), label="settlement")
            return self._create_accounts([dict(id=settle, ledger=led, flags=0, min_balance=MIN, max_balance=MAX,
                                               user_data=0)])
        s = data.draw(st.sampled_from(settlements), label="settlement")
        targets = [a.id for a in self.model.accounts.values() if a.ledger == s.ledger and a.id != s.id]
        if not targets:
            return self._transfers([])
        rows = [dict(id=data.draw(st.integers(1, N_TRANSFER_IDS)), debit_account=s.id,
                     credit_account=data.draw(st.sampled_from(targets)),
                     amount=data.draw(st.sampled_from([1, 10, 100, 1000, 10**6, 2**62])), ledger=s.ledger, code=0,
                     flags=0, pending_id=0, timeout=0, user_data=0) for _ in range(n)]
        for row in rows:  # some reservations too, most of which can expire
            if data.draw(st.integers(0, 3), label="pending") == 0:
                row.update(flags=2, timeout=data.draw(st.sampled_from([0, 1, 1, 2, 4]), label="timeout"))
        self._transfers(rows)

    @rule(data=st.data(), n=st.integers(0, 8), how=st.sampled_from(["array"] * 6 + ["columns"]))
    def transfers(self, data, n, how):
        rows = [data.draw(transfer_row(self.model), label=f"row{i}") for i in range(n)]
        for i, row in enumerate(rows):  # POST/VOID of a pending made earlier in the same batch
            earlier = [r["id"] for r in rows[:i] if r["flags"] & 2]
            if row["flags"] & 12 and earlier and data.draw(st.integers(0, 2), label=f"same_batch{i}") == 0:
                row["pending_id"] = data.draw(st.sampled_from(earlier), label=f"pending{i}")
        self._transfers(rows, how)

    @rule(data=st.data())
    def transfer_one(self, data):
        row = data.draw(transfer_row(self.model))
        row["flags"] &= ~1
        self._transfers([row], "single")

    @rule(data=st.data(), n=st.integers(1, 5))
    def retry(self, data, n):
        """Resubmit earlier rows (idempotency), sometimes with one field changed."""
        if not self.history:
            return self._transfers([])
        rows = []
        for i in range(n):
            row = dict(data.draw(st.sampled_from(self.history), label=f"old{i}"))
            if data.draw(st.integers(0, 3), label=f"mutate{i}") == 0:
                field = data.draw(st.sampled_from(TRANSFER_FIELDS[1:]), label=f"field{i}")
                row[field] = data.draw(st.sampled_from([0, 1, 2, 3]), label=f"value{i}")
            rows.append(row)
        self._transfers(rows)

    @rule()
    def empty_transfers(self):
        self._transfers([])

    @rule(ns=st.one_of(
        st.sampled_from([0, 1, SEC - 1, SEC, SEC + 1, 2 * SEC, 5 * SEC, -SEC]),
        st.integers(0, 6 * SEC),
    ))
    def advance_clock(self, ns):
        self.clock.advance(ns)
        STATS["steps"] += 1

    @rule(seconds=st.integers(1, 3))
    def sleep(self, seconds):
        self.clock.advance(seconds * SEC)
        STATS["steps"] += 1

    # ---- agreement after every step
    @invariant()
    def accounts_agree(self):
        acc = self.lg.accounts()
        rows = acc[list(ACC_COMPARED)].tolist()
        got = sorted(tuple(v & ~1 if f == "flags" else v for f, v in zip(ACC_COMPARED, t, strict=True)) for t in rows)
        want = sorted(
            tuple(getattr(a, f) & ~1 if f == "flags" else getattr(a, f) for f in ACC_COMPARED)
            for a in self.model.accounts.values()
        )
        assert got == want
        # Conservation per ledger, from what the engine says.
        sums = {}
        for t in got:
            s = sums.setdefault(t[1], [0, 0])
            s[0] += t[7] - t[6]
            s[1] += t[8] - t[9]
        assert all(s == [0, 0] for s in sums.values()), sums
        for t in got:  # every counter in [0, 2**63 - 1]
            assert all(0 <= c <= MAX for c in t[6:10]), t

    @invariant()
    def transfers_agree(self):
        out = self.lg.lookup_transfers(LOOKUP_IDS)
        assert len(out) == len(LOOKUP_IDS)
        got = [dict(zip(REC_COMPARED, t, strict=True)) for t in out[list(REC_COMPARED)].tolist()]
        for tid, g in zip(LOOKUP_IDS.tolist(), got, strict=True):
            m = self.model.lookup(tid)
            if m is None:
                assert g["state"] == TransferState.NOT_FOUND, (tid, g)
                continue
            want = {f: getattr(m, f) for f in REC_COMPARED}
            want["state"] = int(want["state"])
            g["flags"] &= ~1
            want["flags"] &= ~1
            assert g == want, tid


TestLedgerStateful = LedgerMachine.TestCase
TestLedgerStateful.settings = settings(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    **PROFILES[PROFILE],
)
