"""Reference model of docs/SEMANTICS.md: the specification in code.

Plain Python: dicts, dataclasses and Python ints (exact arithmetic, no wrap-around); no numpy in the logic.
The hypothesis state machine (tests/test_stateful.py) drives this model and the Cython core side by side and
asserts they agree after every step, so every line here should be traceable to a sentence of SEMANTICS.md.

Rows are dicts keyed by the dtype field names (`ledger.ACCOUNT_DTYPE`, `ledger.TRANSFER_DTYPE`); result lists hold
the int values of `AccountResult` / `TransferResult`.

At the bottom, `ModelLedger` wraps the model in the public `ledger` API (numpy in, numpy out) so the rule tests can
run the same assertions against the model and against the engine. Only that adapter uses numpy.

Where SEMANTICS.md leaves room, the choice made here is written down next to the code as "Reading:".
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ledger.enums import (
    AccountFlags,
    AccountResult,
    TransferFlags,
    TransferResult,
    TransferState,
)

ID_INVALID_MAX = 2**64 - 1
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
NS_PER_S = 10**9
BATCH_SIZE_MAX = 2**23
EXPIRE_BATCH_MAX = 65536

ACCOUNT_FIELDS = ("id", "ledger", "flags", "min_balance", "max_balance", "user_data")
TRANSFER_FIELDS = (
    "id", "debit_account", "credit_account", "amount", "ledger", "code",
    "flags", "pending_id", "timeout", "user_data",
)
# Fields compared by idempotency (flags without LINKED).
ACCOUNT_COMPARED = ("ledger", "flags", "min_balance", "max_balance", "user_data")
TRANSFER_COMPARED = (
    "debit_account", "credit_account", "amount", "ledger", "code",
    "flags", "pending_id", "timeout", "user_data",
)

ACCOUNT_FLAGS_ALL = int(AccountFlags.LINKED)
TRANSFER_FLAGS_ALL = int(
    TransferFlags.LINKED | TransferFlags.PENDING | TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING
)
LINKED = 1
PENDING = int(TransferFlags.PENDING)
POST = int(TransferFlags.POST_PENDING)
VOID = int(TransferFlags.VOID_PENDING)


def id_invalid(x: int) -> bool:
    return x == 0 or x == ID_INVALID_MAX


@dataclass
class Account:
    id: int
    ledger: int
    flags: int
    min_balance: int
    max_balance: int
    user_data: int
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    timestamp: int = 0

    @property
    def balance(self) -> int:
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        """What may still be spent."""
        return self.credits_posted - self.debits_posted - self.debits_pending

    @property
    def ceiling(self) -> int:
        """What the balance could rise to."""
        return self.credits_posted + self.credits_pending - self.debits_posted


@dataclass
class Transfer:
    """A transfer as applied. For POST/VOID the 0 fields are resolved to the pending's values."""

    id: int
    debit_account: int
    credit_account: int
    amount: int
    ledger: int
    code: int
    flags: int
    pending_id: int
    timeout: int
    user_data: int
    timestamp: int
    state: int  # TransferState
    deadline: int | None = None  # PENDING with timeout != 0 only


