"""Make snapshots/v<FORMAT_VERSION>/: a small data directory (journal + one snapshot + a journal tail after it)
with its expected balances in expected.json. Committed once per on-disk format version; every later version
must still open and verify it (tests/test_format_fixtures.py). Run only when introducing a new format version:

    python snapshots/make_fixture.py
"""
from __future__ import annotations

import json
import os
import sys

import ledger
from ledger import _core
from ledger import TransferFlags as F

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    target = os.path.join(HERE, f"v{_core.FORMAT_VERSION}")
    if os.path.exists(target):
        sys.exit(f"{target} exists: fixtures of a released format are never regenerated")
    now = [1_767_225_600_000_000_000]  # 2026-01-01T00:00:00Z, advanced by hand: the content is reproducible

    def clock() -> int:
        now[0] += 1_000_000
        return now[0]

    with ledger.open(target, create=True, segment_records_log2=10, clock=clock) as handle:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN, user_data=42)
        for account in range(100, 110):
            handle.create_account(account, max_balance=1_000_000)
        handle.create_account(200, ledger=2, min_balance=-500)
        handle.create_account(201, ledger=2)
        next_id = iter(range(1_000, 10_000))
        for account in range(100, 110):
            handle.transfer(next(next_id), 1, account, 10_000 * (account - 99))
        handle.transfer(next(next_id), 200, 201, 400, ledger=2, code=7)
        batch = ledger.transfers_batch(4)
        batch["id"] = [next(next_id) for _ in range(4)]
        batch["debit_account"] = [100, 101, 102, 103]
        batch["credit_account"] = [104, 105, 106, 107]
        batch["amount"] = [500, 600, 10**9, 800]  # the third fails: INSUFFICIENT_FUNDS
        batch["flags"] = [F.LINKED, 0, 0, 0]
        handle.transfers(batch)
        held = next(next_id)
        handle.transfer(held, 108, 109, 3_000, flags=F.PENDING, timeout=1)
        voided = next(next_id)
        handle.transfer(voided, 108, 100, 1_000, flags=F.PENDING)
        handle.snapshot()
        handle.transfer(next(next_id), 0, 0, 0, flags=F.VOID_PENDING, pending_id=voided)
        now[0] += 2_000_000_000  # the timed pending expires on the next call
        handle.transfer(next(next_id), 109, 108, 50)
        expected = {
            "format_version": _core.FORMAT_VERSION,
            "journal_position": handle.stats()["journal_position"],
            "accounts": {str(row["id"]): {name: int(row[name]) for name in (
                "ledger", "debits_posted", "credits_posted", "debits_pending", "credits_pending", "min_balance",
                "max_balance", "user_data", "timestamp")} for row in handle.accounts()},
            "transfers": {str(held): int(ledger.TransferState.PENDING_EXPIRED),
                          str(voided): int(ledger.TransferState.PENDING_VOIDED)},
        }
    os.unlink(os.path.join(target, "LOCK"))
    with open(os.path.join(target, "expected.json"), "w") as file:
        json.dump(expected, file, indent=1, sort_keys=True)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
