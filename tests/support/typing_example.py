"""Typical use of the public API, checked by mypy --strict against ledger/__init__.pyi (tests/test_typing.py) and
also run, so the stubs and the code cannot drift apart unnoticed. assert_type fails the type check, not the run."""
from __future__ import annotations

import datetime
import tempfile
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from typing_extensions import assert_type

import ledger


def in_memory() -> None:
    with ledger.open(None) as handle:
        assert_type(handle, ledger.Ledger)
        assert_type(handle.create_account(1, min_balance=ledger.BALANCE_MIN), ledger.AccountResult)
        assert handle.create_account(2, ledger=1, max_balance=ledger.BALANCE_MAX) == ledger.AccountResult.OK
        new_id = ledger.IdGenerator()
        result = handle.transfer(new_id(), 1, 2, 100, code=7, user_data=42)
        assert_type(result, ledger.TransferResult)
        assert result == ledger.TransferResult.OK
        rows = ledger.transfers_batch(2)
        rows["id"] = new_id.batch(2)
        rows["debit_account"], rows["credit_account"], rows["amount"] = 1, 2, [5, 6]
        rows["flags"] = [ledger.TransferFlags.PENDING, ledger.TransferFlags.NONE]
        rows["timeout"] = [60, 0]
        codes = handle.transfers(rows)
        assert_type(codes, npt.NDArray[np.uint8])
        assert not codes.any()
        handle.transfers({"id": [new_id()], "debit_account": [1], "credit_account": [2], "amount": [1]})
        account = handle.account(2)
        assert account is not None
        assert_type(account.balance, int)
        assert_type(handle.balance(2), int)
        assert_type(handle.balance(2, at=datetime.datetime.now(datetime.timezone.utc)), int)
        assert_type(handle.balance(2, at=ledger.At(position=handle.stats()["journal_position"])), int)
        assert_type(handle.available(1), int)
        assert_type(handle.lookup_transfers([1, 2]), npt.NDArray[Any])
        explanation = handle.explain(2)
        assert_type(explanation, ledger.Explanation)
        assert explanation.ok, explanation.to_text()
        report = handle.verify()
        assert_type(report, ledger.VerifyReport)
        assert report.ok, report.problems
        assert_type(report.problems, list[str])
        assert_type(handle.stats(), dict[str, int])
        assert_type(handle.durability, Literal["fsync", "os", "memory", "replicated"])
        assert_type(handle.role, Literal["primary", "standby", "stopped"] | None)
        assert handle.role is None and handle.primary is None and handle.cluster_node is None
        assert ledger.TIMESTAMP_MAX == 2**63 - 1


def on_disk(directory: str) -> None:
    handle = ledger.open(directory, create=True, durability="os", flush_interval_ms=5)
    try:
        handle.create_account(1, min_balance=ledger.BALANCE_MIN)
        handle.create_account(2)
        handle.transfer(10, 1, 2, 3)
        info = handle.snapshot()
        assert_type(info, ledger.SnapshotInfo)
        assert info.position > 0
        job = handle.snapshot(wait=False, keep=2)
        assert_type(job, ledger.SnapshotJob)
        assert_type(job.wait(), ledger.SnapshotInfo)
        assert_type(handle.recovered_from, ledger.SnapshotInfo | None)
        handle.flush()
    finally:
        handle.close()
    try:
        ledger.open(directory, readonly=True).close()
    except ledger.LedgerError as error:
        raise AssertionError(error) from None


def main() -> None:
    in_memory()
    with tempfile.TemporaryDirectory() as directory:
        on_disk(directory + "/data")


if __name__ == "__main__":
    main()