class Model:
    def __init__(self) -> None:
        self.accounts: dict[int, Account] = {}
        self.transfers_by_id: dict[int, Transfer] = {}
        # Timestamp of the last applied event (0: none yet).
        self.last_timestamp = 0
        # Live pendings that can expire: id -> deadline.
        self._deadlines: dict[int, int] = {}
        # Per call: the timestamp the next applied event gets, and the undo log of the open chain.
        self._next_ts = 0
        self._undo: list[tuple] = []

    # ------------------------------------------------------------------ time
    def _begin_call(self, now_ns: int) -> int:
        """T = max(now_ns, previous_event_timestamp + 1); events get T, T+1, ..."""
        t = max(now_ns, self.last_timestamp + 1)
        self._next_ts = t
        self._undo = []
        return t

    def _end_call(self, t: int) -> None:
        # A call that applied nothing does not advance time.
        if self._next_ts > t:
            self.last_timestamp = self._next_ts - 1

    def _take_ts(self) -> int:
        ts = self._next_ts
        self._next_ts += 1
        return ts

    # ------------------------------------------------------------------ undo log (for linked chains)
    def _save_account(self, acc_id: int) -> Account:
        """Record the account's current value for undo; return it (mutate in place afterwards)."""
        acc = self.accounts[acc_id]
        self._undo.append(("account", acc_id, dataclasses.replace(acc)))
        return acc

    def _save_transfer(self, tr_id: int) -> Transfer:
        tr = self.transfers_by_id[tr_id]
        self._undo.append(("transfer", tr_id, dataclasses.replace(tr), self._deadlines.get(tr_id)))
        return tr

    def _rollback(self, mark: int, ts_mark: int) -> None:
        while len(self._undo) > mark:
            entry = self._undo.pop()
            kind = entry[0]
            if kind == "new_account":
                del self.accounts[entry[1]]
            elif kind == "account":
                self.accounts[entry[1]] = entry[2]
            elif kind == "new_transfer":
                del self.transfers_by_id[entry[1]]
                self._deadlines.pop(entry[1], None)
            elif kind == "transfer":
                self.transfers_by_id[entry[1]] = entry[2]
                if entry[3] is not None:
                    self._deadlines[entry[1]] = entry[3]
                else:
                    self._deadlines.pop(entry[1], None)
            else:  # pragma: no cover
                raise AssertionError(kind)
        self._next_ts = ts_mark

    # ------------------------------------------------------------------ linked chains
    def _run_batch(self, rows: list[dict], apply_row: Callable[[dict], int], codes,
                   exists_now: Callable[[dict], bool]) -> list[int]:
        """Apply rows in order with the linked-chain rules.

        A chain is applied all or nothing. The first failing row keeps its own code; rows of the chain that were
        applied are undone and get LINKED_EVENT_FAILED; rows that answered EXISTS keep EXISTS, unless what they
        matched was created by this same chain and is now undone: then they get LINKED_EVENT_FAILED too.
        Reading: rows after the failing row in the same chain are not evaluated; they get LINKED_EVENT_FAILED.
        Reading ("its last row gets LINKED_CHAIN_OPEN, the others LINKED_EVENT_FAILED"): a chain still open at
        the end of the batch is not evaluated at all, so none of its rows answers EXISTS or an error of its own.
        """
        ok, exists = int(codes.OK), int(codes.EXISTS)
        failed, chain_open = int(codes.LINKED_EVENT_FAILED), int(codes.LINKED_CHAIN_OPEN)
        n = len(rows)
        open_start = n  # first row of a chain left open at the end of the batch
        if n and int(rows[-1]["flags"]) & LINKED:
            open_start = n - 1
            while open_start > 0 and int(rows[open_start - 1]["flags"]) & LINKED:
                open_start -= 1
        results: list[int] = []
        chain_start = None
        broken = False
        undo_mark = ts_mark = 0
        for i, row in enumerate(rows[:open_start]):
            linked = bool(int(row["flags"]) & LINKED)
            if chain_start is None:
                chain_start, broken = i, False
                self._undo = []
                undo_mark, ts_mark = 0, self._next_ts
            code = failed if broken else int(apply_row(row))
            results.append(code)
            if code not in (ok, exists) and not broken:
                broken = True
                self._rollback(undo_mark, ts_mark)
                for j in range(chain_start, i):
                    if results[j] == ok or (results[j] == exists and not exists_now(rows[j])):
                        results[j] = failed
            if not linked:
                chain_start = None
        self._undo = []
        if open_start < n:
            results += [failed] * (n - 1 - open_start) + [chain_open]
        return results

    # ------------------------------------------------------------------ accounts
    def create_accounts(self, rows: Iterable[dict], now_ns: int = 0) -> list[int]:
        rows = [_plain(r, ACCOUNT_FIELDS) for r in rows]
        if len(rows) > BATCH_SIZE_MAX:
            raise ValueError("batch too large")
        t = self._begin_call(now_ns)
        results = self._run_batch(rows, self._create_account, AccountResult,
                                  lambda row: int(row["id"]) in self.accounts)
        self._end_call(t)
        return results

    def _create_account(self, a: dict) -> int:
        R = AccountResult
        if a["flags"] & ~ACCOUNT_FLAGS_ALL:
            return R.FLAGS_INVALID
        if id_invalid(a["id"]):
            return R.ID_INVALID
        if a["ledger"] == 0:
            return R.LEDGER_INVALID
        if not (a["min_balance"] <= 0 <= a["max_balance"]):
            return R.BALANCE_LIMITS_INVALID
        existing = self.accounts.get(a["id"])
        if existing is not None:
            same = all(
                _strip_linked(getattr(existing, f)) == _strip_linked(a[f]) if f == "flags"
                else getattr(existing, f) == a[f]
                for f in ACCOUNT_COMPARED
            )
            return R.EXISTS if same else R.EXISTS_WITH_DIFFERENT_FIELDS
        self.accounts[a["id"]] = Account(
            id=a["id"], ledger=a["ledger"], flags=a["flags"], min_balance=a["min_balance"],
            max_balance=a["max_balance"], user_data=a["user_data"], timestamp=self._take_ts(),
        )
        self._undo.append(("new_account", a["id"]))
        return R.OK

    # ------------------------------------------------------------------ transfers
    def transfers(self, rows: Iterable[dict], now_ns: int) -> list[int]:
        rows = [_plain(r, TRANSFER_FIELDS) for r in rows]
        if len(rows) > BATCH_SIZE_MAX:
            raise ValueError("batch too large")
        t = self._begin_call(now_ns)
        self._expire(t)
        results = self._run_batch(rows, self._transfer, TransferResult,
                                  lambda row: int(row["id"]) in self.transfers_by_id)
        self._end_call(t)
        return results

    def _expire(self, t: int) -> None:
        """Expire pendings whose deadline is at or before the call's timestamp: deadline order, then position
        (creation) order, at most EXPIRE_BATCH_MAX; each expiry is an event with its own timestamp."""
        due = [
            (deadline, self.transfers_by_id[tid].timestamp, tid)
            for tid, deadline in self._deadlines.items()
            if deadline <= t
        ]
        due.sort()
        for _deadline, _ts, tid in due[:EXPIRE_BATCH_MAX]:
            p = self.transfers_by_id[tid]
            self._release_pending(p)
            p.state = TransferState.PENDING_EXPIRED
            del self._deadlines[tid]
            self._take_ts()
        self._undo = []

    def _release_pending(self, p: Transfer) -> None:
        dr = self._save_account(p.debit_account)
        cr = self._save_account(p.credit_account)
        dr.debits_pending -= p.amount
        cr.credits_pending -= p.amount

    def _transfer(self, t: dict) -> int:
        R = TransferResult
        flags = t["flags"]
        kind = flags & (PENDING | POST | VOID)
        if flags & ~TRANSFER_FLAGS_ALL or kind not in (0, PENDING, POST, VOID):
            return R.FLAGS_INVALID
        if id_invalid(t["id"]):
            return R.ID_INVALID
        if kind in (POST, VOID):
            return self._post_or_void(t, kind)
        if t["pending_id"] != 0:
            return R.PENDING_ID_MUST_BE_ZERO
        if t["timeout"] != 0 and kind != PENDING:
            return R.TIMEOUT_RESERVED_FOR_PENDING
        if t["id"] in self.transfers_by_id:
            return self._exists(t)
        if id_invalid(t["debit_account"]):
            return R.DEBIT_ACCOUNT_ID_INVALID
        if id_invalid(t["credit_account"]):
            return R.CREDIT_ACCOUNT_ID_INVALID
        if t["debit_account"] == t["credit_account"]:
            return R.ACCOUNTS_MUST_BE_DIFFERENT
        if t["amount"] <= 0:
            return R.AMOUNT_MUST_BE_POSITIVE
        if t["ledger"] == 0:
            return R.LEDGER_INVALID
        dr = self.accounts.get(t["debit_account"])
        if dr is None:
            return R.DEBIT_ACCOUNT_NOT_FOUND
        cr = self.accounts.get(t["credit_account"])
        if cr is None:
            return R.CREDIT_ACCOUNT_NOT_FOUND
        if dr.ledger != cr.ledger or t["ledger"] != dr.ledger:
            return R.LEDGER_MISMATCH
        amount = t["amount"]
        if (dr.debits_posted + dr.debits_pending + amount > INT64_MAX
                or cr.credits_posted + cr.credits_pending + amount > INT64_MAX):
            return R.OVERFLOW
        if dr.available - amount < dr.min_balance:
            return R.INSUFFICIENT_FUNDS
        if cr.ceiling + amount > cr.max_balance:
            return R.EXCEEDS_MAX_BALANCE

        ts = self._take_ts()
        dr = self._save_account(t["debit_account"])
        cr = self._save_account(t["credit_account"])
        if kind == PENDING:
            dr.debits_pending += amount
            cr.credits_pending += amount
            state = TransferState.PENDING
            deadline = ts + t["timeout"] * NS_PER_S if t["timeout"] else None
        else:
            dr.debits_posted += amount
            cr.credits_posted += amount
            state = TransferState.POSTED
            deadline = None
        self._record(t, ts, state, deadline)
        return R.OK

    def _post_or_void(self, t: dict, kind: int) -> int:
        R = TransferResult
        if t["pending_id"] == 0:
            return R.PENDING_ID_REQUIRED
        if t["pending_id"] == ID_INVALID_MAX:
            return R.PENDING_ID_INVALID
        if t["pending_id"] == t["id"]:
            return R.PENDING_ID_MUST_BE_DIFFERENT
        if t["timeout"] != 0:
            return R.TIMEOUT_RESERVED_FOR_PENDING
        if t["id"] in self.transfers_by_id:
            return self._exists(t)
        p = self.transfers_by_id.get(t["pending_id"])
        if p is None:
            return R.PENDING_NOT_FOUND
        if not p.flags & PENDING:
            return R.PENDING_TRANSFER_NOT_PENDING
        if p.state == TransferState.PENDING_POSTED:
            return R.PENDING_ALREADY_POSTED
        if p.state == TransferState.PENDING_VOIDED:
            return R.PENDING_ALREADY_VOIDED
        # The timestamp this row gets if applied (the next one; undone rows give theirs back).
        if p.state == TransferState.PENDING_EXPIRED or (p.deadline is not None and p.deadline <= self._next_ts):
            return R.PENDING_EXPIRED
        assert p.state == TransferState.PENDING
        if t["debit_account"] != 0 and t["debit_account"] != p.debit_account:
            return R.PENDING_DIFFERENT_DEBIT_ACCOUNT
        if t["credit_account"] != 0 and t["credit_account"] != p.credit_account:
            return R.PENDING_DIFFERENT_CREDIT_ACCOUNT
        if t["ledger"] != 0 and t["ledger"] != p.ledger:
            return R.LEDGER_MISMATCH
        if t["amount"] < 0:
            return R.AMOUNT_MUST_BE_POSITIVE
        if kind == POST:
            amount = t["amount"] or p.amount
            if amount > p.amount:
                return R.EXCEEDS_PENDING_AMOUNT
        else:
            if t["amount"] not in (0, p.amount):
                return R.PENDING_DIFFERENT_AMOUNT
            amount = p.amount

        ts = self._take_ts()
        self._release_pending(p)
        p = self._save_transfer(p.id)
        if kind == POST:
            dr = self._save_account(p.debit_account)
            cr = self._save_account(p.credit_account)
            dr.debits_posted += amount
            cr.credits_posted += amount
            p.state = TransferState.PENDING_POSTED
        else:
            p.state = TransferState.PENDING_VOIDED
        self._deadlines.pop(p.id, None)
        resolved = dict(t, debit_account=p.debit_account, credit_account=p.credit_account,
                        ledger=p.ledger, amount=amount)
        self._record(resolved, ts, TransferState.POSTED, None)
        return R.OK

    def _exists(self, t: dict) -> int:
        """Idempotency: compare the row with what was applied under its id."""
        e = self.transfers_by_id[t["id"]]
        row = dict(t)
        if t["flags"] & (POST | VOID):
            # For POST/VOID rows a 0 in debit_account, credit_account, ledger or amount is "as the pending
            # transfer" and matches what was recorded. Reading (the sentence's last clause, literally): a 0 matches
            # whatever was recorded, so retrying a partial POST of 30 with amount 0 answers EXISTS. (For the
            # accounts, the ledger and a VOID's amount, what was recorded is the pending's value anyway.)
            for f in ("debit_account", "credit_account", "ledger", "amount"):
                if row[f] == 0:
                    row[f] = getattr(e, f)
        for f in TRANSFER_COMPARED:
            mine, theirs = row[f], getattr(e, f)
            if f == "flags":
                mine, theirs = _strip_linked(mine), _strip_linked(theirs)
            if mine != theirs:
                return TransferResult.EXISTS_WITH_DIFFERENT_FIELDS
        return TransferResult.EXISTS

    def _record(self, t: dict, ts: int, state: int, deadline: int | None) -> None:
        tr = Transfer(**{f: t[f] for f in TRANSFER_FIELDS}, timestamp=ts, state=state, deadline=deadline)
        self.transfers_by_id[tr.id] = tr
        self._undo.append(("new_transfer", tr.id))
        if deadline is not None:
            self._deadlines[tr.id] = deadline

    # ------------------------------------------------------------------ reads
    def account(self, acc_id: int) -> Account | None:
        return self.accounts.get(acc_id)

    def lookup(self, tr_id: int) -> Transfer | None:
        return self.transfers_by_id.get(tr_id)

    def state(self, tr_id: int) -> int:
        tr = self.transfers_by_id.get(tr_id)
        return TransferState.NOT_FOUND if tr is None else tr.state

    def conservation(self) -> dict[int, tuple[int, int]]:
        """Per ledger: (sum of balances, sum(debits_pending) - sum(credits_pending)); both must be 0."""
        out: dict[int, list[int]] = {}
        for a in self.accounts.values():
            s = out.setdefault(a.ledger, [0, 0])
            s[0] += a.balance
            s[1] += a.debits_pending - a.credits_pending
        return {k: (v[0], v[1]) for k, v in out.items()}


def _strip_linked(flags: int) -> int:
    return int(flags) & ~LINKED


def _plain(row, fields) -> dict:
    """A row as a dict of Python ints (accepts dicts or numpy records)."""
    return {f: int(row[f]) if _has(row, f) else 0 for f in fields}


def _has(row, f) -> bool:
    if isinstance(row, dict):
        return f in row
    names = getattr(getattr(row, "dtype", None), "names", None)
    return names is None or f in names


# ====================================================================== numpy adapter (no rules below)
class ModelLedger:
    """The model behind the public `ledger` API, so rule tests can run against both. No logic of its own."""

    def __init__(self, clock: Callable[[], int]):
        self.model = Model()
        self.clock = clock

    # context manager / lifecycle
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass

    def create_accounts(self, batch):
        import numpy as np

        rows = [{f: int(batch[f][i]) for f in ACCOUNT_FIELDS} for i in range(len(batch))]
        return np.array(self.model.create_accounts(rows, self.clock()), dtype=np.uint8)

    def create_account(self, id, ledger=1, *, min_balance=0, max_balance=INT64_MAX, flags=0, user_data=0):
        row = dict(id=id, ledger=ledger, flags=flags, min_balance=min_balance, max_balance=max_balance,
                   user_data=user_data)
        return AccountResult(self.model.create_accounts([row], self.clock())[0])

    def transfers(self, batch):
        import numpy as np

        n = len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)
        defaults = {"ledger": 1}
        rows = [
            {f: int(batch[f][i]) if f in _names(batch) else defaults.get(f, 0) for f in TRANSFER_FIELDS}
            for i in range(n)
        ]
        return np.array(self.model.transfers(rows, self.clock()), dtype=np.uint8)

    def transfer(self, id, debit_account, credit_account, amount, *, ledger=1, code=0, flags=0, pending_id=0,
                 timeout=0, user_data=0):
        row = dict(id=id, debit_account=debit_account, credit_account=credit_account, amount=amount,
                   ledger=ledger, code=code, flags=flags, pending_id=pending_id, timeout=timeout,
                   user_data=user_data)
        return TransferResult(self.model.transfers([row], self.clock())[0])

    def account(self, acc_id):
        a = self.model.account(acc_id)
        return None if a is None else dataclasses.replace(a)

    def balance(self, acc_id):
        a = self.model.account(acc_id)
        if a is None:
            raise KeyError(acc_id)
        return a.balance

    def available(self, acc_id):
        a = self.model.account(acc_id)
        if a is None:
            raise KeyError(acc_id)
        return a.available

    def accounts(self):
        import numpy as np

        fields = [f.name for f in dataclasses.fields(Account)]
        dtype = [(f, "<u8" if f in ("id", "user_data", "timestamp") else "<i8") for f in fields]
        rows = [tuple(getattr(a, f) for f in fields) for a in sorted(self.model.accounts.values(),
                                                                      key=lambda a: a.id)]
        return np.array(rows, dtype=dtype)

    def lookup_transfers(self, ids):
        import numpy as np

        from ledger.enums import TRANSFER_RECORD_DTYPE

        out = np.zeros(len(ids), dtype=TRANSFER_RECORD_DTYPE)
        for i, tid in enumerate(ids):
            tr = self.model.lookup(int(tid))
            if tr is None:
                continue
            for f in TRANSFER_FIELDS:
                out[f][i] = getattr(tr, f)
            out["timestamp"][i] = tr.timestamp
            out["state"][i] = tr.state
        return out


def _names(batch):
    if isinstance(batch, dict):
        return batch.keys()
    return batch.dtype.names
